"""The file zoo: one row per checkpoint file a user really has, named as its publisher names it, synthesized at tiny
width from one fp32 original per model, in that file's key names, dtypes, marker keys and metadata.

Where each layout comes from (read in the code that writes or reads the real files; nothing copied):
- ComfyUI's repackaged files (Comfy-Org Wan 2.1 / 2.2 split_files): DiT in official keys under
  `model.diffusion_model.`; fp8_e4m3fn = matrices in fp8, the rest fp16; fp8_scaled = comfy/ops.py scaled_fp8_ops
  and model_detection: a `scaled_fp8` marker (an empty tensor of the fp8 dtype), float32 0-d `scale_weight` per
  Linear, embedding tables unscaled. umt5_xxl_*: HF T5 keys (`encoder.block.N.layer.0.SelfAttention.q.weight`,
  `shared.weight`) with the tokenizer as a uint8 `spiece_model` tensor; the fp8_scaled one quantises the Linears only
  (its 6.7 GB = 4.6 G fp8 Linear values + a 16-bit 1.05 G embedding). clip_vision_h: HF CLIPVisionModel keys under
  `vision_model.`, fp16. wav2vec2_large_english_fp16: ComfyUI's audio encoder keys (parametrised weight norm).
- Kijai's WanVideo_comfy(_fp8_scaled) files: official keys, no prefix; `*_fp8_e4m3fn_scaled_KJ` = fp8 Linear
  weights with float32 `scale_weight`, everything else float32, no `scaled_fp8` marker (the loader also reads
  the marker when present); `umt5-xxl-enc-bf16` / `-fp8_e4m3fn`: the official umT5 keys.
- ComfyUI's current quantized layout (its QUANTIZATION.md, comfy/ops.py mixed_precision_ops, comfy/utils.py
  convert_old_quants): per Linear `weight` (the data), `weight_scale`, nvfp4's `weight_scale_2`, and the layer's format
  as a `<layer>.comfy_quant` uint8 entry of JSON bytes (what ComfyUI's own state_dict writes) and/or the
  `_quantization_metadata` header (silveroxides' convert_to_quant writes both, e.g. the partial NVFP4 + fp8 Wan files);
  formats float8_e4m3fn, nvfp4, mxfp8, int8_tensorwise, quantized from the bf16 weights by fixtures.quant_writer
  (comfy_kitchen's bytes, checked in tests/test_quant.py), everything else bf16.
- GGUF (city96's ComfyUI-GGUF convert script, QuantStack's Wan 2.2 files): general.architecture "wan",
  general.quantization_version 2, general.file_type; 1-D and small tensors F32; matrices whose rows do not split
  into 256 re-shaped to rows of 256 with a `comfy.gguf.orig_shape.<key>` INT32 array; the 5-D patch embedding F32
  with its 5-D shape (city96's fix_5d_tensors step); *_K_M files keep `self_attn.v` and `ffn.2` one step higher.
- Official releases: fp32 shards `diffusion_pytorch_model-0000i-of-0000n.safetensors` + index json (Wan2.2 A14B in
  `high_noise_model/` and `low_noise_model/`), `.pth` text encoder and VAE; diffusers folders: WanTransformer3DModel /
  AutoencoderKLWan keys + config.json.
- LoRAs: lightx2v (Kijai's extractions and ComfyUI's 4-step files): `diffusion_model.` + `lora_down`/`lora_up` +
  `alpha`, full `.diff` for norms/modulations and `.diff_b` for biases; Wan2.2-Lightning: `diffusion_model.` +
  `lora_A`/`lora_B` + `alpha`; CausVid (Kijai): `lora_down`/`lora_up` + `alpha`; musubi-tuner: kohya names
  `lora_unet_blocks_0_self_attn_q` + `alpha` + `ss_*` metadata; diffusers trainers: `transformer.blocks.0.attn1.to_q`
  + `lora_A`/`lora_B`, no alpha; DiffSynth-Studio (Stable-Video-Infinity's LoRAs): PEFT adapter names without prefix,
  `blocks.0.self_attn.q.lora_A.default.weight`, no alpha, attention q/k/v/o and ffn.0/ffn.2 only.

Files go to `.smoke/models/<folder>/zoo/` (so the shared test server lists them as `zoo/<name>`), the fp32 originals
to `.smoke/models/<folder>/zoo/reference/`.
"""
import functools
import json
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save_file

if __name__ == "__main__":  # run as a script: the repository root on the path
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan_core import convert  # noqa: E402
from fixtures.gguf_writer import write_gguf  # noqa: E402
from fixtures.lora import smoke_lora  # noqa: E402
from fixtures.smoke import clip_state, dit_state, official_to_hf, t5_state, vae_state, write_sharded  # noqa: E402
from fixtures.smoke import wav2vec2_state  # noqa: E402
from fixtures.quant_writer import comfy_quant_file, plain_layout  # noqa: E402
from fixtures.variants import to_scaled_fp8  # noqa: E402
from wan_core.quant import FORMATS, unblock  # noqa: E402

