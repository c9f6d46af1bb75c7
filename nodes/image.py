"""Image conditioning nodes: CLIP vision (Wan 2.1 I2V/FLF2V) and Wan Image To Video (I2V, FLF2V, TI2V-5B)."""
import torch

import comfy.clip_vision
import comfy.model_management as mm
import folder_paths
import node_helpers
from comfy_api.latest import io

from ..wan_core.checkpoint import read_file
from ..wan_core.checks import ENCODER_CAUSE, VAE_CAUSE, check_finite
from ..wan_core.clip import WanCLIPVision
from ..wan_core.conditioning import SIZINGS, clip_tokens, image_latents, official_i2v_size, to_pixels
from ..wan_core.pipeline import check_video_size, spatial_stride
from .common import Handle, WanLeanCLIPVision, WanLeanNode, WanLeanVAE, casting_ops, compute_dtype
from .decode import encode_memory


class WanLeanCLIPVisionLoader(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanCLIPVisionLoader", "Wan Load CLIP Vision", (
            "Loads the CLIP ViT-H/14 image encoder of Wan 2.1 I2V/FLF2V (ComfyUI's clip_vision_h.safetensors or the "
            "official models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth). Wan 2.2 models use no CLIP."), [
            io.Combo.Input("clip_name", options=folder_paths.get_filename_list("clip_vision"),
                           tooltip="The CLIP vision model from models/clip_vision."),
        ], [WanLeanCLIPVision.Output(display_name="clip_vision")])

    @classmethod
    def execute(cls, clip_name):
        sd = read_file(folder_paths.get_full_path_or_raise("clip_vision", clip_name))
        model = WanCLIPVision.from_state_dict(sd, ops=casting_ops())
        device = mm.text_encoder_device()
        return io.NodeOutput(Handle.wrap(model, device, mm.text_encoder_offload_device(),
                                         compute_dtype(device, fp16_ok=False)))


class WanLeanCLIPVisionEncode(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanCLIPVisionEncode", "Wan CLIP Vision Encode", (
            "Encodes an image into the CLIP tokens Wan 2.1 I2V/FLF2V attend to (second-to-last block, 257 x 1280). "
            "The output is ComfyUI's CLIP_VISION_OUTPUT, so the built-in CLIP Vision Encode works too."), [
            WanLeanCLIPVision.Input("clip_vision", tooltip="From Wan Load CLIP Vision."),
            io.Image.Input("image", tooltip="The image to encode (any size; resized to 224)."),
        ], [io.ClipVisionOutput.Output(display_name="clip_vision_output")])

    @classmethod
    def execute(cls, clip_vision, image):
        out = comfy.clip_vision.Output()
        out["penultimate_hidden_states"] = clip_encoder(clip_vision)(to_pixels(image, "image")).to(mm.intermediate_device())
        return io.NodeOutput(out)


def clip_encoder(clip_vision):
    """pixels [1, 3, H, W] in [-1, 1] -> CLIP tokens [1, 257, 1280] (float32, on the encoder's device), the model
    loaded through ComfyUI's memory manager at each call."""
    def encode(pixels):
        model = clip_vision.load()
        with torch.no_grad():
            return check_finite(model(pixels.to(clip_vision.device, clip_vision.dtype)).float(), "the CLIP vision tokens",
                                ENCODER_CAUSE)
    return encode


def _tokens(output, name):
    if output is None:
        return None
    tokens = output["penultimate_hidden_states"]
    if tokens.ndim != 3 or tokens.shape[1] != 257:
        raise ValueError(f"{name} is not a ViT-H/14 encoding (tokens {tuple(tokens.shape)}, expected 257 per image): "
                         "use clip_vision_h")
    return tokens


def frame_inputs():
    """Width, height and length of the conditioning, which the sampler after it must share."""
    return [io.Int.Input("width", default=832, min=16, max=4096, step=16, tooltip="Must match the sampler."),
            io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip="Must match the sampler."),
            io.Int.Input("length", default=81, min=1, max=1025, step=4, tooltip="Frames, 1+4k; must match the sampler.")]


