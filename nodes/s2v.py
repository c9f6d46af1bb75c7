"""Speech-to-video nodes (Wan2.2-S2V-14B): the wav2vec2 audio encoder, an audio file loader, and one node that
renders a whole talking/singing video clip by clip, returning its frames and the audio trimmed to them."""
import hashlib
import itertools
import logging
import os

import torch

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io

from ..wan_core.audio import (SAMPLE_RATE, audio_buckets, clips_for, encode_for_clips, from_comfy_audio, load_audio,
                              prepare, readable_extensions, to_comfy_audio, trim_to_video, video_frames)
from ..wan_core.checkpoint import read_file
from ..wan_core.checks import ENCODER_CAUSE, VAE_CAUSE, check_finite
from ..wan_core.conditioning import SIZINGS, official_s2v_size, pose_pixels, to_pixels
from ..wan_core.pipeline import check_video_size
from ..wan_core.s2v import WanS2V
from ..wan_core.s2v_pipeline import CLIP_FRAMES, S2VJob, fit_frames, generate_s2v, output_frames, pose_latents
from ..wan_core.wav2vec2 import Wav2Vec2
from .common import (Handle, WanLeanAudioEncoder, WanLeanModel, WanLeanNode, WanLeanVAE, casting_ops,
                     clips_step_callback)
from .decode import decode_memory, encode_memory
from .inputs import resolve_file
from .sampler import (activation_memory, cond_inputs, passes, sampler_input, seed_input, seed_mode_input, shift_input,
                      steps_input, to_cond)

VIDEO_LENGTHS = ("audio", "whole clips")


class WanLeanAudioEncoderLoader(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanAudioEncoderLoader", "Wan Load Audio Encoder (wav2vec2)", (
            "Loads the wav2vec2 speech encoder S2V listens with (wav2vec2-large-xlsr-53-english; HF layout, with or "
            "without a wav2vec2. prefix, or ComfyUI's wav2vec2_large_english file)."), [
            io.Combo.Input("audio_encoder_name", options=folder_paths.get_filename_list("audio_encoders"),
                           tooltip="The wav2vec2 model from models/audio_encoders."),
        ], [WanLeanAudioEncoder.Output(display_name="audio_encoder")])

    @classmethod
    def execute(cls, audio_encoder_name):
        sd = read_file(folder_paths.get_full_path_or_raise("audio_encoders", audio_encoder_name))
        model = Wav2Vec2.from_state_dict(sd, ops=casting_ops())
        device = mm.text_encoder_device()
        return io.NodeOutput(Handle.wrap(model, device, mm.text_encoder_offload_device(), torch.float32))


