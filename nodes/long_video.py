"""Wan Long Video: one node that renders a long video from any Wan model but S2V as clips chained by their last
frames (wan_core/long_video.py), decoding each clip as it is done and returning the frames."""
import torch

import comfy.model_management as mm
from comfy_api.latest import io

from ..wan_core.conditioning import clip_tokens, fit, to_pixels
from ..wan_core.long_video import (CONTINUATIONS, JOINS, LongJob, clip_prompts, conditioning_kind,
                                   continuation_rule, count_clips, generate_long, join_of)
from ..wan_core.pipeline import check_video_size, latent_shape, spatial_stride
from ..wan_core.s2v import WanS2V
from .common import (WanLeanCLIPVision, WanLeanNode, WanLeanModel, WanLeanTextEncoder, WanLeanVAE, clips_step_callback,
                     errors_named)
from .conditioning import encode_prompts
from .image import _tokens, clip_encoder, clip_vision_inputs
from .s2v import VAEOnDevice
from .sampler import (cfg_input, check_context, check_experts, check_memory, cond_inputs, low_noise_inputs,
                      make_experts, passes, sampling_inputs, to_cond)

NODE = "Wan Long Video"


def check_images(net, start_image, end_image, clip_vision_start, clip_vision_end):
    """The image inputs this model can use: end_image (and its CLIP encoding) on FLF2V-14B only, the CLIP encodings
    with their images, the start image's CLIP encoding for Wan 2.1 I2V / FLF2V."""
    img_emb = getattr(net, "img_emb", None)
    if end_image is not None and getattr(img_emb, "emb_pos", None) is None:
        raise ValueError(f"end_image is for Wan 2.1 FLF2V-14B only, and the model is {net.variant_name}: disconnect "
                         "it (or load the FLF2V model)")
    if clip_vision_end is not None and (clip_vision_start is None or end_image is None):
        raise ValueError("clip_vision_end is connected without clip_vision_start and end_image: connect the CLIP "
                         "encodings of both images and the end image (FLF2V), or disconnect it")
    if img_emb is not None and clip_vision_start is None:
        raise ValueError("this Wan 2.1 image-to-video model needs the start image's CLIP encoding: connect "
                         "clip_vision_start (Wan CLIP Vision Encode of the start image)")


def _continuation_inputs():
    """Added after the first release: optional and last, so that workflows saved before keep their widget values."""
    return [
        io.Combo.Input("continuation", options=list(CONTINUATIONS), default="auto", optional=True, tooltip=(
            "How each clip continues the one before. auto: latent carry for the image-to-video models, pixel for "
            "the others and with an FLF2V end image. pixel: the last frames decoded, re-encoded, cross-faded. "
            "latent carry: the last sampled latent frames (never decoded) after the start image's latent, as SVI 2.0 "
            "Pro builds it. svi 2.0 pro (Wan 2.2 I2V-A14B + its SVI Pro LoRAs), svi 2.0 (Wan 2.2 or 2.1 I2V + SVI "
            "2.0 LoRA), svi 1.0 shot / film (Wan 2.1 I2V + SVI 1.0 LoRA): exactly as SVI's code, with its seeds "
            "(clip k: seed + 42 k).")),
        io.Boolean.Input("colour_anchor", default=False, optional=True, tooltip=(
            "Match every clip's brightness, contrast and saturation to clip 0's (hues never move): removes the colour "
            "creep of long chains; leave off when the scene is meant to change its look.")),
        io.Combo.Input("join", options=list(JOINS), default="auto", optional=True, tooltip=(
            "How the frames two clips share are joined. auto: as the continuation's reference (pixel: cross-fade; "
            "latent carry / SVI: cut). cut: one rendering kept (pixel: the earlier clip's). cross-fade: both blended "
            "(latent carry: the re-created motion frames, the start image's frame dropped).")),
        WanLeanCLIPVision.Input("clip_vision", optional=True, tooltip=(
            "Wan 2.1 SVI modes: the CLIP vision model (Wan Load CLIP Vision), to encode each clip's first frame as SVI "
            "does.")),
    ]