def clip_vision_inputs(start_tooltip, end_tooltip="FLF2V: CLIP encoding of the end image."):
    """The optional CLIP encodings of the start and end images (Wan 2.1 I2V / FLF2V)."""
    return [io.ClipVisionOutput.Input("clip_vision_start", optional=True, tooltip=start_tooltip),
            io.ClipVisionOutput.Input("clip_vision_end", optional=True, tooltip=end_tooltip)]


class WanLeanImageToVideo(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanImageToVideo", "Wan Image To Video", (
            "Adds image conditioning to the prompt: Wan 2.1 I2V (start image + CLIP), FLF2V (start and end images, "
            "both CLIP encodings), Wan 2.2 I2V-A14B (start image, no CLIP) or TI2V-5B (start image, Wan 2.2 VAE). "
            "Use the same width, height and length on the sampler (with sizing: official, wire the width and height "
            "outputs to it)."), [
            io.Conditioning.Input("positive", tooltip="From Wan Text Encode."),
            io.Conditioning.Input("negative", tooltip="From Wan Text Encode."),
            WanLeanVAE.Input("vae", tooltip="Wan 2.1 VAE (I2V, FLF2V, A14B) or Wan 2.2 VAE (TI2V-5B)."),
            io.Image.Input("start_image", tooltip="The first frame; scaled to cover width x height and centre-cropped."),
            *frame_inputs(),
            io.Image.Input("end_image", optional=True, tooltip="FLF2V only: the last frame."),
            *clip_vision_inputs("Wan 2.1 I2V/FLF2V: CLIP encoding of the start image."),
            io.Combo.Input("sizing", options=list(SIZINGS), default="crop", optional=True, tooltip=(
                "crop: scale the image to cover width x height and centre-crop (bicubic). official: as the official "
                "image-to-video code (Wan 2.1 I2V/FLF2V, Wan 2.2 I2V-A14B): the video takes the image's aspect ratio "
                "at about width x height pixels (sides multiples of 16), the image resized to it without cropping; "
                "wire the width and height outputs to the sampler.")),
        ], [io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
            io.Int.Output(display_name="width"), io.Int.Output(display_name="height")])

    @classmethod
    def execute(cls, positive, negative, vae, start_image, width, height, length, end_image=None,
                clip_vision_start=None, clip_vision_end=None, sizing="crop"):
        check_video_size(width, height, length, 2 * spatial_stride(vae.patcher.model.z_dim))
        if clip_vision_end is not None and clip_vision_start is None:
            raise ValueError("clip_vision_end is connected but clip_vision_start is not: FLF2V needs the CLIP encodings "
                             "of both images; connect the start image's CLIP Vision Encode to clip_vision_start")
        if clip_vision_end is not None and end_image is None:
            raise ValueError("clip_vision_end is connected but end_image is not: connect the end image too (FLF2V)")
        start = to_pixels(start_image, "start_image")
        end = None if end_image is None else to_pixels(end_image, "end_image")
        out_h, out_w = height, width
        if sizing == "official" and vae.patcher.model.z_dim != 48:
            out_h, out_w = official_i2v_size(*start.shape[-2:], width * height)  # the size image_latents makes
        model = vae.load(encode_memory((1, 3, length, out_h, out_w), vae.dtype, vae.patcher.model.STRIDE))
        with torch.no_grad():
            y, first = image_latents(model, start.to(vae.device, vae.dtype),
                                     None if end is None else end.to(vae.device, vae.dtype), width, height, length,
                                     sizing)
        check_finite(y if first is None else first, "the start image's VAE latent", VAE_CAUSE)
        extras = {"wanlean_y": y, "wanlean_first_frame": first}
        start_tokens = _tokens(clip_vision_start, "clip_vision_start")
        if start_tokens is not None:
            extras["wanlean_clip"] = clip_tokens(start_tokens, _tokens(clip_vision_end, "clip_vision_end"))
        extras = {k: v.float().cpu() for k, v in extras.items() if v is not None}
        return io.NodeOutput(node_helpers.conditioning_set_values(positive, extras),
                             node_helpers.conditioning_set_values(negative, extras), out_w, out_h)


NODES = [WanLeanCLIPVisionLoader, WanLeanCLIPVisionEncode, WanLeanImageToVideo]
