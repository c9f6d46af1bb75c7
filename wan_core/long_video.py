"""Long video from any Wan model except S2V (which has its own loop, s2v_pipeline.py): clips of `clip_length` frames,
each continuing the one before. How clip k+1 continues clip k is a `continuation` (a Rule):

- "pixel" (any model): clip k+1 starts with clip k's last `overlap` decoded frames (the "known" frames), given to the
  model through its own image path:
  - I2V / FLF2V / I2V-A14B ("image"): the I2V channel conditioning y, mask 1 on the known frames + the VAE latent of
    [known..., zeros...] (FLF2V: the end image, if any, closes the last clip). The CLIP tokens of the start image
    (Wan 2.1 I2V / FLF2V) stay the same for every clip: the anchor that keeps the subject's identity.
  - TI2V-5B ("ti2v"): as its image-to-video mode, with more frames: the known frames' latents replace the first
    latent frames and their tokens see timestep 0.
  - T2V 1.3B / 14B / A14B ("t2v"): no image path, so the known frames' latents are pinned by inpainting
    (Cond.pinned): at every step the denoiser reports them as x0, the solver keeps them on the noise-to-latent path
    the model sees, and the new frames are denoised attending to them.
  The overlap is decoded twice (clip k's tail, clip k+1's re-creation of it); the two are cross-faded in pixel space,
  clip k+1's weight rising (i + 1) / (overlap + 1). Pixel space, because the same frames have different latents in
  the two clips (a clip's first latent is a lone frame, later ones 4-frame groups with causal context).
- "latent carry" and "svi 2.0 pro" (image models): SVI 2.0 Pro's construction (its svi_wan22 branch,
  WanVideoUnit_ImageEmbedderVAE): y = [mask on frame 0 only, latents [anchor, motion..., zeros...]] with the anchor
  the start image's latent (encoded once), the motion the previous clip's last (overlap - 1) / 4 latent frames as
  the sampler left them (never decoded), zeros in the normalised latent space. Each clip is decoded once, for output;
  every clip after the first loses its first `overlap` frames (the anchor's frame and the re-created motion frames).
- "svi 2.0" on Wan 2.2 I2V-A14B (svi_wan22's SVI 2.0): y = [mask on frame 0, VAE([last frame, anchor x (L - 1)])],
  the last frame as the reference carries it (an 8-bit image); clips after the first lose their first frame.
- "svi 2.0" / "svi 1.0 shot" / "svi 1.0 film" on Wan 2.1 I2V-14B (SVI's test_svi.py): y = [mask on frame 0,
  VAE([the last `overlap` frames (8-bit), padding])], padding the anchor image repeated (svi 2.0, shot) or zeros
  (film); the CLIP tokens are those of each clip's first frame; every clip but the last loses its last `overlap`
  frames (the next clip re-creates them).
`join` overrides how the overlap is joined: "cut" (the references' cut; pixel: later clips lose their head) or
"cross-fade" (latent carry: the start image's frame dropped, the re-created motion frames blended).
`overlap` is 1 + 4j frames, so the known frames fill exactly the first 1 + j latent frames of the new clip. The SVI
modes seed clip k with seed + 42 k (the references use k x 42: seed 0 reproduces them), the others with seed + k.
Colour anchoring (colour.py), when on, maps each clip's colour statistics (over the frames the join keeps) to clip
0's before the join.

Memory: one clip's latent and conditioning on the device; finished frames are yielded (to the CPU) as soon as no later
clip can change them; only the last `overlap` frames (or motion latents) are held back.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .colour import colour_stats, match_colour
from .conditioning import carried_latents_y, known_frames_y
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
    clip's last frame); clip: CLIP tokens kept for every clip (Wan 2.1 I2V / FLF2V); encode_clip: pixels
    [1, 3, H, W] -> CLIP tokens, for the SVI modes that encode each clip's first frame."""
    kind: str
    contexts: list
    neg_context: torch.Tensor
    start: Optional[torch.Tensor] = None
    end: Optional[torch.Tensor] = None
    clip: Optional[torch.Tensor] = None
    encode_clip: Optional[Callable] = None


CONTINUATIONS = ("auto", "pixel", "latent carry", "svi 2.0 pro", "svi 2.0", "svi 1.0 shot", "svi 1.0 film")
SVI_SEED_STEP = 42  # SVI's inference scripts seed clip k with k x 42


@dataclass(frozen=True)
class Rule:
    """How clip k+1 continues clip k. carry: "pixels" (the last `overlap` decoded frames) or "latents" (the last
    (overlap - 1) / 4 sampled latent frames); pad: what follows them in the image conditioning, "zeros" or "anchor"
    (the start image repeated); mark_all: the mask marks every carried frame (else frame 0 only); join: "blend"
    (cross-fade the overlap), "drop head" (later clips lose their first `overlap` frames) or "drop tail" (clips
    before the last lose their last `overlap` frames); seed_step: clip k uses seed + seed_step * k; eight_bit: carried
    frames rounded to 8 bits as the reference's images; clip_each: Wan 2.1, the CLIP tokens of each clip's first
    frame."""
    carry: str = "pixels"
    pad: str = "zeros"
    mark_all: bool = True
    join: str = "blend"
    seed_step: int = 1
    eight_bit: bool = False
    clip_each: bool = False


