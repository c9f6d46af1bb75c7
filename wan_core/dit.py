"""The Wan diffusion transformer (Wan 2.1 T2V 1.3B / 14B; one class sized from the checkpoint).

Numerics follow the official wan/modules/model.py: fp32 sinusoid time embedding ([cos, sin]),
fp32 modulation and non-affine LayerNorms, RMSNorm over the full width before the head split,
3-axis RoPE (frame/height/width) with adjacent-pair rotation, text context zero-padded to 512.
State-dict keys are the official ones (`blocks.N.self_attn.q.weight`, `head.modulation`, ...).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention

HEAD_DIM = 128  # every official Wan model uses 128-wide heads


class RMSNorm(nn.Module):
    """x / rms(x) * weight, statistics in fp32 (WanRMSNorm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight.to(x)


def layer_norm_f32(x, eps=1e-6):
    """Non-affine LayerNorm computed in fp32 (WanLayerNorm without weights)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def sinusoid(t, dim):
    """[cos, sin] embedding of raw timesteps t (any shape) -> t.shape + (dim,), fp32 (computed in fp64)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def rope_axes(head_dim):
    """Rotary pairs per axis (frame, height, width): 22/21/21 for 128-wide heads."""
    pairs = head_dim // 2
    hw = head_dim // 6
    return (pairs - 2 * hw, hw, hw)


def rope_table(grid, head_dim, device, theta=10000.0):
    """cos/sin tables [L, head_dim/2] for a (frames, height, width) token grid, positions from 0."""
    angles = []
    for axis, (size, n) in enumerate(zip(grid, rope_axes(head_dim))):
        inv = 1.0 / theta ** (torch.arange(n, dtype=torch.float64, device=device) * 2 / (2 * n))
        a = torch.arange(size, dtype=torch.float64, device=device)[:, None] * inv
        shape = [1, 1, 1, n]
        shape[axis] = size
        angles.append(a.view(shape).expand(*grid, n))
    angles = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x, rope):
    """Rotate adjacent pairs of x [B, L, H, D] by the table (cos, sin) [L, D/2]; math in fp32."""
    cos, sin = (r[None, :, None, :] for r in rope)
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, eps, ops):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (ops.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, rope):
        split = lambda t: t.unflatten(-1, (self.heads, -1))  # noqa: E731
        q = apply_rope(split(self.norm_q(self.q(x))), rope)
        k = apply_rope(split(self.norm_k(self.k(x))), rope)
        return self.o(attention(q, k, split(self.v(x))))


class CrossAttention(nn.Module):
    """Text cross-attention (q from video tokens, k/v from the embedded text context)."""

    def __init__(self, dim, heads, eps, ops):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (ops.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, context):
        split = lambda t: t.unflatten(-1, (self.heads, -1))  # noqa: E731
        q = split(self.norm_q(self.q(x)))
        k = split(self.norm_k(self.k(context)))
        return self.o(attention(q, k, split(self.v(context))))


class Block(nn.Module):
    def __init__(self, dim, ffn_dim, heads, eps, ops):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, heads, eps, ops)
        self.norm3 = ops.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, heads, eps, ops)
        self.ffn = nn.Sequential(ops.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), ops.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x, e, rope, context):
        """x [B, L, dim] fp32 residual stream (as the official code keeps it); e [B, Lt, 6, dim] fp32
        (Lt = 1, or L for per-token timesteps); context [B, 512, dim] in the compute dtype."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float()[:, None] + e).unbind(2)
        dt = context.dtype
        h = layer_norm_f32(x, self.eps) * (1 + scale1) + shift1
        x = x + self.self_attn(h.to(dt), rope).float() * gate1
        x = x + self.cross_attn(self.norm3(x).to(dt), context).float()
        h = layer_norm_f32(x, self.eps) * (1 + scale2) + shift2
        return x + self.ffn(h.to(dt)).float() * gate2


class Head(nn.Module):
    def __init__(self, dim, out_features, eps, ops):
        super().__init__()
        self.eps = eps
        self.head = ops.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e, dtype):
        """x [B, L, dim] fp32; e [B, Lt, dim] fp32 time embedding; the projection runs in `dtype`."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        return self.head((layer_norm_f32(x, self.eps) * (1 + scale) + shift).to(dtype))


