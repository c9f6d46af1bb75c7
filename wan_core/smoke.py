"""Tiny random checkpoints in the real key layouts and under the file names users drop in, so every
graph runs anywhere: `python -m wan_core.smoke MODELS_DIR [--force]` writes a ComfyUI models folder.

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

from .dit import WanDiT
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
    return {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}


def write_text_encoders(root):
    torch.manual_seed(0)
    spm = train_smoke_spm(seed=0)
    t5 = UMT5Encoder(vocab=_vocab_size(spm), **T5_TINY)
    sd = _state(t5, torch.float16)
    hf = official_to_hf(sd)
    hf["spiece_model"] = torch.from_numpy(np.frombuffer(spm, dtype=np.uint8).copy())
    save_file(hf, os.path.join(root, "text_encoders", "umt5_xxl_fp16.safetensors"))
    torch.save(_state(t5, torch.bfloat16), os.path.join(root, "text_encoders", "models_t5_umt5-xxl-enc-bf16.pth"))
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


def write_dits(root):
    for i, (name, cfg) in enumerate(DIT_TINY.items()):
        model = randomize_(WanDiT(text_dim=T5_TINY["dim"], **cfg), seed=10 + i)
        save_file(_state(model, torch.float16), os.path.join(root, "diffusion_models", name))
        if name == "wan2.1_t2v_14B_fp16.safetensors":  # also as the official sharded bf16 release
            write_sharded(_state(model, torch.bfloat16), os.path.join(root, "diffusion_models", "Wan2.1-T2V-14B"))


def write_vaes(root):
    torch.manual_seed(1)
    vae = WanVAE21(**VAE_TINY)
    save_file(_state(vae, torch.bfloat16), os.path.join(root, "vae", "wan_2.1_vae.safetensors"))
    torch.save(_state(vae, torch.float32), os.path.join(root, "vae", "Wan2.1_VAE.pth"))
    torch.manual_seed(2)
    save_file(_state(WanVAE22(**VAE22_TINY), torch.bfloat16), os.path.join(root, "vae", "wan2.2_vae.safetensors"))


def write_s2v(root):
    """The S2V DiT (ComfyUI's file name) and ComfyUI's wav2vec2 audio encoder file."""
    model = randomize_(WanS2V(**dict(S2V_TINY, text_dim=T5_TINY["dim"])), seed=20)
    save_file(_state(model, torch.bfloat16), os.path.join(root, "diffusion_models", "wan2.2_s2v_14B_bf16.safetensors"))
    save_file(wav2vec2_smoke(seed=21), os.path.join(root, "audio_encoders", "wav2vec2_large_english_fp16.safetensors"))


def write_clip(root):
    """ComfyUI's clip_vision_h layout (HF CLIPVisionModel keys); default init keeps the LayerNorms at 1."""
    torch.manual_seed(3)
    sd = _state(WanCLIPVision(**CLIP_TINY), torch.float16)
    save_file({"vision_model." + k: v for k, v in sd.items()}, os.path.join(root, "clip_vision", "clip_vision_h.safetensors"))


def write_all(root, force=False):
    """Write the smoke models folder (skipped when already complete, unless force)."""
    stamp = os.path.join(root, ".smoke-v5")
    if os.path.exists(stamp) and not force:
        return root
    for sub in ("diffusion_models", "vae", "text_encoders", "clip_vision", "audio_encoders"):
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
