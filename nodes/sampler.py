"""The sampler nodes: seeded noise -> flow-matching solver with CFG -> LATENT. One node for single
models (Wan 2.1, TI2V-5B), one for the Wan 2.2 A14B pair of experts switched at a boundary timestep."""
import logging

import torch

import comfy.model_management as mm
from comfy_api.latest import io

from ..wan_core import cache
from ..wan_core.checks import check_finite
from ..wan_core.pipeline import (NOISE_MODES, Cond, Expert, check_video_size, generate, guided, latent_shape,
                                 spatial_stride)
from ..wan_core.s2v import WanS2V
from ..wan_core.sampling import SAMPLERS
from .common import ACTIVATION_MARGIN, WanLeanNode, WanLeanModel, step_callback


def passes(cfg):
    """DiT passes a step batches: prompt and negative, or the prompt alone at cfg 1 (no negative pass)."""
    return 2 if guided(cfg) else 1


def activation_memory(model, shape, dtype, batch=2):
    """Peak activations of one forward of `batch` passes (2: CFG-batched; 1 at cfg 1, no negative pass) x tokens
    (patch 1x2x2), per token and pass: the fp32 residual stream and its normalised copy (8 x dim bytes) + in the
    compute dtype one dim-wide tensor and three ffn-wide ones (the FFN's hidden state, its GELU and the matmul's
    buffer); times ACTIVATION_MARGIN. One block's peak with the CFG batch, measured in bf16 (CPU, RSS), grows by 69 KB
    per token for 1.3B and 134 KB for 14B; so does this estimate before its margin (tests/test_memory.py)."""
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    size = torch.finfo(dtype).bits // 8
    per_token = 8 * model.dim + size * (model.dim + 3 * model.blocks[0].ffn[0].out_features)
    return int(ACTIVATION_MARGIN * batch * tokens * per_token)


def to_cond(conditioning, name, model=None):
    """Native CONDITIONING ([[features, extras]]) -> Cond; image conditioning rides in the extras. Refused: an empty
    or combined conditioning, NaN/inf in it, and (given the model) features of another text encoder's width."""
    if not conditioning:
        raise ValueError(f"{name} conditioning is empty: connect Wan Text Encode (or CLIP Text Encode)")
    if len(conditioning) > 1:
        raise ValueError(f"{name} conditioning holds {len(conditioning)} entries (Conditioning Combine or Concat): the "
                         "Wan samplers take one prompt per input; write the prompts into one Wan Text Encode instead")
    features, extras = conditioning[0]
    check_finite(features, f"{name} conditioning")
    cond = Cond(features, clip=extras.get("wanlean_clip"), y=extras.get("wanlean_y"),
                first_frame=extras.get("wanlean_first_frame"))
    for key in ("clip", "y", "first_frame"):
        check_finite(getattr(cond, key), f"{name} conditioning's image part ({key})")
    if model is not None:
        check_context(model, features, name)
    return cond


def check_context(net, features, name):
    """The text features' width must be the model's umT5 width (4096): a CLIP-L/G or T5 of another family made them
    otherwise, and the model would fail deep inside with a matrix-shape error."""
    width = net.text_embedding[0].in_features
    if features.shape[-1] != width:
        raise ValueError(f"{name} conditioning has features {features.shape[-1]} wide but this Wan model takes umT5-XXL "
                         f"features ({width} wide): it comes from another text encoder. Use Wan Text Encode with Wan Load "
                         "Text Encoder (umt5_xxl), or ComfyUI's Load CLIP with type 'wan' and a umt5_xxl file")


