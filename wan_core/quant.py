"""Quantized matrices, kept packed in memory and decoded one layer at a time when that layer runs.

`PackedWeight` is what a state dict holds in place of such a matrix (GGUF blocks: wan_core.gguf.GGUFWeight; ComfyUI's
per-layer formats: `QuantWeight`); `QuantLinear` is the Linear mixin that adopts one when a state dict is loaded and
decodes it in forward (nodes/ops.py builds ComfyUI's casting Linear on it, wan_core.castops a plain-torch one).

ComfyUI's formats (the names of its comfy/quant_ops.py QUANT_ALGOS; byte layouts as comfy_kitchen's quantizers write
them, read in its eager backend; wan_core.convert.pack_quantized turns every file layout into these):
- float8_e4m3fn / float8_e5m2: fp8 data, `weight_scale` one float32 per tensor; w = data * scale.
- int8_tensorwise: int8 data, `weight_scale` one float32 per tensor (or one per output row); w = data * scale.
- nvfp4: uint8 [N, K/2], two e2m1 codes a byte, the even column in the high nibble; `weight_scale` one float8_e4m3fn
  per 16 values of a row, in the blocked layout below; `weight_scale_2` one float32 per tensor;
  w = e2m1 value * block scale * weight_scale_2.
- mxfp8: float8_e4m3fn data; `weight_scale` one e8m0 exponent byte per 32 values of a row (2^(e - 127); 0 decodes
  as 0, as comfy_kitchen decodes it), in the blocked layout.
Blocked layout (cuBLAS's block-scaling factor layout): the [rows, row blocks] scale matrix padded to whole tiles of
128 rows x 4 columns; each tile is stored as 32 x 16, its element (32a + b, c) at (b, 4a + c); tiles row by row.
Data padded to whole blocks (rows and columns to 16 for nvfp4, 32 for mxfp8) decodes to the layer's own shape.
`pre_quant_scale` (one per input column: AWQ smoothing) multiplies the decoded columns. `input_scale` only serves
matmuls on quantized activations, which this code never runs (every format computes dequantized), so it is not kept.
"""
import copy
import json
from dataclasses import dataclass

import torch
from torch import nn


class QuantError(ValueError):
    """A quantized layer this code cannot decode; the message names the layer and its format."""


# ----------------------------------------------------------------------------- decoders (torch, any device)

def unblock(scales, rows, cols):
    """The [rows, cols] scale matrix stored in the blocked layout (any shape holding its whole tiles; bytes: 8-bit float
    dtypes lack some copy kernels)."""
    tile_rows, tile_cols = -(-rows // 128), -(-cols // 4)
    tiles = scales.reshape(tile_rows, tile_cols, 32, 4, 4)  # tile row, tile column, b, a, c
    return tiles.permute(0, 3, 2, 1, 4).reshape(tile_rows * 128, tile_cols * 4)[:rows, :cols]


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_TABLES = {}


def _e2m1_table(device):
    """The 16 e2m1 codes' values (bit 3 the sign) as float32 on `device`, made once per device."""
    if device not in _E2M1_TABLES:
        _E2M1_TABLES[device] = torch.tensor(_E2M1 + tuple(-v for v in _E2M1), device=device)
    return _E2M1_TABLES[device]


def _per_tensor(t):
    scale = t["weight_scale"].float()
    return t["weight"].float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)


