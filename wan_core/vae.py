"""Wan 2.1 causal video VAE (8x spatial, 4x temporal, 16 latent channels).

Numerics follow the official wan/modules/vae.py: causal 3D convs that pad time on the left only,
RMS norms (`normalize * sqrt(C) * gamma`), chunked processing with a per-conv cache of the last
2 frames (encode chunks of 1, 4, 4, ... frames; decode one latent frame at a time), latent
normalisation z = (mu - mean) / std inside the wrapper, decoded pixels clamped to [-1, 1].
State-dict keys are the official ones (`encoder.*`, `conv1.*`, `conv2.*`, `decoder.*`).
"""
from functools import lru_cache, partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .checks import check_weights, nearest_valid
from .keys import build_on_meta

WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
CACHE_T = 2  # frames of left context kept per causal conv between chunks


# ----------------------------------------------------------------------------- shape checks

def check_video_shape(T, H, W, multiple=8):
    """Raise ValueError unless T = 1+4k frames and H, W are positive multiples of `multiple`
    (8 for the Wan 2.1 VAE, 16 for Wan 2.2's)."""
    problems = []
    if T < 1 or (T - 1) % 4:
        problems.append(f"length {T} is not 1+4k; use {nearest_valid(T, 4, 1)}")
    for name, size in (("height", H), ("width", W)):
        if size < multiple or size % multiple:
            problems.append(f"{name} {size} is not a multiple of {multiple}; use {nearest_valid(size, multiple)}")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------- causal cache

class _FrameCache:
    """Per-call causal state: one slot per cached layer, visited in the same order in every chunk."""

    def __init__(self):
        self.slots, self.pos = [], 0

    def next_chunk(self):
        self.pos = 0

    def get(self):
        """The slot's value from the previous chunk (None in the first chunk)."""
        return self.slots[self.pos] if self.pos < len(self.slots) else None

    def put(self, value):
        """Store this chunk's value for the slot and move to the next slot."""
        if self.pos < len(self.slots):
            self.slots[self.pos] = value
        else:
            self.slots.append(value)
        self.pos += 1


def _tail(x, prev):
    """Last CACHE_T frames of x, topped up with prev's last frame when x is shorter."""
    tail = x[:, :, -CACHE_T:].clone()
    if tail.shape[2] < CACHE_T and prev is not None:
        tail = torch.cat([prev[:, :, -1:].to(tail), tail], dim=2)
    return tail


def _cached_conv(conv, x, cache):
    """Causal conv: kt-1 frames of left context (the previous chunk's last frames, zeros before the first chunk) and
    the 'same' spatial zero padding (`conv.spatial_pad`), written with x into one zero-filled buffer: one copy, as the
    time context alone costs. Padding the input rather than inside the conv keeps CPU convolutions on oneDNN, whose
    choice (`use_mkldnn`: batch x channels x frames x height > 20480 for fp32) the padded height can tip; the old
    context is dropped before the conv runs."""
    prev = cache.get()
    cache.put(_tail(x, prev))
    ph, pw = conv.spatial_pad
    ctx = 0 if prev is None else prev.shape[2]
    left = max(conv.kernel_size[0] - 1 - ctx, 0)
    if not (left or ctx or ph or pw):
        return conv(x)
    b, c, t, h, w = x.shape
    buf = x.new_zeros(b, c, left + ctx + t, h + 2 * ph, w + 2 * pw)
    if prev is not None:
        buf[:, :, left:left + ctx, ph:ph + h, pw:pw + w] = prev
    buf[:, :, left + ctx:, ph:ph + h, pw:pw + w] = x
    del prev
    return conv(buf)


class _OneDNNOnCPU:
    """Mixin for a Conv3d class: fp32 on the CPU always through oneDNN. PyTorch picks its unfolding kernel instead
    for inputs with batch x channels x frames x height <= 20480, which the VAE's causal chunks (a few frames each)
    often are: 1.3-5x slower at those shapes, within 1e-6 of the output scale of each other."""

    def _conv_forward(self, input, weight, bias, *args, **kwargs):
        if input.device.type == "cpu" and input.dtype == weight.dtype == torch.float32 and _ONEDNN:
            return torch.ops.aten.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation,
                                                     self.groups)
        return super()._conv_forward(input, weight, bias, *args, **kwargs)


_ONEDNN = torch.backends.mkldnn.is_available()


@lru_cache(maxsize=None)
def _conv3d_class(base):
    return type(base.__name__, (_OneDNNOnCPU, base), {})


