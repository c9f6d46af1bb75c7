"""Generation glue the sampler nodes call: size checks, noise, image conditioning, CFG, the Wan 2.2
expert switch, and the solver loop. Model-agnostic: it sees modules and tensors, never ComfyUI."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .checks import nearest_valid
from .sampling import sample

TIME_STRIDE = 4  # both Wan VAEs compress 4 frames into one latent frame (after the first)


def spatial_stride(latent_channels):
    """8 for the Wan 2.1 VAE (16 channels), 16 for the Wan 2.2 VAE (48 channels)."""
    return 16 if latent_channels == 48 else 8


def check_video_size(width, height, length, multiple=16):
    """ValueError naming the bad input and the nearest valid values: sizes multiple of `multiple`, length 1+4k."""
    for name, v in (("width", width), ("height", height)):
        if v % multiple or v <= 0:
            raise ValueError(f"{name} {v} is not a multiple of {multiple}; use {nearest_valid(v, multiple)}")
    if length < 1 or (length - 1) % TIME_STRIDE:
        raise ValueError(f"length {length} is not 1+4k frames; use {nearest_valid(length, 4, 1)}")


def latent_shape(width, height, length, channels=16, batch=1):
    s = spatial_stride(channels)
    return (batch, channels, (length - 1) // TIME_STRIDE + 1, height // s, width // s)


SEED_SPACE = 2 ** 64  # seeds wrap modulo 2^64 (the widgets' range), so seed + clip never overflows the generator
NOISE_MODES = ("comfy", "official")


def guided(cfg):
    """Whether guidance `cfg` needs the negative pass: not at 1, within 1e-6 (as Wan2.2-Lightning's use_cfg; a
    widget's 1.0000000000000002 is 1)."""
    return abs(cfg - 1.0) > 1e-6


def noise_generator(mode, device):
    """The generator initial_noise draws on, which lcm-distilled then goes on drawing from: a CPU one for comfy,
    one on `device` for official."""
    return torch.Generator("cpu" if mode == "comfy" else device)


def initial_noise(shape, seed, mode="comfy", device="cpu", dtype=torch.float32, generator=None):
    """Seeded Gaussian noise [shape] float32 on `device`; any integer seed, taken mod 2^64.

    comfy: drawn by a CPU generator in float32 (ComfyUI's convention: the same numbers on every device).
    official: drawn as the official generate() draws it: torch.Generator(device) seeded with `seed`, torch.randn
    on that device in `dtype` (float32 for T2V / I2V / FLF2V / TI2V / A14B; S2V: bfloat16, seeded seed + clip per
    clip), the same element count in the same order (the official tensor lacks the batch axis); then float32.
    `generator`: that generator (a CPU one for comfy, one on `device` for official), seeded here, to keep drawing
    from afterwards (lcm-distilled's fresh noise: LightX2V draws it from the generator of the initial noise)."""
    if mode not in NOISE_MODES:
        raise ValueError(f"seed_mode must be one of {', '.join(NOISE_MODES)}, got {mode!r}")
    seed = int(seed) % SEED_SPACE
    generator = (generator or noise_generator(mode, device)).manual_seed(seed)
    if mode == "comfy":
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device).float()


def pad_context(ctx, length=512):
    """[L, D] or [1, L, D] text features -> [1, length, D], zero-padded as the official code pads them."""
    ctx = ctx.reshape(-1, ctx.shape[-1])[:length]
    return F.pad(ctx, (0, 0, 0, length - ctx.shape[0]))[None]


def frame_mask(length, h, w, last=False, first=1):
    """The I2V/FLF2V 4-channel mask [1, 4, T_lat, h, w]: 1 on known pixel frames (the first `first` ones, and the
    last for FLF2V), the first frame repeated 4x, then every 4 pixel frames folded into one latent frame."""
    m = torch.zeros(length + 3, h, w)
    m[:3 + first] = 1
    if last:
        m[-1] = 1
    return m.view(-1, 4, h, w).transpose(0, 1)[None]


@dataclass
class Cond:
    """One branch's conditioning: text features [L, D] plus, for image models, CLIP tokens, the channel
    conditioning y (mask + image latent) or the TI2V first-frame latent(s) [1, C, n, h, w] (their tokens see t = 0);
    for any model, `pinned` latent frames [1, C, n, h, w] held at the start of the video by inpainting (the
    denoiser reports x0 = pinned there at every step, so the solver keeps them on the path (1 - sigma) * pinned +
    sigma * noise and ends exactly on them): how a text-to-video model continues given frames."""
    context: torch.Tensor
    clip: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    first_frame: Optional[torch.Tensor] = None
    pinned: Optional[torch.Tensor] = None


