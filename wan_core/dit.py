"""The Wan diffusion transformer (Wan 2.1 T2V 1.3B / 14B; one class sized from the checkpoint).

Numerics follow the official wan/modules/model.py: fp32 sinusoid time embedding ([cos, sin]),
fp32 modulation and non-affine LayerNorms, RMSNorm over the full width before the head split,
3-axis RoPE (frame/height/width) with adjacent-pair rotation, text context zero-padded to 512 (the padding slots
embedded once and counted per slot: `WanDiT.embed_text`).
State-dict keys are the official ones (`blocks.N.self_attn.q.weight`, `head.modulation`, ...).
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import sp_hooks
from .attention import attention, use_backend
from .cache import block0_signal
from .checks import check_weights
from .keys import build_on_meta

HEAD_DIM = 128  # every official Wan model uses 128-wide heads
TEXT_ROWS = 64  # embedded text rows are kept in multiples of this (one compiled block shape per multiple)


class Text(NamedTuple):
    """Embedded text: tokens [B, n, dim]; pads > 1: the last token stands for that many identical padding slots."""
    tokens: torch.Tensor
    pads: int = 0


def text_parts(context):
    """(tokens, pads) of a Text, or of a plain context tensor (no pads)."""
    return tuple(context) if isinstance(context, Text) else (context, 0)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, statistics in fp32 (WanRMSNorm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(self.eps))
        return y.type_as(x).mul_(self.weight.to(x))


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


def rope_positions(positions, head_dim, device, theta=10000.0):
    """cos/sin tables [L, head_dim/2] for the token grid spanned by per-axis positions (frame, height, width),
    row-major; positions may be negative (S2V motion tokens) or sparse (S2V compressed motion buckets)."""
    positions = [torch.as_tensor(p, dtype=torch.float64, device=device).reshape(-1) for p in positions]
    sizes = [len(p) for p in positions]
    angles = []
    for axis, (pos, n) in enumerate(zip(positions, rope_axes(head_dim))):
        inv = 1.0 / theta ** (torch.arange(n, dtype=torch.float64, device=device) * 2 / (2 * n))
        a = pos[:, None] * inv
        shape = [1, 1, 1, n]
        shape[axis] = len(pos)
        angles.append(a.view(shape).expand(*sizes, n))
    angles = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def rope_table(grid, head_dim, device, theta=10000.0):
    """cos/sin tables [L, head_dim/2] for a (frames, height, width) token grid, positions from 0."""
    return rope_positions([torch.arange(size, dtype=torch.float64) for size in grid], head_dim, device, theta)


def modulate(h, scale, shift=None, segments=None):
    """h * scale (+ shift) in fp32; scale/shift [B, Lt, dim] with Lt = 1 (all tokens) or L (per token). With
    `segments` (token counts of consecutive runs, Lt = len(segments)) row i applies to run i only: S2V's noisy
    tokens at t and its reference/motion tokens at t = 0, without a per-token copy of the modulation."""
    if segments is not None:
        parts = h.split(list(segments), dim=1)
        return torch.cat([modulate(p, scale[:, i:i + 1], None if shift is None else shift[:, i:i + 1])
                          for i, p in enumerate(parts)], dim=1)
    return h * scale if shift is None else torch.addcmul(shift, h, scale)


def gated_residual(x, y, gate, segments=None):
    """x + y * gate in fp32 (y in any dtype, promoted inside the one fused op); segments as in `modulate`."""
    if segments is not None:
        return x + modulate(y.float(), gate, None, segments)
    return torch.addcmul(x, y, gate)


def apply_rope(x, rope):
    """Rotate adjacent pairs of x [B, L, H, D] by the table (cos, sin) [L, D/2]: one complex multiply in fp32
    (under torch.compile the same product in real arithmetic: inductor generates no code for complex tensors)."""
    if torch.compiler.is_compiling():
        cos, sin = (t[None, :, None, :] for t in rope)
        re, im = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).type_as(x)
    freqs = torch.complex(*rope)[None, :, None, :]
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


class TanhGELU(nn.GELU):
    """GELU (tanh approximation), in place when no gradient is recorded: the FFN's widest activation is then not
    allocated twice (on the CPU each fresh buffer of that size costs page faults as well as memory)."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x):
        return torch.ops.aten.gelu_(x, approximate="tanh") if not torch.is_grad_enabled() else super().forward(x)