def file_fingerprint(path):
    """sha256 of a file's bytes: ComfyUI re-runs a node when this changes (a file overwritten under the same name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class WanLeanLoadAudio(WanLeanNode):
    @classmethod
    def define_schema(cls):
        readable = readable_extensions()
        files = [f for f in os.listdir(folder_paths.get_input_directory()) if f.lower().endswith(readable)]
        return cls.schema("WanLeanLoadAudio", "Wan Load Audio", (
            "Reads an audio file from ComfyUI's input folder (soundfile) as AUDIO: wav, flac, ogg and, with "
            "libsndfile >= 1.1, mp3 (only what the installed libsndfile reads is listed; convert m4a/aac to one of "
            "those, or use ComfyUI's Load Audio). A file overwritten under the same name is read again."), [
            io.Combo.Input("audio_file", options=sorted(files), upload=io.UploadType.audio,
                           tooltip="A speech or song file in ComfyUI's input folder."),
        ], [io.Audio.Output(display_name="audio")])

    @classmethod
    def validate_inputs(cls, audio_file=None):
        """At /prompt, on every host: a name outside the input folder is refused before the graph runs. Naming the
        input here also makes newer hosts skip their own options check of it, so names ComfyUI's upload gives
        ("sub/x.wav", "x.wav [input]") pass as in 0.3.75. None: the name arrives over a link (execute checks it)."""
        return cls.input_refusal(audio_file=audio_file) or True

    @classmethod
    def fingerprint_inputs(cls, audio_file):
        try:
            path = resolve_file(audio_file)
        except ValueError:  # execute refuses it; nothing outside the input folder is read, not even for a hash
            return audio_file
        return file_fingerprint(path)

    @classmethod
    def execute(cls, audio_file):
        wave, rate = load_audio(resolve_file(audio_file))
        return io.NodeOutput(to_comfy_audio(wave, rate))


class VAEOnDevice:
    """The VAE handle as the S2V loop wants it: encode/decode that ask ComfyUI for the device first."""

    def __init__(self, handle):
        self.handle = handle

    def encode(self, video):
        model = self.handle.load(encode_memory(video.shape, self.handle.dtype, self.handle.patcher.model.STRIDE))
        return check_finite(model.encode(video.to(self.handle.device, self.handle.dtype)), "the VAE's encoding", VAE_CAUSE)

    def decode(self, latent):
        model = self.handle.load(decode_memory(latent.shape, self.handle.dtype, self.handle.patcher.model.STRIDE))
        return check_finite(model.decode(latent.to(self.handle.device, self.handle.dtype)), "the decoded video", VAE_CAUSE)


def audio_features(encoder, audio, clips_wanted):
    """AUDIO -> (bucketed features [1, 25, C, clips*80], clips, waveform [C, N], sample rate)."""
    wave, rate = from_comfy_audio(audio)
    speech = prepare(wave, rate)
    frames = video_frames(speech.shape[-1])
    clips = clips_for(frames) if clips_wanted == 0 else min(clips_wanted, clips_for(frames))
    model = encoder.load()
    with torch.no_grad():
        hidden, encoded = encode_for_clips(lambda x: model(x.to(encoder.device)).float().cpu(), speech, clips)
    check_finite(hidden, "the wav2vec2 features", ENCODER_CAUSE)
    logging.info("Wan Lean S2V: wav2vec2 encoded %d of %d samples (%.1f of %.1f s) for %d clip(s)",
                 encoded, speech.shape[-1], encoded / SAMPLE_RATE, speech.shape[-1] / SAMPLE_RATE, clips)
    feats = audio_buckets(hidden, clips * CLIP_FRAMES)
    return feats, clips, wave, rate


def s2v_inputs():
    """Model, VAE, audio encoder, conditioning, reference image and speech, size, then the shared sampling inputs with
    the official S2V defaults and the clip count."""
    side = "Multiple of 16 (64 or more)."
    return [
        WanLeanModel.Input("model", tooltip="The S2V model (wan2.2_s2v_14B) from Wan Load Diffusion Model."),
        WanLeanVAE.Input("vae", tooltip="The Wan 2.1 VAE."),
        WanLeanAudioEncoder.Input("audio_encoder", tooltip="From Wan Load Audio Encoder (wav2vec2)."),
        *cond_inputs("Prompt features (Wan Text Encode).", "Negative prompt features (Wan Text Encode)."),
        io.Image.Input("ref_image", tooltip="The person/scene to animate; scaled to cover the size and centre-cropped."),
        io.Audio.Input("audio", tooltip="Speech or song (Wan Load Audio, or ComfyUI's Load Audio)."),
        io.Int.Input("width", default=832, min=64, max=4096, step=16, tooltip=side),
        io.Int.Input("height", default=480, min=64, max=4096, step=16, tooltip=side),
        seed_input("Noise seed (clip r uses seed + r, wrapping to 0 after 2^64-1)."),
        steps_input(40, "Solver steps per clip (official: 40)."),
        io.Float.Input("cfg", default=4.5, min=1.0, max=20.0, step=0.1,
                       tooltip="Guidance; the negative branch also gets silent audio (official: 4.5)."),
        shift_input(3.0, "Timestep shift (official: 3)."),
        sampler_input(),
        io.Int.Input("max_clips", default=0, min=0, max=1000,
                     tooltip="0: as many 80-frame clips as the audio needs; else at most this many."),
    ]


class WanLeanSpeechToVideo(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanSpeechToVideo", "Wan Speech To Video (S2V)", (
            "Wan2.2-S2V: one image + a speech or song track -> a talking/singing video, rendered in clips of 80 frames "
            "that continue from the last 73 frames of the previous clip; the clip count follows the audio (or "
            "max_clips). Returns the frames (16 fps, cut where the audio ends, as the official mp4) and the audio "
            "trimmed to them."), [
            *s2v_inputs(),
            io.Image.Input("pose_video", optional=True, tooltip=(
                "Pose frames at 16 fps to drive the motion (e.g. from a pose estimator): RGB, RGBA (alpha dropped) or "
                "grey (1 channel, used as grey RGB).")),
            io.Combo.Input("video_length", options=list(VIDEO_LENGTHS), default="audio", optional=True, tooltip=(
                "audio: the video ends with the audio, as the official mp4 (floor(seconds x 16) frames). whole clips: "
                "every generated frame (clips x 80 - 3); the tail past the speech moves without sound.")),
            seed_mode_input(),
            io.Combo.Input("sizing", options=list(SIZINGS), default="crop", optional=True, tooltip=(
                "crop: scale the reference image to cover width x height and centre-crop (bicubic). official: as the "
                "official S2V: the size (multiples of 64) follows the image at about width x height pixels; short side "
                "resized (antialiased), centre-cropped, black bars where the image falls short.")),
        ], [io.Image.Output(display_name="frames"), io.Audio.Output(display_name="audio")], progress=True)

    @classmethod
    def execute(cls, model, vae, audio_encoder, positive, negative, ref_image, audio, width, height, seed, steps, cfg,
                shift, sampler, max_clips, pose_video=None, video_length="audio", seed_mode="comfy", sizing="crop"):
        net = model.patcher.model
        if not isinstance(net, WanS2V):
            raise ValueError(f"model is {net.variant_name}, not the S2V model: load wan2.2_s2v_14B")
        check_video_size(width, height, 1, 16)
        context, neg_context = to_cond(positive, "positive", net).context, to_cond(negative, "negative", net).context
        pixels = to_pixels(ref_image, "ref_image")
        pose_frames = None if pose_video is None else pose_pixels(pose_video)
        if sizing == "official":
            height, width = official_s2v_size(*pixels.shape[-2:], width * height)
        feats, clips, wave, rate = audio_features(audio_encoder, audio, max_clips)
        coder = VAEOnDevice(vae)
        with torch.no_grad():
            ref = coder.encode(fit_frames(pixels, width, height, sizing)[:, :, None])
            pose = None if pose_frames is None else pose_latents(coder, pose_frames, width, height, clips, sizing)
        job = S2VJob(context, neg_context, feats, ref, pose)
        shape = (1, 16, 20 + 19 + 1, height // 8, width // 8)
        act = activation_memory(model.patcher.model, shape, model.dtype, passes(cfg))
        get = lambda: model.load(act)  # noqa: E731
        video = generate_s2v(get, coder, job, clips=clips, seed=seed, steps=steps, cfg=cfg, shift=shift, sampler=sampler,
                             width=width, height=height, device=model.device, dtype=model.dtype,
                             callback=cls._progress(steps, clips, cls.node_id(), model), noise_mode=seed_mode)
        kept = output_frames(clips, wave.shape[-1], rate, whole_clips=video_length == "whole clips")
        frames = ((video[0, :, :kept].clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)
        return io.NodeOutput(frames.to(mm.intermediate_device()), to_comfy_audio(trim_to_video(wave, rate, kept), rate))

    @staticmethod
    def _progress(steps, clips, node_id, model):
        """One bar over all clips' steps, with the latent preview of each step; interrupts between steps."""
        return clips_step_callback(steps, clips, node_id, model.patcher.model.out_dim, model.device)


NODES = [WanLeanAudioEncoderLoader, WanLeanLoadAudio, WanLeanSpeechToVideo]
