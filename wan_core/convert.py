"""Other key layouts and precisions of the Wan DiT and VAE, turned into official keys at load time.

Diffusers: `WanTransformer3DModel` and `AutoencoderKLWan` (Wan 2.1 and 2.2 VAEs) name the same modules
differently; keys are renamed module path by module path and the tensors are kept (no copy; nothing needs
splitting or merging). The mapping follows diffusers' own conversion script (scripts/convert_wan_to_diffusers.py):
blocks' `attn1`/`attn2` are `self_attn`/`cross_attn`, diffusers' `norm2` is the cross-attention norm the
official code calls `norm3`, `scale_shift_table` is `modulation`, `add_k_proj`/`add_v_proj`/`norm_added_k` are
the I2V `k_img`/`v_img`/`norm_k_img`, and the VAE's stages are regrouped (`down_blocks`/`up_blocks`).

Precision: casting to a chosen weight dtype (fp8 only for matrices, the rest of the model stays as stored), and
ComfyUI's quantized files in every layout they come in (per-layer `comfy_quant` entries or header metadata, legacy
scaled fp8, Kijai's scaled fp8), turned into wan_core.quant's packed weights.
"""
import re

import torch

from . import quant

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)

# ----------------------------------------------------------------------------- DiT keys

DIT_TOP = {  # official module path -> diffusers
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
DIT_BLOCK = {  # inside blocks.N
    "norm3": "norm2",  # the cross-attention LayerNorm: diffusers numbers norms in call order
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
}
for _ours, _theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    DIT_BLOCK.update({f"{_ours}.{p}": f"{_theirs}.to_{p}" for p in "qkv"})
    DIT_BLOCK.update({f"{_ours}.o": f"{_theirs}.to_out.0", f"{_ours}.norm_q": f"{_theirs}.norm_q",
                       f"{_ours}.norm_k": f"{_theirs}.norm_k"})
_BLOCK_KEY = re.compile(r"(blocks\.\d+\.)(.+)")


def _inverse(table):
    return {v: k for k, v in table.items()}


def _rename(key, table):
    """key with its longest module-path prefix (whole dotted parts) replaced through `table`; unchanged if none."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in table:
            return ".".join([table[head], *parts[i:]])
    return key


def _dit_key(key, top, block):
    m = _BLOCK_KEY.fullmatch(key)
    return m.group(1) + _rename(m.group(2), block) if m else _rename(key, top)


def dit_from_diffusers(sd):
    """`WanTransformer3DModel` keys -> official keys (same tensor objects)."""
    top, block = _inverse(DIT_TOP), _inverse(DIT_BLOCK)
    return {_dit_key(k, top, block): v for k, v in sd.items()}


def dit_to_diffusers(sd):
    """Official keys -> `WanTransformer3DModel` keys (for writing diffusers-layout files)."""
    return {_dit_key(k, DIT_TOP, DIT_BLOCK): v for k, v in sd.items()}


# ----------------------------------------------------------------------------- VAE keys

_RES = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
        "shortcut": "conv_shortcut"}
_VAE_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
for _c in ("encoder", "decoder"):
    _VAE_TOP.update({f"{_c}.conv1": f"{_c}.conv_in", f"{_c}.head.0": f"{_c}.norm_out", f"{_c}.head.2": f"{_c}.conv_out",
                     f"{_c}.middle.0": f"{_c}.mid_block.resnets.0", f"{_c}.middle.1": f"{_c}.mid_block.attentions.0",
                     f"{_c}.middle.2": f"{_c}.mid_block.resnets.1"})
_RESAMPLER = ("resample.", "time_conv.")
_UP21 = 4  # Wan 2.1 decoder stages: 3 residual blocks + 1 upsampler, numbered flat in the official keys
_RES22 = {"encoder": 2, "decoder": 3}  # Wan 2.2 residual blocks per stage (the resampler's index)
_OFFICIAL_STAGE = re.compile(r"(encoder|decoder)\.(?:down|up)samples\.(\d+)\.(?:(?:down|up)samples\.(\d+)\.)?(.+)")
_DIFFUSERS_STAGE = re.compile(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\."
                              r"(?:(resnets)\.(\d+)\.|(upsamplers\.0|downsampler|upsampler)\.)?(.+)")


def _vae_key_to_diffusers(key):
    m = _OFFICIAL_STAGE.fullmatch(key)
    if m is None:
        top = _rename(key, _VAE_TOP)
        return re.sub(r"mid_block\.resnets\.(\d)\.(.+)", lambda r: f"mid_block.resnets.{r[1]}.{_rename(r[2], _RES)}", top)
    coder, i, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    blocks = "down_blocks" if coder == "encoder" else "up_blocks"
    resampler = rest.startswith(_RESAMPLER)
    if j is not None:  # Wan 2.2: stage i, layer j
        inner = ("downsampler" if coder == "encoder" else "upsampler") if resampler else f"resnets.{j}"
        return f"{coder}.{blocks}.{i}.{inner}.{rest if resampler else _rename(rest, _RES)}"
    if coder == "encoder":  # Wan 2.1 encoder: flat in both layouts
        return f"encoder.down_blocks.{i}.{rest if resampler else _rename(rest, _RES)}"
    stage, r = divmod(i, _UP21)
    if resampler:
        return f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
    return f"decoder.up_blocks.{stage}.resnets.{r}.{_rename(rest, _RES)}"


def _vae_key_from_diffusers(key, v22):
    m = _DIFFUSERS_STAGE.fullmatch(key)
    if m is None:
        top = _rename(key, _inverse(_VAE_TOP))
        return re.sub(r"middle\.([02])\.(.+)", lambda r: f"middle.{r[1]}.{_rename(r[2], _inverse(_RES))}", top)
    coder, i, resnets, j, sampler, rest = m.groups()
    i = int(i)
    samples = "downsamples" if coder == "encoder" else "upsamples"
    inner = _rename(rest, _inverse(_RES))
    if v22:  # stage i, layer j; the resampler follows the stage's residual blocks
        layer = j if resnets else _RES22[coder]
        return f"{coder}.{samples}.{i}.{samples}.{layer}.{inner if resnets else rest}"
    if sampler == "upsamplers.0":  # Wan 2.1 decoder, flat numbering
        return f"decoder.upsamples.{i * _UP21 + _UP21 - 1}.{rest}"
    if resnets:
        return f"decoder.upsamples.{i * _UP21 + int(j)}.{inner}"
    return f"{coder}.{samples}.{i}.{rest if rest.startswith(_RESAMPLER) else inner}"


def vae_from_diffusers(sd):
    """`AutoencoderKLWan` keys (Wan 2.1 or 2.2 VAE) -> official keys (same tensor objects)."""
    v22 = any(re.match(r"encoder\.down_blocks\.\d+\.resnets\.", k) for k in sd)  # 2.1's encoder stages are flat
    return {_vae_key_from_diffusers(k, v22): v for k, v in sd.items()}


def vae_to_diffusers(sd):
    """Official VAE keys -> `AutoencoderKLWan` keys (for writing diffusers-layout files)."""
    return {_vae_key_to_diffusers(k): v for k, v in sd.items()}


# ----------------------------------------------------------------------------- precision

def is_matrix_weight(key, value):
    """Linear / conv weights (2D and up): what fp8 storage applies to. Modulation tables, position tables,
    norms and biases are left alone (the model reads them in fp32)."""
    return key.endswith(".weight") and value.ndim >= 2


def cast_weights(sd, dtype):
    """Floating tensors to `dtype`; for an fp8 dtype only the matrix weights. Other values (GGUF blocks) pass."""
    def cast(key, v):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and (dtype not in FP8 or is_matrix_weight(key, v)):
            return v.to(dtype)
        return v
    return {k: cast(k, v) for k, v in sd.items()}


# nn.Embedding tables of the Wan models (S2V's token-type table, umT5's token and relative-position tables): 2D
# weights that are no Linear (ComfyUI quantizes Linears only; a file that quantized one anyway has it decoded at load)
EMBEDDING_TABLES = ("trainable_cond_mask.weight", "token_embedding.weight", "pos_embedding.embedding.weight")
_ENTRY, _SCALE = ".comfy_quant", ".weight_scale"
_LEGACY_SCALE, _INPUT_SCALES = ".scale_weight", (".scale_input", ".input_scale")
_LAYER_TENSORS = ("weight_scale", "weight_scale_2", *quant.OPTIONAL)


def _layer_entries(sd):
    """{layer: ComfyUI's entry} of a state dict, which is edited to the current names: `<layer>.comfy_quant` entries
    and the legacy `scaled_fp8` marker popped, legacy `.scale_weight` renamed `.weight_scale`, input scales dropped
    (only fp8 matmuls on quantized activations use them). A layer with a `.weight_scale` and no entry is per-tensor fp8
    of its weight's own dtype when that is fp8, as the legacy layout (ComfyUI's marker, which convert_old_quants reads
    as e4m3fn whatever the weights are; Kijai's marker-less files) and the new names without an entry mean."""
    entries = {}
    sd.pop("scaled_fp8", None)
    for key in list(sd):
        if key.endswith(_ENTRY):
            entries[key[: -len(_ENTRY)]] = quant.read_layer_entry(key, sd.pop(key))
        elif key.endswith(_INPUT_SCALES):
            sd.pop(key)
        elif key.endswith(_LEGACY_SCALE):
            sd[key[: -len(_LEGACY_SCALE)] + _SCALE] = sd.pop(key)
    for key in [k for k in sd if k.endswith(_SCALE)]:
        layer = key[: -len(_SCALE)]
        weight = sd.get(layer + ".weight")
        if layer not in entries and isinstance(weight, torch.Tensor) and weight.dtype in FP8:
            entries[layer] = {"format": str(weight.dtype).replace("torch.", "")}
    return entries


def pack_quantized(sd):
    """A state dict (official keys) with every quantized Linear as a `wan_core.quant.QuantWeight` at its `.weight` key,
    whatever layout its file used: ComfyUI's per-layer `<layer>.comfy_quant` entries (wan_core.checkpoint.read_file
    turns a `_quantization_metadata` header into them, as ComfyUI does) with `.weight_scale` / `.weight_scale_2`; the
    legacy scaled fp8 (`scaled_fp8` marker, `.scale_weight`, `.scale_input`) and Kijai's marker-less scaled fp8. A
    scale on a weight that is no quantized one (a 16/32-bit layer with its scale) is folded into it; a quantized
    embedding table is decoded (bf16). Formats it cannot decode, missing scales: wan_core.quant.QuantError."""
    sd = dict(sd)
    for layer, entry in _layer_entries(sd).items():
        key = layer + ".weight"
        if key not in sd:  # an entry (a header's layer list) for a layer this file does not hold
            continue
        tensors = {"weight": sd.pop(key), **{n: sd.pop(f"{layer}.{n}") for n in _LAYER_TENSORS if f"{layer}.{n}" in sd}}
        packed = quant.QuantWeight.of(layer, entry, tensors)
        sd[key] = packed.dequantize(torch.bfloat16) if key.endswith(EMBEDDING_TABLES) else packed
    for key in [k for k in sd if k.endswith(_SCALE)]:  # scales of plain float weights
        weight_key = key[: -len(_SCALE)] + ".weight"
        if isinstance(sd.get(weight_key), torch.Tensor) and sd[weight_key].is_floating_point():
            scale = sd.pop(key).float()
            sd[weight_key] = (sd[weight_key].float() * scale).to(sd[weight_key].dtype)
    return sd
