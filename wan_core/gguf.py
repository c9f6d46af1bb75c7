"""GGUF checkpoints, kept quantised and dequantised one layer at a time when that layer runs.

Layout read (city96's Wan GGUFs, which ComfyUI-GGUF loads): `general.architecture` "wan", tensor names =
the official keys, matrices in any ggml block type below, 1D tensors, `.modulation` and the 5D
`patch_embedding.weight` in F32/F16 (the 5D one stored with its 5D shape), and optional
`comfy.gguf.orig_shape.<name>` INT32 arrays for tensors that were flattened before quantising.

Matrices (2D `.weight` tensors) stay as raw blocks in a `GGUFWeight`; every other tensor is dequantised once
when read. `QuantLinear` adopts a `GGUFWeight` when a state dict is loaded and dequantises it in forward:
`make_ops()` builds plain-torch layers on it, nodes/ops.py ComfyUI's casting layers.

The `gguf` package (from the registry) reads and writes the container; the dequantisers here are torch
code (they run on the weights' device). Writing K-quants (Q4_K, Q5_K) is done here too, because the `gguf`
package only quantises the 32-value block types.
"""
import types
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

QK_K = 256
# ggml block type -> (values per block, bytes per block)
BLOCK_TYPES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}
FLOAT_TYPES = ("F32", "F16", "BF16")


class GGUFError(ValueError):
    """A GGUF file this loader cannot use; the message says why."""


class GGUFWeight:
    """A matrix as raw ggml blocks (uint8 [rows, bytes per row]) with its type and logical shape.
    Not a tensor: only `QuantLinear` takes it (and shape readers such as WanDiT.config_from_state_dict)."""

    def __init__(self, raw, qtype, shape):
        self.raw, self.qtype, self.shape = raw, qtype, torch.Size(shape)

    def dequantize(self, dtype=torch.float32):
        return dequantize(self.raw, self.qtype, self.shape, dtype)

    def __repr__(self):
        return f"GGUFWeight({self.qtype}, {tuple(self.shape)})"


# ----------------------------------------------------------------------------- dequantisers (torch)

def _half(b):
    """[n, 2] uint8 -> [n, 1] float32 (a little-endian fp16 field)."""
    return b.contiguous().view(torch.float16).float()


def _low_high(qs):
    """[n, k, m] bytes -> [n, k, 2, m] nibbles (low nibbles first)."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _bit_planes(b, count):
    """[n, m] bytes -> [n, count, m]: plane k holds bit k of every byte."""
    shifts = torch.arange(count, dtype=torch.uint8, device=b.device).view(1, count, 1)
    return (b.unsqueeze(1) >> shifts) & 1


def _crumbs(b):
    """[n, k, m] bytes -> [n, k, 4, m] two-bit fields (bits 0-1 first)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    return (b.unsqueeze(2) >> shifts) & 3


def _q32(b, signed_offset, with_min, five_bit):
    """Q4_0 / Q4_1 / Q5_0 / Q5_1: fp16 d (+ fp16 m), (4 bytes of 5th bits), 16 bytes of nibbles."""
    d, pos = _half(b[:, :2]), 2
    m = None
    if with_min:
        m, pos = _half(b[:, 2:4]), 4
    high = None
    if five_bit:
        high, pos = _bit_planes(b[:, pos:pos + 4], 8).transpose(1, 2).reshape(-1, 32), pos + 4
    q = _low_high(b[:, None, pos:]).reshape(-1, 32)
    if high is not None:
        q = q | (high << 4)
    q = q.float() - signed_offset
    return d * q if m is None else d * q + m


def _q8_0(b):
    return _half(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _k_scales(s):
    """The 12 packed bytes of Q4_K / Q5_K -> (scales, mins), each [n, 8] of 6-bit values."""
    s = s.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat([a & 63, (c & 15) | ((a >> 2) & 48)], dim=1)
    mins = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 48)], dim=1)
    return scales.float(), mins.float()


