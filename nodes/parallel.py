"""Multi-device sampling: one worker process per local GPU (wan_core.parallel.WorkerPool), each holding its own copy
of the model file, sequence-parallel and optionally CFG-parallel; the ComfyUI process feeds the job and gets the
latent back. The pool is kept while the model file, devices and layout stay the same, and is closed on an
interrupt, a worker error and ComfyUI's exit. The node loads its model file itself (each worker reads it), so
LoRAs and ComfyUI's model patches do not apply here."""
import atexit
import os
import sys

import torch

import comfy.model_management as mm
import folder_paths

# The workers are spawned processes that unpickle their job by module name: the pack's own package name exists
# only inside ComfyUI, so the core is imported here under its top-level name from the pack's folder.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
from wan_core.parallel import ATTENTION_MODES, DiTFiles, WorkerPool, parse_devices, sample_job  # noqa: E402
from wan_core.pipeline import Cond  # noqa: E402

if not os.path.abspath(sys.modules["wan_core"].__file__).startswith(_ROOT):
    raise ImportError(f"another 'wan_core' package ({sys.modules['wan_core'].__file__}) shadows this pack's")
from ..wan_core.pipeline import check_video_size
from .common import CATEGORY, compute_dtype
from .loaders import diffusion_model_files
from .sampler import cfg_widget, to_cond, widgets

_POOL = {"pool": None}


def close_pool():
    pool, _POOL["pool"] = _POOL["pool"], None
    if pool is not None:
        pool.close()


atexit.register(close_pool)


def get_pool(factory, devices, cfg_parallel, attention):
    """The running pool when it holds these models on these devices, else a new one (the old one closed)."""
    key = (factory, tuple(devices), bool(cfg_parallel), attention)
    pool = _POOL["pool"]
    if pool is not None and pool.key == key and pool.alive:
        return pool
    close_pool()
    _POOL["pool"] = WorkerPool(factory, devices, cfg_parallel, attention,
                               poll=mm.throw_exception_if_processing_interrupted)
    return _POOL["pool"]


class WanLeanParallelSampler:
    DESCRIPTION = ("Samples a Wan video latent on several local devices at once: the video tokens are split across "
                   "them (sequence parallel, Ulysses attention; all-gather attention when the head count does not "
                   "divide), and with cfg_parallel the prompt and negative passes run on different halves. Each worker "
                   "loads the model file itself and stays loaded for the next run with the same settings.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (diffusion_model_files(), {"tooltip": "A Wan T2V/I2V/FLF2V/TI2V model from "
                                                                "models/diffusion_models; every worker loads it."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt features (Wan Text Encode, or Wan Image To Video)."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt features."}),
            **widgets(50, cfg_widget("cfg", 5.0, ""), 5.0),
            "devices": ("STRING", {"default": "cuda:all", "tooltip": "'cuda:all', a list such as 'cuda:0,cuda:1', "
                                                                    "or 'cpu:2' (CPU processes over gloo, for tests)."}),
            "cfg_parallel": ("BOOLEAN", {"default": False, "tooltip": "Run the prompt and the negative pass on "
                                                                      "different halves of the devices (even count)."}),
            "attention": (list(ATTENTION_MODES), {"default": "auto", "tooltip": "auto: Ulysses when the head count "
                                                                               "divides, else all-gather K/V."}),
        }}

    def sample(self, model_name, positive, negative, seed, steps, cfg, shift, sampler, width, height, length,
               devices, cfg_parallel, attention):
        devices = parse_devices(devices)
        device = torch.device(devices[0])
        dtype = torch.float32 if device.type == "cpu" else compute_dtype(device)
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        factory = DiTFiles.of({"model": path}, dtype)
        cond, uncond = (Cond(**vars(to_cond(c, n))) for c, n in ((positive, "positive"), (negative, "negative")))
        check_video_size(width, height, length, 16)  # (32 for TI2V-5B: checked in the workers, by the model)
        spec = dict(experts=[("model", cfg, 0.0)], cond=cond, uncond=uncond, seed=seed, steps=steps, shift=shift,
                    sampler=sampler, width=width, height=height, length=length, dtype=dtype)
        pool = get_pool(factory, devices, cfg_parallel, attention)
        return ({"samples": pool.run(sample_job, spec, poll=mm.throw_exception_if_processing_interrupted)},)


NODE_CLASS_MAPPINGS = {"WanLeanParallelSampler": WanLeanParallelSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"WanLeanParallelSampler": "Wan Sampler (multi-GPU)"}
