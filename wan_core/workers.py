"""A pool of local worker processes, one per device, that keeps the models between runs and runs sampling jobs on
every rank in step (torch.multiprocessing, spawn).

A spawned worker imports the core under the very package path its parent knows it by (`<pack>.wan_core` inside
ComfyUI, `wan_core` elsewhere), from the parent's folder, before anything is unpickled (wan_core/worker_boot.py): the
jobs and factories it receives name their classes and functions by that path, so one module identity holds across
processes and no other package called `wan_core` on sys.path is ever picked up.
"""
import contextlib
import os
import pickle
import queue
import runpy
import shutil
import sys
import tempfile
import threading
import time
import traceback
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .parallel import init_distributed, make_mesh
from .pipeline import preview_frame

CORE = __name__.rpartition(".")[0]  # this package's import path: "wan_core", or "<pack>.wan_core" inside ComfyUI
BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_boot.py")


class Cancelled(Exception):
    """Raised on every rank at the same step when the caller cancelled the job."""


def _watch_parent(parent_pid):
    """Exit when the process that started this worker is gone (killed without running its atexit)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _worker(rank, world, init_method, devices, factory, options, inbox, outbox, cancel, parent_pid):
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    device = torch.device(devices[rank])
    if device.type == "cpu":  # CPU workers share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        init_distributed(rank, world, init_method, device)
        mesh = make_mesh(**options)
        models = factory(device)
    except Exception:
        outbox.put(("error", rank, traceback.format_exc()))
        return
    outbox.put(("ready", rank, None))
    flag = torch.zeros(1, device=device)

    def stop_check(step=None, steps=None, _x=None, x0=None):
        """A sampler callback: every rank stops at the same step when cancelled; rank 0 reports the step and the
        middle latent frame of x0 (what a preview shows; the whole latent would be megabytes per step)."""
        flag.fill_(float(cancel.is_set()))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise Cancelled()
        if rank == 0 and x0 is not None:
            outbox.put(("step", rank, (step, steps, preview_frame(x0).float().cpu())))

    while (job := inbox.get()) is not None:
        fn, args = job
        try:
            with torch.no_grad():
                result = fn(models, mesh, device, stop_check, *args)
            outbox.put(("done", rank, result if rank == 0 else None))
        except Cancelled:
            outbox.put(("cancelled", rank, None))
        except Exception:
            outbox.put(("error", rank, traceback.format_exc()))
    dist.destroy_process_group()


def core_packages():
    """[(name, search path)] of this core package and of every package around it (the pack inside ComfyUI, whose
    import name is ComfyUI's own choice), outermost first: what a worker needs to import the core by the same path."""
    parts = CORE.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [(name, list(sys.modules[name].__path__)) for name in names]


def boot_globals(rank, world, init_method, devices, factory, options, inbox, outbox, cancel):
    """What wan_core/worker_boot.py finds in its globals: the core's package path and folders, and _worker's arguments.
    The factory travels as bytes, unpickled only once the core is imported by that path; the queues and the event
    travel as themselves (multiprocessing hands them over while spawning)."""
    return dict(CORE=CORE, PACKAGES=core_packages(), FACTORY=pickle.dumps(factory),
                ARGS=(rank, world, init_method, devices), OPTIONS=options, QUEUES=(inbox, outbox), CANCEL=cancel,
                PARENT=os.getpid())


def run_worker(ARGS, FACTORY, OPTIONS, QUEUES, CANCEL, PARENT, **_):
    """worker_boot.py's call, in the worker, once the core is imported (the arguments are boot_globals')."""
    _worker(*ARGS, pickle.loads(FACTORY), OPTIONS, *QUEUES, CANCEL, PARENT)


@contextlib.contextmanager
def _bare_main():
    """An empty __main__ while workers are spawned: a spawned child re-runs its parent's main module, which in
    ComfyUI is main.py (argument parsing, logging set-up, custom nodes' prestartup scripts, ComfyUI's device
    initialisation: a CUDA context per worker on the first GPU). The workers need nothing from it."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def parse_devices(spec):
    """"cuda:all" | "cuda:0,cuda:1,..." | "cpu:N" (N CPU processes over gloo, for tests) -> device names."""
    spec = str(spec).replace(" ", "")
    if spec == "cuda:all":
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    elif spec.startswith("cpu:") and spec[4:].isdigit():
        devices = ["cpu"] * int(spec[4:])
    else:
        devices = [d for d in spec.split(",") if d]
        for d in devices:
            try:
                torch.device(d)
            except RuntimeError:
                raise ValueError(f"devices {spec!r}: {d!r} is not a device name; use 'cuda:all', "
                                 "'cuda:0,cuda:1' or 'cpu:2'") from None
    if len(devices) < 2:
        raise ValueError(f"devices {spec!r} names {len(devices)} device(s); a parallel run needs at least 2 "
                         "(e.g. 'cuda:all', 'cuda:0,cuda:1' or 'cpu:2')")
    return devices


def check_devices(devices, spec=None):
    """Refuse, before any worker starts, device lists this machine cannot run: CUDA devices it does not have, device
    types other than cuda and cpu (meta, ...), and more CPU processes than it has cores."""
    spec = ",".join(devices) if spec is None else spec
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for d in map(torch.device, devices):
        if d.type not in ("cuda", "cpu"):
            raise ValueError(f"devices {spec!r}: {d.type!r} devices cannot run the workers; use cuda devices, or "
                             "'cpu:2' for CPU processes")
        if d.type == "cuda" and (d.index or 0) >= cuda:
            have = f"{cuda} CUDA device(s) (cuda:0 to cuda:{cuda - 1})" if cuda else "no CUDA device"
            raise ValueError(f"devices {spec!r}: this machine has {have}; name devices it has, 'cuda:all', or "
                             "'cpu:2' for CPU processes")
    cpus = sum(torch.device(d).type == "cpu" for d in devices)
    limit = max(2, os.cpu_count() or 1)
    if cpus > limit:
        raise ValueError(f"devices {spec!r}: {cpus} CPU processes but this machine has {os.cpu_count()} cores; "
                         f"use at most cpu:{limit}")
    return devices


def check_layout(world, cfg_parallel, attention_mode, heads):
    """The refusals make_mesh and Ulysses attention would raise inside the workers, before any worker starts:
    cfg_parallel on an odd device count, attention 'ulysses' where the head count does not divide the devices per
    pass. ValueError naming the input and the fix."""
    cfg = 2 if cfg_parallel else 1
    if world % cfg:
        raise ValueError(f"cfg_parallel needs an even number of devices, got {world}: turn cfg_parallel off or add a "
                         "device")
    if attention_mode == "ulysses" and world // cfg > 1 and heads % (world // cfg):
        raise ValueError(f"attention 'ulysses' needs the model's head count ({heads}) to be a multiple of the devices "
                         f"per pass ({world // cfg}): use attention 'auto' or 'ring', or another device count")


class WorkerPool:
    """One worker process per device (torch.multiprocessing, spawn), each holding `factory(device)`'s models and
    running jobs `fn(models, mesh, device, stop_check, *args)` on every rank in step; rank 0's result comes back
    (and its steps, when a job passes stop_check to a sampler as its callback: `progress(step, steps, x0 frame)`).
    A worker's error or death, the caller's interrupt (raised by `poll`) and `close` end every worker; a pool whose
    `key` matches the next run's is reused (the models stay loaded)."""

    def __init__(self, factory, devices, cfg_parallel=False, attention_mode="auto", poll=None, start_timeout_s=900):
        self.key = (factory, tuple(devices), bool(cfg_parallel), attention_mode)
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="wan-parallel-")
        self._cancel, self._outbox = ctx.Event(), ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in devices]
        options = dict(cfg_parallel=cfg_parallel, attention_mode=attention_mode)
        init = "file://" + os.path.join(self._tmp, "rendezvous")
        self.procs = [ctx.Process(target=runpy.run_path, daemon=True, name=f"wan-parallel-{rank}",
                                  args=(BOOT, boot_globals(rank, len(devices), init, list(devices), factory, options,
                                                           inbox, self._outbox, self._cancel), "__wan_worker__"))
                      for rank, inbox in enumerate(self._inboxes)]
        with _bare_main():  # jobs and factories come from importable modules, never from __main__
            for p in self.procs:
                p.start()
        self._collect(poll, start_timeout_s)  # every worker ready

    @property
    def alive(self):
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def run(self, fn, *args, poll=None, timeout_s=None, progress=None):
        """Run fn on every worker; returns rank 0's result. poll() is called a few times a second in the caller
        (ComfyUI's interrupt check), progress(step, steps, x0 [1, C, 1, H, W]) after each sampler step: whatever
        either raises closes the pool and propagates."""
        if not self.alive:
            raise RuntimeError("the worker pool is closed (a worker ended): start a new one")
        for inbox in self._inboxes:
            inbox.put((fn, args))
        return self._collect(poll, timeout_s, progress)[0]

    def _collect(self, poll, timeout_s, progress=None):
        results, deadline = {}, None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while len(results) < len(self.procs):
                try:
                    status, rank, value = self._outbox.get(timeout=0.2)
                except queue.Empty:
                    dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                    if dead:
                        raise RuntimeError(f"parallel worker {dead[0][0]} ended (exit code {dead[0][1]}); "
                                           "all workers were stopped")
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"parallel workers gave no answer within {timeout_s} s; all were stopped")
                    if poll is not None:
                        poll()
                    continue
                if status == "error":
                    raise RuntimeError(f"parallel worker {rank} failed; all workers were stopped:\n{value}")
                if status == "step":
                    if progress is not None:
                        progress(*value)
                    continue
                results[rank] = value
        except (RuntimeError, TimeoutError):  # a worker failed: the others may wait on it in a collective
            self.close(grace_s=1.0)
            raise
        except BaseException:  # the caller's interrupt: the workers stop at their next step
            self.close()
            raise
        return results

    def close(self, grace_s=10.0):
        """Stop every worker: cancel the running job, ask them to exit, then terminate and kill what remains."""
        if not self.procs:
            return
        self._cancel.set()
        for inbox in self._inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(grace_s if p.is_alive() else 0)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
        for q in self._inboxes + [self._outbox]:
            q.cancel_join_thread()
            q.close()
        self.procs = []
        shutil.rmtree(self._tmp, ignore_errors=True)


