"""LoRA files for the Wan DiT: every common key layout -> patches on the official weight keys.

A LoRA file names the layers it changes in one of several dialects; all are resolved against the model's own
state-dict keys (so a LoRA for another family or size is told apart by what matches, never by file names):

- official / ComfyUI: `diffusion_model.blocks.0.self_attn.q.lora_up.weight` + `.lora_down.weight` (+ `.alpha`),
  or PEFT-style `.lora_B.weight` / `.lora_A.weight` (diffusion-pipe, musubi's ComfyUI export), prefix optional;
- diffusers: `transformer.blocks.0.attn1.to_q.lora_A.weight` (WanTransformer3DModel module names);
- kohya / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight` (Wan-Fun's `lora_unet__...` too);
- lightx2v step distillation (CausVid, AccVideo, lightx2v cfg-step-distill): the official names plus full-tensor
  deltas: `.diff` (a weight: Linear, Conv3d, RMSNorm/LayerNorm gains, `modulation`, `head.modulation`), `.diff_b`
  (a bias); diffusers writes those bias deltas as `.lora_B.bias`.

`match_lora(lora_sd, model_sd)` returns the patches in the tuple format of ComfyUI's ModelPatcher:
`("lora", (up, down, alpha, None, None, None))` (the weights of comfy.weight_adapter.LoRAAdapter; ΔW =
alpha/rank · up @ down, alpha None means 1) and `("diff", (delta,))`; `apply_patch` / `merge_lora` do the same
arithmetic in plain torch. Nothing here edits a model's weights.
"""
from dataclasses import dataclass, field

import torch

from .checks import check_finite
from .convert import DIT_BLOCK, DIT_TOP

