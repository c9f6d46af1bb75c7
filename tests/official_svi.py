"""How Stable-Video-Infinity builds and joins its clips, transcribed from its code as a test reference (read, not
copied; no SVI package exists to install). The pipelines take PIL images; here the same steps take the tensors those
images become (`preprocess_image`: [3, H, W] in [-1, 1]), and the VAE / CLIP encoders are functions in DiffSynth's
calling convention (`encode([video [3, T, H, W], ...])` -> [B, z, t, h, w], normalised latents).

- SVI 2.0 Pro, `svi_wan22` branch, diffsynth/pipelines/wan_video_svi_pro.py `WanVideoUnit_ImageEmbedderVAE.process`
  and inference_svi_2.0_pro.py (seed clip x 42, clip 0 kept whole, later clips from frame num_overlap_frame = 5,
  prev_last_latent = the sampled latents [z, T, h, w]);
- SVI 2.0 for Wan 2.2, same branch, diffsynth/pipelines/wan_video_svi.py `WanVideoUnit_ImageEmbedderVAE.process`
  and inference_svi_2.0.py (the last decoded frame as an 8-bit image, later clips from frame 1);
- SVI 1.0 / SVI 2.0 for Wan 2.1, main branch, diffsynth/pipelines/svi_video.py `encode_images_adaptive` and
  test_svi.py (the last num_motion_frames frames as 8-bit images; clips but the last end num_motion_frames early).
"""
import torch


def _first_frame_mask(num_frames, h, w):
    """The mask every SVI pipeline builds: 1 on pixel frame 0 only, frame 0 repeated 4x, folded by 4 -> [4, T, h, w]."""
    msk = torch.ones(1, num_frames, h, w)
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, h, w)
    return msk.transpose(1, 2)[0]


def svi_pro_y(encode, anchor, prev_last_latent, num_frames, height, width, num_motion_latent=1):
    """SVI 2.0 Pro's y [1, 4 + z, T, h, w]: anchor [3, H, W]; prev_last_latent [z, T, h, w] or None (clip 0)."""
    anchor_latent = encode([anchor[None].transpose(0, 1)])[0]
    total_latents = (num_frames - 1) // 4 + 1
    if prev_last_latent is None:
        padding = torch.zeros(anchor_latent.shape[0], total_latents - anchor_latent.shape[1], *anchor_latent.shape[2:])
        y = torch.concat([anchor_latent, padding], dim=1)
    else:
        motion_latent = prev_last_latent[:, -num_motion_latent:]
        padding_size = total_latents - anchor_latent.shape[1] - motion_latent.shape[1]
        padding = torch.zeros(anchor_latent.shape[0], padding_size, *anchor_latent.shape[2:])
        y = torch.concat([anchor_latent, motion_latent, padding], dim=1)
    msk = _first_frame_mask(num_frames, height // 8, width // 8)
    return torch.concat([msk, y]).unsqueeze(0)


def svi2_wan22_y(encode, image, anchor, num_frames, height, width):
    """SVI 2.0 (Wan 2.2)'s y: VAE([image, anchor x (num_frames - 1)]) behind the frame-0 mask; image, anchor
    [3, H, W]."""
    input_pad = anchor[:, None].repeat(1, num_frames - 1, 1, 1)
    vae_input = torch.concat([image[:, None], input_pad], dim=1)
    y = encode([vae_input])[0]
    return torch.concat([_first_frame_mask(num_frames, height // 8, width // 8), y]).unsqueeze(0)


def svi_wan21_conditioning(encode, encode_clip, first_frames, ref_frame, num_frames, height, width, ref_pad_num):
    """test_svi.py's encode_images_adaptive (ref_pad_cfg off): (CLIP tokens of first_frames[0], y). first_frames:
    a list of [3, H, W]; ref_pad_num 0: zero padding, -1: the reference frame over every remaining frame, k > 0: k
    reference frames then zeros."""
    remaining = num_frames - len(first_frames)
    clip_context = encode_clip(first_frames[0][None])
    condition = torch.stack(first_frames, dim=1)  # (3, n, H, W)
    if ref_pad_num == 0:
        pad = torch.zeros(3, remaining, height, width)
    elif ref_pad_num > 0:
        pad = torch.cat([ref_frame[:, None]] * ref_pad_num + [torch.zeros(3, 1, height, width)] *
                        max(0, remaining - ref_pad_num), dim=1)
    else:
        pad = ref_frame[:, None].repeat(1, remaining, 1, 1)
    y = encode([torch.concat([condition, pad], dim=1)])[0]
    return clip_context, torch.concat([_first_frame_mask(num_frames, height // 8, width // 8), y]).unsqueeze(0)


def as_8bit_image(frame):
    """A decoded frame [3, H, W] in [-1, 1] -> the PIL image the scripts keep -> preprocess_image's tensor."""
    pil = ((frame - (-1)) * (255 / 2)).clip(0, 255).to(dtype=torch.uint8)
    return pil.to(torch.float32) * (2 / 255) + (-1)


def join(kind, clips, overlap):
    """The scripts' streams of frames from decoded clips [3, T, H, W]: "pro" (clip 0 whole, later ones from frame
    `overlap`), "svi2" (later ones from frame 1), "wan21" (every clip but the last without its last `overlap`)."""
    out = []
    for k, clip in enumerate(clips):
        if kind == "wan21":
            out.append(clip[:, :-overlap] if k < len(clips) - 1 else clip)
        else:
            out.append(clip if k == 0 else clip[:, overlap if kind == "pro" else 1:])
    return torch.cat(out, dim=1)


def seed(clip_idx, seed_multiplier=42):
    return clip_idx * seed_multiplier
