"""Sampling beyond one device on torch.distributed (NCCL on GPUs, gloo on CPUs): sequence parallelism, CFG
parallelism and both combined, plus a pool of local worker processes that keeps the models between runs.

Sequence parallel (Ulysses): each rank of a sequence group holds L/world tokens (L padded up to a multiple of
the world size with inert zero tokens), its slice of the RoPE table and of per-token timesteps. Self-attention
does an all-to-all so each rank holds every token for heads/world heads, attends over the real (unpadded) tokens
and all-to-alls back. Where the head count does not divide the group size (the 1.3B model's 12 heads on 8 ranks,
the smoke models' 2-3 heads) the fallback is *all-gather KV*: every rank gathers all keys and values and attends
its own queries over them (exact; more traffic and K/V memory than ring attention, which is not implemented).
Cross-attention needs no communication (the text context is replicated); the head's output is all-gathered.

CFG parallel: a model call whose batch holds (cond, uncond) is split across a CFG group of 2 ranks and the
outputs all-gathered. World = cfg x sp: ranks [c * sp, (c + 1) * sp) form the sequence group of CFG branch c.

The DiT sees none of this but three hooks: `self_attention` (SelfAttention), `current()` (WanDiT / WanS2V shard
their tokens and gather the head's output when a sequence-parallel context is active) and `inject_audio` (S2V).
"""
import contextlib
import contextvars
import datetime
import os
import threading
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .attention import attention

ATTENTION_MODES = ("auto", "ulysses", "allgather")
_ACTIVE = contextvars.ContextVar("wan_sequence_parallel", default=None)


def current():
    """The active `SequenceParallel` of this call, or None (one process: nothing to shard)."""
    return _ACTIVE.get()


def self_attention(q, k, v):
    """A token sequence attending over itself ([B, L, H, D] -> [B, L, H*D]): plain `attention` in one process,
    the distributed version of the active sequence-parallel context otherwise."""
    sp = _ACTIVE.get()
    return attention(q, k, v) if sp is None else sp.attention(q, k, v)


