"""Long speech-to-video in one call, as the official Wan2.2 speech2video loop runs it: clips of 80 frames; each
clip after the first continues from the last 73 decoded frames (VAE-encoded into 19 motion latent frames) and
the audio window advances by exactly one clip. Memory is bounded per clip: only finished frames accumulate."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .conditioning import fit, official_s2v_pixels
from .pipeline import guided, initial_noise, noise_generator, pad_context
from .sampling import sample

CLIP_FRAMES = 80    # pixel frames per clip (infer_frames)
MOTION_FRAMES = 73  # pixel frames carried into the next clip as motion
DROP_FIRST = 3      # clip 0 decodes [reference, 20 latents] and drops its first 3 frames (drop_first_motion)
LATENTS_PER_CLIP = (CLIP_FRAMES + 3 + MOTION_FRAMES) // 4 - (MOTION_FRAMES + 3) // 4  # 20
FPS = 16


def output_frames(clips, num_samples, sample_rate, whole_clips=False, fps=FPS):
    """Frames a video of `clips` clips keeps for audio of num_samples at sample_rate. The official run writes all
    clips * 80 - 3 frames and then muxes its audio file with ffmpeg -c:v copy -shortest, which keeps
    floor(num_samples * fps / sample_rate) frames when the audio is the shorter (tests/test_s2v_pipeline.py runs
    the official merge_video_audio); whole_clips keeps every generated frame (the tail past the audio is silent)."""
    made = clips * CLIP_FRAMES - DROP_FIRST
    if whole_clips:
        return made
    return max(1, min(made, int(num_samples) * fps // int(sample_rate)))


@dataclass
class S2VJob:
    """Everything one speech-to-video run needs besides the models. audio: bucketed wav2vec2 features
    [1, 25, 1024, clips * 80]; ref_latent [1, 16, 1, h, w]; pose_latents: one [1, 16, 20, h, w] per clip or None."""
    context: torch.Tensor
    neg_context: torch.Tensor
    audio: torch.Tensor
    ref_latent: torch.Tensor
    pose_latents: Optional[list] = None


def fit_frames(frames, width, height, sizing="crop"):
    """[N, 3, H, W] in [-1, 1] -> [N, 3, height, width]: conditioning.fit (crop) or the official S2V resize."""
    if sizing == "official":
        return official_s2v_pixels(frames, height, width)
    return torch.cat([fit(f[None], width, height) for f in frames])


def pose_latents(vae, pose, width, height, clips, sizing="crop"):
    """Pose video [1, 3, T, H, W] in [-1, 1] -> per clip: 80 frames (padded with -1 past the end), first frame
    repeated once in front, VAE-encoded, first latent dropped -> [1, 16, 20, h, w] (the official load_pose_cond)."""
    frames = fit_frames(pose[0].transpose(0, 1), width, height, sizing).transpose(0, 1)[None]
    need = clips * CLIP_FRAMES
    frames = frames[:, :, :need]
    if frames.shape[2] < need:
        pad = -torch.ones(1, 3, need - frames.shape[2], height, width, dtype=frames.dtype, device=frames.device)
        frames = torch.cat([frames, pad], dim=2)
    out = []
    for chunk in frames.split(CLIP_FRAMES, dim=2):
        out.append(vae.encode(torch.cat([chunk[:, :, :1], chunk], dim=2))[:, :, 1:])
    return out


def s2v_denoiser(model, job, clip, motion, guidance, dtype):
    """CFG over one batch: (prompt, audio) and (negative prompt, silent audio), same reference/motion/pose."""
    window = job.audio[..., clip * CLIP_FRAMES:(clip + 1) * CLIP_FRAMES]
    both = guided(guidance)
    ctx = torch.cat([pad_context(job.context), pad_context(job.neg_context)]) if both else pad_context(job.context)
    audio = torch.cat([window, torch.zeros_like(window)]) if both else window
    pose = job.pose_latents[clip] if job.pose_latents else None

    def denoise(x, sigma, t):
        xin = torch.cat([x, x]) if both else x
        tin = torch.full((xin.shape[0],), float(t), device=x.device)
        v = model(xin.to(dtype), tin, ctx.to(x.device, dtype), audio=audio.to(x.device), ref_latent=job.ref_latent,
                  motion_latent=motion, pose_latent=pose).float()
        if not both:
            return v
        c, u = v.chunk(2)
        return u + guidance * (c - u)

    return denoise


def generate_s2v(get_model: Callable, vae, job: S2VJob, *, clips, seed, steps, cfg, shift, sampler, width, height,
                 device="cpu", dtype=torch.float32, callback=None, on_clip=None, noise_mode="comfy"):
    """-> frames [1, 3, clips * 80 - 3, H, W] in [-1, 1] (on the CPU). get_model() returns the DiT ready on the
    device (called per clip, so a memory manager may swap the VAE and the DiT); callback(step, steps, ...) per
    step; on_clip(clip, clips, motion_latent) after each clip (progress, tests). Clip r's noise is seeded
    seed + r; noise_mode "official" draws it in bfloat16 on the device, as the official S2V does."""
    h, w = height // 8, width // 8
    history = torch.zeros(1, 3, MOTION_FRAMES, height, width, device=device)
    out = []
    for clip in range(clips):
        motion = None if clip == 0 else vae.encode(history.to(device))
        if on_clip:
            on_clip(clip, clips, motion)
        generator = noise_generator(noise_mode, device)
        noise = initial_noise((1, 16, LATENTS_PER_CLIP, h, w), seed + clip, noise_mode, device, torch.bfloat16,
                              generator=generator)
        denoise = s2v_denoiser(get_model(), job, clip, motion, cfg, dtype)
        with torch.no_grad():
            latent = sample(denoise, noise, sampler=sampler, steps=steps, shift=shift, callback=callback,
                            generator=generator)
            first = job.ref_latent if clip == 0 else motion
            video = vae.decode(torch.cat([first.to(latent), latent], dim=2))[:, :, -CLIP_FRAMES:]
        if clip == 0:
            video = video[:, :, DROP_FIRST:]
        history = torch.cat([history, video.to(history)], dim=2)[:, :, -MOTION_FRAMES:]
        out.append(video.float().cpu())
    return torch.cat(out, dim=2)