# official module name -> diffusers (WanTransformer3DModel) name, inside `blocks.N.` and at the top level
DIFFUSERS_BLOCK = DIT_BLOCK
DIFFUSERS_TOP = {"patch_embedding": "patch_embedding", **DIT_TOP}
# key suffix -> what the tensor is; "up"/"down" are the factors (B/A), diff/diff_b full deltas of weight/bias
SUFFIXES = {".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_B.weight": "up", ".lora_A.weight": "down",
            ".lora.up.weight": "up", ".lora.down.weight": "down",
            ".lora_B.default.weight": "up", ".lora_A.default.weight": "down",
            ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b", ".lora_B.bias": "diff_b"}
# wrappers around the module name: dotted ones (official, ComfyUI, diffusers, PEFT) and kohya-style underscored ones
PREFIXES = ("", "diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model.",
            "lora_unet_", "lora_unet__", "lora_transformer_", "lycoris_")


def diffusers_name(module):
    """The diffusers name of an official module or parameter name (None when diffusers has no such module)."""
    parts = module.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3:
        inner = DIFFUSERS_BLOCK.get(parts[2])
        return inner and f"blocks.{parts[1]}.{inner}"
    return DIFFUSERS_TOP.get(module)


def module_aliases(keys):
    """{every name a LoRA may use for a module: official module name} for a model's state-dict keys.

    A module is a weight's owner (`blocks.0.self_attn.q` for `...q.weight`) or a bare parameter (`blocks.0.modulation`);
    names: official and diffusers, dotted and with underscores (kohya)."""
    aliases = {}
    for key in keys:
        if key.endswith(".bias"):
            continue
        module = key[: -len(".weight")] if key.endswith(".weight") else key
        for name in (module, diffusers_name(module)):
            if name:
                aliases[name] = aliases[name.replace(".", "_")] = module
    return aliases


def split_key(key):
    """'blocks.0.self_attn.q.lora_up.weight' -> ('blocks.0.self_attn.q', 'up'); (None, None) for unknown suffixes."""
    for suffix, kind in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None, None


def resolve(name, aliases):
    """The official module a LoRA module name means (any known prefix stripped), or None."""
    for prefix in PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in aliases:
            return aliases[name[len(prefix):]]
    return None


def delta(patch, shape, device=None):
    """The dense fp32 change a patch makes to a tensor of `shape` at strength 1 (computed on `device`)."""
    kind, value = patch
    f32 = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    if kind == "diff":
        return f32(value[0]).reshape(shape)
    up, down, alpha = value[:3]
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    return (scale * (f32(up).flatten(1) @ f32(down).flatten(1))).reshape(shape)


def apply_patch(weight, patch, strength=1.0):
    """weight + strength * ΔW as a new tensor in the weight's dtype (math in fp32 on the weight's device)."""
    return (weight.float() + strength * delta(patch, weight.shape, weight.device)).to(weight.dtype)


def merge_lora(sd, patches, strength=1.0):
    """A new state dict with the patches merged (for plain-PyTorch use; ComfyUI applies them through ModelPatcher)."""
    out = dict(sd)
    for key, patch in patches.items():
        out[key] = apply_patch(sd[key], patch, strength)
    return out


def _fits(kind, tensors, shape):
    if kind in ("diff", "diff_b"):
        return tuple(tensors[0].shape) == shape
    up, down = tensors
    return (len(shape) >= 2 and up.shape[0] == shape[0] and up.shape[1] == down.shape[0]
            and down[0].numel() == torch.Size(shape[1:]).numel())


@dataclass
class LoraMatch:
    """What a LoRA file does to one model: patches per official key, and the keys that did nothing."""
    patches: dict = field(default_factory=dict)
    unmatched: list = field(default_factory=list)   # keys naming nothing in this model (or of an unknown kind)
    mismatched: list = field(default_factory=list)  # keys naming a tensor of another shape (another model size)

    def add(self, target, patch, shape):
        if target in self.patches:  # two patches on one tensor (a LoRA and a diff): one dense diff, same arithmetic
            patch = ("diff", (delta(self.patches[target], shape) + delta(patch, shape),))
        self.patches[target] = patch

    def summary(self, name="the LoRA"):
        """One line for the log: how much matched, and examples of what did not."""
        text = f"{name}: {len(self.patches)} tensors patched"
        for words, keys in (("unmatched", self.unmatched), ("of another shape", self.mismatched)):
            if keys:
                text += f"; {len(keys)} keys {words} (e.g. {', '.join(keys[:3])})"
        return text

    def check(self, name="the LoRA", total=None):
        """Raise a ValueError saying why when nothing of the LoRA fits the model."""
        if self.patches:
            return self
        if self.mismatched:
            raise ValueError(f"{name} names this model's layers but with other sizes (e.g. {self.mismatched[0]}): "
                             "it is a LoRA for another Wan size (1.3B / 5B / 14B); pick one trained for this model")
        raise ValueError(f"no key of {name} matched this model: it is a LoRA for another model family? "
                         f"({total or len(self.unmatched)} keys, e.g. {', '.join(self.unmatched[:3]) or 'none'}). "
                         "Use a Wan LoRA made for the loaded diffusion model")


def check_lora_tensors(lora_sd):
    """A LoRA file's tensors are float factors / deltas, finite, and each alpha one number: ValueError naming the key
    otherwise (a bool or integer file is no LoRA; a NaN would turn the whole video NaN)."""
    for key, tensor in lora_sd.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        kind = split_key(key)[1]
        if tensor.dtype == torch.bool or (kind != "alpha" and not tensor.is_floating_point()):
            raise ValueError(f"{key} holds {str(tensor.dtype).replace('torch.', '')} values: a LoRA's tensors are "
                             "floating point; this is not a LoRA weight file (or a damaged one)")
        if kind == "alpha" and tensor.numel() != 1:
            raise ValueError(f"{key} holds {tensor.numel()} values but a LoRA alpha is one number: the file is damaged "
                             "or of an unsupported kind")
        if kind in ("up", "down") and tensor.ndim < 2:
            raise ValueError(f"{key} is {tensor.ndim}-D {list(tensor.shape)} but LoRA factors (lora_up / lora_down, "
                             "lora_B / lora_A) are matrices: the file is damaged or of an unsupported kind")
        check_finite(tensor, key, "the LoRA file is damaged (download it again)")


def _group(lora_sd, match):
    groups = {}
    for key, tensor in lora_sd.items():
        module, kind = split_key(key)
        if module is None:
            match.unmatched.append(key)
        else:
            groups.setdefault(module, {})[kind] = (key, tensor)
    return groups


def _match_module(parts, module, shapes, match):
    """Turn one LoRA module's tensors (parts: kind -> (key, tensor)) into patches on `module`'s weight/bias."""
    weight = module + ".weight" if module + ".weight" in shapes else module
    used = set()
    jobs = [("diff", weight, ["diff"]), ("diff_b", module + ".bias", ["diff_b"])]
    if "up" in parts and "down" in parts:
        jobs.append(("lora", weight, ["up", "down"]))
        used.add("alpha")
    for kind, target, needs in jobs:
        if not all(n in parts for n in needs):
            continue
        used.update(needs)
        keys, tensors = [parts[n][0] for n in needs], [parts[n][1] for n in needs]
        if target not in shapes:
            match.unmatched.extend(keys)
        elif not _fits(kind, tensors, shapes[target]):
            match.mismatched.extend(keys)
        elif kind == "lora":
            alpha = parts["alpha"][1].item() if "alpha" in parts else None
            match.add(target, ("lora", (tensors[0], tensors[1], alpha, None, None, None)), shapes[target])
        else:
            match.add(target, ("diff", (tensors[0],)), shapes[target])
    match.unmatched.extend(parts[k][0] for k in parts if k not in used)


def match_lora(lora_sd, model_sd):
    """Patches of a LoRA state dict (any supported layout) on a model given by its state dict (or key -> shape).

    Returns a LoraMatch: patches {official key: ("lora", (up, down, alpha, None, None, None)) | ("diff", (t,))},
    unmatched / mismatched LoRA keys. Factors keep the file's dtype; alpha is a float or None. Malformed files (bool /
    integer tensors, 1-D factors, a vector alpha, NaN/inf) are refused (check_lora_tensors)."""
    check_lora_tensors(lora_sd)
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in model_sd.items()}
    aliases = module_aliases(shapes)
    match = LoraMatch()
    for name, parts in _group(lora_sd, match).items():
        module = resolve(name, aliases)
        if module is None:
            match.unmatched.extend(key for key, _ in parts.values())
        else:
            _match_module(parts, module, shapes, match)
    return match
