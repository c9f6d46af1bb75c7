"""The hooks the models call for sequence parallelism, and nothing else: no model, no process group is imported here.

A sequence-parallel runtime (wan_core.sp_attention.SequenceParallel, driven by wan_core.parallel) makes itself the
active context of the thread; the models then ask `current()` whether to shard their tokens, route self-attention
through `self_attention` and S2V's audio injection through `inject_audio`. With no active context (one process)
every hook is the plain single-device computation.
"""
import contextlib
import threading

import torch

from .attention import attention

# the active sequence-parallel context of this thread (a threading.local, not a ContextVar: torch.compile traces its
# read)
_ACTIVE = threading.local()


def current():
    """The active sequence-parallel context of this call (wan_core.sp_attention.SequenceParallel), or None."""
    return getattr(_ACTIVE, "sp", None)


@contextlib.contextmanager
def activate(sp):
    """Make `sp` the active context of this thread for the duration (nested contexts restore the outer one)."""
    outer, _ACTIVE.sp = getattr(_ACTIVE, "sp", None), sp
    try:
        yield sp
    finally:
        _ACTIVE.sp = outer


def self_attention(q, k, v):
    """A token sequence attending over itself ([B, L, H, D] -> [B, L, H*D]): plain `attention` in one process,
    the distributed version of the active sequence-parallel context otherwise."""
    sp = current()
    return attention(q, k, v) if sp is None else sp.attention(q, k, v)


def inject_audio(injector, x, block, n, audio, audio_global):
    """S2V's per-frame audio injection (wan_core.s2v.AudioInjector) on this rank's tokens: the noisy tokens it holds
    are placed in whole frames (zeros elsewhere, the injector is per token) with those frames' audio."""
    sp = current()
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
