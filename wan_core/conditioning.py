"""Image conditioning for I2V / FLF2V (mask + VAE latent of [first, zeros..., last]) and TI2V-5B
(the first frame's latent), and the images' way in: ComfyUI-style [B, H, W, C] in [0, 1].

Sizing ("crop", the pack's default: scale to cover the asked width x height, bicubic, centre-crop) or "official":
- image-to-video (official image2video / first_last_frame2video): the video size follows the image's aspect ratio
  at about max_area = width * height pixels, each side floored to a multiple of 16 (`official_i2v_size`); the image
  is resized to it with bicubic interpolation (no antialias, no clamp, no crop). A last frame of another size is
  first centre-cropped as the official FLF2V code does it (`official_end_frame`).
- speech-to-video (official speech2video): the size is picked from the reference image and the area in multiples
  of 64 (`official_s2v_size`, get_size_less_than_area); the image's short side is resized to the short side of that
  size (bilinear with antialias, as torchvision's Resize on a PIL image), rounded to 8-bit levels, and centre-cropped
  (torchvision's CenterCrop: zero-padded, i.e. black bars, where the resized image is smaller).
"""
import math

import torch
import torch.nn.functional as F

from .checks import check_finite
from .pipeline import TIME_STRIDE, frame_mask


def _rgb(images, name):
    """IMAGE [B, H, W, C] in [0, 1] -> [B, H, W, 3]: grey (1 channel) broadcast to RGB, alpha dropped. Other channel
    counts, empty images and NaN/inf pixels are refused naming `name`."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be an IMAGE [frames, height, width, channels] with 1 (grey), 3 (RGB) or 4 (RGBA) "
                         f"channels, got shape {tuple(images.shape)}: convert it to RGB first")
    if 0 in images.shape[:3]:
        raise ValueError(f"{name} is empty ({images.shape[0]} frames of {images.shape[2]}x{images.shape[1]} pixels): "
                         "connect a real image")
    check_finite(images, name)
    return images[..., :3] if images.shape[-1] >= 3 else images.expand(-1, -1, -1, 3)


def to_pixels(image, name):
    """[B, H, W, C] in [0, 1] -> [1, 3, H, W] in [-1, 1]; grey images are expanded, alpha is dropped."""
    rgb = _rgb(image, name)
    if rgb.shape[0] != 1:
        raise ValueError(f"{name} holds {image.shape[0]} images but one is used: pick one (e.g. with Image From Batch)")
    return rgb.permute(0, 3, 1, 2).float() * 2 - 1


def pose_pixels(video, name="pose_video"):
    """IMAGE frames [T, H, W, C] in [0, 1] (grey, RGB or RGBA, any count) -> [1, 3, T, H, W] in [-1, 1]."""
    return _rgb(video, name).permute(3, 0, 1, 2)[None].float() * 2 - 1


def fit(pixels, width, height):
    """Scale to cover width x height keeping the aspect ratio, then centre-crop (bicubic, clamped)."""
    _, _, h, w = pixels.shape
    scale = max(width / w, height / h)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    out = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return out[:, :, top:top + height, left:left + width]


SIZINGS = ("crop", "official")


def official_i2v_size(height, width, max_area, stride=8, patch=2):
    """The official image-to-video size (h, w) for an image height x width: lat = sqrt(area * aspect) floored to
    whole patches of stride * patch pixels, per side (aspect = height / width, as the official code divides)."""
    aspect = height / width
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    if lat_h < 1 or lat_w < 1:
        raise ValueError(f"the image ({width}x{height}) is too narrow for an area of {max_area} pixels: "
                         "raise width x height, or use sizing: crop")
    return lat_h * stride, lat_w * stride


def centre_crop(pixels, height, width, fill=0.0):
    """torchvision's CenterCrop on [..., H, W]: padded with `fill` (left/top get the smaller half) where smaller,
    then the window at round((H - height) / 2), round((W - width) / 2) (Python's round, half to even)."""
    h, w = pixels.shape[-2:]
    if h < height or w < width:
        ph, pw = max(0, height - h), max(0, width - w)
        pixels = F.pad(pixels, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2), value=fill)
        h, w = pixels.shape[-2:]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return pixels[..., top:top + height, left:left + width]


def official_end_frame(end, start_hw):
    """The official FLF2V step for a last frame whose size differs from the first's: r = max(first / last) per
    side (PIL width, height order) and the last frame centre-cropped, not resized, to [round(w_l r), round(h_l r)],
    read by torchvision as (height, width), padded with 0 where larger -- as the official code writes it."""
    (hf, wf), (hl, wl) = start_hw, end.shape[-2:]
    if (hf, wf) == (hl, wl):
        return end
    r = max(wf / wl, hf / hl)
    return centre_crop(end, round(wl * r), round(hl * r))


def official_i2v_pixels(start, end, max_area):
    """Start (and end) image [1, 3, H, W] in [-1, 1] -> (start, end) resized to official_i2v_size, bicubic."""
    h, w = official_i2v_size(*start.shape[-2:], max_area)
    resize = lambda x: F.interpolate(x, size=(h, w), mode="bicubic")  # noqa: E731
    return resize(start), None if end is None else resize(official_end_frame(end, start.shape[-2:]))