def _conv3d(ops, cin, cout, k, stride=1):
    """Conv3d without padding; `spatial_pad` is the 'same' zero padding `_cached_conv` adds with the time context."""
    _, kh, kw = (k, k, k) if isinstance(k, int) else k
    conv = _conv3d_class(ops.Conv3d)(cin, cout, k, stride=stride)
    conv.spatial_pad = (kh // 2, kw // 2)
    return conv


def _per_frame(fn, x):
    """Apply a 4D (image) function to every frame of a [B, C, T, H, W] tensor."""
    t = x.shape[2]
    y = fn(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b c t h w", t=t)


# ----------------------------------------------------------------------------- layers

class RMS_norm(nn.Module):
    """Channel RMS norm: x / max(||x||_C, 1e-12) * sqrt(C) * gamma (+ bias), as F.normalize; gamma cast to x at use.
    Always returns a new tensor (callers apply SiLU in place). fp32: one factor per pixel, sqrt(C) / ||x|| from a
    sum of squares, then two passes over x (a third of F.normalize's time on the CPU, where its strided channel
    reduction is slow; within 1e-7 of it); other dtypes: F.normalize's own fp32-accumulated norm."""

    def __init__(self, dim, images=False, bias=False):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x):
        if x.dtype == torch.float32:
            factor = x.square().sum(1, keepdim=True).clamp_min_(1e-24).rsqrt_().mul_(self.scale)
            y = (x * factor).mul_(self.gamma.to(x))
        else:
            y = F.normalize(x, dim=1) * self.scale * self.gamma.to(x)
        return y if self.bias is None else y.add_(self.bias.to(x))


class ResidualBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))); 1x1x1 conv shortcut when the width changes."""

    def __init__(self, in_dim, out_dim, ops):
        super().__init__()
        # Sequential indices match the official keys (residual.0/2/3/6, placeholders at 1/4/5).
        self.residual = nn.Sequential(
            RMS_norm(in_dim), nn.SiLU(), _conv3d(ops, in_dim, out_dim, 3),
            RMS_norm(out_dim), nn.SiLU(), nn.Dropout(0.0), _conv3d(ops, out_dim, out_dim, 3))
        self.shortcut = _conv3d(ops, in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache):
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = _cached_conv(conv1, F.silu(norm1(x), inplace=True), cache)
        h = _cached_conv(conv2, F.silu(norm2(h), inplace=True), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (head dim C), residual."""

    def __init__(self, dim, ops):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = ops.Conv2d(dim, dim * 3, 1)
        self.proj = ops.Conv2d(dim, dim, 1)

    def _attend(self, x):
        h, w = x.shape[2:]
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "n c h w -> n (h w) c").chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "n (h w) c -> n c h w", h=h, w=w))

    def forward(self, x, cache=None):
        return x + _per_frame(self._attend, x)


class Downsample(nn.Module):
    """Per-frame pad (0,1,0,1) + stride-2 conv; temporal: stride-2 time conv over [last cached frame, x]."""

    def __init__(self, dim, temporal, ops):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), ops.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = _conv3d(ops, dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x, cache):
        x = _per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        prev = cache.get()
        cache.put(x[:, :, -1:].clone())
        if prev is None:  # first chunk (one frame) passes through unchanged
            return x
        return self.time_conv(torch.cat([prev.to(x), x], dim=2))


class Upsample(nn.Module):
    """Temporal: causal time conv to 2C channels, interleaved into 2x frames (skipped for the first
    chunk); then per-frame nearest-exact 2x upsample + 3x3 conv to out_dim channels (default C/2;
    Wan 2.2's upsamplers keep the width)."""

    def __init__(self, dim, temporal, ops, out_dim=None):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
            ops.Conv2d(dim, dim // 2 if out_dim is None else out_dim, 3, padding=1))
        self.time_conv = _conv3d(ops, dim, dim * 2, (3, 1, 1)) if temporal else None

    def _double_frames(self, x, cache):
        if cache.get() is None:  # first chunk: one frame stays one frame
            cache.put(x[:, :, :0])  # empty context: the second chunk's time conv sees zeros
            return x
        y = _cached_conv(self.time_conv, x, cache)
        return rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)

    def forward(self, x, cache):
        if self.time_conv is not None:
            x = self._double_frames(x, cache)
        return _per_frame(self.resample, x)


# ----------------------------------------------------------------------------- encoder / decoder

