"""Read checkpoint files into official-key state dicts.

Handles: single .safetensors, sharded safetensors with an index json (the index file itself, any shard or
their folder; shards without an index when all of them lie together), .pth/.pt (read with weights_only=True),
GGUF, and key prefixes such as ComfyUI's `model.diffusion_model.`. `load_dit` / `load_vae` also turn the
diffusers layouts into official keys, and quantized matrices (GGUF, ComfyUI's fp8 / nvfp4 / mxfp8 / int8 in any of
their layouts) into packed weights (wan_core.quant) for layers that decode them at use (wan_core.castops, or
ComfyUI's ops in nodes/ops.py).
Kinds are told apart by marker keys and shapes, never by file names.
"""
import glob
import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from . import convert, t5
from .gguf import GGUFError, read_gguf
from .quant import QuantError, QuantWeight, layer_entry, quant_summary, unpack
from .keys import describe, strip_prefix

DIT_MARKER, DIT_DIFFUSERS_MARKER = "head.modulation", "condition_embedder.time_proj.weight"
VAE_MARKER, VAE_DIFFUSERS_MARKER = "decoder.conv1.weight", "decoder.conv_in.weight"


SHARD_NAME = re.compile(r"-\d{5}-of-(\d{5})\.safetensors$")


class CheckpointError(ValueError):
    """A file that cannot be read, or is not what the node expects; the message says what to do."""


def _read_safetensors(path):
    try:
        with safe_open(path, framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for truncated/corrupt headers
        raise CheckpointError(f"cannot read '{os.path.basename(path)}' as safetensors ({e}); "
                              "the file is truncated or corrupt: download it again") from e
    return _with_layer_entries(sd, header.get("_quantization_metadata"), path)


def _with_layer_entries(sd, metadata, path):
    """ComfyUI's `_quantization_metadata` header (JSON {"format_version": "1.0", "layers": {layer: {"format": ...}}})
    added to sd as the `<layer>.comfy_quant` entries ComfyUI's loader turns it into; an entry in the file wins."""
    if metadata is None:
        return sd
    try:
        layers = json.loads(metadata)["layers"]
        entries = {f"{layer}.comfy_quant": layer_entry(dict(conf)) for layer, conf in layers.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"'{os.path.basename(path)}': its _quantization_metadata header is not ComfyUI's layer "
                              f"table ({type(e).__name__}: {e}); the file is damaged: download it again") from e
    return {**entries, **sd}


def _listing(names, limit=5):
    """Up to `limit` names, then how many more (an error message stays short whatever the count)."""
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shard_names(path):
    """The shard file names an index json lists; each must be a plain name in the index's own folder (an absolute
    path, a sub-folder or `..` would read files from elsewhere on disk)."""
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"'{os.path.basename(path)}' is not a readable shard index (no weight_map: {e})") from e
    outside = [s for s in shards if os.path.basename(s.replace("\\", "/")) != s or s in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"'{os.path.basename(path)}' names shards outside its own folder ({_listing(outside, 3)}): "
                              "refused; shards must be plain file names in the index's folder")
    return shards


def _read_index(path):
    folder = os.path.dirname(path)
    shards = _shard_names(path)
    sd = {}
    for name in shards:
        shard = os.path.join(folder, name)
        if not os.path.isfile(shard):
            raise CheckpointError(f"shard '{name}' listed in '{os.path.basename(path)}' is missing from {folder}")
        sd.update(_read_safetensors(shard))
    return sd


def shard_index(path):
    """The index json beside a shard (`...-00001-of-00006.safetensors`) that lists it, or None."""
    folder, name = os.path.split(path)
    for f in sorted(os.listdir(folder or ".")):
        if f.endswith(".index.json"):
            with open(os.path.join(folder, f), encoding="utf-8") as fh:
                try:
                    listed = json.load(fh).get("weight_map", {}).values()
                except (ValueError, AttributeError):
                    continue  # not an index of ours (another json): the shard is read without it
                if name in listed:
                    return os.path.join(folder, f)
    return None