def check_fit(handle, cond, shape):
    """Errors that name the mismatch between the model, its image conditioning and the asked size."""
    net = handle.patcher.model
    takes_y = net.in_dim - net.out_dim  # 20 image channels (mask + latent) for I2V/FLF2V, 0 otherwise
    if takes_y and cond.first_frame is not None:
        raise ValueError("the image conditioning was encoded with the Wan 2.2 VAE (TI2V-5B style); "
                         "this image-to-video model needs the Wan 2.1 VAE in Wan Image To Video")
    if takes_y and cond.y is None:
        raise ValueError("this is an image-to-video model: connect Wan Image To Video between the text encode and the sampler")
    if cond.y is not None and cond.y.shape[1] != takes_y:
        raise ValueError(f"the image conditioning has {cond.y.shape[1]} channels but this model takes {takes_y}: "
                         + ("use an I2V model, or drop Wan Image To Video" if not takes_y
                            else "encode the image with the Wan 2.1 VAE"))
    if cond.first_frame is not None and cond.first_frame.shape[1] != net.out_dim:
        raise ValueError(f"the start-image latent has {cond.first_frame.shape[1]} channels but the model makes {net.out_dim}: "
                         "encode it with the VAE of the model's family (the Wan 2.2 VAE for TI2V-5B)")
    image = cond.y if cond.y is not None else cond.first_frame
    frames_differ = cond.y is not None and cond.y.shape[2] != shape[2]
    if image is not None and (tuple(image.shape[-2:]) != tuple(shape[-2:]) or frames_differ):
        raise ValueError(f"the image conditioning was made for another size or length (latent {tuple(image.shape[2:])}, "
                         f"the sampler's is {tuple(shape[2:])}): set the same width, height and length on both nodes "
                         "(with sizing: official, connect Wan Image To Video's width and height outputs to the sampler)")


def check_experts(handles):
    """Both A14B experts must be the same variant (a T2V expert next to an I2V one is a wiring mistake)."""
    names = [h.patcher.model.variant_name for h in handles]
    shapes = {(h.patcher.model.in_dim, h.patcher.model.out_dim, h.patcher.model.dim) for h in handles}
    if len(shapes) > 1:
        raise ValueError(f"high_noise_model is {names[0]} but low_noise_model is {names[1]}: load the two experts of "
                         "one Wan 2.2 A14B model (..._high_noise_... and ..._low_noise_...)")


def check_memory(handle, shape, batch=2):
    """Refuse up front what cannot fit: the activation estimate against the device's total memory."""
    need = activation_memory(handle.patcher.model, shape, handle.dtype, batch)
    total = mm.get_total_memory(handle.device)
    if need > total:
        raise ValueError(f"this size and length need about {need / 2**30:.0f} GiB for the sampler's activations but "
                         f"the device has {total / 2**30:.0f} GiB: lower width, height or length")


SAMPLER_TOOLTIP = (
    "unipc is the official solver (dpm++ and euler on the official schedules). For step-distilled models and LoRAs "
    "(lightx2v, Wan2.2-Lightning: 4 steps, cfg 1, shift 5): euler-distilled (Wan 2.2 Lightning's solver) or "
    "lcm-distilled (lightx2v's Wan 2.1 solver: fresh seeded noise each step), both on shift(linspace(1, 0)) with the "
    "float training timesteps (1000, 937.5, 833.3, 625 at 4 steps).")
BOUNDARY_TOOLTIP = "witch to the low-noise expert below timestep boundary*1000 (official: 0.875 T2V, 0.900 I2V)."


# The inputs the sampling nodes share (Wan Sampler, the A14B sampler, the multi-GPU sampler, Wan Long Video, S2V),
# declared once here; defaults are the official ones for each node's models.
def sampler_input():
    return io.Combo.Input("sampler", options=list(SAMPLERS), default="unipc", tooltip=SAMPLER_TOOLTIP)


def seed_input(tooltip="Noise seed."):
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip=tooltip)


def steps_input(default, tooltip=None):
    return io.Int.Input("steps", default=default, min=1, max=200,
                        tooltip=tooltip or f"Solver steps (official: {default}).")


def shift_input(default, tooltip=None):
    return io.Float.Input("shift", default=default, min=0.1, max=30.0, step=0.1,
                          tooltip=tooltip or f"Timestep shift s*sigma/(1+(s-1)*sigma) (official: {default}).")


def cfg_input(name, default, what, optional=False):
    return io.Float.Input(name, default=default, min=1.0, max=20.0, step=0.1, optional=optional,
                          tooltip=f"Classifier-free guidance scale{what}; 1 skips the negative pass.")