def official_s2v_size(height, width, max_area, divisor=64):
    """The official S2V size (h, w) for a reference image height x width: the largest of 100 scales, from the one
    filling max_area down to the one leaving room for padding up to multiples of 64, whose padded size fits in
    max_area; failing that, the area's size floored to multiples of `divisor` (the image's own when larger)."""
    if height * width <= max_area:
        low, high = 0.1, 1.0
    else:
        d = divisor - 1
        a, b, c = height * width, d * (height + width), d ** 2 - max_area
        low = (-b + math.sqrt(b ** 2 - 2 * a * c)) / (2 * a)  # the official expression, as written
        high = math.sqrt(max_area / (height * width))
    for i in range(100):
        scale = high - (high - low) * i / 100
        h, w = int(height * scale), int(width * scale)
        h, w = h + (64 - h % 64) % 64, w + (64 - w % 64) % 64
        if h * w <= max_area:
            return h, w
    aspect = width / height
    tw, th = int((max_area * aspect) ** 0.5 // divisor * divisor), int((max_area / aspect) ** 0.5 // divisor * divisor)
    if tw >= width or th >= height:
        tw, th = int(width // divisor * divisor), int(height // divisor * divisor)
    return th, tw


def official_s2v_pixels(pixels, height, width):
    """[N, 3, H, W] in [-1, 1] -> [N, 3, height, width]: short side resized to min(height, width) (the long side
    int(min * long / short)), bilinear with antialias, 8-bit levels, then centre-cropped with black bars."""
    h, w = pixels.shape[-2:]
    short = min(height, width)
    size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    x = F.interpolate((pixels + 1) / 2, size=size, mode="bilinear", antialias=True, align_corners=False)
    x = (x.clamp(0, 1) * 255).round() / 255
    return centre_crop(x, height, width) * 2 - 1


def image_latents(vae, start, end, width, height, length, sizing="crop"):
    """I2V/FLF2V: y = [4-ch frame mask, latent of [start, zeros..., end]] -> [1, 4 + z, T_lat, h, w].
    TI2V (48-channel VAE): the start frame's latent [1, 48, 1, h, w]; returns (y, first_frame), one of them None.
    sizing "official": width x height is the area; the video size follows the start image (official_i2v_size)."""
    if vae.z_dim == 48:
        if end is not None:
            raise ValueError("TI2V-5B takes a start image only: disconnect end_image")
        if sizing == "official":
            raise ValueError("Wan Image To Video: sizing 'official' follows the image-to-video models (Wan 2.1 "
                             "I2V/FLF2V, Wan 2.2 I2V-A14B); for TI2V-5B use sizing: crop")
        return None, vae.encode(fit(start, width, height)[:, :, None])
    if end is not None and length < 5:
        raise ValueError("a first-last-frame video needs a length of at least 5 frames")
    if sizing == "official":
        start, end = official_i2v_pixels(start, end, width * height)
    else:
        start, end = fit(start, width, height), None if end is None else fit(end, width, height)
    return known_frames_y(vae, start[:, :, None], end, length), None


def known_frames_y(vae, known, end, length, fill=None, marked=None):
    """The I2V/FLF2V channel conditioning of a video of `length` frames that starts with the pixel frames `known`
    [1, 3, n, H, W] (and ends on the image `end` [1, 3, H, W], FLF2V): [mask (1 on the first `marked` frames, default
    all n known ones), latent of [known..., fill..., end]] -> [1, 4 + z, T_lat, h, w]. fill: an image [1, 3, H, W]
    repeated over the frames after the known ones (SVI's anchor padding); None: zeros."""
    n = known.shape[2]
    frames = known.new_zeros(1, 3, length, *known.shape[-2:])
    frames[:, :, :n] = known
    if fill is not None:
        frames[:, :, n:] = fill.to(frames)[:, :, None]
    if end is not None:
        frames[:, :, -1] = end
    latent = vae.encode(frames)
    mask = frame_mask(length, latent.shape[-2], latent.shape[-1], last=end is not None,
                      first=n if marked is None else marked).to(latent)
    return torch.cat([mask, latent], dim=1)


def carried_latents_y(anchor, motion, length):
    """SVI 2.0 Pro's channel conditioning (the pack's latent carry): [mask (1 on the first frame only), latents
    [anchor, motion..., zeros...]] -> [1, 4 + z, T_lat, h, w]. anchor: the start image's latent [1, z, 1, h, w]
    (encoded once); motion: the previous clip's last sampled latent frames [1, z, m, h, w] (None for clip 0); the
    rest are zeros in the normalised latent space (not the encoding of black frames)."""
    t_lat = 1 + (length - 1) // TIME_STRIDE
    latent = anchor.new_zeros(*anchor.shape[:2], t_lat, *anchor.shape[-2:])
    latent[:, :, :1] = anchor
    if motion is not None:
        latent[:, :, 1:1 + motion.shape[2]] = motion.to(latent)
    mask = frame_mask(length, latent.shape[-2], latent.shape[-1], first=1).to(latent)
    return torch.cat([mask, latent], dim=1)


def clip_tokens(start, end=None):
    """CLIP vision tokens of the start image [1, 257, 1280], with the end image's appended for FLF2V."""
    return start if end is None else torch.cat([start, end], dim=1)
