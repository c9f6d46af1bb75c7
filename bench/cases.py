"""Bench cases: for each (case, implementation) a runner on identical weights and inputs.

`runner(case, impl, cfg, cache)` returns a zero-argument function whose result is the output tensor.
Implementations: "ours" (wan_core), "native" (ComfyUI's comfy/ldm/wan classes, with the attention
ComfyUI picks on that device: sub-quadratic on CPU, SDPA on NVIDIA), "native-sdpa" (the same native
model with ComfyUI's pytorch attention, to isolate the attention choice), "ours-tiled" (tiled VAE decode),
"ours-compiled" (DiT cases with --compile: our model with its blocks through torch.compile, wan_core.compile).
"""
import math

import torch

from common import build, import_comfy
from wan_core.compile import compile_blocks
from wan_core.dit import WanDiT
from wan_core.pipeline import Cond, Expert, generate
from wan_core.tiling import tiled_decode
from wan_core.vae import WanVAE21
from wan_core.vae22 import WanVAE22

IMPLS = {
    "dit_t2v": ("ours", "native", "native-sdpa"),
    "dit_i2v": ("ours", "native", "native-sdpa"),
    "sample": ("ours", "native", "native-sdpa"),
    "vae_decode": ("ours", "ours-tiled", "native"),
    "vae_encode": ("ours", "native"),
    "vae22_decode": ("ours", "ours-tiled", "native"),
    "vae22_encode": ("ours", "native"),
}


def _dit_kwargs(cfg, i2v):
    return dict(dim=cfg["dim"], ffn_dim=cfg["ffn"], num_layers=cfg["layers"], text_dim=cfg["text_dim"],
                in_dim=36 if i2v else cfg["channels"], out_dim=cfg["channels"])


def dit_model(cfg, impl, cache, i2v=False):
    """Ours or native, same weights (fill_ keyed by name), cached per process."""
    key = ("dit", impl if impl.startswith("ours") else "native", i2v)
    if key not in cache:
        dev, dt, kw = cfg["device"], cfg["dtype"], _dit_kwargs(cfg, i2v)
        if impl.startswith("ours"):  # below fp32 with ComfyUI's casting ops, as the pack's loader runs it
            ops = None
            if dt != torch.float32:
                import_comfy(dev)
                import comfy.ops
                ops = comfy.ops.manual_cast
            cache[key] = build(lambda: WanDiT(**kw, clip_dim=1280 if i2v else None, ops=ops), dev, dt)
            if impl == "ours-compiled":
                compile_blocks(cache[key], "blocks")
        else:
            comfy = import_comfy(dev)
            import comfy.ops
            from comfy.ldm.wan.model import WanModel
            ctor = lambda: WanModel(model_type="i2v" if i2v else "t2v", num_heads=kw["dim"] // 128,  # noqa: E731
                                    operations=comfy.ops.disable_weight_init, **kw)
            cache[key] = build(ctor, dev, dt, keep_fp32=("patch_embedding",))
    return cache[key]


def _native_attention(impl, cfg):
    """Context for native calls: ComfyUI's default attention, or its pytorch (SDPA) one for native-sdpa."""
    import contextlib
    if impl != "native-sdpa":
        return contextlib.nullcontext()
    import_comfy(cfg["device"])
    import comfy.ldm.wan.model as wan_model
    from comfy.ldm.modules.attention import attention_pytorch

    @contextlib.contextmanager
    def swap():
        saved, wan_model.optimized_attention = wan_model.optimized_attention, attention_pytorch
        try:
            yield
        finally:
            wan_model.optimized_attention = saved
    return swap()


def _gen(cfg, seed=1):
    return torch.Generator("cpu").manual_seed(seed)


def dit_inputs(cfg, i2v=False):
    """x [B,C,f,2h,2w], t [B], context [B,512,text_dim] (real text in the first slots, zeros after)."""
    g, (f, h, w), b = _gen(cfg), cfg["grid"], cfg["batch"]
    x = torch.randn(b, cfg["channels"], f, 2 * h, 2 * w, generator=g)
    ctx = torch.zeros(b, 512, cfg["text_dim"])
    ctx[:, :cfg["text_tokens"]] = torch.randn(b, cfg["text_tokens"], cfg["text_dim"], generator=g)
    t = torch.linspace(999, 500, b)
    dev, dt, clip = cfg["device"], cfg["dtype"], None
    if i2v:  # mask + image latent already concatenated on channels (36 in), 257 CLIP tokens
        clip = torch.randn(b, 257, 1280, generator=g).to(dev, dt)
        x = torch.cat([x, torch.randn(b, 20, f, 2 * h, 2 * w, generator=g)], 1)
    return x.to(dev, dt), t.to(dev), ctx.to(dev, dt), clip


def dit_runner(impl, cfg, cache, i2v=False):
    model = dit_model(cfg, impl, cache, i2v)
    x, t, ctx, clip = dit_inputs(cfg, i2v)
    extra = {} if clip is None else ({"clip": clip} if impl.startswith("ours") else {"clip_fea": clip})

    def run():
        with torch.no_grad(), _native_attention(impl, cfg):
            return model(x, t, ctx, **extra)
    return run


