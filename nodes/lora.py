"""The LoRA loader: a LoRA file applied through ComfyUI's ModelPatcher (patches, never weights edited in place)."""
import dataclasses
import functools
import logging
import os

import torch

import comfy.weight_adapter
import folder_paths
from comfy_api.latest import io

from ..wan_core.checkpoint import read_file
from ..wan_core.lora import apply_patch, match_lora
from .common import WanLeanNode, WanLeanModel


def model_shapes(model):
    """Tensor shapes as a LoRA sees them: packed weights (GGUF, ComfyUI's quantized formats: wan_core.quant.QuantLinear)
    by their logical shape."""
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    shapes.update({f"{name}.weight": m.qshape for name, m in model.named_modules() if getattr(m, "qtype", None)})
    return shapes


def add_lora(patcher, patches, strength):
    """A clone of `patcher` carrying `patches` (wan_core.lora format) at `strength`, each the way ComfyUI applies it
    in every load mode (full, or partial with layers streamed):
    - weights of ComfyUI's casting ops (Linear, Conv3d, LayerNorm): ModelPatcher patches (LoRAAdapter / diff);
    - packed weights (GGUF, ComfyUI's quantized formats): a weight wrapper patching the decoded weight at use (the
      packed tensors stay as stored);
    - anything else (`modulation`, RMSNorm gains; ModelPatcher skips bare parameters of modules with children and,
      in a partial load, plain modules): an object patch, a small patched copy swapped in on load, out on unload."""
    clone = patcher.clone()
    weights = {}
    for key, patch in patches.items():
        owner = patcher.model.get_submodule(key.rpartition(".")[0])
        if key.endswith(".weight") and getattr(owner, "qtype", None):
            clone.add_weight_wrapper(key, functools.partial(apply_patch, patch=patch, strength=strength))
        elif hasattr(owner, "comfy_cast_weights"):
            kind, value = patch
            weights[key] = comfy.weight_adapter.LoRAAdapter(set(), value) if kind == "lora" else patch
        else:
            merged = apply_patch(clone.get_model_object(key), patch, strength).to(patcher.offload_device)
            clone.add_object_patch(key, torch.nn.Parameter(merged, requires_grad=False))
    clone.add_patches(weights, strength)
    return clone


class WanLeanLoraLoader(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanLoraLoader", "Wan Load LoRA", (
            "Applies a LoRA to a Wan diffusion model through ComfyUI's patch mechanism (the loaded weights are never "
            "edited; unload restores them). Chain several to stack them. Reads official/ComfyUI, diffusers, "
            "kohya/musubi and lightx2v step-distillation LoRAs (with their diff / diff_b / norm patches); keys that "
            "match nothing are reported in the log."), [
            WanLeanModel.Input("model", tooltip="The Wan diffusion model (from Wan Load Diffusion Model or another "
                                            "Wan Load LoRA)."),
            io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                           tooltip="A LoRA from models/loras trained for this Wan model (same family and size)."),
            io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                           tooltip="How strongly the LoRA applies: 1 as trained, 0 switches it off, negative values "
                                   "push the other way."),
        ], [WanLeanModel.Output(display_name="model")])

    @classmethod
    def execute(cls, model, lora_name, strength):
        if strength == 0:
            return io.NodeOutput(model)
        lora_sd = read_file(folder_paths.get_full_path_or_raise("loras", lora_name))
        name = f"'{os.path.basename(lora_name)}'"
        try:
            match = match_lora(lora_sd, model_shapes(model.patcher.model))
        except ValueError as e:
            raise ValueError(f"LoRA {name}: {e}") from None
        match.check(name, total=len(lora_sd))
        if match.unmatched or match.mismatched:
            logging.warning("Wan Lean LoRA %s", match.summary(name))
        else:
            logging.info("Wan Lean LoRA %s", match.summary(name))
        patcher = add_lora(model.patcher, match.patches, strength)
        extra = dict(model.extra)
        if "source" in extra:  # recorded for processes that rebuild the model (multi-device workers)
            path = folder_paths.get_full_path_or_raise("loras", lora_name)
            extra["source"] = {**extra["source"], "loras": extra["source"]["loras"] + ((path, strength),)}
        return io.NodeOutput(dataclasses.replace(model, patcher=patcher, extra=extra))


NODES = [WanLeanLoraLoader]