class Attention(nn.Module):
    """q/k/v/o projections with RMSNorm on q and k over the full width (before the head split)."""

    def __init__(self, dim, heads, eps, ops):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (ops.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def split(self, t):
        return t.unflatten(-1, (self.heads, -1))


class SelfAttention(Attention):
    def forward(self, x, rope):
        q = apply_rope(self.split(self.norm_q(self.q(x))), rope)
        k = apply_rope(self.split(self.norm_k(self.k(x))), rope)
        return self.o(sp_hooks.self_attention(q, k, self.split(self.v(x))))


class CrossAttention(Attention):
    """Text cross-attention; image models (I2V/FLF2V) add a CLIP-token branch whose output is summed before `o`."""

    def __init__(self, dim, heads, eps, ops, image=False):
        super().__init__(dim, heads, eps, ops)
        if image:
            self.k_img, self.v_img = ops.Linear(dim, dim), ops.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x, context, context_img=None):
        """context: a Text (WanDiT.embed_text) or a tensor [B, n, dim]."""
        tokens, pads = text_parts(context)
        q = self.split(self.norm_q(self.q(x)))
        out = attention(q, self.split(self.norm_k(self.k(tokens))), self.split(self.v(tokens)), last_count=pads)
        if context_img is not None:
            k_img = self.split(self.norm_k_img(self.k_img(context_img)))
            out = out + attention(q, k_img, self.split(self.v_img(context_img)))
        return self.o(out)


class ImageProjection(nn.Module):
    """CLIP tokens -> context: LN-Linear-GELU-Linear-LN; FLF2V adds a learned position table over both images' tokens."""

    def __init__(self, clip_dim, dim, pos_tokens, ops):
        super().__init__()
        self.proj = nn.Sequential(ops.LayerNorm(clip_dim), ops.Linear(clip_dim, clip_dim), nn.GELU(),
                                  ops.Linear(clip_dim, dim), ops.LayerNorm(dim))
        self.emb_pos = nn.Parameter(torch.zeros(1, pos_tokens, clip_dim)) if pos_tokens else None

    def forward(self, clip_tokens):
        if self.emb_pos is not None:
            n = min(clip_tokens.shape[1], self.emb_pos.shape[1])
            clip_tokens = clip_tokens[:, :n] + self.emb_pos[:, :n].to(clip_tokens)
        return self.proj(clip_tokens)


class Block(nn.Module):
    def __init__(self, dim, ffn_dim, heads, eps, ops, image=False):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, heads, eps, ops)
        self.norm3 = ops.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, heads, eps, ops, image)
        self.ffn = nn.Sequential(ops.Linear(dim, ffn_dim), TanhGELU(), ops.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x, e, rope, context, context_img=None, segments=None):
        """x [B, L, dim] fp32 residual stream (as the official code keeps it); e [B, Lt, 6, dim] fp32
        (Lt = 1, or L for per-token timesteps, or len(segments): see `modulate`); context: a Text (or tensor) in the
        compute dtype, context_img the CLIP tokens."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.to(e)[:, None] + e).unbind(2)
        dt = text_parts(context)[0].dtype
        h = modulate(layer_norm_f32(x, self.eps), 1 + scale1, shift1, segments)
        x = gated_residual(x, self.self_attn(h.to(dt), rope), gate1, segments)
        x = x + self.cross_attn(self.norm3(x).to(dt), context, context_img)  # promoted to fp32
        h = modulate(layer_norm_f32(x, self.eps), 1 + scale2, shift2, segments)
        return gated_residual(x, self.ffn(h.to(dt)), gate2, segments)


class Head(nn.Module):
    def __init__(self, dim, out_features, eps, ops):
        super().__init__()
        self.eps = eps
        self.head = ops.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e, dtype):
        """x [B, L, dim] fp32; e [B, Lt, dim] fp32 time embedding; the projection runs in `dtype`."""
        shift, scale = (self.modulation.to(e)[:, None] + e[:, :, None]).unbind(2)
        return self.head(torch.addcmul(shift, layer_norm_f32(x, self.eps), 1 + scale).to(dtype))


def is_s2v_state_dict(sd):
    """Whether a state dict is Wan2.2-S2V's (its audio encoder or injector keys; wan_core.s2v.WanS2V loads it)."""
    return any(k.startswith(("casual_audio_encoder.", "audio_injector.")) for k in sd)


