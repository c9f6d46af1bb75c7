"""The Wan2.2-S2V-14B speech-to-video DiT: the shared Wan blocks (dit.py) plus audio, reference image, motion
frames and pose. Official state-dict keys (= ComfyUI's repackaged wan2.2_s2v_14B files); sizes read from shapes.

Conventions checked against the official wan/modules/s2v/ (model_s2v.py, audio_utils.py, auxi_blocks.py,
motioner.py, s2v_utils.py, configs/wan_s2v_14B.py, speech2video.py):
- Token sequence: noisy video (F x h x w), then the reference image (1 latent frame), then the motion tokens;
  token-type embedding `trainable_cond_mask` (3, dim) adds row 0 / 1 / 2 to them. Only the noisy tokens reach
  the head and the audio injector.
- Timesteps (zero_timestep): noisy tokens are modulated with e0(t), reference and motion tokens with e0(0);
  the head uses e(t).
- Pose (cond_dim 16): cond_encoder Conv3d(16 -> dim, 1x2x2) of the VAE-encoded pose latent is added to the
  patch embedding; without a pose the official pipeline feeds zero latents, so the conv bias is still added.
- Audio input: wav2vec2 hidden states [B, 25, 1024, T] at 16 fps (T >= 4F; the first 4F frames are used: one
  clip's window, 80 frames for F = 20). Layers mixed with weights SiLU(w) / sum SiLU(w). Causal Conv1d stack
  (kernel 3, replicate left padding) strides 1, 2, 2: conv1_local gives 4 groups of dim/4 channels (4 tokens),
  conv1_global dim/4 channels, both through the shared conv2/conv3 with non-affine LayerNorm(1e-6) + SiLU after
  each conv; local tokens get a learned padding token appended (5 per latent frame); the global branch ends in
  final_linear. The official forward first prefixes the window with 73 copies of its first frame
  (motion_frames = [73, 19]) and drops the first 19 output frames: `audio_prefix` (73; 0 = no prefix).
- Audio injector after blocks (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39) (injector i after the i-th listed
  block): per latent frame, the frame's h*w noisy tokens go through an adaptive LayerNorm (non-affine, eps 1e-5;
  shift, scale = Linear(SiLU(global audio)) in that order) and cross-attend (q/k RMSNorm) to that frame's 5
  audio tokens; the output is added to the residual stream.
- Frame pack (framepack, add_last_motion 2, drop_mode 'padd'): the newest 19 motion latent frames (zero-padded
  at the old end when fewer) split oldest-first into 16 / 2 / 1 frames through proj_4x (4,8,8) / proj_2x
  (2,4,4) / proj (1,2,2); tokens ordered newest bucket first. Without motion (clip 0: drop_first_motion) no
  motion tokens at all.
- RoPE (22/21/21 pairs, positions from s2v_utils.rope_precompute): noisy (0..F-1, 0..h-1, 0..w-1); reference
  time 30 (fixed); motion buckets time -1 / -3 / (-19, -14, -9, -4) and spatial positions sampled over the full
  h x w range as `numpy.linspace(...).astype(int)`, e.g. h = 8 tokens -> 2x (0, 2, 4, 7), 4x (0, 7).

- Dtypes: the audio encoder runs in fp32 (official autocast fp32), the residual stream stays fp32 as in dit.py.
- Config from shapes: audio width / layer count / token count from casual_audio_encoder, N injector weight sets
  -> the first N entries of the block list above (what the official and ComfyUI constructors do).

ComfyUI 0.3.75's WanModel_S2V differs from the official code in: no 73-frame audio prefix; reference time
max(30, F + 9) (the same for F <= 21); 4x motion times -19..-16; fractional compressed-motion positions;
nothing added when control_video is None (its node always feeds zeros, as the official pipeline does).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import sp_hooks
from .dit import (HEAD_DIM, CrossAttention, WanDiT, is_s2v_state_dict,  # noqa: F401  (is_s2v_state_dict: also here)
                  layer_norm_f32, rope_positions)

AUDIO_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
MOTION_BUCKETS = ((1, 1), (2, 2), (16, 4))  # (latent frames, compression), newest first
MOTION_LATENTS = sum(f for f, _ in MOTION_BUCKETS)  # 19 = (73 motion pixel frames + 3) // 4
AUDIO_PREFIX = 73
REF_TIME = 30


def spread(start, span, n):
    """n integer positions over [start, start + span) as rope_precompute samples them: numpy linspace truncated
    toward zero, negative ranges sampled on their magnitudes (oldest first)."""
    if start >= 0:
        return np.linspace(start, start + span - 1, n).astype(int)
    return -np.linspace(-start, -start - span + 1, n).astype(int)


def motion_positions(lat_h, lat_w):
    """Per-axis RoPE positions of the frame-pack buckets (newest first) for motion latents of lat_h x lat_w."""
    h, w, start, groups = lat_h // 2, lat_w // 2, 0, []
    for frames, c in MOTION_BUCKETS:
        start -= frames
        groups.append((spread(start, frames, frames // c), spread(0, h, lat_h // (2 * c)),
                       spread(0, w, lat_w // (2 * c))))
    return groups


class CausalConv1d(nn.Module):
    def __init__(self, cin, cout, stride, ops):
        super().__init__()
        self.conv = ops.Conv1d(cin, cout, 3, stride=stride)

    def forward(self, x):
        return self.conv(F.pad(x, (2, 0), mode="replicate"))


def _norm_act(x):
    """[N, C, T] -> SiLU(LayerNorm_C) as [N, T, C], fp32."""
    return F.silu(layer_norm_f32(x.transpose(1, 2)))


class AudioEncoder(nn.Module):
    """`casual_audio_encoder`: layer mix + MotionEncoder_tc (local 4+1 tokens and a global vector per 4 frames)."""

    def __init__(self, audio_dim, audio_layers, dim, tokens, ops):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, audio_layers, 1, 1), 0.01))
        self.encoder = nn.Module()
        enc = self.encoder
        enc.conv1_local = CausalConv1d(audio_dim, dim // 4 * tokens, 1, ops)
        enc.conv1_global = CausalConv1d(audio_dim, dim // 4, 1, ops)
        enc.conv2 = CausalConv1d(dim // 4, dim // 2, 2, ops)
        enc.conv3 = CausalConv1d(dim // 2, dim, 2, ops)
        enc.final_linear = ops.Linear(dim, dim)
        enc.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.tokens = tokens

    def _tail(self, x):
        enc = self.encoder
        x = enc.conv2(_norm_act(x).transpose(1, 2))
        return _norm_act(enc.conv3(_norm_act(x).transpose(1, 2)))

    def forward(self, features):
        """features [B, layers, C, T] -> local [B, T/4, tokens + 1, dim], global [B, T/4, dim] (fp32)."""
        w = F.silu(self.weights.to(features.device, torch.float32))  # (a partial load may leave it offloaded)
        x = ((features.float() * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)
        b, enc = x.shape[0], self.encoder
        local = self._tail(enc.conv1_local(x).unflatten(1, (self.tokens, -1)).flatten(0, 1))
        local = local.unflatten(0, (b, self.tokens)).transpose(1, 2)
        pad = enc.padding_tokens.to(local.device, torch.float32).expand(b, local.shape[1], 1, -1)
        return torch.cat([local, pad], dim=2), enc.final_linear(self._tail(enc.conv1_global(x))).float()


class AdaLayerNorm(nn.Module):
    def __init__(self, dim, ops):
        super().__init__()
        self.linear = ops.Linear(dim, 2 * dim)

    def forward(self, x, emb):
        """x [N, L, dim], emb [N, dim] -> LN(x) * (1 + scale) + shift, fp32."""
        shift, scale = self.linear(F.silu(emb)).float().unsqueeze(1).chunk(2, dim=-1)
        return layer_norm_f32(x, 1e-5) * (1 + scale) + shift


class AudioInjector(nn.Module):
    """`audio_injector`: after the listed blocks, each latent frame's noisy tokens cross-attend to its audio tokens."""

    def __init__(self, dim, heads, blocks, eps, ops):
        super().__init__()
        self.block_ids = {b: i for i, b in enumerate(blocks)}
        self.injector = nn.ModuleList(CrossAttention(dim, heads, eps, ops) for _ in blocks)
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim, ops) for _ in blocks)

    def forward(self, x, block, n, audio, audio_global):
        """x [B, L, dim] fp32 whose first n tokens are the noisy video; audio [B, F, 5, dim] in the compute dtype;
        audio_global [B, F, dim]."""
        i = self.block_ids.get(block)
        if i is None:
            return x
        b, f = audio.shape[:2]
        h = self.injector_adain_layers[i](x[:, :n].reshape(b * f, n // f, -1), audio_global.flatten(0, 1))
        out = self.injector[i](h.to(audio.dtype), audio.flatten(0, 1)).float().reshape(b, n, -1)
        return torch.cat([x[:, :n] + out, x[:, n:]], dim=1)


class FramePacker(nn.Module):
    """`frame_packer`: the newest 19 motion latent frames as 1 + 2 + 16 frames at 1x / 2x / 4x compression."""

    def __init__(self, dim, ops, channels=16):
        super().__init__()
        self.proj, self.proj_2x, self.proj_4x = (ops.Conv3d(channels, dim, k, stride=k)
                                                 for k in ((1, 2, 2), (2, 4, 4), (4, 8, 8)))

    def forward(self, motion):
        """motion [B, 16, T, H, W] -> tokens [B, Lm, dim], newest bucket first."""
        motion = motion[:, :, -MOTION_LATENTS:]
        motion = F.pad(motion, (0, 0, 0, 0, MOTION_LATENTS - motion.shape[2], 0))
        oldest, middle, newest = motion.split([f for f, _ in MOTION_BUCKETS][::-1], dim=2)
        parts = (self.proj(newest), self.proj_2x(middle), self.proj_4x(oldest))
        return torch.cat([p.flatten(2).transpose(1, 2) for p in parts], dim=1)


class WanS2V(WanDiT):
    """Wan2.2-S2V: forward(x [B,16,F,H,W] noisy latent of one clip, t [B] raw timesteps, context [B, <=512, text_dim],
    audio [B, 25, 1024, >=4F] wav2vec2 hidden states bucketed at 16 fps (this clip's window; zeros for the
    unconditional pass), ref_latent [B,16,1,H,W], motion_latent [B,16,<=19,H,W] or None (clip 0),
    pose_latent [B,16,F,H,W] or None) -> velocity [B,16,F,H,W]. Batch-1 conditioning broadcasts over B."""

    def __init__(self, dim=5120, ffn_dim=13824, num_layers=40, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2),
                 text_len=512, eps=1e-6, in_dim=16, out_dim=16, audio_dim=1024, audio_layers=25, audio_tokens=4,
                 cond_dim=16, audio_inject_layers=AUDIO_INJECT_LAYERS, ops=None):
        super().__init__(dim=dim, ffn_dim=ffn_dim, num_layers=num_layers, in_dim=in_dim, out_dim=out_dim,
                         text_dim=text_dim, freq_dim=freq_dim, patch_size=patch_size, text_len=text_len, eps=eps, ops=ops)
        ops = ops or nn
        self.trainable_cond_mask = ops.Embedding(3, dim)
        self.casual_audio_encoder = AudioEncoder(audio_dim, audio_layers, dim, audio_tokens, ops)
        self.cond_encoder = ops.Conv3d(cond_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.audio_injector = AudioInjector(dim, self.heads, audio_inject_layers, eps, ops)
        self.frame_packer = FramePacker(dim, ops)
        self.audio_prefix = AUDIO_PREFIX

    def encode_audio(self, audio, frames):
        """This clip's audio [B, layers, C, >=4F] -> tokens [B, F, 5, dim] and global [B, F, dim] (fp32)."""
        a = audio[..., :4 * frames].float()
        if self.audio_prefix:
            a = torch.cat([a[..., :1].expand(*a.shape[:-1], self.audio_prefix), a], dim=-1)
        local, glob = self.casual_audio_encoder(a)
        drop = (self.audio_prefix + 3) // 4
        return local[:, drop:], glob[:, drop:]

    def s2v_rope(self, grid, ref_grid, motion_hw, device):
        """RoPE tables for noisy + reference (+ motion) tokens, cached per shape and device."""
        key = ("s2v", tuple(grid), tuple(ref_grid), motion_hw, str(device))
        if key not in self._rope_cache:
            groups = [[range(n) for n in grid], [[REF_TIME], range(ref_grid[1]), range(ref_grid[2])]]
            groups += motion_positions(*motion_hw) if motion_hw else []
            tables = [rope_positions(g, HEAD_DIM, device) for g in groups]
            self._rope_cache = {key: tuple(torch.cat(parts) for parts in zip(*tables))}
        return self._rope_cache[key]

    def forward(self, x, t, context, audio, ref_latent, motion_latent=None, pose_latent=None):
        dtype, frames = x.dtype, x.shape[2]
        t, audio, ref_latent, motion_latent, pose_latent = self.check_inputs(x, t, audio, ref_latent, motion_latent,
                                                                             pose_latent)
        audio_tokens, audio_global = self.encode_audio(audio, frames)
        audio_tokens = audio_tokens.to(dtype)
        pose = torch.zeros_like(x) if pose_latent is None else pose_latent.to(dtype)
        x = self.patch_embedding(x).float() + self.cond_encoder(pose).float()
        grid = x.shape[2:]
        types = self.trainable_cond_mask(torch.arange(3, device=x.device)).float()
        ref = self.patch_embedding(ref_latent.to(dtype))
        tokens = [x.flatten(2).transpose(1, 2) + types[0], ref.flatten(2).transpose(1, 2).float() + types[1]]
        if motion_latent is not None:
            tokens.append(self.frame_packer(motion_latent.to(dtype)).float() + types[2])
        x, n = torch.cat(tokens, dim=1), math.prod(grid)
        segments = (n, x.shape[1] - n)
        e, e0 = self.embed_time(torch.stack([t, torch.zeros_like(t)], dim=1))
        context = self.embed_text(context.to(dtype))
        motion_hw = None if motion_latent is None else tuple(motion_latent.shape[-2:])
        rope = self.s2v_rope(grid, ref.shape[2:], motion_hw, x.device)
        sp = sp_hooks.current()  # a sequence-parallel run: this rank's tokens only (wan_core.sp_hooks)
        if sp is not None:
            x, rope = sp.shard(x, rope)
            segments = sp.segments(segments)
        for i, block in enumerate(self.blocks):
            x = block(x, e0, rope, context, segments=segments)
            x = sp_hooks.inject_audio(self.audio_injector, x, i, n, audio_tokens, audio_global)
        if sp is None:
            return self.unpatchify(self.head(x[:, :n], e[:, :1], dtype), grid)
        return self.unpatchify(sp.gather(self.head(x, e[:, :1], dtype), n), grid)

    def check_inputs(self, x, t, audio, ref_latent, motion_latent, pose_latent):
        """Clear errors for wrong conditioning; batch-1 conditioning is expanded to x's batch."""
        if x.ndim != 5 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must be a [B, {self.in_dim}, F, H, W] Wan 2.1 latent, got {tuple(x.shape)}")
        b, _, frames, h, w = x.shape
        if t.numel() != b:
            raise ValueError(f"t must hold one timestep per batch item ({b}), got shape {tuple(t.shape)}")
        enc = self.casual_audio_encoder
        layers, width = enc.weights.shape[1], enc.encoder.conv1_local.conv.in_channels
        if audio is None or audio.ndim != 4 or tuple(audio.shape[1:3]) != (layers, width):
            raise ValueError(f"audio must be wav2vec2 hidden states [B, {layers}, {width}, frames] (all layers, "
                             "bucketed at 16 fps; zeros for the unconditional pass), got "
                             f"{None if audio is None else tuple(audio.shape)}")
        if audio.shape[-1] < 4 * frames:
            raise ValueError(f"audio covers {audio.shape[-1]} video frames but a clip of {frames} latent frames needs "
                             f"{4 * frames}: pad the audio features (zeros) to the clip length")
        if ref_latent is None or ref_latent.ndim != 5 or ref_latent.shape[1:3] != (16, 1):
            raise ValueError("ref_latent must be the VAE latent of the reference image, [B, 16, 1, H, W], got "
                             f"{None if ref_latent is None else tuple(ref_latent.shape)}")
        if motion_latent is not None and (motion_latent.ndim != 5 or motion_latent.shape[1] != 16
                                          or motion_latent.shape[-2:] != (h, w)):
            raise ValueError(f"motion_latent must be [B, 16, <=19, {h}, {w}] (VAE latent of the last 73 frames), "
                             f"got {tuple(motion_latent.shape)}")
        if pose_latent is not None and pose_latent.shape[1:] != x.shape[1:]:
            raise ValueError(f"pose_latent must match the clip latent {tuple(x.shape[1:])} (VAE-encoded pose video "
                             f"of the same length and size), got {tuple(pose_latent.shape[1:])}")
        out = [t.reshape(b).float()]
        named = dict(audio=audio, ref_latent=ref_latent, motion_latent=motion_latent, pose_latent=pose_latent)
        for name, c in named.items():
            if c is not None and c.shape[0] not in (1, b):
                raise ValueError(f"{name} has batch {c.shape[0]} but x has {b}")
            out.append(None if c is None else c.expand(b, *c.shape[1:]))
        return out

    @staticmethod
    def config_from_state_dict(sd):
        cfg = WanDiT.config_from_state_dict(sd)
        del cfg["clip_dim"], cfg["clip_pos_tokens"]
        local = sd["casual_audio_encoder.encoder.conv1_local.conv.weight"]
        injectors = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("audio_injector.injector."))
        cfg.update(audio_dim=local.shape[1], audio_layers=sd["casual_audio_encoder.weights"].shape[1],
                   audio_tokens=local.shape[0] // (cfg["dim"] // 4), cond_dim=sd["cond_encoder.weight"].shape[1],
                   audio_inject_layers=AUDIO_INJECT_LAYERS[:injectors])
        return cfg

    @staticmethod
    def variant(cfg):
        size = {5120: "14B"}.get(cfg["dim"], f"dim {cfg['dim']}")
        return f"Wan 2.2 S2V-{size}"

    @classmethod
    def check_state_dict(cls, sd):
        if not is_s2v_state_dict(sd):
            raise ValueError("not a Wan2.2-S2V checkpoint (no casual_audio_encoder.* / audio_injector.* weights): "
                             "a Wan text/image-to-video model loads with the Wan diffusion model loader (WanDiT)")
