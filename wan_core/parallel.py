"""Sampling beyond one device on torch.distributed (NCCL on GPUs, gloo on CPUs): sequence parallelism, CFG
parallelism and both combined (the distributed runtime, above the models and the pipelines).

Sequence parallel: wan_core.sp_attention (Ulysses / ring attention), reached by the models through the hooks of
wan_core.sp_hooks. CFG parallel: a model call whose batch holds (cond, uncond) is split across a CFG group of 2 ranks
and the outputs all-gathered. World = cfg x sp: ranks [c * sp, (c + 1) * sp) form the sequence group of CFG
branch c. The models are rebuilt in worker processes by wan_core.model_source; wan_core.workers runs the local pool.
"""
import contextlib
import datetime
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.distributed as dist

from .pipeline import Expert, generate
from .sp_attention import ATTENTION_MODES, SequenceParallel

__all__ = ["ATTENTION_MODES", "Mesh", "ParallelDiT", "init_distributed", "make_mesh", "sample_job"]


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


def _on_device(cond, device):
    return replace(cond, **{f.name: getattr(cond, f.name).to(device) for f in fields(cond)
                            if torch.is_tensor(getattr(cond, f.name))})


def sample_job(models, mesh, device, stop_check, spec):
    """A WorkerPool job: wan_core.pipeline.generate on every rank with the models behind ParallelDiT.
    spec: experts [(model name, cfg, min_t)], cond, uncond (pipeline.Cond), and generate's keywords
    (seed, steps, shift, sampler, width, height, length, dtype; channels default: the model's). Returns the latent on the CPU."""
    spec = dict(spec)
    spec.setdefault("channels", models[spec["experts"][0][0]].out_dim)
    experts = [Expert(lambda m=models[name]: ParallelDiT(m, mesh), cfg, min_t) for name, cfg, min_t in spec.pop("experts")]
    cond, uncond = _on_device(spec.pop("cond"), device), _on_device(spec.pop("uncond"), device)
    return generate(experts, cond, uncond, device=device, callback=stop_check, **spec).cpu()