VERSION = "zoo-v1"
PREFIX = "model.diffusion_model."
FP16, BF16, FP32, E4M3 = torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn
# stated error of each precision: max |output - fp32 original's output| / max |fp32 original's output|; the weights'
# relative rounding step (fp8 e4m3: 2^-3 between neighbours, 2^-4 at most off; int8: 1/254 of the tensor's max; e2m1:
# up to 1/6 of its 16-value block's max) grows through the tiny models' few layers to these
TOLERANCE = {"fp32": 1e-5, "fp16": 3e-3, "bf16": 2.5e-2, "fp8_e4m3fn": 8e-2, "fp8_scaled": 8e-2,
             "float8_e4m3fn": 8e-2, "mxfp8": 8e-2, "int8_tensorwise": 2.5e-2, "nvfp4": 0.2, "nvfp4+float8_e4m3fn": 0.2,
             "Q8_0": 2e-2, "Q6_K": 4e-2, "Q5_K_M": 8e-2, "Q4_K_M": 0.2}
# A text encoder's error shrinks on its way to the sampled latent (through the DiT's text embedding and cross-attention,
# 2 steps): latent error / encoder error measured through the server 0.021 (umT5 fp16), 0.011 (bf16), 0.010 (fp8
# scaled), 0.015 (fp8, header layout), 0.020 (nvfp4). Server rows of text encoders are held to TOLERANCE x
# TEXT_TO_LATENT, 2.4x over the largest measured ratio, so an encoder off by far more than its format allows cannot
# pass there: the dropped-scales umT5 (1.4 off at the encoder) reaches the latent 1.1e-2 off, 2.8x over its bound.
TEXT_TO_LATENT = 0.05


def server_tolerance(row):
    """What the latent of a server row may differ from the fp32 original's (max abs / max abs)."""
    return TOLERANCE[row.precision] * (TEXT_TO_LATENT if row.folder == "text_encoders" else 1.0)


QUANT_LAYOUTS = {"comfy_quant": dict(entries=True, header=False), "quant_metadata": dict(entries=False, header=True),
                 "convert_to_quant": dict(entries=True, header=True)}
MODELS = {  # family -> the smoke model it is made from (fixtures.smoke)
    "t2v-1.3B": "wan2.1_t2v_1.3B_fp16.safetensors", "t2v-14B": "wan2.1_t2v_14B_fp16.safetensors",
    "i2v-480p": "wan2.1_i2v_480p_14B_fp16.safetensors", "i2v-720p": "wan2.1_i2v_720p_14B_fp16.safetensors",
    "flf2v": "wan2.1_flf2v_720p_14B_fp16.safetensors",
    "t2v-A14B-high": "wan2.2_t2v_high_noise_14B_fp16.safetensors",
    "t2v-A14B-low": "wan2.2_t2v_low_noise_14B_fp16.safetensors",
    "i2v-A14B-high": "wan2.2_i2v_high_noise_14B_fp16.safetensors",
    "i2v-A14B-low": "wan2.2_i2v_low_noise_14B_fp16.safetensors",
    "ti2v-5B": "wan2.2_ti2v_5B_fp16.safetensors", "s2v": "s2v",
}
NODES = {"diffusion_models": "WanLeanModelLoader", "text_encoders": "WanLeanTextEncoderLoader",
         "vae": "WanLeanVAELoader", "clip_vision": "WanLeanCLIPVisionLoader",
         "audio_encoders": "WanLeanAudioEncoderLoader", "loras": "WanLeanLoraLoader"}


@dataclass(frozen=True)
class Row:
    """A file: its name as published (a path under models/<folder>/zoo/; a shard of a sharded one), who publishes
    it, the model it holds (a MODELS family, "umt5", "vae-2.1", "vae-2.2", "clip", "wav2vec2"; a LoRA: the family it
    patches), how it is laid out (a key of WRITERS) and stored (a TOLERANCE key, or a LoRA's rank), whether it also
    runs through the shared server, and for a file the pack refuses, the words the refusal must say."""
    name: str
    folder: str
    publisher: str
    model: str
    layout: str
    precision: str
    server: bool = False
    refused: str = ""
    rank: int = 0

    @property
    def path(self):
        return f"zoo/{self.name}"


def _dits(publisher, layout, names, precisions, server=()):
    return [Row(name.format(p=p), "diffusion_models", publisher, family, layout, p, server=(family, p) in server)
            for family, name in names for p in precisions]