def _q4_k(b, five_bit=False):
    d, dmin = _half(b[:, :2]), _half(b[:, 2:4])
    scales, mins = _k_scales(b[:, 4:16])
    pos = 16
    q = None
    if five_bit:
        q, pos = _bit_planes(b[:, 16:48], 8) << 4, 48
    low = _low_high(b[:, pos:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q = low if q is None else low | q
    return ((d * scales)[..., None] * q.float() - (dmin * mins)[..., None]).reshape(-1, QK_K)


def _q6_k(b):
    low = (_low_high(b[:, :128].reshape(-1, 2, 64))).reshape(-1, 8, 32)
    high = _crumbs(b[:, 128:192].reshape(-1, 2, 32)).reshape(-1, 8, 32)
    q = ((low | (high << 4)).float() - 32).reshape(-1, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return ((_half(b[:, 208:210]) * scales)[..., None] * q).reshape(-1, QK_K)


def _q2_k(b):
    scales, d, dmin = b[:, :16], _half(b[:, 80:82]), _half(b[:, 82:84])
    q = _crumbs(b[:, 16:80].reshape(-1, 2, 32)).reshape(-1, 16, 16).float()
    return ((d * (scales & 15).float())[..., None] * q - (dmin * (scales >> 4).float())[..., None]).reshape(-1, QK_K)


def _q3_k(b):
    hmask, s, d = b[:, :32], b[:, 96:108], _half(b[:, 108:110])
    low = _low_high(s[:, None, :8]).reshape(-1, 16)
    high = _crumbs(s[:, None, 8:]).reshape(-1, 16)
    scales = ((low | (high << 4)).float() - 32)
    q = _crumbs(b[:, 32:96].reshape(-1, 2, 32)).reshape(-1, 16, 16).to(torch.int8)
    missing_bit = (_bit_planes(hmask, 8).reshape(-1, 16, 16) ^ 1).to(torch.int8) << 2
    return ((d * scales)[..., None] * (q - missing_bit).float()).reshape(-1, QK_K)


_DEQUANT = {
    "Q4_0": lambda b: _q32(b, 8, False, False), "Q4_1": lambda b: _q32(b, 0, True, False),
    "Q5_0": lambda b: _q32(b, 16, False, True), "Q5_1": lambda b: _q32(b, 0, True, True),
    "Q8_0": _q8_0, "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k,
    "Q5_K": lambda b: _q4_k(b, five_bit=True), "Q6_K": _q6_k,
}


def dequantize(raw, qtype, shape, dtype=torch.float32):
    """Raw ggml blocks (uint8, any shape holding whole blocks) -> a `shape` tensor in `dtype`."""
    if qtype not in _DEQUANT:
        raise GGUFError(f"GGUF tensor type {qtype} is not supported (supported: {', '.join(_DEQUANT)}, F32, F16, BF16)")
    blocks = raw.reshape(-1, BLOCK_TYPES[qtype][1])
    return _DEQUANT[qtype](blocks).reshape(shape).to(dtype)


# ----------------------------------------------------------------------------- reading

def _orig_shape(reader, name):
    field = reader.get_field(f"comfy.gguf.orig_shape.{name}")
    return None if field is None else tuple(int(field.parts[i][0]) for i in field.data)


def read_gguf(path, keep_quantized=True):
    """(state dict, architecture) of a GGUF file, keys as stored. Matrices in block types become `GGUFWeight`s
    (or dense float32 tensors when not keep_quantized); every other tensor is dense, F16/BF16 kept as such."""
    import gguf  # the registry package; only needed for GGUF files
    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture")
    sd = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = _orig_shape(reader, t.name) or tuple(int(n) for n in reversed(t.shape))
        with warnings.catch_warnings():  # copy out of the read-only memory map
            warnings.simplefilter("ignore")
            data = torch.from_numpy(np.array(t.data))
        if qtype in ("F32", "F16"):
            sd[t.name] = data.reshape(shape)
        elif qtype == "BF16":
            sd[t.name] = data.view(torch.bfloat16).reshape(shape)
        elif qtype in BLOCK_TYPES:
            weight = GGUFWeight(data, qtype, shape)
            matrix = keep_quantized and len(shape) == 2 and t.name.endswith(".weight")
            sd[t.name] = weight if matrix else weight.dequantize()
        else:
            raise GGUFError(f"'{t.name}' is stored as GGUF type {qtype}, which this loader does not read "
                             f"(supported: {', '.join(FLOAT_TYPES + tuple(BLOCK_TYPES))}); use another quantisation of the model")
    return sd, (arch.contents() if arch is not None else None)


def quant_summary(sd):
    """'Q4_K x120, Q6_K x8' for the quantised weights of a state dict ('' when none)."""
    counts = {}
    for v in sd.values():
        if isinstance(v, GGUFWeight):
            counts[v.qtype] = counts.get(v.qtype, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


# ----------------------------------------------------------------------------- layers

class QuantLinear:
    """Mixin for a Linear class: a `GGUFWeight` in the loaded state dict becomes a raw uint8 parameter plus
    `qtype`/`qshape`; `dequantized_weight` expands it at use. Other weights load as usual."""
    qtype = None
    qshape = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        value = state_dict.get(prefix + "weight")
        if isinstance(value, GGUFWeight):
            if tuple(value.shape) != (self.out_features, self.in_features):
                raise ValueError(f"'{prefix}weight' is {tuple(value.shape)} in the GGUF file but the layer is "
                                 f"{(self.out_features, self.in_features)}: the file is another model variant")
            self.qtype, self.qshape = value.qtype, value.shape
            self.weight = nn.Parameter(value.raw, requires_grad=False)
            state_dict = {**state_dict, prefix + "weight": value.raw}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantized_weight(self, dtype, device):
        weight = self.weight.to(device, non_blocking=True)
        if self.qtype is None:
            return weight.to(dtype)
        return dequantize(weight, self.qtype, self.qshape, dtype)


class Linear(QuantLinear, nn.Linear):
    """Plain-torch Linear for GGUF state dicts: weight dequantised (and bias cast) to the input's dtype."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x)
        return F.linear(x, self.dequantized_weight(x.dtype, x.device), bias)


def make_ops(base=nn):
    """An ops namespace for the core models (WanDiT) holding GGUF weights without ComfyUI: `Linear`
    dequantises at use; the other layers come from `base`."""
    return types.SimpleNamespace(Linear=Linear, Conv1d=base.Conv1d, Conv2d=base.Conv2d, Conv3d=base.Conv3d,
                                 LayerNorm=base.LayerNorm, Embedding=base.Embedding)


# ----------------------------------------------------------------------------- writing (smoke files, tests)

def _pack_k(x, five_bit):
    """float32 [n, 256] -> Q4_K / Q5_K blocks [n, 144 / 176] (min/max per 32 values, 6-bit scales and mins)."""
    levels = 31 if five_bit else 15
    sub = x.reshape(-1, 8, 32)
    lo, hi = np.minimum(sub.min(-1), 0), np.maximum(sub.max(-1), 0)
    scale, mins = (hi - lo) / levels, -lo
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.rint(scale / d.astype(np.float32))).clip(0, 63).astype(np.uint8)
        mn = np.nan_to_num(np.rint(mins / dmin.astype(np.float32))).clip(0, 63).astype(np.uint8)
        step = (d.astype(np.float32) * sc)[..., None]
        q = np.nan_to_num(np.rint((sub + (dmin.astype(np.float32) * mn)[..., None]) / step))
    q = q.clip(0, levels).astype(np.uint8)
    packed = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
    parts = [d.view(np.uint8), dmin.view(np.uint8), packed]
    if five_bit:
        parts.append(((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8))
    q = (q & 15).reshape(-1, 4, 2, 32)
    parts.append((q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128))
    return np.concatenate(parts, axis=1)


def _pack_q6_k(x):
    """float32 [n, 256] -> Q6_K blocks [n, 210]: 6-bit values (4 low bits, 2 high bits) around 32, an int8 scale per
    16 values, an fp16 d."""
    sub = x.reshape(-1, 16, 16)
    amax = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]
    scale = -amax / 32  # the largest magnitude maps to -32 (as llama.cpp's make_qx_quants does)
    d = (np.abs(scale).max(-1, keepdims=True) / 127).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.rint(scale / d.astype(np.float32))).clip(-128, 127).astype(np.int8)
        step = (d.astype(np.float32) * sc)[..., None]
        q = np.nan_to_num(np.rint(sub / step)).clip(-32, 31)
    q = (q + 32).astype(np.uint8).reshape(-1, 2, 128)  # per half: values 0..127
    low, high = q & 15, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    qh = sum(high[:, :, 32 * k:32 * (k + 1)] << (2 * k) for k in range(4)).astype(np.uint8).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)


def quantize(x, qtype):
    """float32 numpy array [..., k] -> ggml blocks (uint8 [..., bytes]); k a multiple of the type's block."""
    import gguf
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        rows = x.reshape(-1, QK_K).astype(np.float32)
        packed = _pack_q6_k(rows) if qtype == "Q6_K" else _pack_k(rows, qtype == "Q5_K")
        return packed.reshape(*x.shape[:-1], -1)
    return gguf.quants.quantize(x.astype(np.float32), gguf.GGMLQuantizationType[qtype])


# llama.cpp's general.file_type of a whole file (LlamaFileType), by its name's quantisation
FILE_TYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12, "Q4_K": 15,
              "Q5_K": 17, "Q6_K": 18}
_HIGHER = {"Q4_K": "Q6_K", "Q5_K": "Q6_K", "Q3_K": "Q5_K", "Q2_K": "Q4_K"}  # *_K_M: some tensors one step up
ROW = 256  # city96's converter re-shapes matrices into rows of 256 when their own rows do not split into blocks


def _tensor_type(key, x, qtype, mixed):
    """(GGML type, array to store, original shape or None) of one tensor in city96's layout."""
    if x.ndim < 2 or x.size <= 1024 or key.endswith(".modulation") or x.ndim > 4:
        return "F32", x, None
    if mixed and key.endswith(("self_attn.v.weight", "ffn.2.weight")):
        qtype = _HIGHER.get(qtype, qtype)
    block = BLOCK_TYPES[qtype][0]
    if x.shape[-1] % block == 0 and x.ndim == 2:
        return qtype, x, None
    if x.size % ROW == 0:  # every block type's size divides 256
        return qtype, x.reshape(-1, ROW), x.shape
    return "F16", x.astype(np.float16), None


def write_gguf(sd, path, qtype, arch="wan", mixed=False):
    """An official-key state dict as a Wan GGUF in city96's layout (his ComfyUI-GGUF convert script + llama.cpp's
    quantiser): general.architecture `arch`, quantization_version, file_type; 1D, small (<= 1024 values),
    `.modulation` and 5D tensors (the patch embedding, kept 5D as his fix_5d_tensors step does) in F32; matrices in
    `qtype`, re-shaped into rows of 256 with a `comfy.gguf.orig_shape.<key>` INT32 array where their rows do not
    split into blocks; mixed (the *_K_M files): `self_attn.v` and `ffn.2` one step higher."""
    import gguf
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(FILE_TYPES[qtype])
    for key, value in sd.items():
        kind, x, orig = _tensor_type(key, value.float().numpy(), qtype, mixed)
        if orig is not None:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(n) for n in orig])
        data = quantize(x, kind) if kind in BLOCK_TYPES else x
        writer.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
