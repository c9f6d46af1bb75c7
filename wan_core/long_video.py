"""Long video from any Wan model except S2V (which has its own loop, s2v_pipeline.py): clips of `clip_length` frames
chained by their last frames.

Clip k+1 starts with the last `overlap` decoded frames of clip k (the "known" frames), given to the model through its
own image path:
- I2V / FLF2V / I2V-A14B ("image"): the I2V channel conditioning y, mask 1 on the known frames + the VAE latent of
  [known..., zeros...] (FLF2V: the end image, if any, closes the last clip). The CLIP tokens of the start image (Wan 2.1
  I2V / FLF2V) stay the same for every clip: the anchor that keeps the subject's identity.
- TI2V-5B ("ti2v"): as its image-to-video mode, with more frames: the known frames' latents replace the first latent
  frames and their tokens see timestep 0.
- T2V 1.3B / 14B / A14B ("t2v"): no image path, so the known frames' latents are pinned by inpainting (Cond.pinned):
  at every step the denoiser reports them as x0, the solver keeps them on the noise-to-latent path the model sees, and
  the new frames are denoised attending to them.
`overlap` is 1 + 4j frames, so the known frames encode to exactly the first 1 + j latent frames of the new clip (a
clip's first latent frame is one pixel frame in the causal VAE).

Seams: each clip is decoded on its own (the decoder's causal cache starts afresh), so the overlap is decoded twice:
once as clip k's tail, once as clip k+1's head (a re-creation of the same frames). The two are cross-faded in pixel
space, clip k+1's weight rising (i + 1) / (overlap + 1) over the overlap. Pixel space, because the same frames have
different latents in the two clips (a clip's first latent is a lone frame, later ones 4-frame groups with causal
context), so blending latents would mix unrelated codes.

Memory: one clip's latent and conditioning on the device; finished frames are yielded (to the CPU) as soon as no later
clip can change them; only the last `overlap` frames are held back for the cross-fade and the next clip.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .conditioning import known_frames_y
from .pipeline import Cond, TIME_STRIDE, generate

KINDS = ("image", "ti2v", "t2v")


def conditioning_kind(in_dim, out_dim):
    """How a DiT of these channel counts takes known frames: "image" (I2V channels), "ti2v" (48-channel, t = 0 tokens)
    or "t2v" (inpainting)."""
    if in_dim > out_dim:
        return "image"
    return "ti2v" if out_dim == 48 else "t2v"


def count_clips(length, clip_length, overlap):
    """Clips that make `length` frames (clip_length + (clips - 1) * (clip_length - overlap)); ValueError naming the
    input and the nearest valid lengths otherwise."""
    if clip_length < 5 or (clip_length - 1) % TIME_STRIDE:
        raise ValueError(f"clip_length {clip_length} is not 1+4k frames (5 or more); use e.g. 81")
    if overlap < 1 or (overlap - 1) % TIME_STRIDE or 2 * overlap >= clip_length:
        most = 1 + TIME_STRIDE * ((clip_length - 2) // 2 // TIME_STRIDE)  # the largest 1+4j below clip_length / 2
        raise ValueError(f"overlap {overlap} must be 1+4j frames and less than half of clip_length {clip_length}; "
                         + ("use 1" if most == 1 else f"use 1 to {most}"))
    step = clip_length - overlap
    n = (length - overlap) // step  # whole clips that fit
    if n >= 1 and length == clip_length + (n - 1) * step:
        return n
    options = " or ".join(f"{clip_length + (c - 1) * step} ({c} clip{'s' * (c > 1)})" for c in ([n, n + 1] if n >= 1 else [1]))
    raise ValueError(f"length {length} is not a whole number of clips: n clips make clip_length + (n - 1) x "
                     f"(clip_length - overlap) = {clip_length} + (n - 1) x {step} frames; use {options}")


def clip_prompts(lines, clips):
    """One prompt per clip from a list (the last one holds for the remaining clips); ValueError when there are more
    prompts than clips."""
    if len(lines) > clips:
        extra = len(lines) - clips
        raise ValueError(f"prompts has {len(lines)} lines but the length makes {clips} clip{'s' * (clips > 1)}: "
                         f"remove {extra} line{'s' * (extra > 1)} or raise length")
    return [lines[min(k, len(lines) - 1)] for k in range(clips)]


@dataclass
class LongJob:
    """What a long video needs besides models and sampler settings. contexts: text features per clip; start / end:
    images [1, 3, H, W] in [-1, 1] at the video size (start: the first clip's first frame; end: FLF2V, the last
    clip's last frame); clip: CLIP tokens kept for every clip (Wan 2.1 I2V / FLF2V)."""
    kind: str
    contexts: list
    neg_context: torch.Tensor
    start: Optional[torch.Tensor] = None
    end: Optional[torch.Tensor] = None
    clip: Optional[torch.Tensor] = None


def clip_conds(vae, job, k, clips, known, length):
    """(cond, uncond) of clip k starting with the pixel frames `known` [1, 3, n, H, W] (None: nothing known)."""
    image = {}
    if job.kind == "image":
        end = job.end if k == clips - 1 else None
        if known is None:
            raise ValueError("this image-to-video model needs a start image: connect start_image")
        image["y"] = known_frames_y(vae, known, end, length)
    elif known is not None:
        image["first_frame" if job.kind == "ti2v" else "pinned"] = vae.encode(known)
    return (Cond(job.contexts[k], clip=job.clip, **image),
            Cond(job.neg_context, clip=job.clip, **image))


def cross_fade(tail, head):
    """Frames [3, n, H, W] of the overlap: clip k's tail fading into clip k+1's head (weights (i + 1) / (n + 1))."""
    n = tail.shape[1]
    w = torch.arange(1, n + 1, dtype=tail.dtype).div(n + 1).view(1, n, 1, 1)
    return tail * (1 - w) + head * w


def generate_long(experts, vae, job: LongJob, *, clips, clip_length, overlap, seed, steps, shift, sampler, width,
                  height, channels=16, device="cpu", dtype=torch.float32, callback=None,
                  on_clip: Optional[Callable] = None):
    """Yield the video's frames in order as float32 CPU chunks [3, n, H, W] in [-1, 1]; clip_length + (clips - 1) *
    (clip_length - overlap) frames in all. experts: as pipeline.generate takes them (loaded when first used in each
    clip); vae: encode / decode on the device; clip k uses seed + k. callback(step, steps, x, x0) per step;
    on_clip(k, clips, cond) before each clip is sampled (progress, interrupts, tests)."""
    if job.kind not in KINDS:
        raise ValueError(f"unknown conditioning kind {job.kind!r}, expected one of {KINDS}")
    count_clips(clip_length + (clips - 1) * (clip_length - overlap), clip_length, overlap)  # checks both
    known = None if job.start is None else job.start[:, :, None].to(device)
    tail = None
    for k in range(clips):
        cond, uncond = clip_conds(vae, job, k, clips, known, clip_length)
        if on_clip:
            on_clip(k, clips, cond)
        latent = generate(experts, cond, uncond, seed=seed + k, steps=steps, shift=shift, sampler=sampler,
                          width=width, height=height, length=clip_length, channels=channels, device=device,
                          dtype=dtype, callback=callback)
        with torch.no_grad():
            video = vae.decode(latent)
        del latent, cond, uncond
        known = video[:, :, -overlap:].clone()  # the next clip's start: clip k's last frames as decoded, untouched
        frames = video[0].float().cpu()
        del video
        if tail is not None:
            yield cross_fade(tail, frames[:, :overlap])
        yield frames[:, 0 if tail is None else overlap:-overlap]
        tail = frames[:, -overlap:].clone()
        del frames
    yield tail
