"""Sampling beyond one device on torch.distributed (NCCL on GPUs, gloo on CPUs): sequence parallelism, CFG
parallelism and both combined, plus a pool of local worker processes that keeps the models between runs.

Sequence parallel: each rank of a sequence group holds L/world tokens (L padded up to a multiple of the world
size with inert zero tokens), its slice of the RoPE table and of per-token timesteps. Self-attention is one of:
- Ulysses: an all-to-all so each rank holds every token for heads/world heads, attention over the real
  (unpadded) tokens, an all-to-all back. Needs the head count to divide the group size.
- ring: each rank keeps its queries while the key/value blocks travel around the ring of ranks (P2P, the next
  block's transfer overlapping this block's attention); per-block results merge by their log-sum-exp in fp32,
  padding keys are left out. Any head count (the 1.3B model's 12 heads on 8 ranks, the smoke models' 2-3);
  memory per step: one K/V block in use and one in flight.
Mode "auto" takes Ulysses where the heads divide, else ring. Cross-attention needs no communication (the text
context is replicated); the head's output is all-gathered.

CFG parallel: a model call whose batch holds (cond, uncond) is split across a CFG group of 2 ranks and the
outputs all-gathered. World = cfg x sp: ranks [c * sp, (c + 1) * sp) form the sequence group of CFG branch c.

The DiT sees none of this but three hooks: `self_attention` (SelfAttention), `current()` (WanDiT / WanS2V shard
their tokens and gather the head's output when a sequence-parallel context is active) and `inject_audio` (S2V).
"""
import collections
import contextlib
import datetime
import os
import sys
import threading
import traceback
import types
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .attention import attention
from .pipeline import preview_frame

ATTENTION_MODES = ("auto", "ulysses", "ring")
# the active SequenceParallel of this thread (a threading.local, not a ContextVar: torch.compile traces its read)
_ACTIVE = threading.local()


def current():
    """The active `SequenceParallel` of this call, or None (one process: nothing to shard)."""
    return getattr(_ACTIVE, "sp", None)


def self_attention(q, k, v):
    """A token sequence attending over itself ([B, L, H, D] -> [B, L, H*D]): plain `attention` in one process,
    the distributed version of the active sequence-parallel context otherwise."""
    sp = getattr(_ACTIVE, "sp", None)
    return attention(q, k, v) if sp is None else sp.attention(q, k, v)


class SequenceParallel:
    """One rank's view of a sequence-parallel group. `shard` records the real token count of the call."""

    def __init__(self, group, mode="auto"):
        if mode not in ATTENTION_MODES:
            raise ValueError(f"unknown sequence-parallel attention {mode!r}; choose one of {', '.join(ATTENTION_MODES)}")
        self.group, self.mode = group, mode
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        ring = [dist.get_global_rank(group, r) for r in range(self.size)]  # P2P peers are global ranks
        self.next, self.prev = ring[(self.rank + 1) % self.size], ring[(self.rank - 1) % self.size]
        self.length = self.local = self.start = None
        self.calls = collections.Counter()  # self-attention calls per method ("ulysses" / "ring")

    @contextlib.contextmanager
    def active(self):
        outer, _ACTIVE.sp = getattr(_ACTIVE, "sp", None), self
        try:
            yield self
        finally:
            _ACTIVE.sp = outer

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
                             f"({self.size}): use attention 'auto' or 'ring', or another number of devices")
        method = "ring" if self.mode == "ring" or heads % self.size else "ulysses"
        self.calls[method] += 1
        return self._ring(q, k, v) if method == "ring" else self._ulysses(q, k, v)

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

    def _ring(self, q, k, v):
        """Ring attention: the local queries attend each rank's key/value block in turn (this rank's first, then
        the block of rank - 1, - 2, ...), each received while the previous one is attended; the partial results
        merge by log-sum-exp in fp32. Keys past the real token count (the padding) are left out."""
        queries = q.transpose(1, 2)  # [B, H, local, D]
        block = torch.stack([k, v]).transpose(2, 3).contiguous()  # [2, B, H, local, D]: one message per step
        spare = torch.empty_like(block)
        out = lse = None
        for step in range(self.size):
            pending = self._pass_on(block, spare) if step < self.size - 1 else []
            owner = (self.rank - step) % self.size
            real = min(self.local, self.length - owner * self.local)
            if real > 0:
                part = block_attention(queries, block[0, :, :, :real], block[1, :, :, :real])
                out, lse = merge_attention(out, lse, *part)
            for request in pending:
                request.wait()
            block, spare = spare, block
        return out.to(q.dtype).transpose(1, 2).flatten(2)

    def _pass_on(self, block, into):
        """Start sending `block` to the next rank and receiving the previous rank's into `into`."""
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, block, self.next, self.group),
                                       dist.P2POp(dist.irecv, into, self.prev, self.group)])


def _lse_math(q, k, v):
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v.float(), lse


def _lse_kernel(q):
    """PyTorch's fused attention kernel that also returns the log-sum-exp for q's device and dtype (or None)."""
    aten = torch.ops.aten
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    if q.is_cuda:
        return lambda q, k, v: aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    return None


_KERNEL_FAILED = set()


