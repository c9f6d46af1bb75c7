"""Tiny random checkpoints (and the distillation LoRAs of the 4-step workflows) in the real key layouts and under
the file names users drop in, so every graph runs anywhere: `python -m wan_core.smoke MODELS_DIR [--force]` writes
a ComfyUI models folder.

The sizes are tiny, the layouts are real: official keys for the DiT and VAE, ComfyUI's HF-layout umT5
with its `spiece_model` tensor, plus the official `.pth` text encoder with a `google/umt5-xxl/` tokenizer
folder beside it, the official `Wan2.1_VAE.pth` and the 14B as official bf16 shards with an index json. Same seeds, same bytes.
"""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from .checks import check_tensors
from .dit import WanDiT
from .lora import write_smoke_lora
from .t5 import _HF_BLOCK, _HF_TOP, UMT5Encoder
from .tokenizer import train_smoke_spm
from .clip import WanCLIPVision
from .s2v import SMOKE as S2V_TINY
from .s2v import WanS2V
from .vae import WanVAE21
from .vae22 import WanVAE22
from .wav2vec2 import smoke_state_dict as wav2vec2_smoke

T5_TINY = dict(dim=64, dim_ffn=128, num_heads=4, num_layers=2)
CLIP_TINY = dict(dim=64, mlp_dim=128, num_layers=2)
_I2V = dict(in_dim=36, clip_dim=CLIP_TINY["dim"])
_EXPERT = dict(dim=256, ffn_dim=512, num_layers=2)
DIT_TINY = {  # file name (ComfyUI's repackaged names) -> DiT sizes (text_dim = the tiny T5's width)
    "wan2.1_t2v_1.3B_fp16.safetensors": dict(dim=256, ffn_dim=512, num_layers=2),
    "wan2.1_t2v_14B_fp16.safetensors": dict(dim=384, ffn_dim=768, num_layers=3),
    "wan2.1_i2v_480p_14B_fp16.safetensors": dict(_EXPERT, **_I2V),
    "wan2.1_i2v_720p_14B_fp16.safetensors": dict(_EXPERT, **_I2V),
    "wan2.1_flf2v_720p_14B_fp16.safetensors": dict(_EXPERT, clip_pos_tokens=514, **_I2V),
    "wan2.2_t2v_high_noise_14B_fp16.safetensors": _EXPERT,
    "wan2.2_t2v_low_noise_14B_fp16.safetensors": _EXPERT,
    "wan2.2_i2v_high_noise_14B_fp16.safetensors": dict(_EXPERT, in_dim=36),
    "wan2.2_i2v_low_noise_14B_fp16.safetensors": dict(_EXPERT, in_dim=36),
    "wan2.2_ti2v_5B_fp16.safetensors": dict(dim=256, ffn_dim=512, num_layers=2, in_dim=48, out_dim=48),
}
# The step-distillation LoRAs of the bundled 4-step workflows under their published names -> (the smoke DiT they fit,
# key layout, dtype): Wan2.2-Lightning for the A14B experts (ComfyUI's repackaged names; official keys with
# lora_down / lora_up / alpha, fp32 as the Lightning release merges them) and lightx2v for Wan 2.1 14B (Kijai's
# extractions, the names ComfyUI's templates use: factors plus .diff / .diff_b full patches, bf16).
_LIGHTNING = ("comfy", torch.float32)
_LIGHTX2V = ("lightx2v", torch.bfloat16)
LORA_TINY = {
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors": ("wan2.2_t2v_high_noise_14B_fp16.safetensors", *_LIGHTNING),
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors": ("wan2.2_t2v_low_noise_14B_fp16.safetensors", *_LIGHTNING),
    "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors": ("wan2.2_i2v_high_noise_14B_fp16.safetensors", *_LIGHTNING),
    "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors": ("wan2.2_i2v_low_noise_14B_fp16.safetensors", *_LIGHTNING),
    "lightx2v_T2V_14B_cfg_step_distill_v2_lora_rank64_bf16.safetensors": ("wan2.1_t2v_14B_fp16.safetensors", *_LIGHTX2V),
    "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors": ("wan2.1_i2v_480p_14B_fp16.safetensors", *_LIGHTX2V),
}
VAE_TINY = dict(dim=8, z_dim=16)
VAE22_TINY = dict(dim=8, dec_dim=12)
NORM_SUFFIXES = ("norm.weight", "norm_q.weight", "norm_k.weight", "norm3.weight")


def randomize_(module, seed=0, std=0.05):
    """Fill every parameter with N(0, std) (norm gains 1 + N(0, std)) so no output is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + r if name.endswith(NORM_SUFFIXES) else r)
    return module


def official_to_hf(sd):
    """Official umT5 keys -> the HF layout ComfyUI's umt5_xxl_*.safetensors files use."""
    block = {v: k for k, v in _HF_BLOCK.items()}
    top = {"token_embedding": "shared", "norm": "encoder.final_layer_norm"}
    out = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if module in top:
            out[f"{top[module]}.{leaf}"] = value
        else:
            _, n, inner = module.split(".", 2)
            out[f"encoder.block.{n}.{block[inner]}.{leaf}"] = value
    return out


