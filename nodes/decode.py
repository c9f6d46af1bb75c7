"""VAE decode: a normalised Wan latent -> IMAGE frames [T, H, W, 3] in [0, 1]."""
import torch

import comfy.model_management as mm
import comfy.utils

from .common import CATEGORY


def decode_memory(shape, dtype, stride=8):
    """Peak of decoding latent `shape` [B, C, t, h, w] one latent frame (4 pixel frames) at a time with a VAE of
    `stride` pixels per latent (8: Wan 2.1, 16: Wan 2.2): the decoder's working set, 6000 values per output pixel
    (measured 5.5k for the Wan 2.1 VAE, 5.0k for Wan 2.2), plus the decoded video, kept in the compute dtype and
    converted to fp32 [0, 1] frames below (1 + 4(t-1) frames x 3 channels x (compute + 8) bytes)."""
    size = torch.finfo(dtype).bits // 8
    pixels = shape[0] * shape[3] * stride * shape[4] * stride
    return pixels * (6000 * size + 3 * (1 + 4 * (shape[2] - 1)) * (size + 8))


class WanLeanVAEDecode:
    DESCRIPTION = "Decodes a Wan video latent into frames, one latent frame at a time with the causal frame cache."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("WANLEAN_VAE", {"tooltip": "From Wan Load VAE."}),
            "latent": ("LATENT", {"tooltip": "The video latent from Wan Sampler."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    def decode(self, vae, latent, node_id=None):
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

        with torch.no_grad():
            video = model.decode(z.to(vae.device, vae.dtype), progress=progress)
        frames = (video.float().clamp(-1, 1) + 1) / 2  # [B, 3, T, H, W]
        return (frames.permute(0, 2, 3, 4, 1).flatten(0, 1).to(mm.intermediate_device()),)


NODE_CLASS_MAPPINGS = {"WanLeanVAEDecode": WanLeanVAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"WanLeanVAEDecode": "Wan VAE Decode"}