PIXEL = Rule()


def continuation_rule(mode, kind, wan21, overlap, end=False):
    """The Rule of a continuation mode for a model of this conditioning kind (wan21: it takes CLIP tokens; end: an
    FLF2V end image is given, which only the pixel path takes); ValueError naming the input and the fix where the
    mode does not fit the model or the overlap."""
    if mode not in CONTINUATIONS:
        raise ValueError(f"continuation must be one of {', '.join(CONTINUATIONS)}, got {mode!r}")
    if mode == "auto":
        mode = "latent carry" if kind == "image" and not end else "pixel"
    if mode == "pixel":
        return PIXEL
    if kind != "image":
        raise ValueError(f"continuation {mode!r} is for the image-to-video models (Wan 2.1 I2V / FLF2V, Wan 2.2 "
                         "I2V-A14B); for this model use 'pixel' (or 'auto')")
    if mode in ("latent carry", "svi 2.0 pro"):
        if overlap < 5:
            raise ValueError(f"continuation {mode!r} carries (overlap - 1) / 4 latent frames: set overlap to 5 or "
                             "more (SVI 2.0 Pro uses 5)")
        if mode == "svi 2.0 pro" and wan21:
            raise ValueError("continuation 'svi 2.0 pro' is for Wan 2.2 I2V-A14B (its LoRAs); for Wan 2.1 I2V use "
                             "'svi 2.0', 'svi 1.0 shot' / 'film' or 'latent carry'")
        return Rule("latents", mark_all=False, join="drop head", seed_step=SVI_SEED_STEP if "svi" in mode else 1)
    if not wan21:
        if mode != "svi 2.0":
            raise ValueError(f"continuation {mode!r} is for Wan 2.1 I2V-14B (SVI 1.0); for Wan 2.2 I2V-A14B use "
                             "'svi 2.0 pro' or 'svi 2.0'")
        if overlap != 1:
            raise ValueError("continuation 'svi 2.0' on Wan 2.2 I2V-A14B carries the last frame: set overlap to 1")
        return Rule("pixels", "anchor", False, "drop head", SVI_SEED_STEP, True)
    return Rule("pixels", "zeros" if mode == "svi 1.0 film" else "anchor", False, "drop tail", SVI_SEED_STEP, True,
                True)


def eight_bit(frames):
    """Frames in [-1, 1] as the references carry them between clips: 8-bit images ((x + 1) * 127.5, clipped,
    truncated to uint8, as PIL gets them) read back as v * 2 / 255 - 1."""
    return ((frames + 1) * 127.5).clamp(0, 255).to(torch.uint8).to(frames.dtype) * (2 / 255) - 1


def clip_conds(vae, job, k, clips, carried, length, rule=PIXEL, anchor=None):
    """(cond, uncond) of clip k. carried: what clip k - 1 left (pixel frames [1, 3, n, H, W] -- for clip 0 the start
    image -- or latent frames [1, z, m, h, w]; None: nothing known); anchor: the start image's latent (latent carry)."""
    image, tokens = {}, job.clip
    if job.kind == "image":
        if rule.carry == "latents":
            image["y"] = carried_latents_y(anchor, carried, length)
        else:
            if carried is None:
                raise ValueError("this image-to-video model needs a start image: connect start_image")
            end = job.end if k == clips - 1 else None
            image["y"] = known_frames_y(vae, carried, end, length, fill=job.start if rule.pad == "anchor" else None,
                                        marked=None if rule.mark_all else 1)
            if rule.clip_each and k > 0:
                tokens = job.encode_clip(carried[:, :, 0])
    elif carried is not None:
        image["first_frame" if job.kind == "ti2v" else "pinned"] = vae.encode(carried)
    return (Cond(job.contexts[k], clip=tokens, **image),
            Cond(job.neg_context, clip=tokens, **image))


def cross_fade(tail, head):
    """Frames [3, n, H, W] of the overlap: clip k's tail fading into clip k+1's head (weights (i + 1) / (n + 1))."""
    n = tail.shape[1]
    w = torch.arange(1, n + 1, dtype=tail.dtype).div(n + 1).view(1, n, 1, 1)
    return tail * (1 - w) + head * w


JOINS = ("auto", "cut", "cross-fade")


