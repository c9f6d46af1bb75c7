"""Rebuilding the diffusion models inside worker processes: a picklable record of the file, weight dtype, LoRAs and
attention backend a loaded model came from, and a factory that loads them again on a worker's device."""
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .castops import casting_ops, merge_lora_stored, storage_dtypes
from .checkpoint import load_dit, read_file
from .dit import WanDiT
from .lora import match_lora
from .s2v import WanS2V, is_s2v_state_dict


def _dtype_name(dtype):
    return None if dtype is None else str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class ModelSource:
    """One diffusion model as a worker rebuilds it: the checkpoint, the dtype the loader stored its weights in
    (None: the file's own; a torch dtype name such as "float8_e4m3fn"), LoRAs merged in order ((path, strength),
    ...), every file's size and modification time, so that a replaced file makes another source, and the model's
    attention backend (wan_core.attention; None: the process default)."""
    path: str
    weight_dtype: Optional[str] = None
    loras: tuple = ()
    stamps: tuple = ()
    attention: Optional[str] = None

    @classmethod
    def of(cls, path, weight_dtype=None, loras=(), attention=None):
        loras = tuple((p, float(s)) for p, s in loras)
        stamps = tuple((os.path.getsize(f), os.path.getmtime(f)) for f in (path, *(p for p, _ in loras)))
        return cls(path, _dtype_name(weight_dtype), loras, stamps, attention)

    def state_dict(self, dtype):
        """Official-key weights as a worker stores them (wan_core.castops.storage_dtypes): the file loaded as the
        loader loads it, the LoRAs merged in that storage dtype (as ComfyUI patches a model's weights; on packed
        weights, at use); fp8 and quantized sources kept as stored, others cast to the compute `dtype`."""
        ckpt = load_dit(self.path, self.weight_dtype and getattr(torch, self.weight_dtype))
        if ckpt.layout == "GGUF":
            raise ValueError(f"{os.path.basename(self.path)} is GGUF ({ckpt.quantized}): multi-device sampling needs "
                             "a bf16/fp16/fp32/fp8 or ComfyUI-quantized file of the model (or use Wan Sampler on one "
                             "device)")
        sd = ckpt.sd
        for path, strength in self.loras:
            match = match_lora(read_file(path), sd).check(f"'{os.path.basename(path)}'")
            sd = merge_lora_stored(sd, match.patches, strength)
        return storage_dtypes(sd, dtype)


@dataclass(frozen=True)
class DiTFiles:
    """A picklable model factory for the workers: {name: ModelSource} built on the worker's device, weights stored
    as ModelSource.state_dict stores them (fp8 stays fp8, quantized stays packed) and cast to each input's dtype at
    use (wan_core.castops).
    Equal instances mean the same models (the pool's reuse key)."""
    models: tuple  # ((name, ModelSource), ...)
    dtype: str = "bfloat16"

    @classmethod
    def of(cls, sources, dtype):
        """sources: {name: ModelSource, or a checkpoint path (file dtypes, no LoRA)}."""
        return cls(tuple((name, s if isinstance(s, ModelSource) else ModelSource.of(s))
                         for name, s in dict(sources).items()), _dtype_name(dtype))

    def __call__(self, device):
        models = {}
        for name, source in self.models:
            sd = source.state_dict(getattr(torch, self.dtype))
            family = WanS2V if is_s2v_state_dict(sd) else WanDiT
            models[name] = family.from_state_dict(sd, ops=casting_ops()).to(device).eval()  # weights cast at use
            models[name].attention_backend = source.attention
        return models