def _video_inputs():
    """The shared sampling inputs with the total length of the video, then the clips' length and overlap."""
    length = io.Int.Input("length", default=233, min=5, max=100000, step=4, tooltip=(
        "Total frames: clip_length + (clips - 1) x (clip_length - overlap), e.g. 233 = 3 clips of 81 with overlap 5 "
        "(about 15 s at 16 fps). Other lengths are refused with the nearest valid ones."))
    return [
        *sampling_inputs(40, [cfg_input("cfg", 5.0, " (A14B: of the high-noise expert)")], 5.0, length),
        io.Int.Input("clip_length", default=81, min=5, max=1025, step=4,
                     tooltip="Frames per clip, 1+4k (81 for Wan 2.1 / A14B, 121 for TI2V-5B)."),
        io.Int.Input("overlap", default=5, min=1, max=509, step=4, tooltip=(
            "Frames each clip shares with the one before (1+4j, under half a clip). pixel: the next clip starts from "
            "these last frames, cross-faded (1 carries only the picture, 5+ also the motion); latent carry / svi 2.0 "
            "pro: (overlap - 1) / 4 latent frames carried, the re-created frames dropped (SVI: 5); svi 2.0 on Wan "
            "2.2: 1; Wan 2.1 SVI: the frames carried (shot 1, film and svi 2.0: 5).")),
    ]


