"""Sequence-parallel attention over a torch.distributed group (NCCL on GPUs, gloo on CPUs).

Each rank of a sequence group holds L/world tokens (L padded up to a multiple of the world size with inert zero
tokens), its slice of the RoPE table and of per-token timesteps. Self-attention is one of:
- Ulysses: an all-to-all so each rank holds every token for heads/world heads, attention over the real
  (unpadded) tokens, an all-to-all back. Needs the head count to divide the group size.
- ring: each rank keeps its queries while the key/value blocks travel around the ring of ranks (P2P, the next
  block's transfer overlapping this block's attention); per-block results merge by their log-sum-exp in fp32,
  padding keys are left out. Any head count (the 1.3B model's 12 heads on 8 ranks, the smoke models' 2-3);
  memory per step: one K/V block in use and one in flight.
Mode "auto" takes Ulysses where the heads divide, else ring. Cross-attention needs no communication (the text
context is replicated); the head's output is all-gathered. The models reach this only through wan_core.sp_hooks.
"""
import collections
import warnings

import torch
import torch.distributed as dist

from .attention import attention
from .sp_hooks import activate

ATTENTION_MODES = ("auto", "ulysses", "ring")


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

    def active(self):
        """A context in which the models' hooks (wan_core.sp_hooks) run on this group."""
        return activate(self)

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