def boundary_input(prefix="S", optional=False):
    """The A14B expert switch; `prefix` starts the tooltip ("S", or "A14B: s" on nodes that also take one model)."""
    return io.Float.Input("boundary", default=0.875, min=0.0, max=1.0, step=0.005, optional=optional,
                          tooltip=prefix + BOUNDARY_TOOLTIP)


def cond_inputs(positive="Prompt features (Wan Text Encode, or Wan Image To Video).",
                negative="Negative prompt features."):
    return [io.Conditioning.Input("positive", tooltip=positive), io.Conditioning.Input("negative", tooltip=negative)]


def sampling_inputs(steps, cfgs, shift, length=None):
    """seed, steps, the node's cfg inputs, shift, sampler, width, height, length (`length` replaces the default)."""
    return [
        seed_input(), steps_input(steps), *cfgs, shift_input(shift), sampler_input(),
        io.Int.Input("width", default=832, min=16, max=4096, step=16,
                     tooltip="Video width: a multiple of 16 (32 for TI2V-5B)."),
        io.Int.Input("height", default=480, min=16, max=4096, step=16,
                     tooltip="Video height: a multiple of 16 (32 for TI2V-5B)."),
        length or io.Int.Input("length", default=81, min=1, max=1025, step=4,
                               tooltip="Frames, 1+4k (81 = 5 s at 16 fps; TI2V-5B: 121 = 5 s at 24 fps)."),
    ]


def low_noise_inputs(model_tooltip, boundary_prefix):
    """The optional second A14B expert of the nodes that take one model or two: model, its guidance, the switch."""
    return [WanLeanModel.Input("low_noise_model", optional=True, tooltip=model_tooltip),
            cfg_input("cfg_low_noise", 3.0, " of the low-noise expert (A14B only)", optional=True),
            boundary_input(boundary_prefix, optional=True)]


def cache_inputs():
    return [io.Float.Input("cache_threshold", default=0.0, min=0.0, max=5.0, step=0.01, optional=True,
                           tooltip="Step cache: reuse the last DiT residual while block 0's input changed less than "
                                   "this (accumulated relative L1). 0 = off."),
            io.Int.Input("cache_interval", default=0, min=0, max=10, optional=True,
                         tooltip="Fixed-interval cache: compute every n-th step, reuse in between (distilled / short "
                                 "schedules). 0 or 1 = off.")]


def seed_mode_input():
    return io.Combo.Input("seed_mode", options=list(NOISE_MODES), default="comfy", optional=True, tooltip=(
        "comfy: noise from a CPU generator (ComfyUI's convention, the same on every device). official: drawn as the "
        "official Wan code draws it (a generator on the model's device, float32; S2V: bfloat16 per clip): with the "
        "official sizes, settings and prompts, the seed gives the official release's noise."))


def make_experts(models_cfgs, shape, cache_threshold=0.0, cache_interval=0):
    """[Expert] for [(handle, cfg, min_t)]: each loaded through ComfyUI's memory manager (with the activation estimate
    of a latent of `shape`) when the sampler reaches it, so the A14B experts take turns on the device; with caching on,
    each gets its own step cache."""
    use_cache = cache.enabled(cache_threshold, cache_interval)
    return [Expert(lambda h=h, b=passes(cfg): h.load(activation_memory(h.patcher.model, shape, h.dtype, b)), cfg,
                   min_t, cache.StepCache(cache_threshold, cache_interval) if use_cache else None)
            for h, cfg, min_t in models_cfgs]


def checked_inputs(handles, positive, negative, width, height, length):
    """What every sampler node checks before sampling, in one order: the conditionings against the (first) model, the
    size and length, the experts' agreement, each model against its image conditioning. -> (cond, uncond, shape)."""
    if any(isinstance(h.patcher.model, WanS2V) for h in handles):
        raise ValueError("the model wired in is the Wan 2.2 S2V-14B model, which samples only with its audio and "
                         "reference image: use Wan Speech To Video (it chains clips for long audio itself)")
    net = handles[0].patcher.model
    cond, uncond = (to_cond(c, n, net) for c, n in ((positive, "positive"), (negative, "negative")))
    check_video_size(width, height, length, 2 * spatial_stride(net.out_dim))
    shape = latent_shape(width, height, length, net.out_dim)
    check_experts(handles)
    for handle in handles:
        check_fit(handle, cond, shape)
    return cond, uncond, shape


