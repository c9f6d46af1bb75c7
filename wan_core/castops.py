"""Casting layers for processes without ComfyUI (the multi-device workers, wan_core.parallel): an `ops` namespace for
the models (dit.py, s2v.py) whose layers keep their weights in the storage dtype (fp8, bf16, ...) and cast them to
each input's dtype at use, as ComfyUI's `comfy.ops.manual_cast` does on the single-device path. So an fp8 model
stays fp8 in memory (half the bytes of bf16) and fp32 parts (time embedding, norms over the fp32 residual stream)
run beside bf16 blocks.

Quantized Linears (ComfyUI's scaled fp8, nvfp4, mxfp8, int8; GGUF blocks) keep their packed tensors and decode them at
each call (wan_core.quant.QuantLinear), the same code the single-device loader's layers run (nodes/ops.py). Embeddings
are read as stored (ComfyUI's Embedding casts nothing for an fp8 table; the S2V model converts the rows it reads).
LoRAs merge into plain stored weights (`merge_lora_stored`), as ComfyUI's ModelPatcher patches a fully loaded model,
and apply at use on packed ones, as the single-device LoRA loader applies them there (nodes/lora.py).
Imports no model: the models take this namespace as their `ops`."""
import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from .convert import FP8
from .lora import apply_patch
from .quant import PackedWeight, QuantLinear


def _cast(t, like):
    return None if t is None else t.to(device=like.device, dtype=like.dtype)


class Linear(QuantLinear, nn.Linear):
    """Weight (decoded when packed) and bias cast to the input's dtype and device at each call."""

    def forward(self, input):
        return F.linear(input, self.dequantized_weight(input.dtype, input.device), _cast(self.bias, input))


class Conv1d(nn.Conv1d):
    def forward(self, input):
        return self._conv_forward(input, _cast(self.weight, input), _cast(self.bias, input))


class Conv3d(nn.Conv3d):
    def forward(self, input):
        return self._conv_forward(input, _cast(self.weight, input), _cast(self.bias, input))


class LayerNorm(nn.LayerNorm):
    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, _cast(self.weight, input), _cast(self.bias, input), self.eps)


def casting_ops():
    """The ops namespace (Linear, Conv1d, Conv3d, LayerNorm, Embedding)."""
    return types.SimpleNamespace(Linear=Linear, Conv1d=Conv1d, Conv3d=Conv3d, LayerNorm=LayerNorm,
                                 Embedding=nn.Embedding)


def storage_dtypes(sd, dtype):
    """A state dict as a worker stores it. With fp8 tensors or packed weights (an fp8 file, a quantized one, or the
    loader's fp8 weight dtype): every tensor as the single-device loader stores it (the matrices in fp8 or packed,
    norms, biases and modulation in the file's dtype, a few MB), since ComfyUI's casting ops cast each at use: the
    worker computes what the single-device model computes. Without: floating tensors in the compute `dtype` (an fp32
    file takes half)."""
    if any(isinstance(v, PackedWeight) or v.dtype in FP8 for v in sd.values()):
        return dict(sd)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def parameter_bytes(model):
    """Bytes of a module's parameters and buffers as stored."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def merge_lora_stored(sd, patches, strength=1.0):
    """A new state dict with LoRA patches merged into the weights as stored: math in fp32, the result rounded to the
    weight's storage dtype (fp8 stays fp8, clamped to its range). (ComfyUI rounds a patched fp8 weight stochastically,
    seeded per key; this rounds to nearest.) A packed weight stays packed and takes the patch at use, on its decoded
    values, by the function the single-device LoRA loader applies (wan_core.lora.apply_patch)."""
    out = dict(sd)
    for key, patch in patches.items():
        weight = sd[key]
        if isinstance(weight, PackedWeight):
            out[key] = weight.with_patch(functools.partial(apply_patch, patch=patch, strength=strength))
            continue
        merged = apply_patch(weight.float(), patch, strength)
        if weight.dtype in FP8:  # fp8 e4m3fn has no infinity: out of range would be NaN (ComfyUI clamps as well)
            merged = merged.clamp(torch.finfo(weight.dtype).min, torch.finfo(weight.dtype).max)
        out[key] = merged.to(weight.dtype)
    return out