def join_of(rule, choice="auto"):
    """The join a choice means for a rule: auto, the mode's reference (cross-fade for pixel, the SVI scripts' cut for
    the others); cut, that cut (pixel: later clips lose their head, the first rendering kept); cross-fade: blend."""
    if choice not in JOINS:
        raise ValueError(f"join must be one of {', '.join(JOINS)}, got {choice!r}")
    if choice == "auto":
        return rule.join
    if choice == "cut":
        return "drop head" if rule.join == "blend" else rule.join
    return "blend"


def join_clip(join, frames, k, last, tail, overlap, skip=0):
    """(chunks of clip k's frames [3, T, H, W] that go out now, the tail held back for the next clip). blend: the
    first `skip` frames of later clips dropped (latent carry's frame 0 is the start image, no re-creation), the next
    overlap - skip cross-faded with the tail held back."""
    if join == "drop head":
        return [frames if k == 0 else frames[:, overlap:]], None
    if join == "drop tail":
        return [frames if last else frames[:, :-overlap]], None
    n = overlap - skip
    chunks = [] if tail is None else [cross_fade(tail, frames[:, skip:overlap])]
    chunks.append(frames[:, (0 if tail is None else overlap):(None if last else -n)])
    return chunks, None if last else frames[:, -n:].clone()


def kept_frames(join, frames, k, last, overlap, skip=0):
    """The frames of clip k [3, T, H, W] that the join keeps whole or blends (what colour anchoring measures)."""
    if join == "drop head" and k > 0:
        return frames[:, overlap:]
    if join == "drop tail" and not last:
        return frames[:, :-overlap]
    return frames[:, skip:] if k > 0 else frames


def _check_job(job, rule):
    if job.kind not in KINDS:
        raise ValueError(f"unknown conditioning kind {job.kind!r}, expected one of {KINDS}")
    if rule != PIXEL and job.end is not None:
        raise ValueError("end_image (FLF2V) works with continuation 'pixel' only: set continuation to 'pixel' or "
                         "disconnect end_image")
    if rule.carry == "latents" or rule.pad == "anchor":
        if job.start is None:
            raise ValueError("this continuation anchors every clip on the start image: connect start_image")
    if rule.clip_each and job.encode_clip is None:
        raise ValueError("the SVI modes for Wan 2.1 encode each clip's first frame with CLIP: connect clip_vision "
                         "(Wan Load CLIP Vision)")


def generate_long(experts, vae, job: LongJob, *, clips, clip_length, overlap, seed, steps, shift, sampler, width,
                  height, channels=16, device="cpu", dtype=torch.float32, callback=None,
                  on_clip: Optional[Callable] = None, rule=PIXEL, colour_anchor=False, join="auto"):
    """Yield the video's frames in order as float32 CPU chunks [3, n, H, W] in [-1, 1]; clip_length + (clips - 1) *
    (clip_length - overlap) frames in all. experts: as pipeline.generate takes them (loaded when first used in each
    clip); vae: encode / decode on the device; rule: the continuation (clip k uses seed + rule.seed_step * k); join:
    a JOINS choice; colour_anchor: match each clip's colour statistics to clip 0's. callback(step, steps, x, x0) per
    step; on_clip(k, clips, cond) before each clip is sampled (progress, interrupts, tests)."""
    _check_job(job, rule)
    join, skip = join_of(rule, join), 1 if rule.carry == "latents" else 0
    count_clips(clip_length + (clips - 1) * (clip_length - overlap), clip_length, overlap)  # checks both
    start = None if job.start is None else job.start[:, :, None].to(device)
    anchor = vae.encode(start) if rule.carry == "latents" else None
    carried = None if rule.carry == "latents" else start
    tail = reference = None
    for k in range(clips):
        cond, uncond = clip_conds(vae, job, k, clips, carried, clip_length, rule, anchor)
        if on_clip:
            on_clip(k, clips, cond)
        latent = generate(experts, cond, uncond, seed=seed + rule.seed_step * k, steps=steps, shift=shift,
                          sampler=sampler, width=width, height=height, length=clip_length, channels=channels,
                          device=device, dtype=dtype, callback=callback)
        del cond, uncond
        with torch.no_grad():
            video = vae.decode(latent)
        if rule.carry == "latents":  # the next clip's motion: this clip's last latent frames as sampled, untouched
            carried = latent[:, :, latent.shape[2] - (overlap - 1) // TIME_STRIDE:].clone()
        else:  # the next clip's start: this clip's last frames as decoded
            carried = eight_bit(video[:, :, -overlap:]) if rule.eight_bit else video[:, :, -overlap:].clone()
        del latent
        frames = video[0].float().cpu()
        del video
        if colour_anchor:
            stats = colour_stats(kept_frames(join, frames, k, k == clips - 1, overlap, skip))
            reference = reference or stats
            frames = frames if k == 0 else match_colour(frames, reference, stats)
        chunks, tail = join_clip(join, frames, k, k == clips - 1, tail, overlap, skip)
        del frames
        yield from chunks
