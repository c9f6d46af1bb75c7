"""Wan 2.2 causal video VAE (TI2V-5B): 2x2 pixel patchify, 16x spatial, 4x temporal, 48 latent channels.

Numerics follow the official wan/modules/vae2_2.py. Pixels are folded 2x2 into channels (3 -> 12) and
run through a causal encoder (base width 160) whose stages are residual: the main path (residual
blocks + a strided resampler) is added to a parameter-free shortcut that averages channel groups of
the space/time-folded input; the decoder (base width 256) mirrors it with a shortcut that duplicates
channels into the upsampled positions, and its upsamplers keep their width (2.1's halve it). The
layers, the per-conv frame cache and the wrapper (encode 1, 4, 4, ... frames; decode one latent frame
at a time) are wan_core/vae.py's. Latents are normalised z = (mu - mean) / std with the 2.2 constants;
decoded pixels are clamped to [-1, 1]. Keys are the official `Wan2.2_VAE.pth` ones
(= ComfyUI's `wan2.2_vae.safetensors`).
"""
from functools import partial

import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .vae import (Decoder3d, Downsample, Encoder3d, ResidualBlock, Upsample, _require_keys, _stage_specs,
                  _WanVAE)

WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
PATCH = 2      # pixels folded p x p into channels before the encoder
STRIDE = 16    # spatial pixels per latent (patch 2 x three 2x downsamplers)


def patchify(x):
    """[B,C,T,pH,pW] -> [B,C*p*p,T,H,W]; channel order (c, column offset, row offset) as the official code."""
    return rearrange(x, "b c t (h ph) (w pw) -> b (c pw ph) t h w", ph=PATCH, pw=PATCH)


def unpatchify(x):
    """Inverse of `patchify`."""
    return rearrange(x, "b (c pw ph) t h w -> b c t (h ph) (w pw)", ph=PATCH, pw=PATCH)


# ----------------------------------------------------------------------------- parameter-free shortcuts

def _avg_down(x, out_dim, ft, fs):
    """Fold ft x fs x fs neighbourhoods into channels, then average consecutive channel groups down to
    out_dim. Time is zero-padded on the left to a multiple of ft (the 1-frame first chunk meets a zero)."""
    x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % ft, 0))
    x = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=ft, fh=fs, fw=fs)
    return x.unflatten(1, (out_dim, -1)).mean(dim=2)


def _dup_up(x, out_dim, ft, fs):
    """Inverse layout of `_avg_down`: repeat each channel, then unfold channels into ft x fs x fs positions."""
    x = x.repeat_interleave(out_dim * ft * fs * fs // x.shape[1], dim=1)
    return rearrange(x, "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)", ft=ft, fh=fs, fw=fs)


def _check_groups(wide, narrow, factor, what):
    if (wide * factor) % narrow:
        raise ValueError(f"{what} shortcut: {wide} channels x {factor} positions do not divide into {narrow}")


# ----------------------------------------------------------------------------- residual stages

def _res_blocks(in_dim, out_dim, n, ops):
    return [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, ops) for i in range(n)]


def _through(layers, x, cache):
    for layer in layers:
        x = layer(x, cache)
    return x


class DownBlock(nn.Module):
    """`n` ResidualBlocks (+ Downsample when `down`) added to an average-pool shortcut of the same stride."""

    def __init__(self, in_dim, out_dim, n, temporal, down, ops):
        super().__init__()
        self.downsamples = nn.Sequential(*_res_blocks(in_dim, out_dim, n, ops),
                                         *([Downsample(out_dim, temporal, ops)] if down else []))
        self.out_dim, self.ft, self.fs = out_dim, 2 if temporal else 1, 2 if down else 1
        _check_groups(in_dim, out_dim, self.ft * self.fs ** 2, "down")

    def forward(self, x, cache):
        return _through(self.downsamples, x, cache) + _avg_down(x, self.out_dim, self.ft, self.fs)


