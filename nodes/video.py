"""Save IMAGE frames as an H.264 mp4 (PyAV) in ComfyUI's output folder."""
import os

import av
import numpy as np

import folder_paths

from .common import CATEGORY


def write_mp4(path, frames, fps, crf=19):
    """frames: float [T, H, W, 3] in [0, 1] -> H.264 yuv420p mp4 at `fps`."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {w}x{h}: resize the frames first")
    pixels = (frames.clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
    with av.open(path, mode="w") as out:
        stream = out.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in pixels:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


class WanLeanSaveVideo:
    DESCRIPTION = "Saves frames as an H.264 mp4 in ComfyUI's output folder (16 fps for Wan 2.1)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "Video frames (e.g. from Wan VAE Decode)."}),
            "fps": ("INT", {"default": 16, "min": 1, "max": 120, "tooltip": "Frame rate; Wan 2.1 models are trained at 16 fps."}),
            "filename_prefix": ("STRING", {"default": "wan/video", "tooltip": "Output path prefix inside the output folder."}),
            "crf": ("INT", {"default": 19, "min": 0, "max": 51, "tooltip": "H.264 quality: lower is better and larger."}),
        }}

    def save(self, frames, fps, filename_prefix, crf):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be an RGB IMAGE batch [T, H, W, 3], got shape {tuple(frames.shape)}")
        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, out_dir, frames.shape[2], frames.shape[1])
        filename = f"{name}_{counter:05}_.mp4"
        write_mp4(os.path.join(folder, filename), frames, fps, crf)
        return {"ui": {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}], "animated": (True,)}}


NODE_CLASS_MAPPINGS = {"WanLeanSaveVideo": WanLeanSaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"WanLeanSaveVideo": "Wan Save Video (mp4)"}
