"""Save IMAGE frames (+ an optional AUDIO track) as an H.264 mp4 (PyAV) in ComfyUI's output folder."""
import os
from fractions import Fraction

import av
import numpy as np

import folder_paths

from .common import CATEGORY


def _audio_stream(out, audio):
    """An AAC stream for a ComfyUI AUDIO dict, and its samples [C<=2, N] as float32 numpy."""
    rate = int(audio["sample_rate"])
    samples = audio["waveform"][0, :2].float().clamp(-1, 1).cpu().numpy()
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    return out.add_stream("aac", rate=rate, layout=layout), samples


def _encode_audio(stream, samples, seconds):
    """AAC packets of `samples` trimmed to the video's duration (encoded before the container header is
    written, so the muxer knows the encoder's priming delay and writes the edit list that hides it)."""
    rate = stream.codec_context.sample_rate
    samples = np.ascontiguousarray(samples[:, : int(round(seconds * rate))], dtype=np.float32)
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=stream.codec_context.layout.name)
    frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
    return [*stream.encode(frame), *stream.encode()]


def write_mp4(path, frames, fps, crf=19, audio=None):
    """frames: float [T, H, W, 3] in [0, 1] -> H.264 yuv420p mp4 at `fps`; audio: ComfyUI AUDIO dict or None."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {w}x{h}: resize the frames first")
    pixels = (frames.clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
    with av.open(path, mode="w") as out:
        video = out.add_stream("libx264", rate=int(fps))
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.options = {"crf": str(crf)}
        packets = _encode_audio(*_audio_stream(out, audio), t / fps) if audio is not None else []
        for frame in pixels:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode())
        out.mux(packets)


def check_prefix(prefix):
    """An empty prefix (or one that names a folder only) would write hidden files such as `._00001_.mp4`."""
    if os.path.basename(os.path.normpath(prefix.strip() or ".")) in ("", ".", ".."):
        raise ValueError(f"Wan Save Video, input 'filename_prefix': {prefix!r} names no file (it is empty or a folder "
                         "only): give a name such as 'wan/video'")


class WanLeanSaveVideo:
    DESCRIPTION = ("Saves frames as an H.264 mp4 in ComfyUI's output folder (16 fps for Wan 2.1 and A14B, 24 for TI2V-5B), "
                   "with an optional audio track trimmed to the video.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "Video frames (e.g. from Wan VAE Decode)."}),
            "fps": ("INT", {"default": 16, "min": 1, "max": 120, "tooltip": "Frame rate: 16 for Wan 2.1 / A14B / S2V, 24 for TI2V-5B."}),
            "filename_prefix": ("STRING", {"default": "wan/video", "tooltip": "Output path prefix inside the output folder."}),
            "crf": ("INT", {"default": 19, "min": 0, "max": 51, "tooltip": "H.264 quality: lower is better and larger."}),
        }, "optional": {
            "audio": ("AUDIO", {"tooltip": "A sound track (e.g. the S2V speech); trimmed to the video's length."}),
        }}

    def save(self, frames, fps, filename_prefix, crf, audio=None):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be an RGB IMAGE batch [T, H, W, 3], got shape {tuple(frames.shape)}")
        check_prefix(filename_prefix)
        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, out_dir, frames.shape[2], frames.shape[1])
        filename = f"{name}_{counter:05}_.mp4"
        write_mp4(os.path.join(folder, filename), frames, fps, crf, audio)
        return {"ui": {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}], "animated": (True,)}}


NODE_CLASS_MAPPINGS = {"WanLeanSaveVideo": WanLeanSaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"WanLeanSaveVideo": "Wan Save Video (mp4)"}
