"""Glue shared by the nodes: ComfyUI's memory manager, dtypes, progress and interrupts."""
from dataclasses import dataclass, field

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils

CATEGORY = "Wan Lean"
WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(device, fp16_ok=True):
    """bf16 where the device supports it, else fp16 (if the model tolerates it), else fp32."""
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if fp16_ok and mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def casting_ops():
    """ComfyUI's casting ops: weights are cast to each input's dtype at use (so fp32 parts such as the
    time embedding run next to bf16 blocks) and streamed from the offload device in low-VRAM mode."""
    return comfy.ops.manual_cast


@dataclass
class Handle:
    """A core model behind a ComfyUI ModelPatcher, plus what the nodes need to run it."""
    patcher: comfy.model_patcher.ModelPatcher
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @classmethod
    def wrap(cls, model, load_device, offload_device, dtype, **extra):
        size = comfy.model_management.module_size(model)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device, size=size)
        return cls(patcher, dtype, extra)

    @property
    def device(self):
        return self.patcher.load_device

    def load(self, memory_required=0):
        """Ask ComfyUI's memory manager for the device: `memory_required` is the call's activation estimate (bytes);
        ComfyUI adds the weights (the patcher's size, in the storage dtype), unloads other models to make room and
        loads this one partially, streaming the rest through the casting ops, when the device is still too small.
        Only this model is asked for, so models used one after the other (A14B experts) take turns."""
        mm.load_models_gpu([self.patcher], memory_required=memory_required)
        return self.patcher.model


def step_callback(total, node_id=None):
    """A per-step callback: progress bar + interrupt check (raises ComfyUI's InterruptProcessingException)."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def callback(step, *_):
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(step + 1, total)

    return callback