class WanLeanLongVideo(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanLongVideo", "Wan Long Video (clips chained)", (
            "A long video in clips, each continuing from the last frames of the one before through the model's own "
            "image path (I2V / FLF2V / I2V-A14B: the I2V mask and latent of those frames; TI2V-5B: those latents at "
            "timestep 0; T2V: those latents held by inpainting) and cross-fading the shared frames, or, for the "
            "image-to-video models, by carrying the last sampled latents (latent carry, SVI 2.0 Pro) or as the SVI "
            "LoRAs expect (continuation). One prompt line per clip (optional). Returns the decoded frames."), [
            WanLeanModel.Input("model", tooltip="Any Wan model but S2V (A14B: the high-noise expert)."),
            WanLeanVAE.Input("vae", tooltip="The model family's VAE (Wan 2.2 VAE for TI2V-5B, else Wan 2.1)."),
            *cond_inputs("Prompt features (Wan Text Encode): every clip's prompt unless prompts is set. Give images "
                         "to this node, not through Wan Image To Video.", "Negative prompt features (Wan Text Encode)."),
            *_video_inputs(),
            io.Image.Input("start_image", optional=True, tooltip=(
                "The first frame (needed by I2V / FLF2V / I2V-A14B; TI2V-5B and T2V start from it when given). Scaled "
                "to cover the size, centre-cropped.")),
            io.Image.Input("end_image", optional=True, tooltip="FLF2V only: the last clip ends on it."),
            *clip_vision_inputs("Wan 2.1 I2V / FLF2V: CLIP encoding of the start image, kept for every clip as the "
                                "identity anchor."),
            *low_noise_inputs("Wan 2.2 A14B: the low-noise expert (`model` is then the high-noise one); ComfyUI loads "
                              "one at a time.", "A14B: s"),
            WanLeanTextEncoder.Input("text_encoder", optional=True, tooltip="Needed for prompts (Wan Load Text Encoder)."),
            io.String.Input("prompts", multiline=True, default="", optional=True, tooltip=(
                "One prompt per line, line k for clip k (the last line holds for the clips after it; more lines than "
                "clips is refused). Empty: positive for every clip.")),
            *_continuation_inputs(),
        ], [io.Image.Output(display_name="frames")], progress=True)

    @classmethod
    def execute(cls, model, vae, positive, negative, seed, steps, cfg, shift, sampler, width, height, length,
                clip_length, overlap, start_image=None, end_image=None, clip_vision_start=None, clip_vision_end=None,
                low_noise_model=None, cfg_low_noise=3.0, boundary=0.875, text_encoder=None, prompts="",
                continuation="auto", colour_anchor=False, join="auto", clip_vision=None):
        with errors_named(NODE):
            net = model.patcher.model
            if isinstance(net, WanS2V):
                raise ValueError("model is the S2V model: use Wan Speech To Video, which chains its clips itself")
            kind, channels = conditioning_kind(net.in_dim, net.out_dim), net.out_dim
            if vae.patcher.model.z_dim != channels:
                raise ValueError(f"vae makes {vae.patcher.model.z_dim}-channel latents but the model {channels}: use "
                                 "the Wan 2.2 VAE for TI2V-5B, the Wan 2.1 VAE for every other model")
            check_images(net, start_image, end_image, clip_vision_start, clip_vision_end)
            check_video_size(width, height, clip_length, 2 * spatial_stride(channels))
            clips = count_clips(length, clip_length, overlap)
            rule = continuation_rule(continuation, kind, getattr(net, "img_emb", None) is not None, overlap,
                                     end=end_image is not None)
            join_of(rule, join)  # checked before anything runs
            plan = [(model, cfg, 0.0)] if low_noise_model is None else \
                [(model, cfg, boundary * 1000), (low_noise_model, cfg_low_noise, 0.0)]  # high-noise expert first
            check_experts([h for h, *_ in plan])
            shape = latent_shape(width, height, clip_length, channels)
            check_memory(model, shape, max(passes(g) for _, g, _ in plan))
            job = cls._job(net, kind, positive, negative, clips, prompts, text_encoder, start_image, end_image,
                           width, height, clip_vision_start, clip_vision_end)
            job.encode_clip = clip_encoder(clip_vision) if clip_vision is not None else None
            total = clip_length + (clips - 1) * (clip_length - overlap)
            out = torch.empty(total, height, width, 3, dtype=torch.float32, device=mm.intermediate_device())
            callback = clips_step_callback(steps, clips, cls.node_id(), channels, model.device)
            frames = generate_long(make_experts(plan, shape), VAEOnDevice(vae), job, clips=clips,
                                   clip_length=clip_length, overlap=overlap, seed=seed, steps=steps, shift=shift,
                                   sampler=sampler, width=width, height=height, channels=channels,
                                   device=model.device, dtype=model.dtype, callback=callback,
                                   on_clip=lambda *_: mm.throw_exception_if_processing_interrupted(), rule=rule,
                                   colour_anchor=colour_anchor, join=join)
            done = 0
            for chunk in frames:  # [3, n, H, W] in [-1, 1] -> IMAGE rows, as each clip finishes
                out[done:done + chunk.shape[1]] = ((chunk.clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)
                done += chunk.shape[1]
            return io.NodeOutput(out)

    @staticmethod
    def _job(net, kind, positive, negative, clips, prompts, text_encoder, start_image, end_image, width, height,
             clip_vision_start, clip_vision_end):
        """The clip-independent conditioning: text per clip (of the model's text width), images at the video size,
        the CLIP anchor."""
        cond, uncond = to_cond(positive, "positive", net), to_cond(negative, "negative", net)
        if cond.y is not None or cond.first_frame is not None:
            raise ValueError("positive already carries image conditioning (Wan Image To Video): connect Wan Text "
                             "Encode directly and give the image to start_image")
        if kind == "image" and start_image is None:
            raise ValueError("this image-to-video model needs a start image: connect start_image")
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        contexts = [cond.context] * clips
        if lines:
            if text_encoder is None:
                raise ValueError("prompts needs the text encoder: connect text_encoder (Wan Load Text Encoder)")
            per_clip = clip_prompts(lines, clips)
            unique = list(dict.fromkeys(per_clip))
            feats = [f for i in range(0, len(unique), 2) for f in encode_prompts(text_encoder, unique[i:i + 2])]
            contexts = [feats[unique.index(p)] for p in per_clip]
            check_context(net, contexts[0], "prompts (text_encoder)")
        image = lambda img, name: None if img is None else fit(to_pixels(img, name), width, height)  # noqa: E731
        tokens = _tokens(clip_vision_start, "clip_vision_start")
        if tokens is not None:
            tokens = clip_tokens(tokens, _tokens(clip_vision_end, "clip_vision_end"))
        return LongJob(kind, contexts, uncond.context, image(start_image, "start_image"), image(end_image, "end_image"),
                       tokens)


NODES = [WanLeanLongVideo]