class _Coder(nn.Module):
    """Shared trunk: causal conv1 -> blocks -> RMS norm, SiLU, causal conv head."""

    def _head(self, dim, out_dim, ops):
        return nn.Sequential(RMS_norm(dim), nn.SiLU(), _conv3d(ops, dim, out_dim, 3))

    def _middle(self, dim, ops):
        return nn.Sequential(ResidualBlock(dim, dim, ops), AttentionBlock(dim, ops), ResidualBlock(dim, dim, ops))

    def forward(self, x, cache):
        x = _cached_conv(self.conv1, x, cache)
        for block in self.blocks():
            x = block(x, cache)
        return _cached_conv(self.head[2], F.silu(self.head[0](x), inplace=True), cache)


def _stage_specs(dims, temporal):
    """(in width, out width, resamples, temporally) per stage between consecutive dims; all but the last resample."""
    last = len(dims) - 2
    return [(cin, cout, i < last, i < last and temporal[i]) for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))]


class Encoder3d(_Coder):
    """Pixels [B,3,T,H,W] -> [B,out_dim,1+(T-1)//4,H/8,W/8]; 2 res blocks per stage, temporal down [F,T,T]."""

    in_channels = 3

    def __init__(self, dim, out_dim, ops, mult=(1, 2, 4, 4), temporal=(False, True, True)):
        super().__init__()
        dims = [dim * m for m in (1,) + tuple(mult)]
        self.conv1 = _conv3d(ops, self.in_channels, dims[0], 3)
        self.downsamples = nn.Sequential(*self._stages(dims, temporal, ops))
        self.middle = self._middle(dims[-1], ops)
        self.head = self._head(dims[-1], out_dim, ops)

    def _stages(self, dims, temporal, ops):
        layers = []
        for cin, cout, down, temporal_down in _stage_specs(dims, temporal):
            layers += [ResidualBlock(cin, cout, ops), ResidualBlock(cout, cout, ops)]
            if down:
                layers.append(Downsample(cout, temporal_down, ops))
        return layers

    def blocks(self):
        return [*self.downsamples, *self.middle]


class Decoder3d(_Coder):
    """Latent [B,z,t,h,w] -> pixels [B,3,1+4(t-1),8h,8w]; 3 res blocks per stage, temporal up [T,T,F]."""

    out_channels = 3

    def __init__(self, dim, z_dim, ops, mult=(1, 2, 4, 4), temporal=(True, True, False)):
        super().__init__()
        dims = [dim * m for m in (mult[-1],) + tuple(mult[::-1])]
        self.conv1 = _conv3d(ops, z_dim, dims[0], 3)
        self.middle = self._middle(dims[0], ops)
        self.upsamples = nn.Sequential(*self._stages(dims, temporal, ops))
        self.head = self._head(dims[-1], self.out_channels, ops)

    def _stages(self, dims, temporal, ops):
        layers = []
        for i, (cin, cout, up, temporal_up) in enumerate(_stage_specs(dims, temporal)):
            cin = cin // 2 if i > 0 else cin  # every upsampler halves the width
            layers += [ResidualBlock(cin, cout, ops)] + [ResidualBlock(cout, cout, ops) for _ in range(2)]
            if up:
                layers.append(Upsample(cout, temporal_up, ops))
        return layers

    def blocks(self):
        return [*self.middle, *self.upsamples]


# ----------------------------------------------------------------------------- wrapper

def _run_chunks(coder, chunks, progress):
    """Run chunks through coder in order with one call-local frame cache; concatenate along time."""
    cache, outs = _FrameCache(), []
    for i, chunk in enumerate(chunks):
        cache.next_chunk()
        outs.append(coder(chunk, cache))
        if progress is not None:
            progress(i + 1, len(chunks))
    return torch.cat(outs, dim=2)


def _require_keys(sd, keys, what):
    """ValueError naming the first of `keys` missing from sd (checked before shapes are read)."""
    for key in keys:
        if key not in sd:
            raise ValueError(f"not a {what}: missing key '{key}'")