class WanDiT(nn.Module):
    """Wan DiT, text-to-video. forward(x [B,C,F,H,W], t [B] or [B, L], context [B, <=512, text_dim]) -> velocity."""

    def __init__(self, dim=1536, ffn_dim=8960, num_layers=30, in_dim=16, out_dim=16, text_dim=4096,
                 freq_dim=256, patch_size=(1, 2, 2), text_len=512, eps=1e-6, ops=None):
        super().__init__()
        ops = ops or nn
        self.dim, self.in_dim, self.out_dim = dim, in_dim, out_dim
        self.freq_dim, self.patch_size, self.text_len = freq_dim, tuple(patch_size), text_len
        self.heads = dim // HEAD_DIM
        self.patch_embedding = ops.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(ops.Linear(text_dim, dim), nn.GELU(approximate="tanh"), ops.Linear(dim, dim))
        self.time_embedding = nn.Sequential(ops.Linear(freq_dim, dim), nn.SiLU(), ops.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(dim, ffn_dim, self.heads, eps, ops) for _ in range(num_layers))
        self.head = Head(dim, out_dim * math.prod(patch_size), eps, ops)
        self._rope_cache = {}

    def rope(self, grid, device):
        """RoPE tables for a token grid, built once per grid size and device (not per step)."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_table(grid, HEAD_DIM, device)}
        return self._rope_cache[key]

    def embed_text(self, context):
        """Zero-pad the text features to text_len slots (as the official code does), then project."""
        pad = self.text_len - context.shape[1]
        if pad > 0:
            context = F.pad(context, (0, 0, 0, pad))
        return self.text_embedding(context)

    def embed_time(self, t):
        """t [B] or [B, Lt] raw timesteps (0..1000) -> e [B, Lt, dim], e0 [B, Lt, 6, dim], both fp32."""
        t = t.reshape(t.shape[0], -1)
        e = self.time_embedding(sinusoid(t, self.freq_dim))
        return e, self.time_projection(e).unflatten(-1, (6, self.dim))

    def forward(self, x, t, context):
        dtype = x.dtype
        x = self.patch_embedding(x)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2).float()
        e, e0 = self.embed_time(t)
        context = self.embed_text(context.to(dtype))
        rope = self.rope(grid, x.device)
        for block in self.blocks:
            x = block(x, e0, rope, context)
        return self.unpatchify(self.head(x, e, dtype), grid)

    def unpatchify(self, x, grid):
        """[B, f*h*w, pt*ph*pw*C] -> [B, C, f*pt, h*ph, w*pw]."""
        (f, h, w), (pt, ph, pw) = grid, self.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.out_dim, f * pt, h * ph, w * pw)

    @staticmethod
    def config_from_state_dict(sd):
        """Sizes read from tensor shapes (never file names)."""
        pe = sd["patch_embedding.weight"]
        patch = tuple(pe.shape[2:])
        return dict(dim=pe.shape[0], in_dim=pe.shape[1], patch_size=patch,
                    ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
                    num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                    out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
                    text_dim=sd["text_embedding.0.weight"].shape[1],
                    freq_dim=sd["time_embedding.0.weight"].shape[1])

    @classmethod
    def from_state_dict(cls, sd, ops=None, dtype=None):
        """Build on the meta device and adopt the tensors of `sd` (no second copy); dtype converts them."""
        if "img_emb.proj.0.weight" in sd:
            raise ValueError("this is an image-to-video Wan model (it has img_emb.* weights); "
                             "this version of the pack runs text-to-video models only")
        with torch.device("meta"):
            model = cls(**cls.config_from_state_dict(sd), ops=ops)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"Wan diffusion model weights do not fit: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); the file is incomplete or another variant")
        return model
