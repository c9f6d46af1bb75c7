"""VAE decode: a normalised Wan latent -> IMAGE frames [T, H, W, 3] in [0, 1]."""
import logging

import torch

import comfy.model_management as mm
import comfy.utils

from ..wan_core.tiling import decode_retrying, free_memory
from .common import CATEGORY

TILINGS = ["auto", "off", "64", "48", "32", "24"]


def decode_memory(shape, dtype, stride=8):
    """Peak of decoding latent `shape` [B, C, t, h, w] one latent frame (4 pixel frames) at a time with a VAE of
    `stride` pixels per latent (8: Wan 2.1, 16: Wan 2.2): the decoder's working set, 6000 values per output pixel
    (measured 5.5k for the Wan 2.1 VAE, 5.0k for Wan 2.2), plus the decoded video, kept in the compute dtype and
    converted to fp32 [0, 1] frames below (1 + 4(t-1) frames x 3 channels x (compute + 8) bytes)."""
    size = torch.finfo(dtype).bits // 8
    pixels = shape[0] * shape[3] * stride * shape[4] * stride
    return pixels * (6000 * size + 3 * (1 + 4 * (shape[2] - 1)) * (size + 8))


def encode_memory(shape, dtype):
    """Peak of encoding a video `shape` [B, 3, T, H, W] (chunks of 1, 4, 4, ... frames): the encoder's working set,
    4500 values per input pixel (measured at 128x128: 3.75k for the Wan 2.1 VAE, 1.9k for Wan 2.2, flat in T, ComfyUI's
    encoder 3.8k; at 64x64 the fixed costs make 2.1's 4.3k), plus the video in the compute dtype."""
    size = torch.finfo(dtype).bits // 8
    pixels = shape[0] * shape[3] * shape[4]
    return pixels * size * (4500 + 3 * shape[2])


class WanLeanVAEDecode:
    DESCRIPTION = ("Decodes a Wan video latent into frames, one latent frame at a time with the causal frame cache; "
                   "large videos are decoded in spatial tiles blended over their overlap (chosen from free memory, or "
                   "by hand); an out-of-memory decode is retried once with smaller tiles.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("WANLEAN_VAE", {"tooltip": "From Wan Load VAE."}),
            "latent": ("LATENT", {"tooltip": "The video latent from Wan Sampler."}),
        }, "optional": {
            "tiling": (TILINGS, {"default": "auto", "tooltip": "Spatial tiles in latent pixels (8 or 16 image pixels "
                                 "each), blended over 8 latents of overlap: auto = only when the untiled decode would "
                                 "not fit in free memory; off = never (an out-of-memory is still retried tiled)."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    def decode(self, vae, latent, tiling="auto", node_id=None):
        z = latent["samples"]
        if z.ndim != 5 or z.shape[1] != vae.patcher.model.z_dim:
            raise ValueError(f"latent of shape {tuple(z.shape)} does not fit this VAE ({vae.patcher.model.z_dim} channels): "
                             "use the VAE of the model family that made the latent (the Wan 2.1 VAE for 16 channels, "
                             "the Wan 2.2 VAE for 48: TI2V-5B)")
        model = vae.load(decode_memory(z.shape, vae.dtype, vae.patcher.model.STRIDE))
        bar = comfy.utils.ProgressBar(z.shape[2], node_id=node_id)

        def progress(done, total):
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total)

        def on_oom(message):
            logging.warning("Wan Lean: %s", message)
            mm.soft_empty_cache()

        tile = {"auto": "auto", "off": None}[tiling] if tiling in ("auto", "off") else int(tiling)
        z = z.to(vae.device, vae.dtype)
        with torch.no_grad():
            video = decode_retrying(model, z, tile, 8, progress, on_oom, free_memory(z.device) if tile == "auto" else None)
        frames = (video.float().clamp(-1, 1) + 1) / 2  # [B, 3, T, H, W]
        return (frames.permute(0, 2, 3, 4, 1).flatten(0, 1).to(mm.intermediate_device()),)


NODE_CLASS_MAPPINGS = {"WanLeanVAEDecode": WanLeanVAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"WanLeanVAEDecode": "Wan VAE Decode"}