def block_attention(q, k, v):
    """Attention of q over one block of keys, [B, H, L, D] each -> (out [B, H, Lq, D], log-sum-exp of the scaled
    scores, fp32 [B, H, Lq]). A fused kernel where PyTorch has one with the log-sum-exp (flash / memory-efficient
    on CUDA, flash on the CPU), else q @ k^T in fp32 (memory: one block of scores)."""
    kernel = _lse_kernel(q)
    key = (q.device.type, q.dtype)
    if kernel is not None and key not in _KERNEL_FAILED:
        try:
            out, lse = kernel(q, k, v)
            return out, lse[..., :q.shape[2]].float()  # the memory-efficient kernel pads the lse to 32 rows
        except (RuntimeError, NotImplementedError) as e:
            _KERNEL_FAILED.add(key)
            warnings.warn(f"ring attention: no fused kernel for {q.dtype} on {q.device.type} ({e}); using fp32 math",
                          stacklevel=2)
    return _lse_math(q, k, v)


def merge_attention(out, lse, block_out, block_lse):
    """Attention over the keys seen so far (out fp32, lse; None at first) and over one more block -> over both."""
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    both = torch.logaddexp(lse, block_lse)
    return (out * torch.exp(lse - both).unsqueeze(-1) + block_out * torch.exp(block_lse - both).unsqueeze(-1)), both


def inject_audio(injector, x, block, n, audio, audio_global):
    """S2V's per-frame audio injection (wan_core.s2v.AudioInjector) on this rank's tokens: the noisy tokens it holds
    are placed in whole frames (zeros elsewhere, the injector is per token) with those frames' audio."""
    sp = getattr(_ACTIVE, "sp", None)
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


def _dtype_name(dtype):
    return None if dtype is None else str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class ModelSource:
    """One diffusion model as a worker rebuilds it: the checkpoint, the dtype the loader stored its weights in
    (None: the file's own; a torch dtype name such as "float8_e4m3fn"), LoRAs merged in order ((path, strength),
    ...), every file's size and modification time, so that a replaced file makes another source, and the model's
    attention backend (wan_core.attention; None: the process default)."""
    path: str
    weight_dtype: Optional[str] = None
    loras: tuple = ()
    stamps: tuple = ()
    attention: Optional[str] = None

    @classmethod
    def of(cls, path, weight_dtype=None, loras=(), attention=None):
        loras = tuple((p, float(s)) for p, s in loras)
        stamps = tuple((os.path.getsize(f), os.path.getmtime(f)) for f in (path, *(p for p, _ in loras)))
        return cls(path, _dtype_name(weight_dtype), loras, stamps, attention)

    def state_dict(self, dtype):
        """Official-key weights as a worker stores them (wan_core.castops.storage_dtypes): the file loaded as the
        loader loads it, the LoRAs merged in that storage dtype (as ComfyUI patches a model's weights); fp8 sources
        kept as stored (scaled fp8 with its `scale_weight` scalars, as ComfyUI's scaled-fp8 ops keep them), others
        cast to the compute `dtype`."""
        from .castops import merge_lora_stored, storage_dtypes
        from .checkpoint import load_dit, read_file
        from .lora import match_lora
        ckpt = load_dit(self.path, self.weight_dtype and getattr(torch, self.weight_dtype))
        if ckpt.quantized:
            raise ValueError(f"{os.path.basename(self.path)} is GGUF ({ckpt.quantized}): multi-device sampling needs "
                             "a bf16/fp16/fp32/fp8 file of the model (or use Wan Sampler on one device)")
        sd = {k: v for k, v in ckpt.sd.items() if not k.endswith(".scale_input")}  # used only by fp8 matmuls
        for path, strength in self.loras:
            match = match_lora(read_file(path), sd).check(f"'{os.path.basename(path)}'")
            sd = merge_lora_stored(sd, match.patches, strength)
        return storage_dtypes(sd, dtype)


@dataclass(frozen=True)
class DiTFiles:
    """A picklable model factory for the workers: {name: ModelSource} built on the worker's device, weights stored
    as ModelSource.state_dict stores them (fp8 stays fp8) and cast to each input's dtype at use (wan_core.castops).
    Equal instances mean the same models (the pool's reuse key)."""
    models: tuple  # ((name, ModelSource), ...)
    dtype: str = "bfloat16"

    @classmethod
    def of(cls, sources, dtype):
        """sources: {name: ModelSource, or a checkpoint path (file dtypes, no LoRA)}."""
        return cls(tuple((name, s if isinstance(s, ModelSource) else ModelSource.of(s))
                         for name, s in dict(sources).items()), _dtype_name(dtype))

    def __call__(self, device):
        from .castops import casting_ops
        from .dit import WanDiT
        from .s2v import WanS2V, is_s2v_state_dict
        models = {}
        for name, source in self.models:
            sd = source.state_dict(getattr(torch, self.dtype))
            family = WanS2V if is_s2v_state_dict(sd) else WanDiT
            ops = casting_ops(scaled=any(k.endswith(".scale_weight") for k in sd))  # weights cast at use
            models[name] = family.from_state_dict(sd, ops=ops).to(device).eval()
            models[name].attention_backend = source.attention
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
