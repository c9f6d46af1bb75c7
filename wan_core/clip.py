"""The CLIP ViT-H/14 image encoder of Wan 2.1 I2V / FLF2V (visual tower of open-clip xlm-roberta-large-vit-huge-14).

Numerics (official wan/modules/clip.py, `CLIPModel.visual`): image in [-1, 1] -> bicubic resize to 224x224
(F.interpolate, align_corners=False, no antialias, no crop, no clamp) -> [0, 1] -> CLIP mean/std;
patch conv (no bias) -> class token + learned positions -> pre LayerNorm -> pre-norm blocks (exact GELU,
LayerNorm eps 1e-5 in fp32). Wan takes the tokens after block N-1 of N (31 of 32) and no post norm:
[B, 257, 1280]. Only those N-1 blocks are built; the last block, post norm and projection are dropped.

Internal keys are the HF CLIPVisionModel ones without `vision_model.` (ComfyUI's clip_vision_h.safetensors):
that file loads as is and the official `.pth` converts with views only (its fused `to_qkv` is split by
`chunk`), so neither layout is copied.

ComfyUI's CLIP_VISION_OUTPUT.penultimate_hidden_states is the same tensor (encoder layer -2, no post norm)
and its WAN21 model feeds it unchanged as `clip_fea`; only the preprocessing differs (see clip_preprocess).
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import ProjectedAttention
from .keys import assign_weights, describe, prefix_of, strip_prefix

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
EPS = 1e-5
HEADS = 16  # ViT-H/14 (head width 80); not recoverable from shapes, override with from_state_dict(heads=)
FILES = ("expected ComfyUI's clip_vision_h.safetensors (models/clip_vision) or the official "
         "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")


def clip_preprocess(images, size=224):
    """[B,3,H,W] in [-1,1] -> CLIP-normalised float32 [B,3,size,size], as the official Wan code does it:
    bicubic stretch to size x size (align_corners=False, no antialias, no crop, no clamp) on the
    [-1,1] values, then [0,1] and mean/std.

    ComfyUI's comfy.clip_vision.clip_preprocess differs when it resizes: it scales the short side and
    centre-crops (crop="center", its default; "none" stretches like here), uses antialiased bicubic
    (PIL's a=-0.5 kernel instead of a=-0.75) and rounds to 8 bits. At the target size both agree."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W] in [-1,1], got shape {tuple(images.shape)} "
                         "(a ComfyUI IMAGE is [B,H,W,C] in [0,1]: use image[..., :3].movedim(-1, 1) * 2 - 1)")
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x * 0.5 + 0.5 - mean) / std


def _norm(layer, x):
    """LayerNorm in fp32, result back in x's dtype (official LayerNorm subclass)."""
    return layer(x.float()).type_as(x)


Attention = ProjectedAttention  # q_proj/k_proj/v_proj/out_proj, shared with wav2vec2


class MLP(nn.Module):
    def __init__(self, dim, mlp_dim, ops):
        super().__init__()
        self.fc1, self.fc2 = ops.Linear(dim, mlp_dim), ops.Linear(mlp_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim, mlp_dim, heads, ops):
        super().__init__()
        self.layer_norm1 = ops.LayerNorm(dim, eps=EPS)
        self.self_attn = Attention(dim, heads, ops)
        self.layer_norm2 = ops.LayerNorm(dim, eps=EPS)
        self.mlp = MLP(dim, mlp_dim, ops)

    def forward(self, x):
        x = x + self.self_attn(_norm(self.layer_norm1, x))
        return x + self.mlp(_norm(self.layer_norm2, x))


class Embeddings(nn.Module):
    """Patch conv (no bias) -> [class token, patches] + learned positions."""

    def __init__(self, dim, patch, positions, ops):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = ops.Conv2d(3, dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = ops.Embedding(positions, dim)

    def forward(self, x):
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x)