def text_rows_used(context):
    """1 + the index of the last row of context [B, L, D] that is not all zero in some batch item (at least 1).
    Counting reads the result on the host (a device sync), so the count is kept on the tensor (the samplers pass the
    same one at every step) and redone only if the tensor was modified in place since (inference-mode tensors keep
    no version counter: theirs is counted once)."""
    version = -1 if context.is_inference() else context._version
    seen = getattr(context, "_wan_rows_used", None)
    if seen is None or seen[0] != version:
        used = context.ne(0).any(-1).any(0).nonzero()
        seen = context._wan_rows_used = version, (int(used.max()) + 1 if used.numel() else 1)
    return seen[1]


class WanDiT(nn.Module):
    """The Wan DiT for every non-audio variant, chosen by config (read from the weights):
    T2V (in 16), I2V/FLF2V (in 36 + CLIP image branch; FLF2V with a 514-token position table),
    Wan 2.2 I2V-A14B (in 36, no CLIP), TI2V-5B (in/out 48, per-token timesteps).

    forward(x [B,C,F,H,W], t [B] or [B, L] raw timesteps, context [B, <=512, text_dim],
            clip [B, 257 or 514, 1280] for image models, y [B, C_y, F, H, W] concatenated to x on channels) -> velocity.

    `attention_backend`: this model's attention (a name of wan_core.attention.BACKENDS; None: the process default),
    in force for every attention call of a forward, S2V's and sequence-parallel ones included."""
    attention_backend = None

    def __init__(self, dim=1536, ffn_dim=8960, num_layers=30, in_dim=16, out_dim=16, text_dim=4096,
                 freq_dim=256, patch_size=(1, 2, 2), text_len=512, eps=1e-6, clip_dim=None, clip_pos_tokens=None, ops=None):
        super().__init__()
        ops = ops or nn
        self.dim, self.in_dim, self.out_dim = dim, in_dim, out_dim
        self.freq_dim, self.patch_size, self.text_len = freq_dim, tuple(patch_size), text_len
        self.heads = dim // HEAD_DIM
        self.patch_embedding = ops.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(ops.Linear(text_dim, dim), nn.GELU(approximate="tanh"), ops.Linear(dim, dim))
        self.time_embedding = nn.Sequential(ops.Linear(freq_dim, dim), nn.SiLU(), ops.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(dim, 6 * dim))
        image = clip_dim is not None
        self.blocks = nn.ModuleList(Block(dim, ffn_dim, self.heads, eps, ops, image) for _ in range(num_layers))
        self.head = Head(dim, out_dim * math.prod(patch_size), eps, ops)
        self.img_emb = ImageProjection(clip_dim, dim, clip_pos_tokens, ops) if image else None
        self._rope_cache = {}

    def __call__(self, *args, **kwargs):
        with use_backend(self.attention_backend):
            return super().__call__(*args, **kwargs)

    def rope(self, grid, device):
        """RoPE tables for a token grid, built once per grid size and device (not per step)."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_table(grid, HEAD_DIM, device)}
        return self._rope_cache[key]

    def embed_text(self, context):
        """Text features [B, L, text_dim] -> Text. The official model zero-pads them to text_len slots and attends all
        of them; every zero slot embeds to the same key and value, so the rows past the last non-zero one (rounded
        up to TEXT_ROWS) are embedded once, as one token counted `pads` times: the same attention, less work."""
        slots = max(self.text_len, context.shape[1])
        keep = min(slots, math.ceil(text_rows_used(context) / TEXT_ROWS) * TEXT_ROWS)
        pads = slots - keep
        rows = F.pad(context[:, :keep], (0, 0, 0, keep + (pads > 0) - min(keep, context.shape[1])))
        return Text(self.text_embedding(rows), pads)

    def embed_time(self, t):
        """t [B] or [B, Lt] raw timesteps (0..1000) -> e [B, Lt, dim], e0 [B, Lt, 6, dim], both fp32."""
        t = t.reshape(t.shape[0], -1)
        e = self.time_embedding(sinusoid(t, self.freq_dim))
        return e, self.time_projection(e).unflatten(-1, (6, self.dim))

    def forward(self, x, t, context, clip=None, y=None, cache=None):
        """cache: a wan_core.cache.StepCache to reuse the blocks' residual across steps (None: always compute)."""
        dtype = x.dtype
        if y is not None:
            x = torch.cat([x, y.to(dtype)], dim=1)
        if x.shape[1] != self.in_dim:
            raise ValueError(f"the model takes {self.in_dim} input channels, got {x.shape[1]}: "
                             + ("an image-to-video model needs the image conditioning" if self.in_dim > self.out_dim
                                else "the latent comes from another model family"))
        x = self.patch_embedding(x)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2).to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        e, e0 = self.embed_time(t)
        context = self.embed_text(context.to(dtype))
        context_img = None
        if self.img_emb is not None:
            if clip is None:
                raise ValueError("this image-to-video model needs CLIP vision tokens (connect a CLIP vision encoding)")
            if clip.shape[-1] != self.img_emb.proj[0].normalized_shape[0]:
                raise ValueError(f"CLIP tokens are {clip.shape[-1]} wide but the model takes "
                                 f"{self.img_emb.proj[0].normalized_shape[0]}: use the model's CLIP (clip_vision_h)")
            context_img = self.img_emb(clip.to(dtype))
        rope = self.rope(grid, x.device)
        sp = sp_hooks.current()  # a sequence-parallel run: this rank's tokens only (wan_core.sp_hooks)
        if sp is not None:
            x, rope, e, e0 = sp.shard(x, rope, e, e0)

        def blocks(x):
            for block in self.blocks:
                x = block(x, e0, rope, context, context_img)
            return x

        x = blocks(x) if cache is None else cache.run(blocks, x, block0_signal(self.blocks[0], x, e0))
        x = self.head(x, e, dtype)
        return self.unpatchify(x if sp is None else sp.gather(x), grid)

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
        clip = sd.get("img_emb.proj.0.weight")
        pos = sd.get("img_emb.emb_pos")
        return dict(dim=pe.shape[0], in_dim=pe.shape[1], patch_size=patch,
                    clip_dim=None if clip is None else clip.shape[0], clip_pos_tokens=None if pos is None else pos.shape[1],
                    ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
                    num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                    out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
                    text_dim=sd["text_embedding.0.weight"].shape[1],
                    freq_dim=sd["time_embedding.0.weight"].shape[1])

    @staticmethod
    def variant(cfg):
        """A readable name for a config (the A14B experts share the 14B shapes; high/low noise cannot be told apart)."""
        size = {1536: "1.3B", 3072: "5B", 5120: "14B"}.get(cfg["dim"], f"dim {cfg['dim']}")
        if cfg["in_dim"] == 48:
            return f"Wan 2.2 TI2V-{size}"
        if cfg.get("clip_pos_tokens"):
            return f"Wan 2.1 FLF2V-{size}"
        if cfg.get("clip_dim"):
            return f"Wan 2.1 I2V-{size}"
        if cfg["in_dim"] > cfg["out_dim"]:
            return f"Wan 2.2 I2V-A14B expert ({size}, no CLIP)"
        return f"Wan T2V-{size} (2.1, or a 2.2 A14B expert)"

    @classmethod
    def check_state_dict(cls, sd):
        """Refuse a checkpoint that belongs to another model class, naming the class that loads it."""
        if is_s2v_state_dict(sd):
            raise ValueError("this is a Wan2.2-S2V (speech-to-video) checkpoint: load it with wan_core.s2v.WanS2V "
                             "(the S2V model loader), not as a text/image-to-video model")

    @classmethod
    def from_state_dict(cls, sd, ops=None, dtype=None):
        """Build on the meta device and adopt the tensors of `sd` (no second copy); dtype converts them."""
        cls.check_state_dict(sd)
        cfg = cls.config_from_state_dict(sd)
        model, expected = build_on_meta(lambda o: cls(**cfg, ops=o), ops)
        model.variant_name = cls.variant(cfg)
        check_weights(expected, sd, f"{model.variant_name} weights")
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"Wan diffusion model weights do not fit: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); the file is incomplete or another variant")
        return model
