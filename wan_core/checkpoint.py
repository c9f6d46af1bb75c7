"""Read checkpoint files into official-key state dicts.

Handles: single .safetensors, official sharded safetensors with an index json (the index file itself
or its folder), .pth/.pt (read with weights_only=True), and key prefixes such as ComfyUI's
`model.diffusion_model.`. Kinds are told apart by marker keys and shapes, never by file names.
"""
import json
import os
import re

import torch
from safetensors import safe_open

# marker key (without prefix) -> what a file holding it is
MARKERS = {
    "head.modulation": "Wan diffusion model",
    "decoder.conv1.weight": "video VAE",
    "encoder.block.0.layer.0.SelfAttention.q.weight": "umT5 text encoder (HF layout)",
    "blocks.0.attn.q.weight": "umT5 text encoder (official layout)",
    "visual.transformer.resblocks.0.attn.in_proj_weight": "CLIP vision model",
    "vision_model.encoder.layers.0.self_attn.q_proj.weight": "CLIP vision model",
    "log_one_minus_alphas_cumprod": "Stable Diffusion checkpoint",
    "model.diffusion_model.input_blocks.0.0.weight": "Stable Diffusion checkpoint",
    "double_blocks.0.img_attn.qkv.weight": "Flux model",
}


SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


class CheckpointError(ValueError):
    """A file that cannot be read, or is not what the node expects; the message says what to do."""


def _read_safetensors(path):
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/corrupt headers
        raise CheckpointError(f"cannot read '{os.path.basename(path)}' as safetensors ({e}); "
                              "the file is truncated or corrupt: download it again") from e


def _read_index(path):
    folder = os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
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
                if name in json.load(fh).get("weight_map", {}).values():
                    return os.path.join(folder, f)
    return None


def read_file(path):
    """Every tensor of a checkpoint file, keys as stored. A shard of an indexed checkpoint, the index
    json or its folder read the whole sharded checkpoint."""
    if SHARD_NAME.search(path):
        path = shard_index(path) or path
    if os.path.isdir(path):
        index = [f for f in sorted(os.listdir(path)) if f.endswith(".index.json")]
        if not index:
            raise CheckpointError(f"folder '{path}' has no *.index.json to say which shards form the model")
        path = os.path.join(path, index[0])
    if path.endswith(".index.json"):
        return _read_index(path)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith((".pth", ".pt", ".ckpt", ".bin")):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"cannot read '{os.path.basename(path)}' as a torch checkpoint ({e})") from e
        return sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    raise CheckpointError(f"'{os.path.basename(path)}': unsupported file type (use .safetensors, .pth or an index json)")


def find_marker(sd):
    """(prefix, kind) for the first marker key found in sd, or (None, None)."""
    for key in sd:
        for marker, kind in MARKERS.items():
            if key.endswith(marker):
                return key[: len(key) - len(marker)], kind
    return None, None


def strip_prefix(sd, prefix):
    """Keys under `prefix`, without it (ComfyUI's `model.diffusion_model.` and similar)."""
    if not prefix:
        return sd
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def describe(sd):
    """What a state dict looks like, for error messages."""
    _, kind = find_marker(sd)
    if kind:
        return f"a {kind}"
    sample = ", ".join(list(sd)[:3])
    return f"no known model ({len(sd)} tensors, e.g. {sample or 'none'})"


def load_for(path, marker, expected, node_hint):
    """Read `path`, check it holds `marker`, and return its official-key state dict.

    expected: words for the wanted kind ("a Wan diffusion model"); node_hint: where the file belongs instead.
    """
    sd = read_file(path)
    hits = [k for k in sd if k.endswith(marker)]
    if not hits:
        raise CheckpointError(f"'{os.path.basename(path)}' is not {expected}: it looks like {describe(sd)}. {node_hint}")
    return strip_prefix(sd, min(hits, key=len)[: -len(marker)])