class WanCLIPVision(nn.Module):
    """ViT image encoder returning the tokens after block N-1 of N (Wan's `use_31_block`), no post norm.

    num_layers is the count of blocks BUILT (the file's count minus one)."""

    def __init__(self, dim=1280, mlp_dim=5120, heads=HEADS, num_layers=31, patch=14, image_size=224, ops=None):
        super().__init__()
        ops = ops or nn
        if dim % heads:
            raise ValueError(f"CLIP width {dim} is not divisible by heads={heads}")
        self.image_size = image_size
        self.embeddings = Embeddings(dim, patch, (image_size // patch) ** 2 + 1, ops)
        self.pre_layrnorm = ops.LayerNorm(dim, eps=EPS)
        blocks = nn.ModuleList(Block(dim, mlp_dim, heads, ops) for _ in range(num_layers))
        self.encoder = nn.ModuleDict({"layers": blocks})

    def forward(self, pixels, dtype=None):
        """pixels [B,3,H,W] in [-1,1], any size -> tokens [B, 1 + (size/patch)^2, dim] (257x1280 for ViT-H).
        Preprocessing runs in float32; the blocks in `dtype` (default: pixels' dtype)."""
        return self.forward_preprocessed(clip_preprocess(pixels, self.image_size).to(dtype or pixels.dtype))

    def forward_preprocessed(self, x):
        """Already CLIP-normalised [B,3,size,size] -> tokens (what ComfyUI's model is fed)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"normalised pixels must be [B,3,{self.image_size},{self.image_size}], got "
                             f"{tuple(x.shape)}: call forward() with [-1,1] images of any size instead")
        x = _norm(self.pre_layrnorm, self.embeddings(x))
        for block in self.encoder["layers"]:
            x = block(x)
        return x

    @classmethod
    def from_state_dict(cls, sd, ops=None, heads=None):
        """Build from ComfyUI's clip_vision_h (HF layout) or the official Wan CLIP .pth state dict.

        Width, MLP width, patch, image size and layers come from shapes; heads cannot (default 16, ViT-H).
        With `ops` the tensors are assigned as stored (ComfyUI casts at use); with plain torch.nn
        (ops=None) they are made float32."""
        sd = to_internal(sd)
        config = infer_config(sd)
        return assign_weights(lambda o: cls(**config, heads=heads or HEADS, ops=o), sd, ops, "CLIP vision", FILES)


# ---------------------------------------------------------------- state dict layouts

HF_MARKER = "vision_model.embeddings.patch_embedding.weight"
OFFICIAL_MARKER = "visual.transformer.0.attn.to_qkv.weight"
_OFFICIAL_TOP = {"patch_embedding.weight": "embeddings.patch_embedding.weight",
                 "pre_norm.weight": "pre_layrnorm.weight", "pre_norm.bias": "pre_layrnorm.bias"}
_OFFICIAL_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                   "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
_OFFICIAL_BLOCK_KEY = re.compile(r"^transformer\.(\d+)\.(.+)\.(weight|bias)$")


def official_to_internal(sd):
    """Official keys (`visual.` stripped) -> internal keys; to_qkv split into views, nothing copied.
    The text tower, `head` and `post_norm` are not used by Wan and are dropped."""
    out = {}
    for key, value in sd.items():
        m = _OFFICIAL_BLOCK_KEY.match(key)
        if key in _OFFICIAL_TOP:
            out[_OFFICIAL_TOP[key]] = value
        elif key == "cls_embedding":
            out["embeddings.class_embedding"] = value.reshape(-1)
        elif key == "pos_embedding":
            out["embeddings.position_embedding.weight"] = value.reshape(value.shape[-2:])
        elif m and m.group(2) == "attn.to_qkv":
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(3)}"] = part
        elif m and m.group(2) in _OFFICIAL_BLOCK:
            out[f"encoder.layers.{m.group(1)}.{_OFFICIAL_BLOCK[m.group(2)]}.{m.group(3)}"] = value
    return out


def to_internal(sd):
    """Either supported layout -> internal keys (HF names without `vision_model.`), told apart by marker keys."""
    prefix = prefix_of(sd, HF_MARKER)
    if prefix is not None:
        return strip_prefix(sd, prefix + "vision_model.")
    prefix = prefix_of(sd, OFFICIAL_MARKER)
    if prefix is not None:
        return official_to_internal(strip_prefix(sd, prefix + "visual."))
    if prefix_of(sd, "visual.transformer.resblocks.0.attn.in_proj_weight") is not None:
        raise ValueError("this is an open_clip-layout CLIP checkpoint, which is not supported; " + FILES)
    raise ValueError(f"not a CLIP vision model: it looks like {describe(sd)}; {FILES}")


def infer_config(sd):
    """WanCLIPVision kwargs from internal-layout shapes (num_layers = blocks in the file minus one)."""
    need = ("embeddings.class_embedding", "embeddings.patch_embedding.weight",
            "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise ValueError(f"incomplete CLIP vision state dict: missing {absent}; {FILES}")
    dim = sd["embeddings.class_embedding"].shape[0]
    patch = sd["embeddings.patch_embedding.weight"].shape[-1]
    positions = sd["embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid + 1 != positions:
        raise ValueError(f"CLIP position table has {positions} rows; expected 1 + a square number of patches")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.layer_norm1\.weight$", k))}
    if len(layers) < 2:
        raise ValueError(f"CLIP vision state dict has {len(layers)} block(s); Wan uses the output of the "
                         "second-to-last block, so at least 2 are needed")
    return dict(dim=dim, mlp_dim=sd["encoder.layers.0.mlp.fc1.weight"].shape[0], num_layers=max(layers),
                patch=patch, image_size=grid * patch)