ZOO = [
    # ComfyUI's repackaged Wan 2.1 / 2.2 diffusion models
    *_dits("ComfyUI", "comfy", [("t2v-1.3B", "wan2.1_t2v_1.3B_{p}.safetensors")], ["fp16", "bf16"],
           server={("t2v-1.3B", "fp16")}),
    *_dits("ComfyUI", "comfy", [("t2v-14B", "wan2.1_t2v_14B_{p}.safetensors"),
                                ("i2v-480p", "wan2.1_i2v_480p_14B_{p}.safetensors"),
                                ("i2v-720p", "wan2.1_i2v_720p_14B_{p}.safetensors")],
           ["fp16", "bf16", "fp8_e4m3fn", "fp8_scaled"], server={("t2v-14B", "fp8_e4m3fn"), ("t2v-14B", "fp8_scaled")}),
    *_dits("ComfyUI", "comfy", [("flf2v", "wan2.1_flf2v_720p_14B_{p}.safetensors")], ["fp16", "fp8_e4m3fn"]),
    *_dits("ComfyUI", "comfy", [(f"{t}-A14B-{n}", f"wan2.2_{t}_{n}_noise_14B_{{p}}.safetensors")
                                for t in ("t2v", "i2v") for n in ("high", "low")],
           ["fp16", "fp8_scaled"], server={("t2v-A14B-high", "fp8_scaled")}),
    *_dits("ComfyUI", "comfy", [("ti2v-5B", "wan2.2_ti2v_5B_{p}.safetensors")], ["fp16"], server={("ti2v-5B", "fp16")}),
    *_dits("ComfyUI", "comfy", [("s2v", "wan2.2_s2v_14B_{p}.safetensors")], ["bf16", "fp8_scaled"]),
    Row("umt5_xxl_fp16.safetensors", "text_encoders", "ComfyUI", "umt5", "comfy", "fp16", server=True),
    Row("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders", "ComfyUI", "umt5", "comfy", "fp8_scaled", server=True),
    Row("clip_vision_h.safetensors", "clip_vision", "ComfyUI", "clip", "comfy", "fp16"),
    Row("wan_2.1_vae.safetensors", "vae", "ComfyUI", "vae-2.1", "official", "bf16"),
    Row("wan2.2_vae.safetensors", "vae", "ComfyUI", "vae-2.2", "official", "bf16"),
    Row("wav2vec2_large_english_fp16.safetensors", "audio_encoders", "ComfyUI", "wav2vec2", "comfy", "fp16"),
    *[Row(f"wan2.2_{t}_lightx2v_4steps_lora_{v}_{n}_noise.safetensors", "loras", "ComfyUI", f"{t}-A14B-{n}",
          "lightx2v", "bf16", rank=64, server=(t, n) == ("t2v", "high"))
      for t, v in (("t2v", "v1.1"), ("i2v", "v1")) for n in ("high", "low")],
    # files the pack does not run: refused by name, with what runs them
    Row("wan2.1_vace_14B_fp16.safetensors", "diffusion_models", "ComfyUI", "t2v-14B", "vace", "fp16",
        refused="Wan VACE .*WanVaceToVideo"),
    Row("wan2.2_animate_14B_bf16.safetensors", "diffusion_models", "ComfyUI", "i2v-480p", "animate", "bf16",
        refused="Animate .*WanAnimateToVideo"),
    Row("wan2.1_fun_control_1.3B_bf16.safetensors", "diffusion_models", "ComfyUI", "t2v-1.3B", "fun_control", "bf16",
        refused="48 input channels: a Wan Fun Control .*WanFunControlToVideo"),
    # Kijai's files
    *_dits("Kijai", "kj", [("t2v-14B", "Wan2_1-T2V-14B_{p}.safetensors"),
                           ("i2v-480p", "Wan2_1-I2V-14B-480P_{p}.safetensors")],
           ["fp8_e4m3fn", "bf16"]),
    *[Row(f"{n}_fp8_e4m3fn_scaled_KJ.safetensors", "diffusion_models", "Kijai", f, "kj", "fp8_scaled",
          server=f == "t2v-14B")
      for n, f in (("Wan2_1-T2V-14B", "t2v-14B"), ("Wan2_1-I2V-14B-480P", "i2v-480p"),
                   ("Wan2_2-T2V-A14B-HIGH", "t2v-A14B-high"), ("Wan2_2-T2V-A14B-LOW", "t2v-A14B-low"),
                   ("Wan2_2-I2V-A14B-HIGH", "i2v-A14B-high"), ("Wan2_2-I2V-A14B-LOW", "i2v-A14B-low"),
                   ("Wan2_2-TI2V-5B", "ti2v-5B"))],
    Row("umt5-xxl-enc-bf16.safetensors", "text_encoders", "Kijai", "umt5", "official", "bf16", server=True),
    Row("umt5-xxl-enc-fp8_e4m3fn.safetensors", "text_encoders", "Kijai", "umt5", "official", "fp8_e4m3fn"),
    Row("Wan2_1_VAE_bf16.safetensors", "vae", "Kijai", "vae-2.1", "official", "bf16"),
    Row("Wan2_1_VAE_fp32.safetensors", "vae", "Kijai", "vae-2.1", "official", "fp32"),
    # ComfyUI's per-layer quantized files: its own conversion (comfy_quant entries), the header-only layout, and
    # convert_to_quant's partial NVFP4 (nvfp4 with fp8 cross-attention, entries and header)
    *[Row(f"wan2.2_t2v_high_noise_14B_{p}.safetensors", "diffusion_models", "ComfyUI (mixed precision)",
          "t2v-A14B-high", "comfy_quant", p, server=True) for p in ("nvfp4", "mxfp8", "int8_tensorwise")],
    Row("wan2.1_t2v_14B_fp8_e4m3fn_scaled_metadata.safetensors", "diffusion_models", "header-only quant metadata",
        "t2v-14B", "quant_metadata", "float8_e4m3fn", server=True),
    Row("Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v-NVFP4.safetensors", "diffusion_models",
        "InsecureErasure (convert_to_quant)", "i2v-480p", "convert_to_quant", "nvfp4+float8_e4m3fn"),
    *[Row(f"umt5_xxl_{p}.safetensors", "text_encoders", "ComfyUI (mixed precision)", "umt5", "comfy_quant", p,
          server=p == "nvfp4") for p in ("nvfp4", "mxfp8", "int8_tensorwise")],
    Row("umt5_xxl_fp8_e4m3fn_scaled_metadata.safetensors", "text_encoders", "header-only quant metadata", "umt5",
        "quant_metadata", "float8_e4m3fn", server=True),
    # GGUF
    *[Row(n, "diffusion_models", p, f, "gguf", q, server=(f, q) == ("t2v-14B", "Q4_K_M"))
      for n, p, f, q in (("wan2.1-t2v-14b-Q8_0.gguf", "city96", "t2v-14B", "Q8_0"),
                         ("wan2.1-t2v-14b-Q4_K_M.gguf", "city96", "t2v-14B", "Q4_K_M"),
                         ("wan2.1-i2v-14b-480p-Q5_K_M.gguf", "city96", "i2v-480p", "Q5_K_M"),
                         ("wan2.1-flf2v-720p-14b-Q8_0.gguf", "city96", "flf2v", "Q8_0"),
                         ("Wan2.2-T2V-A14B-HighNoise-Q4_K_M.gguf", "QuantStack", "t2v-A14B-high", "Q4_K_M"),
                         ("Wan2.2-T2V-A14B-LowNoise-Q8_0.gguf", "QuantStack", "t2v-A14B-low", "Q8_0"),
                         ("Wan2.2-I2V-A14B-HighNoise-Q6_K.gguf", "QuantStack", "i2v-A14B-high", "Q6_K"),
                         ("Wan2.2-TI2V-5B-Q5_K_M.gguf", "QuantStack", "ti2v-5B", "Q5_K_M"),
                         ("Wan2.2-S2V-14B-Q8_0.gguf", "QuantStack", "s2v", "Q8_0"))],
    # official releases and diffusers folders (fp32)
    Row("Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors", "diffusion_models", "Wan-AI", "t2v-1.3B", "official", "fp32"),
    Row("Wan2.1-T2V-14B/diffusion_pytorch_model-00001-of-00006.safetensors", "diffusion_models", "Wan-AI", "t2v-14B",
        "official", "fp32", server=True),
    Row("Wan2.1-I2V-14B-720P/diffusion_pytorch_model-00003-of-00007.safetensors", "diffusion_models", "Wan-AI",
        "i2v-720p", "official", "fp32"),
    Row("Wan2.2-T2V-A14B/high_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors", "diffusion_models",
        "Wan-AI", "t2v-A14B-high", "official", "fp32"),
    Row("Wan2.2-I2V-A14B/low_noise_model/diffusion_pytorch_model-00006-of-00006.safetensors", "diffusion_models",
        "Wan-AI", "i2v-A14B-low", "official", "fp32"),
    Row("Wan2.2-TI2V-5B/diffusion_pytorch_model-00002-of-00003.safetensors", "diffusion_models", "Wan-AI", "ti2v-5B",
        "official", "fp32"),
    Row("Wan2.2-S2V-14B/diffusion_pytorch_model-00001-of-00004.safetensors", "diffusion_models", "Wan-AI", "s2v",
        "official", "fp32"),
    Row("models_t5_umt5-xxl-enc-bf16.pth", "text_encoders", "Wan-AI", "umt5", "official", "bf16"),
    Row("Wan2.1_VAE.pth", "vae", "Wan-AI", "vae-2.1", "official", "fp32"),
    Row("Wan2.2_VAE.pth", "vae", "Wan-AI", "vae-2.2", "official", "fp32"),
    Row("Wan2.1-T2V-1.3B-Diffusers/transformer/diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_models",
        "Wan-AI (diffusers)", "t2v-1.3B", "diffusers", "fp32", server=True),
    Row("Wan2.1-I2V-14B-480P-Diffusers/transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_models", "Wan-AI (diffusers)", "i2v-480p", "diffusers", "fp32"),
    Row("Wan2.2-T2V-A14B-Diffusers/transformer_2/diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_models", "Wan-AI (diffusers)", "t2v-A14B-low", "diffusers", "fp32"),
    Row("Wan2.2-TI2V-5B-Diffusers/transformer/diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_models",
        "Wan-AI (diffusers)", "ti2v-5B", "diffusers", "fp32"),
    Row("Wan2.1-T2V-1.3B-Diffusers/vae/diffusion_pytorch_model.safetensors", "vae", "Wan-AI (diffusers)", "vae-2.1",
        "diffusers", "fp32"),
    Row("Wan2.2-TI2V-5B-Diffusers/vae/diffusion_pytorch_model.safetensors", "vae", "Wan-AI (diffusers)", "vae-2.2",
        "diffusers", "fp32"),
    Row("wav2vec2-large-xlsr-53-english/model.safetensors", "audio_encoders", "jonatasgrosman (HF)", "wav2vec2",
        "hub", "fp32"),
    # LoRAs
    *[Row(f"lightx2v_T2V_14B_cfg_step_distill_v2_lora_rank{r}_bf16.safetensors", "loras", "Kijai (lightx2v)",
          "t2v-14B", "lightx2v", "bf16", rank=r, server=r == 32) for r in (32, 64, 128)],
    Row("lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors", "loras", "Kijai (lightx2v)", "i2v-480p",
        "lightx2v", "bf16", rank=64),
    *[Row(f"Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/{n}_noise_model.safetensors", "loras", "lightx2v",
          f"t2v-A14B-{n}", "lightning", "bf16", rank=64, server=n == "high") for n in ("high", "low")],
    Row("Wan21_CausVid_14B_T2V_lora_rank32.safetensors", "loras", "Kijai (CausVid)", "t2v-14B", "causvid", "bf16",
        rank=32, server=True),
    Row("Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32.safetensors", "loras", "Kijai (CausVid)", "t2v-1.3B", "causvid",
        "bf16", rank=32),
    Row("wan21_t2v_14b_my_style_musubi.safetensors", "loras", "musubi-tuner", "t2v-14B", "musubi", "bf16", rank=16,
        server=True),
    Row("pytorch_lora_weights.safetensors", "loras", "diffusers trainer", "t2v-1.3B", "diffusers", "fp32", rank=8,
        server=True),
    # Stable-Video-Infinity's LoRAs (vita-video-gen/svi-model: version-2.0 and version-1.0) for Wan Long Video's SVI
    # continuations, and Kijai's ComfyUI repack of the 2.0 Pro pair
    *[Row(f"SVI_Wan2.2-I2V-A14B_{n}_noise_lora_v2.0{v}.safetensors", "loras", "SVI (DiffSynth-Studio)",
          f"i2v-A14B-{n}", "diffsynth", "bf16", rank=128)
      for v in ("_pro", "") for n in ("high", "low")],
    *[Row(f"SVI_v2_PRO_Wan2.2-I2V-A14B_{n.upper()}_lora_rank_128_fp16.safetensors", "loras", "Kijai (SVI 2.0 Pro)",
          f"i2v-A14B-{n}", "causvid", "fp16", rank=128) for n in ("high", "low")],
    *[Row(name, "loras", "SVI (DiffSynth-Studio)", "i2v-480p", "diffsynth", "bf16", rank=128)
      for name in ("SVI_Wan2.1-I2V-14B_lora_v2.0.safetensors", "svi-shot.safetensors",
                   "svi-film-opt-10212025.safetensors")],
]


