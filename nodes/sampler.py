"""The sampler node: seeded noise -> flow-matching solver with CFG -> LATENT."""
import torch

from ..wan_core.pipeline import check_video_size, generate, latent_shape
from ..wan_core.sampling import SAMPLERS
from .common import CATEGORY, step_callback

# first official example prompt's defaults (Wan 2.1 T2V: 50 steps, shift 5, guidance 5; 832x480, 81 frames)
DEFAULTS = dict(steps=50, cfg=5.0, shift=5.0, width=832, height=480, length=81)


def activation_memory(model, shape, dtype):
    """Rough peak of one CFG-batched forward: tokens x (residual, qkv, ffn) in the compute dtype."""
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    width = 8 * model.dim + 2 * model.blocks[0].ffn[0].out_features
    return 2 * tokens * width * torch.finfo(dtype).bits // 8


def first_cond(conditioning, name):
    if not conditioning:
        raise ValueError(f"{name} conditioning is empty: connect the output of Wan Text Encode (or CLIP Text Encode)")
    return conditioning[0][0]


class WanLeanSampler:
    DESCRIPTION = ("Generates a video latent with a Wan model: seeded noise, flow-matching sampling (UniPC as in the "
                   "official release, DPM++ 2M or Euler) with classifier-free guidance.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        d = DEFAULTS
        return {"required": {
            "model": ("WANLEAN_MODEL", {"tooltip": "From Wan Load Diffusion Model."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt features (Wan Text Encode)."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt features (Wan Text Encode)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed."}),
            "steps": ("INT", {"default": d["steps"], "min": 1, "max": 200, "tooltip": "Solver steps (official: 50)."}),
            "cfg": ("FLOAT", {"default": d["cfg"], "min": 1.0, "max": 20.0, "step": 0.1,
                              "tooltip": "Classifier-free guidance scale; 1 skips the negative pass."}),
            "shift": ("FLOAT", {"default": d["shift"], "min": 0.1, "max": 30.0, "step": 0.1,
                                "tooltip": "Timestep shift s*sigma/(1+(s-1)*sigma) (official: 5; 3 for small sizes)."}),
            "sampler": (list(SAMPLERS), {"default": "unipc", "tooltip": "unipc is the official solver."}),
            "width": ("INT", {"default": d["width"], "min": 16, "max": 4096, "step": 16, "tooltip": "Video width (multiple of 16)."}),
            "height": ("INT", {"default": d["height"], "min": 16, "max": 4096, "step": 16, "tooltip": "Video height (multiple of 16)."}),
            "length": ("INT", {"default": d["length"], "min": 1, "max": 1025, "step": 4,
                               "tooltip": "Frames, 1+4k (81 = 5 s at 16 fps)."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, length):
        try:
            check_video_size(width, height, length)
        except ValueError as e:
            return str(e)
        return True

    def sample(self, model, positive, negative, seed, steps, cfg, shift, sampler, width, height, length, node_id=None):
        cond, uncond = first_cond(positive, "positive"), first_cond(negative, "negative")
        net = model.patcher.model
        shape = latent_shape(width, height, length, net.out_dim)
        net = model.load(activation_memory(net, shape, model.dtype))
        latent = generate(net, cond, uncond, seed=seed, steps=steps, cfg=cfg, shift=shift, sampler=sampler,
                          width=width, height=height, length=length, device=model.device, dtype=model.dtype,
                          callback=step_callback(steps, node_id))
        return ({"samples": latent.cpu()},)


NODE_CLASS_MAPPINGS = {"WanLeanSampler": WanLeanSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"WanLeanSampler": "Wan Sampler"}
