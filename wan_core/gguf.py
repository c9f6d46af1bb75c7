"""GGUF checkpoints, kept quantised and dequantised one layer at a time when that layer runs.

Layout read (city96's Wan GGUFs, which ComfyUI-GGUF loads): `general.architecture` "wan", tensor names =
the official keys, matrices in any ggml block type below, 1D tensors, `.modulation` and the 5D
`patch_embedding.weight` in F32/F16 (the 5D one stored with its 5D shape), and optional
`comfy.gguf.orig_shape.<name>` INT32 arrays for tensors that were flattened before quantising.

Matrices (2D `.weight` tensors) stay as raw blocks in a `GGUFWeight` (a wan_core.quant.PackedWeight); every other
tensor is dequantised once when read. wan_core.quant.QuantLinear adopts a `GGUFWeight` when a state dict is loaded and
dequantises it in forward (plain-torch layers: wan_core.castops; ComfyUI's casting layers: nodes/ops.py).

The `gguf` package (from the registry) reads and writes the container; the dequantisers here are torch
code (they run on the weights' device). Writing K-quants (Q4_K, Q5_K) is done here too, because the `gguf`
package only quantises the 32-value block types.
"""
import warnings

import numpy as np
import torch

from .quant import PackedWeight

QK_K = 256
# ggml block type -> (values per block, bytes per block)
BLOCK_TYPES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}
FLOAT_TYPES = ("F32", "F16", "BF16")


class GGUFError(ValueError):
    """A GGUF file this loader cannot use; the message says why."""


class GGUFWeight(PackedWeight):
    """A matrix as raw ggml blocks (uint8 [rows, bytes per row]: its "weight" tensor), its type and logical shape."""

    def __init__(self, raw, qtype, shape):
        super().__init__(qtype, shape, {"weight": raw})

    @property
    def raw(self):
        return self.tensors["weight"]

    @staticmethod
    def decode(qtype, tensors, shape, dtype):
        return dequantize(tensors["weight"], qtype, shape, dtype)


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