def _blocks(values, block_scales, size):
    """values [rows, cols] times one scale per `size` values of a row (block_scales [rows, cols / size])."""
    rows, cols = values.shape
    return (values.reshape(rows, cols // size, size) * block_scales.unsqueeze(-1)).reshape(rows, cols)


def _nvfp4(t):
    packed = t["weight"]
    rows, cols = packed.shape[0], packed.shape[1] * 2
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(rows, cols)
    values = _e2m1_table(packed.device)[codes.long()]
    block = unblock(t["weight_scale"].view(torch.uint8), rows, cols // 16).view(torch.float8_e4m3fn).float()
    return _blocks(values, t["weight_scale_2"].float() * block, 16)


def _mxfp8(t):
    data = t["weight"]
    exponents = unblock(t["weight_scale"].view(torch.uint8), data.shape[0], data.shape[1] // 32)
    return _blocks(data.float(), (exponents.int() << 23).view(torch.float32), 32)


@dataclass(frozen=True)
class Format:
    storage: torch.dtype  # the dtype of the `weight` tensor in the file
    scales: tuple  # scale tensors the format needs
    block: int  # values per block scale along a row (data padded to it), 0: one scale per tensor
    decode: object  # {name: tensor} -> float32 matrix as stored (padding included)


FORMATS = {
    "float8_e4m3fn": Format(torch.float8_e4m3fn, ("weight_scale",), 0, _per_tensor),
    "float8_e5m2": Format(torch.float8_e5m2, ("weight_scale",), 0, _per_tensor),
    "int8_tensorwise": Format(torch.int8, ("weight_scale",), 0, _per_tensor),
    "nvfp4": Format(torch.uint8, ("weight_scale", "weight_scale_2"), 16, _nvfp4),
    "mxfp8": Format(torch.float8_e4m3fn, ("weight_scale",), 32, _mxfp8),
}
OPTIONAL = ("pre_quant_scale",)


def dequantize(qtype, tensors, shape, dtype=torch.float32):
    """A `qtype` matrix ({"weight": data, scales...}) decoded to `shape` in `dtype` (math in float32)."""
    weight = FORMATS[qtype].decode(tensors)[: shape[0], : shape[1]]
    pre = tensors.get("pre_quant_scale")
    if pre is not None:
        weight = weight * pre.float()
    return weight.to(dtype)


# ----------------------------------------------------------------------------- packed weights

class PackedWeight:
    """A matrix kept as stored: `tensors` ("weight" and what decodes it), its format `qtype`, its logical `shape`, and
    `patches`, functions applied in order to the decoded weight (LoRAs merged at use). Not a tensor: only a
    `QuantLinear` takes it (and shape readers such as WanDiT.config_from_state_dict). Subclasses give `decode`."""

    def __init__(self, qtype, shape, tensors, patches=()):
        self.qtype, self.shape, self.tensors, self.patches = qtype, torch.Size(shape), dict(tensors), tuple(patches)

    @staticmethod
    def decode(qtype, tensors, shape, dtype):
        raise NotImplementedError

    def fits(self, shape):
        """Whether a layer of `shape` [out, in] can hold this matrix."""
        return tuple(self.shape) == tuple(shape)

    def dequantize(self, dtype=torch.float32):
        weight = self.decode(self.qtype, self.tensors, self.shape, dtype)
        for patch in self.patches:
            weight = patch(weight)
        return weight

    def with_patch(self, patch):
        """A copy that applies `patch` (a function of the decoded weight) after the ones it has."""
        out = copy.copy(self)
        out.patches = self.patches + (patch,)
        return out

    def __repr__(self):
        return f"{type(self).__name__}({self.qtype}, {tuple(self.shape)})"


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


class QuantWeight(PackedWeight):
    """A matrix in one of ComfyUI's FORMATS. `shape` is the stored data's (nvfp4: two values a byte)."""
    decode = staticmethod(dequantize)

    def fits(self, shape):
        block = FORMATS[self.qtype].block
        return tuple(self.shape) == tuple(_round_up(n, block) if block else n for n in shape)

    @classmethod
    def of(cls, layer, conf, tensors):
        """The layer's weight from its ComfyUI entry (`conf`, e.g. {"format": "nvfp4"}) and its tensors ({"weight": ...,
        "weight_scale": ..., ...}), checked: a format this code does not decode, a missing scale, a wrong storage dtype
        or scale count is a QuantError naming the layer and the format."""
        qtype, params = conf.get("format"), conf.get("params")
        rotated = conf.get("convrot") or isinstance(params, dict) and params.get("convrot")
        if not isinstance(qtype, str) or qtype not in FORMATS or rotated:
            name = f"{qtype} with a ConvRot rotation" if qtype in FORMATS else repr(qtype)
            raise QuantError(f"layer '{layer}' is quantized as {name}, which Wan Lean does not decode (it reads "
                             f"{', '.join(FORMATS)}): use a bf16/fp16/fp8 or GGUF file of the model")
        fmt, weight = FORMATS[qtype], tensors["weight"]
        missing = [s for s in fmt.scales if s not in tensors]
        if missing:
            raise QuantError(f"layer '{layer}' is {qtype} but the file has no {layer}.{missing[0]}: the file is "
                             "incomplete or damaged: download it again")
        if weight.dtype != fmt.storage or weight.ndim != 2:
            raise QuantError(f"layer '{layer}' is declared {qtype} (a 2-D {str(fmt.storage)[6:]} matrix) but stored "
                             f"as {str(weight.dtype)[6:]} {list(weight.shape)}: the file is damaged")
        shape = (weight.shape[0], weight.shape[1] * (2 if qtype == "nvfp4" else 1))
        _check_scale_counts(layer, qtype, tensors, shape)
        return cls(qtype, shape, {k: v for k, v in tensors.items() if k in ("weight", *fmt.scales, *OPTIONAL)})


def _check_scale_counts(layer, qtype, tensors, shape):
    fmt, (rows, cols) = FORMATS[qtype], shape
    if fmt.block:
        want = {"weight_scale": _round_up(rows, 128) * _round_up(cols // fmt.block, 4), "weight_scale_2": 1}
    else:
        want = {"weight_scale": (1, rows)}
    for name, count in want.items():
        have = tensors[name].numel() if name in tensors else None
        if have is not None and have not in (count if isinstance(count, tuple) else (count,)):
            raise QuantError(f"layer '{layer}' is {qtype} {list(shape)} but its {name} holds {have} values "
                             f"(expected {count}): the file is damaged")


def unpack(sd, dtype):
    """sd with every QuantWeight decoded to a plain tensor in `dtype` (GGUF blocks stay packed)."""
    return {k: v.dequantize(dtype) if isinstance(v, QuantWeight) else v for k, v in sd.items()}


def quant_summary(sd):
    """'nvfp4 x120, Q4_K x8' for the packed weights of a state dict ('' when none)."""
    counts = {}
    for v in sd.values():
        if isinstance(v, PackedWeight):
            counts[v.qtype] = counts.get(v.qtype, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


def read_layer_entry(key, value):
    """A `<layer>.comfy_quant` entry (uint8 tensor of JSON bytes) as a dict, or a QuantError."""
    try:
        conf = json.loads(value.cpu().numpy().tobytes())
    except (ValueError, TypeError, AttributeError) as e:
        raise QuantError(f"'{key}' is not ComfyUI's JSON layer entry ({e}): the file is damaged") from e
    if not isinstance(conf, dict):
        raise QuantError(f"'{key}' holds {type(conf).__name__}, not ComfyUI's layer entry (a JSON object)")
    return conf


def layer_entry(conf):
    """A layer's configuration as ComfyUI stores it in a `<layer>.comfy_quant` entry (JSON bytes in a uint8 tensor)."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


# ----------------------------------------------------------------------------- layers

class QuantLinear:
    """Mixin for a Linear class: a `PackedWeight` at the layer's `weight` key in a loaded state dict becomes the layer's
    stored tensors (its `weight` parameter and one parameter per scale, so they move, offload and count with the
    layer), plus `qtype` / `qshape`; `dequantized_weight` decodes them at use. Other weights load as usual."""
    qtype = None
    qshape = None
    qnames = ()
    qdecode = None
    qpatches = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        value = state_dict.get(prefix + "weight")
        if isinstance(value, PackedWeight):
            state_dict = {**state_dict, **self._adopt(value, prefix)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _adopt(self, value, prefix):
        shape = (self.out_features, self.in_features)
        if not value.fits(shape):
            raise ValueError(f"'{prefix}weight' is {value.qtype} {tuple(value.shape)} in the file but the layer is "
                             f"{shape}: the file is another model variant")
        self.qtype, self.qshape, self.qnames = value.qtype, torch.Size(shape), tuple(value.tensors)
        self.qdecode, self.qpatches = value.decode, value.patches
        for name, tensor in value.tensors.items():
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))
        return {prefix + name: tensor for name, tensor in value.tensors.items()}

    def dequantized_weight(self, dtype, device):
        """The weight in `dtype` on `device` (a packed one decoded there, its patches applied)."""
        if self.qtype is None:
            return self.weight.to(device, non_blocking=True).to(dtype)
        tensors = {name: getattr(self, name).to(device, non_blocking=True) for name in self.qnames}
        weight = self.qdecode(self.qtype, tensors, self.qshape, dtype)
        for patch in self.qpatches:
            weight = patch(weight)
        return weight
