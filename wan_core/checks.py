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
