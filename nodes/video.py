"""Save IMAGE frames (+ an optional AUDIO track) as an H.264 mp4 (PyAV) in ComfyUI's output folder."""
import os
from fractions import Fraction

import av
import numpy as np

import folder_paths
from comfy_api.latest import io, ui

from ..wan_core.audio import aac_rate, from_comfy_audio
from ..wan_core.checks import check_finite
from .common import WanLeanNode


def _audio_track(audio):
    """A ComfyUI AUDIO dict -> (samples [C<=2, N] float32 numpy in [-1, 1], sample rate); refused with a clear error
    when it has no samples, a sample rate of 0 or NaN (wan_core.audio.from_comfy_audio)."""
    wave, rate = from_comfy_audio(audio, "audio")
    return wave[:2].clamp(-1, 1).numpy(), rate


def _encode_audio(out, samples, rate, seconds):
    """AAC packets of `samples` (at `rate`) trimmed to the video's duration, in a stream at the nearest rate AAC takes
    (wan_core.audio.aac_rate: 40 kHz is written at 44.1 kHz; PyAV's encoder resamples). Encoded before the container
    header is written, so the muxer knows the encoder's priming delay and writes the edit list that hides it."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    stream = out.add_stream("aac", rate=aac_rate(rate), layout=layout)
    samples = np.ascontiguousarray(samples[:, : max(1, int(round(seconds * rate)))], dtype=np.float32)
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
    frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
    return [*stream.encode(frame), *stream.encode()]


def write_mp4(path, frames, fps, crf=19, audio=None):
    """frames: float [T, H, W, 3] in [0, 1] -> H.264 yuv420p mp4 at `fps`; audio: ComfyUI AUDIO dict or None.
    Everything is checked before the file is opened: NaN/inf frames are refused, not written black."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {w}x{h}: resize the frames first")
    check_finite(frames, "frames", "the node that made them produced NaN/inf; refusing to write them as black frames")
    track = None if audio is None else _audio_track(audio)
    pixels = (frames.clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
    with av.open(path, mode="w") as out:
        video = out.add_stream("libx264", rate=int(fps))
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.options = {"crf": str(crf)}
        packets = _encode_audio(out, *track, t / fps) if track is not None else []
        for frame in pixels:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode())
        out.mux(packets)


def check_prefix(prefix, out_dir):
    """filename_prefix must give names the file system takes: each folder name, and the file name with its
    `_00001_.mp4` counter, within the file system's name limit (255 bytes on most); an empty prefix (or a folder
    only) would write hidden files such as `._00001_.mp4`."""
    try:
        limit = os.pathconf(out_dir, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if os.path.basename(os.path.normpath(prefix.strip() or ".")) in ("", ".", ".."):
        raise ValueError(f"Wan Save Video, input 'filename_prefix': {prefix!r} names no file (it is empty or a folder "
                         "only): give a name such as 'wan/video'")
    parts = prefix.replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        size = len(part.encode("utf-8")) + (len("_00001_.mp4") if i == len(parts) - 1 else 0)
        if size > limit:
            raise ValueError(f"filename_prefix is too long for the file system: "
                             f"{'the file name' if i == len(parts) - 1 else 'the folder name ' + repr(part[:20] + '...')} "
                             f"would be {size} bytes, the limit is {limit}: shorten filename_prefix")


class WanLeanSaveVideo(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanSaveVideo", "Wan Save Video (mp4)", (
            "Saves frames as an H.264 mp4 in ComfyUI's output folder (16 fps for Wan 2.1 and A14B, 24 for TI2V-5B), "
            "with an optional audio track trimmed to the video."), [
            io.Image.Input("frames", tooltip="Video frames (e.g. from Wan VAE Decode)."),
            io.Int.Input("fps", default=16, min=1, max=120,
                         tooltip="Frame rate: 16 for Wan 2.1 / A14B / S2V, 24 for TI2V-5B."),
            io.String.Input("filename_prefix", default="wan/video", tooltip="Output path prefix inside the output folder."),
            io.Int.Input("crf", default=19, min=0, max=51, tooltip="H.264 quality: lower is better and larger."),
            io.Audio.Input("audio", optional=True, tooltip=(
                "A sound track (e.g. the S2V speech); trimmed to the video's length, written as AAC at its own rate "
                "or, for rates AAC does not take (e.g. 40 kHz), resampled to the next rate up (44.1 kHz).")),
        ], output_node=True)

    @classmethod
    def execute(cls, frames, fps, filename_prefix, crf, audio=None):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be an RGB IMAGE batch [T, H, W, 3], got shape {tuple(frames.shape)}")
        out_dir = folder_paths.get_output_directory()
        check_prefix(filename_prefix, out_dir)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, out_dir, frames.shape[2], frames.shape[1])
        filename = f"{name}_{counter:05}_.mp4"
        write_mp4(os.path.join(folder, filename), frames, fps, crf, audio)
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(filename, subfolder, io.FolderType.output)]))


NODES = [WanLeanSaveVideo]