def _check_keys(expected, sd, what="Wan 2.1 VAE"):
    """ValueError naming the first missing/unexpected key or wrong shape."""
    for key, ref in expected.items():
        if key not in sd:
            raise ValueError(f"not a {what}: missing key '{key}'")
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise ValueError(f"not a {what}: '{key}' has shape {tuple(sd[key].shape)}, "
                             f"expected {tuple(ref.shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise ValueError(f"not a {what}: unexpected key '{extra[0]}'")


class _WanVAE(nn.Module):
    """What both Wan VAEs share: encoder -> conv1 (mu, log-var) and conv2 -> decoder around latents
    normalised with the family's per-channel mean/std; encode in chunks of 1, 4, 4, ... frames, decode one
    latent frame at a time. Subclasses set the constants and may fold pixels (`_pack`/`_unpack`)."""

    FAMILY = LATENT_MEAN = LATENT_STD = STRIDE = None  # name in messages, latent stats, pixels per latent

    def __init__(self, z_dim, ops, encoder, decoder):
        """encoder(ops) and decoder(ops) build the coders; built in key order, after the z_dim check."""
        super().__init__()
        if z_dim != len(self.LATENT_MEAN):
            raise ValueError(f"{self.FAMILY} has {len(self.LATENT_MEAN)} latent channels, got z_dim={z_dim}")
        ops = ops or nn
        self.z_dim = z_dim
        self.encoder = encoder(ops)
        self.conv1 = _conv3d(ops, z_dim * 2, z_dim * 2, 1)
        self.conv2 = _conv3d(ops, z_dim, z_dim, 1)
        self.decoder = decoder(ops)

    @classmethod
    def _assign(cls, sd, ops, *args):
        """cls(*args) built on the meta device, sd checked key by key and assigned; eval mode."""
        model, expected = build_on_meta(lambda o: cls(*args, ops=o), ops)
        _check_keys(expected, sd, cls.FAMILY)
        check_weights(expected, sd, f"{cls.FAMILY} weights")
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()

    def _pack(self, video):
        return video

    def _unpack(self, pixels):
        return pixels

    def _latent_stats(self, like):
        mean = torch.tensor(self.LATENT_MEAN, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.LATENT_STD, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode(self, video, progress=None):
        """[B,3,T,H,W] in [-1,1] -> (mu - mean) / std, [B,z_dim,1+(T-1)//4,H/STRIDE,W/STRIDE]."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [B,3,T,H,W], got shape {tuple(video.shape)}")
        check_video_shape(*video.shape[2:], self.STRIDE)
        x = self._pack(video)
        chunks = [x[:, :, :1]] + (list(x[:, :, 1:].split(4, dim=2)) if x.shape[2] > 1 else [])
        mu = self.conv1(_run_chunks(self.encoder, chunks, progress))[:, :self.z_dim]
        mean, std = self._latent_stats(mu)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, z, progress=None):
        """Normalised latent [B,z_dim,t,h,w] -> pixels [B,3,1+4(t-1),STRIDE*h,STRIDE*w] clamped to [-1,1]."""
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"expected latent [B,{self.z_dim},t,h,w], got shape {tuple(z.shape)}")
        mean, std = self._latent_stats(z)
        x = self.conv2(z * std + mean)
        out = _run_chunks(self.decoder, list(x.split(1, dim=2)), progress)
        return self._unpack(out).clamp_(-1.0, 1.0)


class WanVAE21(_WanVAE):
    """Wan 2.1 VAE: encode pixels [B,3,1+4k,8h,8w] in [-1,1] to normalised latents [B,16,1+k,h,w] and
    back (official key layout)."""

    FAMILY, LATENT_MEAN, LATENT_STD, STRIDE = "Wan 2.1 VAE", WAN21_LATENT_MEAN, WAN21_LATENT_STD, 8
    z_dim = 16

    def __init__(self, dim=96, z_dim=16, ops=None):
        super().__init__(z_dim, ops, partial(Encoder3d, dim, z_dim * 2), partial(Decoder3d, dim, z_dim))

    @classmethod
    def from_state_dict(cls, sd, ops=None):
        """Build from official keys (dim, z_dim read from shapes); parameters take sd's tensors (assign)."""
        _require_keys(sd, ("encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.conv1.weight"),
                      cls.FAMILY)
        z_dim, dim = sd["conv2.weight"].shape[0], sd["encoder.conv1.weight"].shape[0]
        if z_dim == 48:
            raise ValueError("looks like a Wan 2.2 VAE (48 latent channels); load it with the Wan 2.2 VAE")
        if z_dim != 16 or sd["encoder.conv1.weight"].shape[1] != 3:
            raise ValueError(f"not a Wan 2.1 VAE: {z_dim} latent channels, "
                             f"{sd['encoder.conv1.weight'].shape[1]} input channels (expected 16 and 3)")
        return cls._assign(sd, ops, dim, z_dim)