class SequenceParallel:
    """One rank's view of a sequence-parallel group. `shard` records the real token count of the call."""

    def __init__(self, group, mode="auto"):
        if mode not in ATTENTION_MODES:
            raise ValueError(f"unknown sequence-parallel attention {mode!r}; choose one of {', '.join(ATTENTION_MODES)}")
        self.group, self.mode = group, mode
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.length = self.local = self.start = None

    @contextlib.contextmanager
    def active(self):
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def split(self, t, dim=1):
        """This rank's slice of t along `dim` (zero-padded at the end up to size * local)."""
        pad = self.local * self.size - t.shape[dim]
        if pad:
            t = torch.cat([t, t.new_zeros(*t.shape[:dim], pad, *t.shape[dim + 1:])], dim=dim)
        return t.narrow(dim, self.start, self.local)

    def shard(self, x, rope, *times):
        """x [B, L, dim] -> this rank's tokens; rope (cos, sin) [L, D/2] -> its rows; per-token time embeddings
        ([B, L, ...]) -> their rows, per-sample ones ([B, 1, ...] or per segment) unchanged."""
        length = x.shape[1]
        self.length, self.local = length, -(-length // self.size)
        self.start = self.rank * self.local
        times = [e if e.shape[1] != length else self.split(e) for e in times]
        return (self.split(x), tuple(self.split(r, 0) for r in rope), *times)

    def segments(self, segments):
        """Token counts of consecutive runs (see dit.modulate) within this rank's slice; padding joins the last run."""
        out, begin, stop = [], 0, self.start + self.local
        for n in segments:
            out.append(max(0, min(begin + n, stop) - max(begin, self.start)))
            begin += n
        out[-1] += self.local - sum(out)
        return tuple(out)

    def gather(self, x, length=None):
        """[B, local, C] on every rank -> [B, length (default: the real token count), C] on every rank."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=1)[:, :self.length if length is None else length]

    def attention(self, q, k, v):
        heads = q.shape[2]
        if self.mode == "ulysses" and heads % self.size:
            raise ValueError(f"Ulysses attention needs the head count ({heads}) to divide the sequence-parallel size "
                             f"({self.size}): use attention 'auto' or 'allgather', or another number of devices")
        if self.mode == "allgather" or heads % self.size:
            return self._allgather_kv(q, k, v)
        return self._ulysses(q, k, v)

    def _all_to_all(self, x):
        """[size, ...] chunks: chunk i goes to rank i; returns the chunks received, in rank order."""
        x = x.contiguous()  # before empty_like, which would copy a permuted layout
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        return out

    def _ulysses(self, q, k, v):
        """Scatter heads, gather the sequence, attend over the real tokens, and back."""
        b, n, heads, d = q.shape
        w = self.size

        def to_heads(t):  # [B, local, H, D] -> [B, w * local, H/w, D]
            t = self._all_to_all(t.view(b, n, w, heads // w, d).permute(2, 0, 1, 3, 4))
            return t.permute(1, 0, 2, 3, 4).reshape(b, w * n, heads // w, d)

        q, k, v = (to_heads(t)[:, :self.length] for t in (q, k, v))
        out = attention(q, k, v).unflatten(2, (heads // w, d))
        out = torch.cat([out, out.new_zeros(b, w * n - self.length, heads // w, d)], dim=1)
        out = self._all_to_all(out.view(b, w, n, heads // w, d).transpose(0, 1))
        return out.permute(1, 2, 0, 3, 4).reshape(b, n, heads * d)

    def _allgather_kv(self, q, k, v):
        """Fallback for any head count: gather every rank's keys and values, attend the local queries over them."""
        k, v = (self.gather(t.flatten(2)).unflatten(2, q.shape[2:]) for t in (k, v))
        return attention(q, k, v)


def inject_audio(injector, x, block, n, audio, audio_global):
    """S2V's per-frame audio injection (wan_core.s2v.AudioInjector) on this rank's tokens: the noisy tokens it holds
    are placed in whole frames (zeros elsewhere, the injector is per token) with those frames' audio."""
    sp = _ACTIVE.get()
    if sp is None or injector.block_ids.get(block) is None:
        return injector(x, block, n, audio, audio_global)
    a, b = sp.start, min(sp.start + sp.local, n)
    if a >= b:
        return x
    per_frame = n // audio.shape[1]
    f0, f1 = a // per_frame, -(-b // per_frame)
    lo = a - f0 * per_frame
    frames = x.new_zeros(x.shape[0], (f1 - f0) * per_frame, x.shape[2])
    frames[:, lo:lo + b - a] = x[:, :b - a]
    out = injector(frames, block, frames.shape[1], audio[:, f0:f1], audio_global[:, f0:f1])
    return torch.cat([out[:, lo:lo + b - a], x[:, b - a:]], dim=1)


# ----------------------------------------------------------------------------- process groups and the model wrapper

@dataclass
class Mesh:
    """This rank's place in a cfg x sp layout of the world."""
    cfg_size: int
    cfg_rank: int
    cfg_group: Optional[object]
    sp: Optional[SequenceParallel]


def make_mesh(cfg_parallel=False, attention_mode="auto"):
    """Sub-groups of the initialised default group (every rank must call this, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = 2 if cfg_parallel else 1
    if world % cfg:
        raise ValueError(f"CFG-parallel runs need an even number of processes, got {world}: turn cfg_parallel off "
                         "or add a device")
    sp_size = world // cfg
    groups = {}
    if sp_size > 1:
        for c in range(cfg):
            groups[("sp", c)] = dist.new_group(list(range(c * sp_size, (c + 1) * sp_size)))
    if cfg > 1:
        for s in range(sp_size):
            groups[("cfg", s)] = dist.new_group([c * sp_size + s for c in range(cfg)])
    c, s = divmod(rank, sp_size)
    sp = SequenceParallel(groups[("sp", c)], attention_mode) if sp_size > 1 else None
    return Mesh(cfg, c, groups.get(("cfg", s)), sp)


class ParallelDiT:
    """Calls a WanDiT / WanS2V over a Mesh: the batch split across the CFG group (when it divides), the tokens
    across the sequence group; every rank returns the full output. Same call signature as the model."""

    def __init__(self, model, mesh):
        self.model, self.mesh = model, mesh

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, context, **kwargs):
        mesh, b = self.mesh, x.shape[0]
        if getattr(kwargs.get("cache"), "threshold", 0):
            raise ValueError("the step cache's threshold mode decides per process and would desynchronise a parallel "
                             "run: use its fixed interval, or no cache, with several devices")
        split = mesh.cfg_size > 1 and b % mesh.cfg_size == 0
        if split:
            n = b // mesh.cfg_size
            rows = slice(mesh.cfg_rank * n, (mesh.cfg_rank + 1) * n)

            def pick(v):
                return v[rows] if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v

            x, t, context = pick(x), pick(t), pick(context)
            kwargs = {k: pick(v) for k, v in kwargs.items()}
        with mesh.sp.active() if mesh.sp is not None else contextlib.nullcontext():
            out = self.model(x, t, context, **kwargs)
        if split:
            out = out.contiguous()
            parts = [torch.empty_like(out) for _ in range(mesh.cfg_size)]
            dist.all_gather(parts, out, group=mesh.cfg_group)
            out = torch.cat(parts)
        return out


def backend_for(device):
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(rank, world, init_method, device, timeout_s=600):
    """Join the default process group (gloo for CPU devices, NCCL for CUDA) and select the device."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


# ----------------------------------------------------------------------------- local worker processes

class Cancelled(Exception):
    """Raised on every rank at the same step when the caller cancelled the job."""


@dataclass(frozen=True)
class DiTFiles:
    """A picklable model factory for the workers: {name: checkpoint path} loaded with wan_core.checkpoint in the
    compute dtype on the worker's device. Equal instances mean the same models (the pool's reuse key)."""
    paths: tuple  # ((name, path), ...)
    dtype: str = "bfloat16"
    stamps: tuple = ()  # file sizes and modification times, so a replaced file is reloaded

    @classmethod
    def of(cls, paths, dtype):
        stamps = tuple((os.path.getsize(p), os.path.getmtime(p)) for p in dict(paths).values())
        return cls(tuple(dict(paths).items()), str(dtype).replace("torch.", ""), stamps)

    def __call__(self, device):
        from .checkpoint import load_dit
        from .dit import WanDiT
        from .s2v import WanS2V, is_s2v_state_dict
        models = {}
        for name, path in self.paths:
            ckpt = load_dit(path, getattr(torch, self.dtype))
            if ckpt.quantized:
                raise ValueError(f"{os.path.basename(path)} is {ckpt.quantized}: multi-device sampling needs a "
                                 "bf16/fp16/fp32/fp8 file")
            family = WanS2V if is_s2v_state_dict(ckpt.sd) else WanDiT
            models[name] = family.from_state_dict(ckpt.sd).to(device).eval()
        return models


def _watch_parent(parent_pid):
    """Exit when the process that started this worker is gone (killed without running its atexit)."""
    import time
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _worker(rank, world, init_method, devices, factory, options, inbox, outbox, cancel, parent_pid):
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    device = torch.device(devices[rank])
    try:
        init_distributed(rank, world, init_method, device)
        mesh = make_mesh(**options)
        models = factory(device)
    except Exception:
        outbox.put(("error", rank, traceback.format_exc()))
        return
    outbox.put(("ready", rank, None))
    flag = torch.zeros(1, device=device)

    def stop_check(*_):
        flag.fill_(float(cancel.is_set()))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item():
            raise Cancelled()

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


class WorkerPool:
    """One worker process per device (torch.multiprocessing, spawn), each holding `factory(device)`'s models and
    running jobs `fn(models, mesh, device, stop_check, *args)` on every rank in step; rank 0's result comes back.
    A worker's error or death, the caller's interrupt (raised by `poll`) and `close` end every worker; a pool whose
    `key` matches the next run's is reused (the models stay loaded)."""

    def __init__(self, factory, devices, cfg_parallel=False, attention_mode="auto", poll=None, start_timeout_s=900):
        import tempfile
        self.key = (factory, tuple(devices), bool(cfg_parallel), attention_mode)
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="wan-parallel-")
        self._cancel, self._outbox = ctx.Event(), ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in devices]
        options = dict(cfg_parallel=cfg_parallel, attention_mode=attention_mode)
        init = "file://" + os.path.join(self._tmp, "rendezvous")
        self.procs = [ctx.Process(target=_worker, daemon=True, name=f"wan-parallel-{rank}",
                                  args=(rank, len(devices), init, list(devices), factory, options, inbox,
                                        self._outbox, self._cancel, os.getpid()))
                      for rank, inbox in enumerate(self._inboxes)]
        for p in self.procs:
            p.start()
        self._collect("ready", poll, start_timeout_s)

    @property
    def alive(self):
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def run(self, fn, *args, poll=None, timeout_s=None):
        """Run fn on every worker; returns rank 0's result. poll() is called a few times a second in the caller
        (ComfyUI's interrupt check): whatever it raises closes the pool and propagates."""
        if not self.alive:
            raise RuntimeError("the worker pool is closed (a worker ended): start a new one")
        for inbox in self._inboxes:
            inbox.put((fn, args))
        return self._collect("done", poll, timeout_s)[0]

    def _collect(self, kind, poll, timeout_s):
        import queue
        import time
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
        import shutil
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


def _on_device(cond, device):
    from dataclasses import fields, replace
    return replace(cond, **{f.name: getattr(cond, f.name).to(device) for f in fields(cond)
                            if torch.is_tensor(getattr(cond, f.name))})


def sample_job(models, mesh, device, stop_check, spec):
    """A WorkerPool job: wan_core.pipeline.generate on every rank with the models behind ParallelDiT.
    spec: experts [(model name, cfg, min_t)], cond, uncond (pipeline.Cond), and generate's keywords
    (seed, steps, shift, sampler, width, height, length, dtype; channels default: the model's). Returns the latent on the CPU."""
    from .pipeline import Expert, generate
    spec = dict(spec)
    spec.setdefault("channels", models[spec["experts"][0][0]].out_dim)
    experts = [Expert(lambda m=models[name]: ParallelDiT(m, mesh), cfg, min_t) for name, cfg, min_t in spec.pop("experts")]
    cond, uncond = _on_device(spec.pop("cond"), device), _on_device(spec.pop("uncond"), device)
    return generate(experts, cond, uncond, device=device, callback=stop_check, **spec).cpu()