def preview_frame(x0):
    """What a step's preview shows of x0 [B, C, F, H, W]: the first sample's middle latent frame [1, C, 1, H, W].
    Not frame 0: it is the causal VAE's lone first frame (one pixel frame, not four), and TI2V pins it to the start
    image, so it would not show the video forming."""
    mid = x0.shape[2] // 2
    return x0[:1, :, mid:mid + 1]


@dataclass
class Expert:
    """A model used for every step whose timestep is >= min_t; `get` returns it ready on the device
    (called when the sampler switches to it, so a memory manager can load one expert at a time)."""
    get: Callable[[], torch.nn.Module]
    cfg: float
    min_t: float = 0.0
    cache: Optional[object] = None  # a wan_core.cache.StepCache, or None


def _cat(a, b, both):
    return None if a is None else (torch.cat([a, b]) if both else a)


def _model_inputs(x, t, cond, both):
    """The batched (cond, uncond) x, per-token or per-sample t, and extras for one model call."""
    xin = torch.cat([x, x]) if both else x
    batch = xin.shape[0]
    if cond.first_frame is not None:  # TI2V: the image latent(s) replace the first frame(s), whose tokens see t = 0
        n = cond.first_frame.shape[2]
        xin = torch.cat([cond.first_frame.to(xin).expand(batch, -1, -1, -1, -1), xin[:, :, n:]], dim=2)
        _, _, f, h, w = xin.shape
        tin = torch.full((batch, f, h // 2, w // 2), float(t), device=x.device)
        tin[:, :n] = 0
        return xin, tin.flatten(1)
    return xin, torch.full((batch,), float(t), device=x.device)


def make_denoiser(experts, cond, uncond, dtype):
    """denoise(x, sigma, t) = u + g * (c - u) with the expert (and its g) for timestep t; both branches
    run as one batch, the negative one skipped when g is 1 (`guided`)."""
    current = {}

    def denoise(x, sigma, t):
        expert = next(e for e in experts if float(t) >= e.min_t)
        if current.get("expert") is not expert:
            current.update(expert=expert, model=expert.get())
        both = guided(expert.cfg)
        xin, tin = _model_inputs(x, t, cond, both)
        if (both, x.device) not in current:  # built once: the model counts its text rows once per context tensor
            ctx = torch.cat([pad_context(cond.context), pad_context(uncond.context)]) if both else pad_context(cond.context)
            current[both, x.device] = ctx.to(x.device, dtype)
        extra = {} if expert.cache is None else {"cache": expert.cache}
        v = current["model"](xin.to(dtype), tin, current[both, x.device],
                             clip=_cat(cond.clip, uncond.clip, both), y=_cat(cond.y, uncond.y, both), **extra).float()
        if both:
            c, u = v.chunk(2)
            v = u + expert.cfg * (c - u)
        return v if cond.pinned is None else _pin(v, x, sigma, cond.pinned)

    return denoise


def _pin(v, x, sigma, pinned):
    """The velocity whose x0 = x - sigma * v is `pinned` on the first pinned frames (model output elsewhere)."""
    n = pinned.shape[2]
    return torch.cat([(x[:, :, :n] - pinned.to(x)) / sigma, v[:, :, n:]], dim=2)


def generate(experts, cond, uncond, *, seed, steps, shift, sampler, width, height, length, channels=16,
             device="cpu", dtype=torch.float32, callback=None, noise_mode="comfy"):
    """Sample a normalised video latent [1, C, 1+(length-1)/4, height/s, width/s] (s = VAE stride);
    noise_mode: see initial_noise."""
    check_video_size(width, height, length, 2 * spatial_stride(channels))
    generator = noise_generator(noise_mode, device)
    x = initial_noise(latent_shape(width, height, length, channels), seed, noise_mode, device, generator=generator)
    denoise = make_denoiser(experts, cond, uncond, dtype)
    with torch.no_grad():
        x = sample(denoise, x, sampler=sampler, steps=steps, shift=shift, callback=callback, generator=generator)
    for known in (cond.first_frame, cond.pinned):
        if known is not None:
            x[:, :, :known.shape[2]] = known.to(x)
    return x
