"""The one attention entry point of the core. Tensors are [B, L, heads, head_dim].

Backends: "sdpa" (torch scaled_dot_product_attention, always there), "flash" (the flash-attn package:
FA3's `flash_attn_interface` on Hopper when installed, else FA2's `flash_attn`), "sage" (the
sageattention package: INT8 QK / FP8 PV kernels, lossy, about 1e-2 relative). "auto" (the default)
takes flash when it is importable and supports the call (CUDA, fp16/bf16, head_dim <= 256), else sdpa;
sage is only used when chosen by name. A named kernel that cannot run a call (CPU tensors, fp32)
falls back to sdpa for that call.

Choosing: `attention(..., backend=name)` for one call; `use_backend(name)` for everything inside a `with` block in
this thread (a model's forward enters its own `attention_backend` this way, so two models with different backends
never interfere); `set_backend(name)` for the process default (what a None override leaves in force).
The override lives in a threading.local, not a ContextVar: torch.compile traces a threading.local read (guarding
on its value) but breaks the graph at every ContextVar.get.
"""
import contextlib
import importlib
import math
import threading
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash", "sage")
_PACKAGES = {"flash": ("flash_attn_interface", "flash_attn"), "sage": ("sageattention",)}
_INSTALL = {"flash": "pip install flash-attn", "sage": "pip install sageattention"}
_modules = {}
_state = {"backend": "auto"}
_override = threading.local()  # .backend: the innermost use_backend's name in this thread (absent or None: none)


def _module(name):
    """The kernel package of a backend, imported once (None when none of its packages imports)."""
    if name not in _modules:
        _modules[name] = None
        for package in _PACKAGES[name]:
            try:
                _modules[name] = importlib.import_module(package)
                break
            except Exception:  # ImportError, or a broken CUDA build raising at import
                continue
    return _modules[name]


def _half_cuda(q, max_dim=256):
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= max_dim


def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _flash(q, k, v):
    out = _module("flash").flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # some FA3 builds return (out, lse)


def _sage(q, k, v):
    return _module("sage").sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _ampere(q):  # get_device_properties: torch.compile folds it to a constant (get_device_capability breaks)
    return torch.cuda.get_device_properties(q.device).major >= 8


def _flash_ok(q):
    return _half_cuda(q) and _ampere(q)


def _sage_ok(q):
    return _half_cuda(q, max_dim=128) and _ampere(q)


_KERNELS = {"sdpa": (_sdpa, lambda q: True), "flash": (_flash, _flash_ok), "sage": (_sage, _sage_ok)}


def available_backends():
    """Names whose kernels import here ("auto" and "sdpa" always)."""
    return ["auto", "sdpa"] + [n for n in _PACKAGES if _module(n) is not None]


def check_backend(name):
    """`name` if it is a backend whose kernel imports here, else a ValueError naming it and the fix."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in _PACKAGES and _module(name) is None:
        raise ValueError(f"attention backend {name!r} is not installed here ({_INSTALL[name]}); "
                         f"available: {', '.join(available_backends())}")
    return name


def set_backend(name):
    """Choose the process-wide default backend; returns the previous one (to restore it)."""
    previous, _state["backend"] = _state["backend"], check_backend(name)
    return previous


def get_backend():
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name):
    """Inside the block (this thread only), calls without an explicit backend use `name`; None: the process default."""
    previous = getattr(_override, "backend", None)
    _override.backend = None if name is None else check_backend(name)
    _module("flash")  # imported here, outside compiled code (auto asks for it; tracing an import breaks the graph)
    try:
        yield
    finally:
        _override.backend = previous


def resolve(q, backend=None):
    """The backend that will run a call on q: the named one (else the use_backend override, else the process
    default) if it supports q, else sdpa."""
    name = check_backend(backend) if backend is not None else getattr(_override, "backend", None) or _state["backend"]
    if name == "auto":
        return "flash" if _module("flash") is not None and _flash_ok(q) else "sdpa"
    if not _KERNELS[name][1](q):
        warnings.warn(f"attention backend {name!r} cannot run {q.dtype} on {q.device.type}; using sdpa", stacklevel=3)
        return "sdpa"
    return name


def attention(q, k, v, backend=None, last_count=1):
    """Scaled dot-product attention over [B, L, H, D] inputs; returns [B, Lq, H*D].
    last_count n > 1: the last key/value pair stands for n identical ones (the same result as repeating it n times)."""
    if last_count > 1:
        return _repeated_last(q, k, v, backend, last_count)
    return _KERNELS[resolve(q, backend)][0](q, k, v).flatten(2)


def _repeated_last(q, k, v, backend, count):
    """n identical keys with identical values weigh as one whose score is raised by log(n). For SDPA in fp32 that bias
    goes in as its mask (more exact than n terms: the sum has fewer roundings); in half precision the mask itself
    would be rounded (bf16: up to 1.6% of those keys' weight) and the other kernels take no mask, so the pair is
    repeated instead."""
    name = resolve(q, backend)
    if name != "sdpa" or q.dtype != torch.float32:
        k, v = (torch.cat([t, t[:, -1:].expand(-1, count - 1, -1, -1)], dim=1) for t in (k, v))
        return _KERNELS[name][0](q, k, v).flatten(2)
    bias = torch.zeros(k.shape[1], device=q.device, dtype=q.dtype)
    bias[-1] = math.log(count)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias.view(1, 1, 1, -1))
    return out.transpose(1, 2).flatten(2)


class ProjectedAttention(torch.nn.Module):
    """Self-attention with separate biased q/k/v/out projections under the HF names (q_proj, k_proj, v_proj,
    out_proj): the CLIP vision tower and wav2vec2 use it. x [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim, heads, ops):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (ops.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v))