class UpBlock(nn.Module):
    """`n` ResidualBlocks (+ width-keeping Upsample and a channel-duplicating shortcut when `up`)."""

    def __init__(self, in_dim, out_dim, n, temporal, up, ops):
        super().__init__()
        self.upsamples = nn.Sequential(*_res_blocks(in_dim, out_dim, n, ops),
                                       *([Upsample(out_dim, temporal, ops, out_dim)] if up else []))
        self.up, self.out_dim, self.ft = up, out_dim, 2 if temporal else 1
        if up:
            _check_groups(out_dim, in_dim, self.ft * 4, "up")

    def forward(self, x, cache):
        h = _through(self.upsamples, x, cache)
        if not self.up:
            return h
        # In the first chunk the temporal upsampler keeps its single frame while the duplicate has two:
        # the shortcut keeps the trailing frames the main path produced (official: drop ft-1 leading).
        short = _dup_up(x, self.out_dim, self.ft, 2)
        return h + short[:, :, short.shape[2] - h.shape[2]:]


class Encoder22(Encoder3d):
    """Patchified pixels [B,12,T,H,W] -> [B,out_dim,1+(T-1)//4,H/8,W/8]; DownBlock stages, temporal down [F,T,T]."""

    in_channels = 3 * PATCH ** 2

    def _stages(self, dims, temporal, ops):
        return [DownBlock(cin, cout, 2, t, down, ops) for cin, cout, down, t in _stage_specs(dims, temporal)]


class Decoder22(Decoder3d):
    """Latent [B,z,t,h,w] -> patchified pixels [B,12,1+4(t-1),8h,8w]; UpBlock stages, temporal up [T,T,F]."""

    out_channels = 3 * PATCH ** 2

    def _stages(self, dims, temporal, ops):
        return [UpBlock(cin, cout, 3, t, up, ops) for cin, cout, up, t in _stage_specs(dims, temporal)]


# ----------------------------------------------------------------------------- wrapper

def is_vae22(sd):
    """Whether an official-key VAE state dict is Wan 2.2's: 48 latent channels, so its 1x1 `conv1` maps 96 -> 96 and
    `conv2` 48 -> 48 (the 2.1 VAE's 32 -> 32 and 16 -> 16)."""
    w = sd.get("conv1.weight")
    return w is not None and w.shape[0] == 96


class WanVAE22(_WanVAE):
    """Wan 2.2 VAE: encode pixels [B,3,1+4k,16h,16w] in [-1,1] to normalised latents [B,48,1+k,h,w] and
    back (official keys); pixels are patchified 2x2 around the coders."""

    FAMILY, LATENT_MEAN, LATENT_STD, STRIDE = "Wan 2.2 VAE", WAN22_LATENT_MEAN, WAN22_LATENT_STD, STRIDE
    z_dim = 48

    def __init__(self, dim=160, dec_dim=256, z_dim=48, ops=None):
        super().__init__(z_dim, ops, partial(Encoder22, dim, z_dim * 2), partial(Decoder22, dec_dim, z_dim))

    @classmethod
    def from_state_dict(cls, sd, ops=None):
        """Build from official keys (dim, dec_dim read from shapes); parameters take sd's tensors (assign)."""
        _require_keys(sd, ("encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.conv1.weight",
                           "decoder.head.0.gamma"), "Wan VAE")
        z_dim, in_ch = sd["conv2.weight"].shape[0], sd["encoder.conv1.weight"].shape[1]
        if z_dim == 16:
            raise ValueError("16 latent channels: this is the Wan 2.1 VAE; load it with the Wan 2.1 VAE (WanVAE21)")
        if z_dim != cls.z_dim or in_ch != 3 * PATCH ** 2:
            raise ValueError(f"not a Wan 2.2 VAE: {z_dim} latent channels, {in_ch} input channels "
                             f"(expected {cls.z_dim} and {3 * PATCH ** 2})")
        dim, dec_dim = sd["encoder.conv1.weight"].shape[0], sd["decoder.head.0.gamma"].shape[0]
        return cls._assign(sd, ops, dim, dec_dim, z_dim)

    def _pack(self, video):
        return patchify(video)

    def _unpack(self, pixels):
        return unpatchify(pixels)
