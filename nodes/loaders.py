"""Loader nodes: the Wan diffusion model, the Wan 2.1 / 2.2 VAE and the umT5 text encoder."""
import logging

import torch

import folder_paths
import comfy.model_management as mm
from comfy_api.latest import io

from ..wan_core import attention as attention_backends
from ..wan_core.checkpoint import load_dit, load_text_encoder, load_vae, read_file
from ..wan_core.compile import MODES as COMPILE_MODES, check_toolchain, compile_blocks
from ..wan_core.dit import WanDiT
from ..wan_core.s2v import WanS2V, is_s2v_state_dict
from ..wan_core.t5 import UMT5Encoder
from ..wan_core.tokenizer import UMT5Tokenizer
from ..wan_core.vae import WanVAE21
from ..wan_core.vae22 import WanVAE22, is_vae22
from .common import (WEIGHT_DTYPES, Handle, WanLeanModel, WanLeanNode, WanLeanTextEncoder, WanLeanVAE, casting_ops,
                     compute_dtype)
from .ops import ops_for

# the DiT can also be stored in fp8 (matrices only), computed through ComfyUI's casting ops
DIT_WEIGHT_DTYPES = {**WEIGHT_DTYPES, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# GGUF files are listed beside the diffusion models (ComfyUI's own list only has its torch extensions)
GGUF_FILES = "wanlean_gguf"
if GGUF_FILES not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[GGUF_FILES] = (folder_paths.folder_names_and_paths["diffusion_models"][0], {".gguf"})


def diffusion_model_files():
    return sorted(folder_paths.get_filename_list("diffusion_models") + folder_paths.get_filename_list(GGUF_FILES))


class WanLeanModelLoader(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanModelLoader", "Wan Load Diffusion Model", (
            "Loads a Wan diffusion model: official (single or sharded), ComfyUI-repackaged (bf16/fp16/fp8, fp8 "
            "scaled), diffusers (single file or a transformer folder: pick any shard) or GGUF (city96's, kept "
            "quantised and dequantised per layer). Variant and layout are read from the weights."), [
            io.Combo.Input("model_name", options=diffusion_model_files(), tooltip=(
                "A Wan model from models/diffusion_models (any variant: T2V, I2V, FLF2V, A14B expert, TI2V-5B; "
                ".safetensors, .gguf; sharded files: pick any shard).")),
            io.Combo.Input("weight_dtype", options=list(DIT_WEIGHT_DTYPES), default="default", tooltip=(
                "Dtype the weights are kept in; 'default' keeps the file's dtype (fp8, scaled fp8 and GGUF stay as "
                "stored). fp8 stores the matrices in 8 bits.")),
            io.Combo.Input("attention", options=list(attention_backends.BACKENDS), default="auto", optional=True,
                           tooltip="Attention kernel of this model. auto: flash-attn where installed and the GPU and "
                                   "dtype suit it, else PyTorch SDPA; flash / sage: that package (sage is lossy, "
                                   "~1e-2), SDPA for calls it cannot run; sdpa: PyTorch only."),
            io.Combo.Input("compile", options=list(COMPILE_MODES), default="off", optional=True, tooltip=(
                "torch.compile the transformer blocks (one graph shared by all blocks). The first step compiles "
                "(minutes on big models), later steps reuse it; a new size, length or cfg 1 vs >1 compiles again. "
                "Partially loaded models run uncompiled.")),
        ], [WanLeanModel.Output(display_name="model")])

    @classmethod
    def execute(cls, model_name, weight_dtype, attention="auto", compile="off"):
        cls.check_options(attention, compile)  # before reading the file: what cannot run here fails at once
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        device = mm.get_torch_device()
        ckpt = load_dit(path, DIT_WEIGHT_DTYPES[weight_dtype])
        family = WanS2V if is_s2v_state_dict(ckpt.sd) else WanDiT
        model = family.from_state_dict(ckpt.sd, ops=ops_for(ckpt, device))
        logging.info("Wan Lean: %s is %s (%s)", model_name, model.variant_name, ckpt.describe())
        model.attention_backend = None if attention == "auto" else attention  # auto: the process default (auto)
        compile_blocks(model, compile, eager_when=cls.partially_loaded)
        dtype = compute_dtype(device)
        # where the weights came from: multi-device workers load the same file (and LoRAs, see nodes/lora.py)
        source = {"path": path, "weight_dtype": weight_dtype, "loras": ()}
        return io.NodeOutput(Handle.wrap(model, device, mm.unet_offload_device(), dtype, source=source))

    @staticmethod
    def check_options(attention, compile):
        checks = [("attention", lambda: attention_backends.check_backend(attention))]
        if COMPILE_MODES.get(compile) is not None:
            checks.append(("compile", lambda: check_toolchain(mm.get_torch_device())))
        for name, check in checks:
            try:
                check()
            except ValueError as e:
                raise ValueError(f"Wan Load Diffusion Model, input '{name}': {e}") from None

    @staticmethod
    def partially_loaded(model):
        """Why compiled blocks must not run now (None: they may): ComfyUI streams a partially loaded model's weights
        through its casting ops with per-module patch functions, which would recompile per block."""
        return "the model is partially loaded (low VRAM)" if getattr(model, "model_lowvram", False) else None