def _sibling_shards(path):
    """All shards `...-0000i-of-0000n.safetensors` of the checkpoint `path` belongs to (no index json needed)."""
    m = SHARD_NAME.search(path)
    stem, total = path[: m.start()], int(m.group(1))
    shards = [f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
    if missing:
        which = f"{missing[0]} is" if len(missing) == 1 else f"{len(missing)} of them ({_listing(missing)}) are"
        raise CheckpointError(f"'{os.path.basename(path)}' is one of {total} shards and {which} missing beside it: "
                              f"download every shard into {os.path.dirname(path) or '.'}")
    return shards


def read_file(path, keep_quantized=False):
    """Every tensor of a checkpoint file, keys as stored. A shard of a sharded checkpoint, its index json or
    its folder read the whole checkpoint. GGUF matrices stay `GGUFWeight`s when keep_quantized. A safetensors
    `_quantization_metadata` header comes as the `<layer>.comfy_quant` entries ComfyUI makes of it."""
    if not os.path.exists(path):
        raise CheckpointError(f"'{path}' does not exist")
    if SHARD_NAME.search(path):
        index = shard_index(path)
        if index is None:
            sd = {}
            for shard in _sibling_shards(path):
                sd.update(_read_safetensors(shard))
            return sd
        path = index
    if os.path.isdir(path):
        index = sorted(glob.glob(os.path.join(path, "*.index.json")))
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not index and not (len(files) == 1 or files and SHARD_NAME.search(files[0])):
            raise CheckpointError(f"folder '{path}' has no *.index.json to say which shards form the model")
        return read_file(index[0] if index else files[0], keep_quantized)
    if path.endswith(".index.json"):
        return _read_index(path)
    if path.endswith((".safetensors", ".sft")):
        return _read_safetensors(path)
    if path.endswith(".gguf"):
        try:
            return read_gguf(path, keep_quantized)[0]
        except GGUFError as e:
            raise CheckpointError(f"'{os.path.basename(path)}': {e}") from e
        except Exception as e:  # the gguf reader raises several types for a truncated or foreign file
            raise CheckpointError(f"cannot read '{os.path.basename(path)}' as GGUF ({e}); "
                                  "the file is truncated or corrupt: download it again") from e
    if path.endswith((".pth", ".pt", ".ckpt", ".bin")):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"cannot read '{os.path.basename(path)}' as a torch checkpoint ({e})") from e
        return sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    raise CheckpointError(f"'{os.path.basename(path)}': unsupported file type (use .safetensors, .gguf, .pth or an index json)")


# ----------------------------------------------------------------------------- layouts and precisions

@dataclass
class Checkpoint:
    """An official-key state dict and what its file was: layout ('official', 'ComfyUI', 'diffusers', 'GGUF').
    Quantized matrices are wan_core.quant.PackedWeights in sd (GGUF blocks, ComfyUI's formats)."""
    sd: dict
    layout: str

    @property
    def quantized(self):
        """'nvfp4 x120, float8_e4m3fn x8' for the packed weights ('' when none)."""
        return quant_summary(self.sd)

    def describe(self):
        dtypes = {}
        for v in self.sd.values():
            if isinstance(v, torch.Tensor):
                dtypes[v.dtype] = dtypes.get(v.dtype, 0) + v.numel()
        main = str(max(dtypes, key=dtypes.get)).replace("torch.", "") if dtypes else "?"
        return f"{self.layout} layout, {self.quantized or main}"


def _layout(sd, markers, path, expected, node_hint):
    """(prefix, layout) from the first of `markers` ({marker: layout}) found, or a CheckpointError."""
    for marker, layout in markers.items():
        hits = [k for k in sd if k.endswith(marker)]
        if hits:
            prefix = min(hits, key=len)[: -len(marker)]
            return prefix, ("ComfyUI" if layout == "official" and prefix else layout)
    raise CheckpointError(f"'{os.path.basename(path)}' is not {expected}: it looks like {describe(sd)}. {node_hint}")


# marker key -> (a Wan variant this pack does not run, what runs it): refused by name instead of loaded half-way
_NATIVE = "ComfyUI's own Load Diffusion Model (UNETLoader) with its {} node"
UNSUPPORTED_DIT = {
    "vace_patch_embedding.weight": ("Wan VACE (wan2.1_vace_*)", _NATIVE.format("WanVaceToVideo")),
    "control_adapter.conv.weight": ("Wan Fun Camera (wan2.1_fun_camera_*, wan2.2_fun_camera_*)",
                                    _NATIVE.format("WanCameraImageToVideo")),
    "audio_proj.audio_proj_glob_1.layer.bias": ("HuMo (humo_*)", _NATIVE.format("WanHuMoImageToVideo")),
    "face_adapter.fuser_blocks.0.k_norm.weight": ("Wan 2.2 Animate (wan2.2_animate_14B_*)",
                                                  _NATIVE.format("WanAnimateToVideo")),
    "ref_conv.weight": ("Wan Fun Control/InP with a reference image (ref_conv)",
                        _NATIVE.format("Wan22FunControlToVideo")),
}


