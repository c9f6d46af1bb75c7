"""Image conditioning for I2V / FLF2V (mask + VAE latent of [first, zeros..., last]) and TI2V-5B
(the first frame's latent), and the images' way in: ComfyUI-style [B, H, W, C] in [0, 1]."""
import torch
import torch.nn.functional as F

from .checks import check_finite
from .pipeline import frame_mask


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


def image_latents(vae, start, end, width, height, length):
    """I2V/FLF2V: y = [4-ch frame mask, latent of [start, zeros..., end]] -> [1, 4 + z, T_lat, h, w].
    TI2V (48-channel VAE): the start frame's latent [1, 48, 1, h, w]; returns (y, first_frame), one of them None."""
    start = fit(start, width, height)
    if vae.z_dim == 48:
        if end is not None:
            raise ValueError("TI2V-5B takes a start image only: disconnect end_image")
        return None, vae.encode(start[:, :, None])
    if end is not None and length < 5:
        raise ValueError("a first-last-frame video needs a length of at least 5 frames")
    return known_frames_y(vae, start[:, :, None], None if end is None else fit(end, width, height), length), None


def known_frames_y(vae, known, end, length):
    """The I2V/FLF2V channel conditioning of a video of `length` frames that starts with the pixel frames `known`
    [1, 3, n, H, W] (and ends on the image `end` [1, 3, H, W], FLF2V): [mask (1 on the known frames), latent of
    [known..., zeros..., end]] -> [1, 4 + z, T_lat, h, w]."""
    n = known.shape[2]
    frames = known.new_zeros(1, 3, length, *known.shape[-2:])
    frames[:, :, :n] = known
    if end is not None:
        frames[:, :, -1] = end
    latent = vae.encode(frames)
    mask = frame_mask(length, latent.shape[-2], latent.shape[-1], last=end is not None, first=n).to(latent)
    return torch.cat([mask, latent], dim=1)


def clip_tokens(start, end=None):
    """CLIP vision tokens of the start image [1, 257, 1280], with the end image's appended for FLF2V."""
    return start if end is None else torch.cat([start, end], dim=1)
