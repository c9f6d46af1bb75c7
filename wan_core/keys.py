"""State-dict keys: which kind of model a dict holds (marker keys), key prefixes, and adopting tensors into a model
built on the meta device. Below the models (they use it to load their weights) and the file readers (checkpoint)."""
import torch

from .checks import check_weights

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
    "condition_embedder.time_proj.weight": "Wan diffusion model (diffusers layout)",
    "decoder.conv_in.weight": "VAE (diffusers layout)",
}

def find_marker(sd):
    """(prefix, kind) for the first marker key found in sd, or (None, None)."""
    for key in sd:
        for marker, kind in MARKERS.items():
            if key.endswith(marker):
                return key[: len(key) - len(marker)], kind
    return None, None


def prefix_of(sd, marker):
    """What precedes `marker` in the first key ending with it ("" when the key is the marker itself), or None."""
    return next((k[: -len(marker)] for k in sd if k.endswith(marker)), None)


def strip_prefix(sd, prefix):
    """A new dict of the keys under `prefix`, without it (ComfyUI's `model.diffusion_model.` and similar); every key
    when prefix is empty or None."""
    prefix = prefix or ""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def describe(sd):
    """What a state dict looks like, for error messages."""
    _, kind = find_marker(sd)
    if kind:
        return f"a {kind}"
    sample = ", ".join(list(sd)[:3])
    return f"no known model ({len(sd)} tensors, e.g. {sample or 'none'})"


def build_on_meta(make, ops):
    """(make(ops), expected), built on the meta device: the model, and {key: meta tensor} of every tensor it must
    load. A layer class of `ops` may hold no tensors until a state dict is loaded (ComfyUI's dynamic-VRAM ops build
    Linear layers with weight and bias None; its mixed-precision Linear has no weight), and the model's own
    state_dict() leaves those out: a plain torch.nn build of the same config (make(None)) supplies them. Where the
    ops model does declare a tensor (an fp8 scale, a GGUF layer's weight), its own declaration counts. Building on
    meta costs no memory and milliseconds."""
    with torch.device("meta"):
        model = make(ops)
        if ops is None:
            return model, model.state_dict()
        expected = make(None).state_dict()
    expected.update(model.state_dict())
    return model, expected


def assign_weights(make, sd, ops, what, hint):
    """Build make(ops) on the meta device and load `sd` into it by assignment (no copy): every key the model declares
    (build_on_meta) must be there (ValueError naming up to 5 missing, `what` and `hint` otherwise); extras are
    ignored. Without casting ops (ops None: plain torch.nn) the tensors become float32. Returns the model in eval
    mode, no grads."""
    model, expected = build_on_meta(make, ops)
    wanted = expected.keys()
    scaled = [k for k in sd if k.endswith((".scale_weight", ".weight_scale")) or k.endswith("scaled_fp8")]
    if scaled:
        raise ValueError(f"this {what} file is scaled fp8 ({scaled[0]}), which this loader does not read: {hint}")
    missing = [k for k in wanted if k not in sd]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise ValueError(f"incomplete {what} state dict: missing {missing[:5]}{more}; {hint}")
    check_weights(expected, sd, f"{what} weights")
    model.load_state_dict({k: sd[k] if ops is not None else sd[k].float() for k in wanted}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