def sample_runner(impl, cfg, cache, step_cache=None):
    """The same solver (wan_core.pipeline.generate: UniPC, CFG batch of 2) driving either model; ours optionally
    with a wan_core.cache.StepCache."""
    model = dit_model(cfg, impl, cache)
    g, (f, h, w) = _gen(cfg, 2), cfg["sample_grid"]
    cond = Cond(torch.randn(cfg["text_tokens"], cfg["text_dim"], generator=g))
    uncond = Cond(torch.randn(cfg["text_tokens"], cfg["text_dim"], generator=g))
    stride = 16 if cfg["channels"] == 48 else 8
    size = dict(width=2 * stride * w, height=2 * stride * h, length=1 + 4 * (f - 1), channels=cfg["channels"])

    def run():
        with _native_attention(impl, cfg):
            return generate([Expert(lambda: model, cfg=5.0, cache=step_cache)], cond, uncond, seed=0,
                            steps=cfg["steps"], shift=5.0, sampler="unipc", device=cfg["device"],
                            dtype=cfg["dtype"], **size)
    return run


VAES = {  # family -> (ours, ComfyUI module, pixels per latent)
    "vae": (WanVAE21, "comfy.ldm.wan.vae", 8),
    "vae22": (WanVAE22, "comfy.ldm.wan.vae2_2", 16),
}


def vae_model(cfg, impl, family, cache):
    """Our VAE or ComfyUI's for the family (2.1: `vae_dim`; 2.2: `vae22_dim`, `vae22_dec_dim`), same weights."""
    key = (family, "native" if impl == "native" else "ours")
    if key not in cache:
        ours, module, _ = VAES[family]
        dims = dict(dim=cfg["vae_dim"]) if family == "vae" else dict(dim=cfg["vae22_dim"], dec_dim=cfg["vae22_dec_dim"])
        if impl == "native":
            import importlib
            import_comfy(cfg["device"])
            native = importlib.import_module(module).WanVAE
            ctor = lambda: native(z_dim=ours.z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2,  # noqa: E731
                                  attn_scales=[], temperal_downsample=[False, True, True], **dims)
        else:
            ctor = lambda: ours(**dims)  # noqa: E731
        cache[key] = build(ctor, cfg["device"], cfg["vae_dtype"], seed=3)
    return cache[key]


def vae_runner(case, impl, cfg, cache):
    """decode: normalised latent -> pixels clamped to [-1, 1]; encode: pixels -> normalised latent.
    Native gets (and returns) unnormalised latents, as ComfyUI's latent format does it outside the model."""
    family, op = case.split("_")
    vae = vae_model(cfg, impl, family, cache)
    ours = VAES[family][0]
    g, (f, h, w), s = _gen(cfg, 4), cfg[f"{family}_grid"], VAES[family][2]
    dev, dt = cfg["device"], cfg["vae_dtype"]
    z = torch.randn(1, ours.z_dim, f, h, w, generator=g).to(dev, dt)
    video = (torch.rand(1, 3, 1 + 4 * (f - 1), s * h, s * w, generator=g) * 2 - 1).to(dev, dt)
    mean, std = (torch.tensor(v, device=dev, dtype=dt).view(1, -1, 1, 1, 1)
                 for v in (ours.LATENT_MEAN, ours.LATENT_STD))

    def run():
        with torch.no_grad():
            if op == "encode":
                return vae.encode(video) if impl == "ours" else (vae.encode(video) - mean) / std
            if impl == "ours-tiled":
                return tiled_decode(vae, z, cfg[f"{family}_tile"], cfg[f"{family}_overlap"])
            return vae.decode(z) if impl == "ours" else vae.decode(z * std + mean).clamp_(-1, 1)
    return run


def runner(case, impl, cfg, cache):
    if case in ("dit_t2v", "dit_i2v"):
        return dit_runner(impl, cfg, cache, i2v=case == "dit_i2v")
    if case == "sample":
        return sample_runner(impl, cfg, cache)
    return vae_runner(case, impl, cfg, cache)


def dit_flops(cfg, grid=None, batch=None):
    """Matmul FLOPs of one DiT forward (2 per multiply-add): linears, self- and cross-attention."""
    d, ffn, ctx = cfg["dim"], cfg["ffn"], 512
    f, h, w = grid or cfg["grid"]
    L = f * h * w
    per_layer = 2 * L * d * d * 6 + 2 * ctx * d * d * 2 + 4 * L * L * d + 4 * L * ctx * d + 4 * L * d * ffn
    head = 2 * L * d * cfg["channels"] * 4 + 2 * L * cfg["channels"] * d * 4
    return (batch or cfg["batch"]) * (cfg["layers"] * per_layer + head + 2 * ctx * (cfg["text_dim"] + d) * d)


def tokens(grid):
    return math.prod(grid)
