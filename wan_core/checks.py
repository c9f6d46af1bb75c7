"""Output checks: NaN or inf is stopped where it first appears, with the likely cause named, instead of ending
as a black video. Imports torch only (any layer may use it)."""
import torch

# the likely causes, by where the values went bad (the messages end with these)
MODEL_CAUSE = ("the model file is probably damaged (download it again), or the model overflowed in fp16: use a "
               "bf16 or fp32 file, or on a GPU without bf16 start ComfyUI with --force-fp32")
VAE_CAUSE = ("the VAE file is probably damaged (download wan_2.1_vae / wan2.2_vae again), or it overflowed in fp16: "
             "use a bf16 or fp32 VAE file")
ENCODER_CAUSE = ("the encoder file is probably damaged (download it again), or it overflowed in fp16: use a bf16 or "
                 "fp32 file of it")
INPUT_CAUSE = "the node that made it produced NaN/inf: check that node's files and inputs"


def nearest_valid(value, multiple, offset=0):
    """The valid values (offset + k*multiple, positive) just below and above `value`, as text ("96 or 104", "8"): what
    every size and frame-count refusal suggests."""
    lo = (value - offset) // multiple * multiple + offset
    return " or ".join(str(n) for n in (lo, lo + multiple) if n >= max(offset, 1))


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf; the message says which tensor and the likely cause."""


def count_nonfinite(tensor):
    """How many values of `tensor` are NaN or +-inf (0 for integer tensors)."""
    if not torch.is_floating_point(tensor):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_finite(tensor, what, cause=INPUT_CAUSE):
    """`tensor` unchanged when every value is finite, else NonFiniteError("{what} holds N NaN/inf values of M:
    {cause}"). One reduction and one host sync: cheap next to any model call."""
    if tensor is None or not torch.is_floating_point(tensor) or bool(torch.isfinite(tensor).all()):
        return tensor
    bad = count_nonfinite(tensor)
    raise NonFiniteError(f"{what} holds {bad} NaN/inf value{'s' if bad != 1 else ''} of {tensor.numel()}: {cause}")


def check_tensors(tensors, what, cause=INPUT_CAUSE):
    """check_finite over a dict of tensors (a state dict, conditioning extras); names the first bad key."""
    for key, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor):
            check_finite(tensor, f"{what} ({key})", cause)
    return tensors


def check_weights(expected, sd, what):
    """Before a state dict is loaded: every tensor of `expected` ({key: tensor}, a model's declared tensors, e.g. on
    the meta device: wan_core.keys.build_on_meta) that `sd` holds must be a float (fp32/fp16/bf16/fp8) of the expected
    shape. A ValueError names up to 3 offenders and what to do instead of torch's load_state_dict dump (int8/bool
    files, files mixing two models or damaged ones). Entries that are not tensors (GGUF blocks: their layers check
    them) are left alone."""
    wrong_type, wrong_shape, total = [], [], 0
    for key, want in expected.items():
        have = sd.get(key)
        if not isinstance(have, torch.Tensor) or not isinstance(want, torch.Tensor):
            continue
        if want.is_floating_point() and not have.is_floating_point():
            wrong_type.append(f"{key} ({str(have.dtype).replace('torch.', '')})")
        elif tuple(have.shape) != tuple(want.shape):
            wrong_shape.append(f"{key} {list(have.shape)} (expected {list(want.shape)})")
        total += 1
    more = lambda items: f"{', '.join(items[:3])}{f' and {len(items) - 3} more' if len(items) > 3 else ''}"  # noqa: E731
    if wrong_type:
        raise ValueError(f"{what}: {len(wrong_type)} of its {total} weights are not floating point: {more(wrong_type)}. "
                         "Integer / bool weight files (e.g. int8-quantised exports) are not supported: use the "
                         "fp16 / bf16 / fp8 file of the model, or a GGUF one")
    if wrong_shape:
        raise ValueError(f"{what}: {len(wrong_shape)} weights have shapes that do not fit the model the file's other "
                         f"tensors describe: {more(wrong_shape)}. The file is damaged or mixes two models: download "
                         "it again")