def _state(module, dtype):
    """The module's tensors in `dtype`, every value finite there (a smoke file holding inf makes NaN videos)."""
    sd = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    return check_tensors(sd, f"smoke {type(module).__name__} in {dtype}", "fix its initialisation in wan_core/smoke.py")


def t5_state(dtype=torch.float16):
    """(the smoke umT5 in official keys in `dtype`, its SentencePiece model bytes); same weights in every dtype."""
    torch.manual_seed(0)
    spm = train_smoke_spm(seed=0)
    return _state(UMT5Encoder(vocab=_vocab_size(spm), **T5_TINY), dtype), spm


def write_text_encoders(root):
    sd, spm = t5_state(torch.float16)
    hf = official_to_hf(sd)
    hf["spiece_model"] = torch.from_numpy(np.frombuffer(spm, dtype=np.uint8).copy())
    save_file(hf, os.path.join(root, "text_encoders", "umt5_xxl_fp16.safetensors"))
    torch.save(t5_state(torch.bfloat16)[0], os.path.join(root, "text_encoders", "models_t5_umt5-xxl-enc-bf16.pth"))
    tok_dir = os.path.join(root, "text_encoders", "google", "umt5-xxl")
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "spiece.model"), "wb") as f:
        f.write(spm)


def _vocab_size(spm_bytes):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_proto=spm_bytes).get_piece_size()


def write_sharded(sd, folder, shards=2):
    """The official release's layout: diffusion_pytorch_model-0000i-of-0000n.safetensors + index json."""
    os.makedirs(folder, exist_ok=True)
    keys, weight_map = sorted(sd), {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def dit_state(name, dtype=torch.float16):
    """The smoke DiT of DIT_TINY's file `name` (or "s2v": the S2V model) in `dtype`; same weights in every dtype."""
    if name == "s2v":
        return _state(randomize_(WanS2V(**dict(S2V_TINY, text_dim=T5_TINY["dim"])), seed=20), dtype)
    model = randomize_(WanDiT(text_dim=T5_TINY["dim"], **DIT_TINY[name]), seed=10 + list(DIT_TINY).index(name))
    return _state(model, dtype)


def write_dits(root):
    """Every DiT of DIT_TINY, and the LoRAs of LORA_TINY for them (in models/loras)."""
    for name in DIT_TINY:
        save_file(dit_state(name), os.path.join(root, "diffusion_models", name))
        for j, (lora, (target, fmt, dtype)) in enumerate(LORA_TINY.items()):
            if target == name:
                write_smoke_lora(os.path.join(root, "loras", lora), dit_state(name, torch.float32), fmt, seed=30 + j,
                                 dtype=dtype)
        if name == "wan2.1_t2v_14B_fp16.safetensors":  # also as the official sharded bf16 release
            write_sharded(dit_state(name, torch.bfloat16), os.path.join(root, "diffusion_models", "Wan2.1-T2V-14B"))


def vae_state(family="2.1", dtype=torch.bfloat16):
    """The smoke Wan 2.1 or 2.2 VAE in `dtype` (same weights in every dtype)."""
    torch.manual_seed(1 if family == "2.1" else 2)
    return _state(WanVAE21(**VAE_TINY) if family == "2.1" else WanVAE22(**VAE22_TINY), dtype)


def write_vaes(root):
    save_file(vae_state("2.1"), os.path.join(root, "vae", "wan_2.1_vae.safetensors"))
    torch.save(vae_state("2.1", torch.float32), os.path.join(root, "vae", "Wan2.1_VAE.pth"))
    save_file(vae_state("2.2"), os.path.join(root, "vae", "wan2.2_vae.safetensors"))


def write_s2v(root):
    """The S2V DiT (ComfyUI's file name) and ComfyUI's wav2vec2 audio encoder file."""
    save_file(dit_state("s2v", torch.bfloat16), os.path.join(root, "diffusion_models", "wan2.2_s2v_14B_bf16.safetensors"))
    save_file(wav2vec2_smoke(seed=21), os.path.join(root, "audio_encoders", "wav2vec2_large_english_fp16.safetensors"))


def write_clip(root):
    """ComfyUI's clip_vision_h layout (HF CLIPVisionModel keys); default init keeps the LayerNorms at 1."""
    save_file({"vision_model." + k: v for k, v in clip_state().items()},
              os.path.join(root, "clip_vision", "clip_vision_h.safetensors"))


def clip_state(dtype=torch.float16):
    """The smoke CLIP vision model (internal = HF keys without `vision_model.`) in `dtype`."""
    torch.manual_seed(3)
    model = WanCLIPVision(**CLIP_TINY)
    with torch.no_grad():  # the class token is allocated uninitialised (torch.empty): drawn like CLIP's own init
        model.embeddings.class_embedding.normal_(0, CLIP_TINY["dim"] ** -0.5)
    return _state(model, dtype)


def write_all(root, force=False):
    """Write the smoke models folder (skipped when already complete, unless force)."""
    stamp = os.path.join(root, ".smoke-v6")
    if os.path.exists(stamp) and not force:
        return root
    for sub in ("diffusion_models", "vae", "text_encoders", "clip_vision", "audio_encoders", "loras"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    write_text_encoders(root)
    write_dits(root)
    write_vaes(root)
    write_clip(root)
    write_s2v(root)
    open(stamp, "w").close()
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models_dir")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    print("smoke models in", write_all(a.models_dir, a.force))