# ----------------------------------------------------------------------------- the originals (fp32)

@functools.lru_cache(maxsize=None)
def _original(model):
    """The fp32 original of a zoo model: (official-key state dict, extra) with extra the umT5 tokenizer bytes."""
    if model == "umt5":
        return t5_state(FP32)
    if model.startswith("vae-"):
        return vae_state(model[4:], FP32), None
    if model == "clip":
        return clip_state(FP32), None
    if model == "wav2vec2":
        return wav2vec2_state(seed=21, dtype=FP32), None
    return dit_state(MODELS[model], FP32), None


def original(model):
    """_original(model) with a fresh dict (callers pop and rename keys); the tensors are shared, never edited."""
    sd, extra = _original(model)
    return dict(sd), extra


def reference_path(root, row):
    """The fp32 original of a row's model as a file the loaders read (official keys, for the server's reference runs)."""
    return os.path.join(root, row.folder if row.folder != "loras" else "diffusion_models", "zoo", "reference",
                        f"{row.model}_fp32.safetensors")


# ----------------------------------------------------------------------------- writers

def _dtype_dit(sd, precision, rest=FP16):
    """A DiT state dict in a file precision: fp16/bf16/fp32 everything; fp8_e4m3fn matrices in fp8 and the rest in
    `rest`; fp8_scaled ComfyUI's scaled layout (fixtures.variants.to_scaled_fp8) over `rest`."""
    if precision in ("fp16", "bf16", "fp32"):
        return convert.cast_weights(sd, {"fp16": FP16, "bf16": BF16, "fp32": FP32}[precision])
    base = convert.cast_weights(sd, rest)
    if precision == "fp8_e4m3fn":
        return convert.cast_weights(base, E4M3)
    return to_scaled_fp8(base)