def run(models_cfgs, positive, negative, node_id, seed, steps, shift, sampler, width, height, length,
        cache_threshold=0.0, cache_interval=0, seed_mode="comfy"):
    """models_cfgs: [(handle, cfg, min_t)], high-noise first. Loads each expert through ComfyUI when reached;
    with caching on, each expert gets its own step cache and the skipped calls are logged."""
    first = models_cfgs[0][0]
    cond, uncond, shape = checked_inputs([h for h, *_ in models_cfgs], positive, negative, width, height, length)
    channels = first.patcher.model.out_dim
    check_memory(first, shape, max(passes(cfg) for _, cfg, _ in models_cfgs))
    experts = make_experts(models_cfgs, shape, cache_threshold, cache_interval)
    latent = generate(experts, cond, uncond, seed=seed, steps=steps, shift=shift, sampler=sampler, width=width,
                      height=height, length=length, channels=channels, device=first.device, dtype=first.dtype,
                      callback=step_callback(steps, node_id, channels, first.device), noise_mode=seed_mode)
    for i, expert in enumerate(e for e in experts if e.cache is not None):
        logging.info("Wan Lean step cache (model %d): %s", i, expert.cache.report())
    return io.NodeOutput({"samples": latent.cpu()})


class WanLeanSampler(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanSampler", "Wan Sampler", (
            "Generates a video latent with one Wan model (2.1 T2V/I2V/FLF2V, 2.2 TI2V-5B): seeded noise, "
            "flow-matching sampling (UniPC as in the official release, DPM++ 2M or Euler) with guidance."), [
            WanLeanModel.Input("model", tooltip="From Wan Load Diffusion Model."),
            *cond_inputs(),
            *sampling_inputs(50, [cfg_input("cfg", 5.0, "")], 5.0),
            *cache_inputs(), seed_mode_input(),
        ], [io.Latent.Output(display_name="latent")], progress=True)

    @classmethod
    def execute(cls, model, positive, negative, seed, steps, cfg, shift, sampler, width, height, length,
                cache_threshold=0.0, cache_interval=0, seed_mode="comfy"):
        return run([(model, cfg, 0.0)], positive, negative, cls.node_id(), seed, steps, shift, sampler, width, height,
                   length, cache_threshold, cache_interval, seed_mode)


class WanLeanSamplerA14B(WanLeanNode):
    @classmethod
    def define_schema(cls):
        cfgs = [cfg_input("cfg_high_noise", 4.0, " of the high-noise expert"),
                cfg_input("cfg_low_noise", 3.0, " of the low-noise expert")]
        return cls.schema("WanLeanSamplerA14B", "Wan 2.2 A14B Sampler (two experts)", (
            "Wan 2.2 A14B (T2V or I2V): the high-noise expert runs while the timestep is at or above boundary x 1000, "
            "then the low-noise expert, each with its own guidance; ComfyUI loads one at a time. Defaults are "
            "T2V-A14B's; I2V-A14B: shift 5, cfg 3.5 / 3.5, boundary 0.900."), [
            WanLeanModel.Input("high_noise_model", tooltip="The high-noise expert (..._high_noise_...)."),
            WanLeanModel.Input("low_noise_model", tooltip="The low-noise expert (..._low_noise_...)."),
            *cond_inputs(),
            *sampling_inputs(40, cfgs, 12.0),
            boundary_input(),
            *cache_inputs(), seed_mode_input(),
        ], [io.Latent.Output(display_name="latent")], progress=True)

    @classmethod
    def execute(cls, high_noise_model, low_noise_model, positive, negative, seed, steps, cfg_high_noise, cfg_low_noise,
                shift, sampler, width, height, length, boundary, cache_threshold=0.0, cache_interval=0,
                seed_mode="comfy"):
        experts = [(high_noise_model, cfg_high_noise, boundary * 1000), (low_noise_model, cfg_low_noise, 0.0)]
        return run(experts, positive, negative, cls.node_id(), seed, steps, shift, sampler, width, height, length,
                   cache_threshold, cache_interval, seed_mode)


NODES = [WanLeanSampler, WanLeanSamplerA14B]