def check_supported_dit(sd, path):
    """Refuse the Wan diffusion models this pack does not run (a CheckpointError naming the variant and what runs
    it): VACE, Fun Camera, HuMo, Animate, Fun Control/InP (their input channels are neither 16, 36 nor TI2V's 48/48)."""
    name = os.path.basename(path.rstrip("/"))
    for marker, (variant, use) in UNSUPPORTED_DIT.items():
        if marker in sd:
            raise CheckpointError(f"'{name}' is {variant}, which Wan Lean does not run: use {use}")
    patch, head = sd.get("patch_embedding.weight"), sd.get("head.head.weight")
    if patch is not None and head is not None:
        in_dim, out_dim = patch.shape[1], head.shape[0] // 4
        if in_dim not in (16, 36) and (in_dim, out_dim) != (48, 48):
            raise CheckpointError(f"'{name}' takes {in_dim} input channels: a Wan Fun Control / Inpaint model, which "
                                  f"Wan Lean does not run: use {_NATIVE.format('WanFunControlToVideo')}")


def _precision(sd, weight_dtype, what):
    """sd with its quantized layers packed (convert.pack_quantized; a QuantError becomes a CheckpointError naming
    `what`), then stored in `weight_dtype`: None keeps every dtype as stored; bf16/fp16/fp32 decode ComfyUI's formats
    and convert every float tensor; an fp8 dtype stores the plain matrices in it, packed ones stay as they are. GGUF
    blocks stay packed whatever is asked."""
    try:
        sd = convert.pack_quantized(sd)
    except QuantError as e:
        raise CheckpointError(f"{what}: {e}") from None
    if weight_dtype is None or weight_dtype in convert.FP8 and any(isinstance(v, QuantWeight) for v in sd.values()):
        return sd
    return convert.cast_weights(unpack(sd, weight_dtype), weight_dtype)


def load_dit(path, weight_dtype=None):
    """A Wan diffusion model file of any layout and precision as a `Checkpoint` with official keys.
    weight_dtype: None keeps the file's dtypes (quantized layers stay packed, decoded at use); bf16/fp16/fp32 convert
    every float tensor (and decode ComfyUI's quantized formats into it); an fp8 dtype stores the matrices in it.
    GGUF weights stay quantised whatever is asked."""
    raw = read_file(path, keep_quantized=True)
    prefix, layout = _layout(raw, {DIT_MARKER: "official", DIT_DIFFUSERS_MARKER: "diffusers"}, path,
                             "a Wan diffusion model", "Put Wan diffusion models in models/diffusion_models and load "
                             "VAEs and text encoders with their own loaders.")
    sd = strip_prefix(raw, prefix)
    if layout == "diffusers":
        sd = convert.dit_from_diffusers(sd)
    check_supported_dit(sd, path)
    if path.endswith(".gguf"):
        layout = "GGUF"
    return Checkpoint(_precision(sd, weight_dtype, f"'{os.path.basename(path.rstrip('/'))}'"), layout)


def load_vae(path):
    """A Wan 2.1 / 2.2 VAE file (official, ComfyUI or diffusers layout) as a `Checkpoint` with official keys."""
    raw = read_file(path)
    prefix, layout = _layout(raw, {VAE_MARKER: "official", VAE_DIFFUSERS_MARKER: "diffusers"}, path,
                             "a video VAE", "Put the Wan VAE in models/vae.")
    sd = strip_prefix(raw, prefix)
    if layout == "diffusers":
        if sd[VAE_DIFFUSERS_MARKER].ndim != 5:
            raise CheckpointError(f"'{os.path.basename(path)}' is an image VAE in diffusers layout (2D convs), "
                                  "not the Wan video VAE (3D convs): use wan_2.1_vae / wan2.2_vae")
        sd = convert.vae_from_diffusers(sd)
    return Checkpoint(sd, layout)


def load_text_encoder(raw, weight_dtype=None):
    """A umT5 encoder state dict as read (ComfyUI/HF or official layout, any prefix) as a `Checkpoint` with official
    keys. Quantized files (umt5_xxl_fp8_e4m3fn_scaled: fp8 Linear weights with per-layer scales and a `scaled_fp8`
    marker; ComfyUI's per-layer formats) keep their layers packed, decoded at use, as load_dit keeps the DiT's, or
    decoded into weight_dtype when it is given (plain torch); input scales are dropped, as ComfyUI drops them for
    text encoders. Other files pass; weight_dtype casts them."""
    sd = _precision(t5.to_official(raw), weight_dtype, "umT5 text encoder")
    official = any(k.endswith("blocks.0.attn.q.weight") for k in raw)
    return Checkpoint(sd, "official" if official else "ComfyUI")
