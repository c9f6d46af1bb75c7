"""Casting layers for processes without ComfyUI (the multi-device workers, wan_core.parallel): an `ops` namespace for
the models (dit.py, s2v.py) whose layers keep their weights in the storage dtype (fp8, bf16, ...) and cast them to
each input's dtype at use, as ComfyUI's `comfy.ops.manual_cast` does on the single-device path. So an fp8 model
stays fp8 in memory (half the bytes of bf16) and fp32 parts (time embedding, norms over the fp32 residual stream)
run beside bf16 blocks.

`scaled=True` is ComfyUI's scaled fp8 (`comfy.ops.scaled_fp8_ops` without its fp8-matmul path): every Linear
holds a per-tensor `scale_weight` (fp32) and computes with weight * scale (or input * scale for a weight smaller
than the input), the scale cast to the input's dtype, in the same order as ComfyUI. Embeddings are read as stored
(ComfyUI's Embedding casts nothing for an fp8 table; the S2V model converts the rows it reads).
LoRAs merge into the stored weights (`merge_lora_stored`), as ComfyUI's ModelPatcher patches a fully loaded model.
Imports no model: the models take this namespace as their `ops`."""
import types

import torch
import torch.nn.functional as F
from torch import nn

from .convert import FP8
from .lora import delta


def _cast(t, like):
    return None if t is None else t.to(device=like.device, dtype=like.dtype)


class Linear(nn.Linear):
    def forward(self, input):
        return F.linear(input, _cast(self.weight, input), _cast(self.bias, input))


class ScaledLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale_weight = nn.Parameter(torch.ones((), device=self.weight.device), requires_grad=False)

    def forward(self, input):
        weight, bias = _cast(self.weight, input), _cast(self.bias, input)
        scale = _cast(self.scale_weight, input)
        if weight.numel() < input.numel():  # ComfyUI's choice of where the scale goes
            return F.linear(input, weight * scale, bias)
        return F.linear(input * scale, weight, bias)


class Conv1d(nn.Conv1d):
    def forward(self, input):
        return self._conv_forward(input, _cast(self.weight, input), _cast(self.bias, input))


class Conv3d(nn.Conv3d):
    def forward(self, input):
        return self._conv_forward(input, _cast(self.weight, input), _cast(self.bias, input))


class LayerNorm(nn.LayerNorm):
    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, _cast(self.weight, input), _cast(self.bias, input), self.eps)


def casting_ops(scaled=False):
    """The ops namespace (Linear, Conv1d, Conv3d, LayerNorm, Embedding); scaled: Linears with `scale_weight`."""
    return types.SimpleNamespace(Linear=ScaledLinear if scaled else Linear, Conv1d=Conv1d, Conv3d=Conv3d,
                                 LayerNorm=LayerNorm, Embedding=nn.Embedding)


def storage_dtypes(sd, dtype):
    """A state dict as a worker stores it. With fp8 tensors (an fp8 file, scaled fp8 or the loader's fp8 weight
    dtype): every tensor as the single-device loader stores it (the matrices in fp8, scales in fp32, norms, biases and
    modulation in the file's dtype, a few MB), since ComfyUI's casting ops cast each at use: the worker computes what
    the single-device model computes. Without: floating tensors in the compute `dtype` (an fp32 file takes half)."""
    if any(v.dtype in FP8 for v in sd.values()):
        return dict(sd)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def parameter_bytes(model):
    """Bytes of a module's parameters and buffers as stored."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def merge_lora_stored(sd, patches, strength=1.0):
    """A new state dict with LoRA patches merged into the weights as stored: math in fp32, the result rounded to the
    weight's storage dtype (fp8 stays fp8); a scaled-fp8 weight is patched as weight * scale_weight and stored back
    divided by its scale and clamped to the fp8 range, as ComfyUI's scaled-fp8 Linear converts and sets a patched
    weight. (ComfyUI rounds a patched fp8 weight stochastically, seeded per key; this rounds to nearest.)"""
    out = dict(sd)
    for key, patch in patches.items():
        weight = sd[key]
        scale = sd.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        scale = torch.ones(()) if scale is None else scale.float()
        merged = (weight.float() * scale + strength * delta(patch, weight.shape, weight.device)) / scale
        if weight.dtype in FP8:  # fp8 e4m3fn has no infinity: out of range would be NaN (ComfyUI clamps as well)
            merged = merged.clamp(torch.finfo(weight.dtype).min, torch.finfo(weight.dtype).max)
        out[key] = merged.to(weight.dtype)
    return out
