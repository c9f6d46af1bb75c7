"""Text-to-video generation glue that the sampler node calls: size checks, noise, CFG, the solver loop."""
import torch
import torch.nn.functional as F

from .sampling import sample

VAE_STRIDE = (4, 8, 8)  # time, height, width compression of the Wan 2.1 VAE


def _nearest(value, multiple, offset=0):
    """The valid values (offset + k*multiple, positive) just below and above `value`, as text."""
    lo = (value - offset) // multiple * multiple + offset
    return " or ".join(str(n) for n in (lo, lo + multiple) if n >= max(offset, 1))


def check_video_size(width, height, length, multiple=16):
    """ValueError naming the bad input and the nearest valid values: sizes multiple of `multiple`, length 1+4k."""
    for name, v in (("width", width), ("height", height)):
        if v % multiple or v <= 0:
            raise ValueError(f"{name} {v} is not a multiple of {multiple}; use {_nearest(v, multiple)}")
    if length < 1 or (length - 1) % VAE_STRIDE[0]:
        raise ValueError(f"length {length} is not 1+4k frames; use {_nearest(length, 4, 1)}")


def latent_shape(width, height, length, channels=16, batch=1):
    t, s = VAE_STRIDE[0], VAE_STRIDE[1]
    return (batch, channels, (length - 1) // t + 1, height // s, width // s)


def initial_noise(shape, seed):
    """Seeded Gaussian noise from a CPU generator (the same on every device)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def pad_context(ctx, length=512):
    """[L, D] or [1, L, D] text features -> [1, length, D], zero-padded as the official code pads them."""
    ctx = ctx.reshape(-1, ctx.shape[-1])[:length]
    return F.pad(ctx, (0, 0, 0, length - ctx.shape[0]))[None]


def cfg_denoiser(model, cond, uncond, guidance, dtype):
    """denoise(x, sigma, t) = u + g * (c - u); both branches in one batch, skipped uncond when g == 1."""
    both = guidance != 1.0
    ctx = torch.cat([pad_context(cond), pad_context(uncond)]) if both else pad_context(cond)

    def denoise(x, sigma, t):
        xin = torch.cat([x, x]) if both else x
        tin = torch.full((xin.shape[0],), float(t), device=x.device)
        v = model(xin.to(dtype), tin, ctx.to(x.device, dtype)).float()
        if not both:
            return v
        c, u = v.chunk(2)
        return u + guidance * (c - u)

    return denoise


def generate(model, cond, uncond, *, seed, steps, cfg, shift, sampler, width, height, length,
             device="cpu", dtype=torch.float32, callback=None):
    """Sample a normalised video latent [1, C, 1+(length-1)/4, height/8, width/8]."""
    check_video_size(width, height, length)
    x = initial_noise(latent_shape(width, height, length, model.out_dim), seed).to(device)
    denoise = cfg_denoiser(model, cond, uncond, cfg, dtype)
    with torch.no_grad():
        return sample(denoise, x, sampler=sampler, steps=steps, shift=shift, callback=callback)