class WanLeanVAELoader(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanVAELoader", "Wan Load VAE", (
            "Loads a Wan video VAE: Wan 2.1 (wan_2.1_vae.safetensors / Wan2.1_VAE.pth; all 14B and 1.3B models) or "
            "Wan 2.2 (wan2.2_vae.safetensors / Wan2.2_VAE.pth; TI2V-5B only). The family is read from the weights."), [
            io.Combo.Input("vae_name", options=folder_paths.get_filename_list("vae"), tooltip=(
                "A Wan VAE from models/vae (wan_2.1_vae.safetensors, or wan2.2_vae.safetensors for TI2V-5B).")),
        ], [WanLeanVAE.Output(display_name="vae")])

    @classmethod
    def execute(cls, vae_name):
        path = folder_paths.get_full_path_or_raise("vae", vae_name)
        sd = load_vae(path).sd
        device = mm.vae_device()
        dtype = compute_dtype(device, fp16_ok=False)
        family = WanVAE22 if is_vae22(sd) else WanVAE21
        model = family.from_state_dict(sd, ops=casting_ops())
        return io.NodeOutput(Handle.wrap(model, device, mm.vae_offload_device(), dtype))


class WanLeanTextEncoderLoader(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanTextEncoderLoader", "Wan Load Text Encoder (umT5)", (
            "Loads the umT5-XXL text encoder (official models_t5_umt5-xxl-enc-bf16.pth with its tokenizer beside it, "
            "or ComfyUI's umt5_xxl_*.safetensors which carries its tokenizer)."), [
            io.Combo.Input("text_encoder_name", options=folder_paths.get_filename_list("text_encoders"),
                           tooltip="The umT5-XXL encoder from models/text_encoders."),
        ], [WanLeanTextEncoder.Output(display_name="text_encoder")])

    @classmethod
    def execute(cls, text_encoder_name):
        path = folder_paths.get_full_path_or_raise("text_encoders", text_encoder_name)
        raw = read_file(path)
        device = mm.text_encoder_device()
        ckpt = load_text_encoder(raw)  # quantized layers stay packed with their scales, decoded at use
        model = UMT5Encoder.from_state_dict(ckpt.sd, ops=ops_for(ckpt, device))  # runs in fp32, weights cast at use
        tokenizer = UMT5Tokenizer.locate(path, raw)  # after the model check: a wrong file is named as such first
        return io.NodeOutput(Handle.wrap(model, device, mm.text_encoder_offload_device(), torch.float32,
                                         tokenizer=tokenizer))


NODES = [WanLeanModelLoader, WanLeanVAELoader, WanLeanTextEncoderLoader]
