"""VAE decode: a normalised Wan latent -> IMAGE frames [T, H, W, 3] in [0, 1]."""
import logging

import torch

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..wan_core.checks import VAE_CAUSE, check_finite
from ..wan_core.tiling import decode_retrying, free_memory
from .common import MARGIN, WanLeanNode, WanLeanVAE

TILINGS = ["auto", "off", "64", "48", "32", "24"]


# Values per pixel, measured (CPU, RSS, fp32, real-width VAEs); the estimates add MARGIN (nodes/common.py)
DECODE_VALUES = {8: 5500, 16: 5000}  # per output pixel: Wan 2.1 VAE (stride 8), Wan 2.2 VAE (stride 16)
ENCODE_VALUES = {8: 4700, 16: 1900}  # per input pixel: 2.1 at 64x64 (4.3-4.7k; 3.75k at 128x128), 2.2 (1.7-1.9k)
# Plus, per call, the largest encoder conv weight in fp32 (2.1: 384x384x3x3x3, 2.2: 640x640x3x3x3): on the CPU every
# fp32 Conv3d runs on oneDNN (wan_core.vae), which reorders the weight into its own layout for the call.
ENCODE_WEIGHT_COPY = {8: 384 * 384 * 27 * 4, 16: 640 * 640 * 27 * 4}


def decode_memory(shape, dtype, stride=8):
    """Peak of decoding latent `shape` [B, C, t, h, w] one latent frame (4 pixel frames) at a time with a VAE of
    `stride` pixels per latent (8: Wan 2.1, 16: Wan 2.2): the decoder's working set (DECODE_VALUES per output pixel)
    plus the decoded video, kept in the compute dtype and converted to fp32 [0, 1] frames below
    (1 + 4(t-1) frames x 3 channels x (compute + 8) bytes); times MARGIN."""
    size = torch.finfo(dtype).bits // 8
    pixels = shape[0] * shape[3] * stride * shape[4] * stride
    return int(MARGIN * pixels * (DECODE_VALUES[stride] * size + 3 * (1 + 4 * (shape[2] - 1)) * (size + 8)))


def encode_memory(shape, dtype, stride=8):
    """Peak of encoding a video `shape` [B, 3, T, H, W] (chunks of 1, 4, 4, ... frames) with a VAE of `stride` (8: Wan
    2.1, 16: Wan 2.2): the encoder's working set (ENCODE_VALUES per input pixel, flat in T; ComfyUI's 2.1 encoder
    3.8k at 128x128) plus the video in the compute dtype, plus one reordered conv weight (ENCODE_WEIGHT_COPY); times
    MARGIN."""
    size = torch.finfo(dtype).bits // 8
    pixels = shape[0] * shape[3] * shape[4]
    return int(MARGIN * (pixels * size * (ENCODE_VALUES[stride] + 3 * shape[2]) + ENCODE_WEIGHT_COPY[stride]))


class WanLeanVAEDecode(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanVAEDecode", "Wan VAE Decode", (
            "Decodes a Wan video latent into frames, one latent frame at a time with the causal frame cache; large "
            "videos are decoded in spatial tiles blended over their overlap (chosen from free memory, or by hand); an "
            "out-of-memory decode is retried once with smaller tiles."), [
            WanLeanVAE.Input("vae", tooltip="From Wan Load VAE."),
            io.Latent.Input("latent", tooltip="The video latent from Wan Sampler."),
            io.Combo.Input("tiling", options=TILINGS, default="auto", optional=True, tooltip=(
                "Spatial tiles in latent pixels (8 or 16 image pixels each), blended over 8 latents of overlap: auto "
                "= only when the untiled decode would not fit in free memory; off = never (an out-of-memory is still "
                "retried tiled).")),
        ], [io.Image.Output(display_name="frames")], progress=True)

    @classmethod
    def execute(cls, vae, latent, tiling="auto"):
        z = latent["samples"]
        if z.ndim != 5 or z.shape[1] != vae.patcher.model.z_dim:
            raise ValueError(f"latent of shape {tuple(z.shape)} does not fit this VAE ({vae.patcher.model.z_dim} channels): "
                             "use the VAE of the model family that made the latent (the Wan 2.1 VAE for 16 channels, "
                             "the Wan 2.2 VAE for 48: TI2V-5B)")
        check_finite(z, "the latent", "the sampler that made it failed, or the latent file is damaged")
        model = vae.load(decode_memory(z.shape, vae.dtype, vae.patcher.model.STRIDE))
        bar = comfy.utils.ProgressBar(z.shape[2], node_id=cls.node_id())

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
        check_finite(video, "the decoded video", VAE_CAUSE)
        frames = (video.float().clamp(-1, 1) + 1) / 2  # [B, 3, T, H, W]
        return io.NodeOutput(frames.permute(0, 2, 3, 4, 1).flatten(0, 1).to(mm.intermediate_device()))


NODES = [WanLeanVAEDecode]