def _save(sd, path, metadata=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)


def _sharded(sd, path):
    """The official release's shards: as many as the published file name says, the index json beside them."""
    folder, name = os.path.split(path)
    total = int(name.split("-of-")[1][:5])
    write_sharded(sd, folder, total)
    if len(sd) < total:
        raise ValueError(f"{name}: fewer tensors than shards")


def format_of(row):
    """key -> the format a QUANT_LAYOUTS row stores that Linear weight in (the mixed 'nvfp4+float8_e4m3fn': fp8 for the
    cross-attention, nvfp4 elsewhere)."""
    first, _, second = row.precision.partition("+")
    return (lambda key: second if ".cross_attn." in key else first) if second else (lambda key: first)


def quant_file(row, sd, rename=lambda key: key):
    """(tensors, header metadata) of a row in QUANT_LAYOUTS."""
    return comfy_quant_file(sd, format_of(row), rename=rename, **QUANT_LAYOUTS[row.layout])


def write_dit(row, sd, path):
    s2v_bf16 = BF16 if row.model == "s2v" else FP16  # what the rest of a repackaged fp8 file is stored in
    if row.layout in QUANT_LAYOUTS:
        tensors, meta = quant_file(row, sd, (lambda k: PREFIX + k) if row.layout == "comfy_quant" else (lambda k: k))
        _save(tensors, path, meta)
    elif row.layout == "comfy":
        _save({PREFIX + k: v for k, v in _dtype_dit(sd, row.precision, s2v_bf16).items()}, path)
    elif row.layout == "kj":
        out = _dtype_dit(sd, row.precision, FP32 if row.precision == "fp8_scaled" else BF16)
        out.pop("scaled_fp8", None)
        _save(out, path)
    elif row.layout == "official":
        (_sharded if "-of-" in row.name else _save)(sd, path)
    elif row.layout == "diffusers":
        folder = os.path.dirname(path)
        _sharded(convert.dit_to_diffusers(sd), path)
        _config(folder, {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0"})
    elif row.layout == "gguf":
        write_gguf(sd, path, row.precision.removesuffix("_M"), mixed=row.precision.endswith("_M"))
    else:
        _save({PREFIX + k: v for k, v in _unsupported(row, sd).items()}, path)


def _unsupported(row, sd):
    """A model this pack does not run, in its marker keys: VACE blocks, Animate's face adapter, Fun Control's 48
    input channels (16 noise + 16 control + 16 reference latent channels)."""
    out = convert.cast_weights(sd, FP16 if row.precision == "fp16" else BF16)
    dim = sd["head.modulation"].shape[-1]
    if row.layout == "vace":
        out["vace_patch_embedding.weight"] = torch.zeros(dim, 96, 1, 2, 2, dtype=FP16)
        out["vace_blocks.0.after_proj.weight"] = torch.zeros(dim, dim, dtype=FP16)
    elif row.layout == "animate":
        out["face_adapter.fuser_blocks.0.k_norm.weight"] = torch.ones(128, dtype=BF16)
        out["pose_patch_embedding.weight"] = torch.zeros(dim, 16, 1, 2, 2, dtype=BF16)
    else:
        out["patch_embedding.weight"] = torch.zeros(dim, 48, 1, 2, 2, dtype=BF16)
    return out


def _config(folder, config):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def write_text_encoder(row, sd, spm, path):
    if row.layout in QUANT_LAYOUTS:  # HF keys as ComfyUI's umt5_xxl files, with their tokenizer
        sd, meta = quant_file(row, sd, lambda key: next(iter(official_to_hf({key: None}))))
        _save({**sd, "spiece_model": torch.from_numpy(np.frombuffer(spm, dtype=np.uint8).copy())}, path, meta)
        return
    if row.precision == "fp8_scaled":  # Linears only (not the embedding tables), over fp16
        sd = to_scaled_fp8(convert.cast_weights(sd, FP16))
    elif row.precision == "fp8_e4m3fn":
        sd = {k: v.to(E4M3) if k.endswith(".weight") and v.ndim == 2 and not k.endswith(convert.EMBEDDING_TABLES)
              else v.to(BF16) for k, v in sd.items()}
    else:
        sd = convert.cast_weights(sd, FP16 if row.precision == "fp16" else BF16)
    if row.layout == "comfy":
        marker = sd.pop("scaled_fp8", None)
        sd = official_to_hf(sd)
        if marker is not None:
            sd["scaled_fp8"] = marker
        sd["spiece_model"] = torch.from_numpy(np.frombuffer(spm, dtype=np.uint8).copy())
    if row.name.endswith(".pth"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(sd, path)
    else:
        _save(sd, path)
    tokenizer = os.path.join(os.path.dirname(path), "google", "umt5-xxl", "spiece.model")  # beside official files
    if row.layout == "official" and not os.path.exists(tokenizer):
        os.makedirs(os.path.dirname(tokenizer), exist_ok=True)
        with open(tokenizer, "wb") as f:
            f.write(spm)


def write_other(row, sd, path):
    """VAE, CLIP vision and wav2vec2 files."""
    dtype = {"fp16": FP16, "bf16": BF16, "fp32": FP32}[row.precision]
    if row.model == "clip":
        sd = {"vision_model." + k: v for k, v in sd.items()}
    elif row.model == "wav2vec2":
        sd = wav2vec2_state(seed=21, dtype=dtype, **({"prefix": "wav2vec2.", "parametrized": False}
                                                      if row.layout == "hub" else {}))
    elif row.layout == "diffusers":
        sd = convert.vae_to_diffusers(sd)
        _config(os.path.dirname(path), {"_class_name": "AutoencoderKLWan", "z_dim": 16 if row.model == "vae-2.1" else 48})
    sd = convert.cast_weights(sd, dtype)
    if row.name.endswith(".pth"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(sd, path)
    else:
        _save(sd, path)


def lora_tensors(row, sd, dtype=None):
    """A row's LoRA for the model `sd` (same random factors in every layout, see fixtures.lora.smoke_lora), in the
    row's key layout and dtype; dtype fp32 gives the reference factors."""
    dtype = dtype or {"bf16": BF16, "fp16": FP16, "fp32": FP32}[row.precision]
    fmt = {"lightx2v": "lightx2v", "lightning": "comfy", "causvid": "comfy", "musubi": "kohya",
           "diffusers": "diffusers", "diffsynth": "diffsynth"}[row.layout]
    lora = smoke_lora(lora_targets(row, sd), fmt, rank=row.rank, seed=row.rank, std=0.2 / row.rank ** 0.5, dtype=dtype)
    if row.layout == "lightning":  # PEFT factor names, alpha kept
        lora = {k.replace(".lora_up.", ".lora_B.").replace(".lora_down.", ".lora_A."): v for k, v in lora.items()}
    return lora


def reference_lora(row, sd):
    """The same factors as lora_tensors(row, sd) in fp32 and official names (lightx2v's, or ComfyUI's with alpha):
    what the test merges by hand."""
    ref = Row(row.name, row.folder, row.publisher, row.model, "lightx2v" if row.layout == "lightx2v" else "causvid",
              "fp32", rank=row.rank)
    return lora_tensors(ref, lora_targets(row, sd), FP32)


# DiffSynth-Studio's LoRA training (SVI's scripts: --lora_target_modules "q,k,v,o,ffn.0,ffn.2") adapts these only
DIFFSYNTH_TARGETS = re.compile(r"blocks\.\d+\.((self|cross)_attn\.[qkvo]|ffn\.[02])\.weight")


def lora_targets(row, sd):
    """The weights a row's trainer adapts: the DiT's attention and FFN Linears for DiffSynth, all others else."""
    return {k: v for k, v in sd.items() if DIFFSYNTH_TARGETS.fullmatch(k)} if row.layout == "diffsynth" else sd


LORA_METADATA = {
    "musubi": lambda row: {"ss_network_module": "networks.lora_wan", "ss_network_dim": str(row.rank),
                           "ss_network_alpha": str(row.rank / 2), "ss_base_model_version": "wan2.1_t2v_14B",
                           "modelspec.architecture": "wan2.1-t2v-14b/lora", "modelspec.sai_model_spec": "1.0.0"},
    "diffusers": lambda row: {"format": "pt"},
}


def write_row(root, row):
    """Write one row's file (and whatever lies beside it) under root/<folder>/zoo/."""
    path = os.path.join(root, row.folder, "zoo", row.name)
    sd, extra = original(row.model)
    if row.folder == "diffusion_models":
        write_dit(row, sd, path)
    elif row.folder == "text_encoders":
        write_text_encoder(row, sd, extra, path)
    elif row.folder == "loras":
        meta = LORA_METADATA.get(row.layout, lambda r: None)(row)
        _save(lora_tensors(row, sd), path, meta)
    else:
        write_other(row, sd, path)
    return path


# negative controls: a quantized row's file with one thing wrong, which the loader must refuse or the comparison catch
DAMAGES = {"no_scales": "every weight_scale / weight_scale_2 / scale_weight dropped",
           "unswizzled": "block scales in plain row-major order instead of cuBLAS's tiles",
           "nibbles_swapped": "nvfp4 codes with the odd column in the high nibble"}


def _damage(tensors, damage, fmt_of):
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith((".weight_scale", ".scale_weight"))]:
        layer = key.rsplit(".", 1)[0]
        weight, fmt = tensors[layer + ".weight"], fmt_of(layer + ".weight")
        if damage == "no_scales":
            out.pop(key)
            out.pop(layer + ".weight_scale_2", None)
        elif damage == "unswizzled" and fmt in FORMATS and FORMATS[fmt].block:
            blocks = weight.shape[1] * (2 if fmt == "nvfp4" else 1) // FORMATS[fmt].block
            plain = unblock(tensors[key].view(torch.uint8), weight.shape[0], blocks)
            out[key] = plain_layout(plain).view(tensors[key].dtype)
        elif damage == "nibbles_swapped" and fmt == "nvfp4":
            out[layer + ".weight"] = weight << 4 | weight >> 4
    return out


def write_damaged(root, row, damage):
    """The row's file (written) with DAMAGES[damage] done to it, under zoo/negative/<damage>/; returns its zoo path."""
    from safetensors import safe_open
    with safe_open(os.path.join(root, row.folder, "zoo", row.name), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = f"negative/{damage}/{row.name}"
    fmt_of = format_of(row) if row.layout in QUANT_LAYOUTS else (lambda key: None)
    _save(_damage(tensors, damage, fmt_of), os.path.join(root, row.folder, "zoo", name), meta)
    return f"zoo/{name}"


def merged_reference_path(row):
    """A server LoRA row's reference: the fp32 original with the fp32 factors merged by hand (a diffusion_models name)."""
    return f"zoo/reference/{os.path.splitext(row.name.replace('/', '_'))[0]}_merged_fp32.safetensors"


def write_merged_reference(root, row):
    from test_lora import merged_by_hand
    sd, _ = original(row.model)
    _save(merged_by_hand(sd, reference_lora(row, sd), 1.0), os.path.join(root, "diffusion_models",
                                                                         merged_reference_path(row)))


def write_zoo(root, rows=None):
    """The files of `rows` (default: every row) and the fp32 references they are checked against, under root (a
    ComfyUI models folder). Each file is written once (when missing); the zoo folders are cleared when VERSION changes."""
    stamp = os.path.join(root, f".{VERSION}")
    if not os.path.exists(stamp):
        for folder in NODES:
            shutil.rmtree(os.path.join(root, folder, "zoo"), ignore_errors=True)
        open(stamp, "w").close()
    for row in ZOO if rows is None else rows:
        if not os.path.exists(os.path.join(root, row.folder, "zoo", row.name)):
            write_row(root, row)
        ref = reference_path(root, row)
        if not os.path.exists(ref) and row.folder in ("diffusion_models", "text_encoders", "loras"):
            sd, spm = original(row.model)
            if row.model == "umt5":
                sd = {**official_to_hf(sd), "spiece_model": torch.from_numpy(np.frombuffer(spm, dtype=np.uint8).copy())}
            _save(sd, ref)
        if row.folder == "loras" and row.server and not os.path.exists(
                os.path.join(root, "diffusion_models", merged_reference_path(row))):
            write_merged_reference(root, row)
    return root


def readme_table(figures):
    """The README's zoo table (markdown) from {row name: {"node": error, "server": error}} (.smoke/zoo-figures.json)."""
    lines = ["| File (as published) | Publisher | Model | Layout / precision | Stated error | Measured (node / server) |",
             "|---|---|---|---|---|---|"]
    for row in ZOO:
        got = figures.get(row.name, {})
        if row.refused:
            measured, tol = "refused: names the variant and what runs it", "–"
        else:
            measured = " / ".join(f"{got[w]:.1e}" for w in ("node", "server") if w in got) or "not run"
            tol = f"{TOLERANCE[row.precision]:.0e}"
        what = f"{row.layout} / {row.precision}" + (f", rank {row.rank}" if row.rank else "")
        lines.append(f"| `{row.name}` | {row.publisher} | {row.model} | {what} | {tol} | {measured} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the README table from the figures the last test run recorded
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", ".smoke", "zoo-figures.json")) as f:
        print(readme_table(json.load(f)))
