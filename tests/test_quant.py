"""ComfyUI's quantized formats: float8_e4m3fn / float8_e5m2 / int8_tensorwise (one scale per tensor), nvfp4 and mxfp8
(block scales in cuBLAS's tiled layout), in every file layout they come in.

- The test files' writer (fixtures.quant_writer) writes ComfyUI 0.33's bytes: equal, dtype, shape and byte for byte, to
  what ComfyUI's own conversion makes of the same tensor (`QuantizedTensor.from_float(w, <layout>,
  scale="recalculate")`, which runs comfy_kitchen's quantize_per_tensor_fp8 / quantize_nvfp4 / quantize_mxfp8 /
  quantize_int8_tensorwise) and its state_dict names; padded shapes included. Only where comfy_kitchen is installed
  (the 0.33.0 host).
- wan_core.quant's decoders equal comfy_kitchen's dequantize_* (float32 output) bit for bit (0.33.0 host).
- On both hosts: decoded weights lie within each format's rounding of the original (bounds in test_decoded_weights_*),
  and the negative controls (block scales in plain row-major order, nvfp4 nibbles swapped) break those bounds; the
  tiled layout is inverted exactly; every file layout (per-layer `comfy_quant` entries, the `_quantization_metadata`
  header, legacy scaled fp8 with its marker rules, Kijai's marker-less scaled fp8, the new scale names without an entry)
  gives the same packed weights; formats this code does not decode, missing scales and damaged entries are refused with
  a message naming the layer and the format. Whole models through the loader nodes and the server: tests/test_zoo.py.
"""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import import_comfy
from fixtures import quant_writer as qw
from fixtures.variants import to_scaled_fp8
from wan_core import convert, quant
from wan_core.checkpoint import CheckpointError, load_dit, read_file

FORMATS = list(quant.FORMATS)
LAYOUTS = {"float8_e4m3fn": "TensorCoreFP8E4M3Layout", "float8_e5m2": "TensorCoreFP8E5M2Layout",
           "int8_tensorwise": "TensorWiseINT8Layout", "nvfp4": "TensorCoreNVFP4Layout",
           "mxfp8": "TensorCoreMXFP8Layout"}


def weight(shape=(256, 128), dtype=torch.float32, seed=0):
    """N(0, 0.05) with row scales spread over e^(+-2) (so block scales differ), an all-zero block and a tiny negative
    value (e2m1 -0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05 * torch.randn(shape[0], 1, generator=g).exp()
    w[3, :32] = 0
    w[5, 0] = -1e-7
    return w.to(dtype)


@pytest.fixture(scope="module")
def kitchen():
    """comfy_kitchen (with the host's ComfyUI imported, for its layouts), or a skip where it is not installed."""
    import_comfy()
    return pytest.importorskip("comfy_kitchen", reason="comfy_kitchen comes with ComfyUI 0.33.0 (WANLEAN_HOST=0.33.0); "
                                                       "the 0.3.75 host has no quantized layouts to compare with")


def _bytes(t):
    return t.reshape(-1).view(torch.uint8) if t.element_size() == 1 else t.reshape(-1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_writer_bytes_equal_comfyui_conversion(kitchen, fmt):
    from comfy.quant_ops import QuantizedTensor
    for shape in ((256, 128), (40, 48), (130, 96)):  # the last two padded to whole blocks
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = weight(shape, dtype)
            ours = qw.QUANTIZERS[fmt](w)
            kwargs = {} if fmt == "mxfp8" else {"scale": "recalculate"}
            theirs = QuantizedTensor.from_float(w, LAYOUTS[fmt], **kwargs).state_dict("weight")
            assert set(theirs) == set(ours), (fmt, set(theirs), set(ours))
            for name, t in ours.items():
                assert (t.dtype, t.shape) == (theirs[name].dtype, theirs[name].shape), (fmt, shape, dtype, name)
                assert torch.equal(_bytes(t), _bytes(theirs[name])), (fmt, shape, dtype, name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoders_equal_comfy_kitchen(kitchen, fmt):
    from comfy_kitchen.backends.eager.quantization import dequantize_int8_simple
    stored = qw.QUANTIZERS[fmt](weight())
    w, s = stored["weight"], stored["weight_scale"]
    reference = {"nvfp4": lambda: kitchen.dequantize_nvfp4(w, stored["weight_scale_2"], s, torch.float32),
                 "mxfp8": lambda: kitchen.dequantize_mxfp8(w, s, torch.float32),
                 "int8_tensorwise": lambda: dequantize_int8_simple(w, s)}.get(
        fmt, lambda: kitchen.dequantize_per_tensor_fp8(w, s, torch.float32))()
    assert torch.equal(quant.dequantize(fmt, stored, (256, 128)), reference)


def _block_max(w, size):
    return w.abs().reshape(w.shape[0], -1, size).amax(-1).repeat_interleave(size, 1)


def _bound(fmt, w, stored):
    """Largest |decoded - w| each element may have: half a rounding step of the format at that value.
    e4m3 (3 mantissa bits): 2^-4 |w|, subnormals 2^-10 * scale; e5m2: 2^-3 |w|, 2^-17 * scale; int8: scale / 2;
    mxfp8: e4m3 within a power-of-two block scale (< 2 * block max / 448); nvfp4: the e2m1 step at the block's top
    (values 4..6 of the block scale s = block max / 6, rounded to e4m3: <= 1.07 s)."""
    scale, slack = stored["weight_scale"].float(), 1 + 1e-4  # slack: float32 rounding of the products
    bounds = {"nvfp4": lambda: 1.07 * _block_max(w, 16) / 6,
              "mxfp8": lambda: 2 ** -4 * w.abs() + 2 ** -10 * 2 * _block_max(w, 32) / 448,
              "float8_e4m3fn": lambda: 2 ** -4 * w.abs() + 2 ** -10 * scale,
              "float8_e5m2": lambda: 2 ** -3 * w.abs() + 2 ** -17 * scale,
              "int8_tensorwise": lambda: torch.full_like(w, scale.item() / 2)}
    return bounds[fmt]() * slack


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoded_weights_within_format_precision(fmt):
    """Measured (this weight, max |err| / max |w|): e4m3 3.6e-2, e5m2 7.0e-2, int8 3.9e-3, mxfp8 3.2e-2,
    nvfp4 1.35e-1."""
    w = weight()
    stored = qw.QUANTIZERS[fmt](w)
    err = (quant.dequantize(fmt, stored, w.shape) - w).abs()
    print(f"\n{fmt}: max |err| / max |w| = {(err.max() / w.abs().max()).item():.2e}")
    assert (err <= _bound(fmt, w, stored)).all(), f"{fmt}: {(err - _bound(fmt, w, stored)).max():.3e} over the bound"
    controls = {}
    if quant.FORMATS[fmt].block:
        rows, blocks = w.shape[0], w.shape[1] // quant.FORMATS[fmt].block
        scale = stored["weight_scale"]
        plain = qw.plain_layout(quant.unblock(scale.view(torch.uint8), rows, blocks).view(scale.dtype))
        controls["unswizzled"] = {**stored, "weight_scale": plain}
    if fmt == "nvfp4":
        controls["nibbles swapped"] = {**stored, "weight": stored["weight"] << 4 | stored["weight"] >> 4}
    for name, damaged in controls.items():
        wrong = (quant.dequantize(fmt, damaged, w.shape) - w).abs()
        assert (wrong > _bound(fmt, w, stored)).any(), f"{fmt} {name}: decodes within the bound"


def test_blocked_layout_tiles_and_inverse():
    """Element (32a + b, c) of each 128 x 4 tile at (b, 4a + c) of a 32 x 16 one, tiles row by row; unblock inverts
    it for shapes that need padding."""
    ids = torch.arange(256 * 8).reshape(256, 8) % 251
    tiled = qw.block_layout(ids.to(torch.uint8))
    for tile_row, tile_col, a, b, c in ((0, 0, 0, 0, 0), (1, 1, 3, 31, 3), (0, 1, 2, 5, 1), (1, 0, 1, 17, 2)):
        tile = tiled.reshape(2, 2, 32, 16)[tile_row, tile_col]  # tiles row by row: (tile row, tile column)
        assert tile[b, 4 * a + c] == ids[128 * tile_row + 32 * a + b, 4 * tile_col + c]
    odd = torch.randint(0, 255, (130, 5), dtype=torch.uint8)
    assert torch.equal(quant.unblock(qw.block_layout(odd), 130, 5), odd)
    assert not torch.equal(quant.unblock(qw.plain_layout(odd), 130, 5), odd)  # negative control


# ----------------------------------------------------------------------------- file layouts

LAYER = "blocks.0.ffn.0"


def _save_path(tmp_path, tensors, metadata=None, name="f.safetensors"):
    path = os.path.join(tmp_path, name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def _small_sd():
    return {f"{LAYER}.weight": weight((64, 64)), f"{LAYER}.bias": torch.randn(64),
            "head.modulation": torch.randn(1, 2, 8)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_entries_and_header_give_the_same_weights(tmp_path, fmt):
    sd = _small_sd()
    expected = qw.QUANTIZERS[fmt](sd[f"{LAYER}.weight"].to(torch.bfloat16))
    decoded = quant.dequantize(fmt, expected, (64, 64))
    for layout in (dict(entries=True), dict(entries=False, header=True), dict(entries=True, header=True)):
        tensors, meta = qw.comfy_quant_file(sd, lambda key: fmt, **layout)
        packed = convert.pack_quantized(read_file(_save_path(tmp_path, tensors, meta)))
        q = packed[f"{LAYER}.weight"]
        assert isinstance(q, quant.QuantWeight) and q.qtype == fmt and tuple(q.shape) == (64, 64)
        assert torch.equal(q.dequantize(), decoded), layout
        assert packed["head.modulation"].dtype == torch.bfloat16 and not any(k.endswith("comfy_quant") for k in packed)


def test_entry_wins_over_header_and_prefixed_header_names(tmp_path):
    sd = _small_sd()
    tensors, _ = qw.comfy_quant_file(sd, lambda key: "mxfp8", rename=lambda k: "model.diffusion_model." + k)
    header = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
        f"model.diffusion_model.{LAYER}": {"format": "nvfp4"}}})}
    raw = read_file(_save_path(tmp_path, tensors, header))
    assert json.loads(raw[f"model.diffusion_model.{LAYER}.comfy_quant"].numpy().tobytes()) == {"format": "mxfp8"}
    no_entry = {k: v for k, v in tensors.items() if not k.endswith("comfy_quant")}
    header["_quantization_metadata"] = header["_quantization_metadata"].replace("nvfp4", "mxfp8")
    raw = read_file(_save_path(tmp_path, no_entry, header, "h.safetensors"))
    from wan_core.keys import strip_prefix
    assert convert.pack_quantized(strip_prefix(raw, "model.diffusion_model."))[f"{LAYER}.weight"].qtype == "mxfp8"


def test_legacy_scaled_fp8_layouts():
    """ComfyUI's `scaled_fp8` marker (its dtype the format, float32 meaning e4m3fn; 2 elements: no input scales) and
    Kijai's marker-less files read as per-tensor fp8 of the weights' own dtype (ComfyUI's convert_old_quants calls every
    one e4m3fn); input scales dropped; the new `weight_scale` name without an entry the same; a scale on a 16-bit
    weight folded into it; embedding tables decoded."""
    sd = _small_sd()
    legacy = to_scaled_fp8(sd)
    legacy[f"{LAYER}.scale_input"] = torch.tensor(0.5)
    reference = legacy[f"{LAYER}.weight"].float() * legacy[f"{LAYER}.scale_weight"]
    for marker in (torch.empty(0, dtype=torch.float8_e4m3fn), torch.zeros(1), torch.zeros(2), None):
        files = {**legacy, "scaled_fp8": marker} if marker is not None else {k: v for k, v in legacy.items()
                                                                            if k != "scaled_fp8"}
        packed = convert.pack_quantized(files)
        assert set(packed) == {f"{LAYER}.weight", f"{LAYER}.bias", "head.modulation"}
        q = packed[f"{LAYER}.weight"]
        assert q.qtype == "float8_e4m3fn" and torch.equal(q.dequantize(), reference)
    e5m2 = to_scaled_fp8(sd, torch.float8_e5m2)
    assert convert.pack_quantized({**e5m2, "scaled_fp8": torch.zeros(1)})[f"{LAYER}.weight"].qtype == "float8_e5m2"
    renamed = {k.replace("scale_weight", "weight_scale"): v for k, v in legacy.items() if k != "scaled_fp8"}
    assert torch.equal(convert.pack_quantized(renamed)[f"{LAYER}.weight"].dequantize(), reference)
    half = sd[f"{LAYER}.weight"].half()
    plain = {f"{LAYER}.weight": half, f"{LAYER}.scale_weight": torch.tensor(2.0)}
    assert torch.equal(convert.pack_quantized(plain)[f"{LAYER}.weight"], (half.float() * 2).half())
    forced = {"token_embedding.weight": qw.quantize_fp8(weight((32, 64)))["weight"],
              "token_embedding.weight_scale": torch.tensor(0.01)}
    assert convert.pack_quantized(forced)["token_embedding.weight"].dtype == torch.bfloat16  # decoded at load


@pytest.mark.parametrize("entry,tensors,message", [
    ({"format": "convrot_w4a4"}, {}, r"'blocks.0.ffn.0' is quantized as 'convrot_w4a4', which Wan Lean does not "
                                     r"decode \(it reads float8_e4m3fn, .*mxfp8\)"),
    ({"format": "asym_w4a8_int8"}, {}, r"quantized as 'asym_w4a8_int8'"),
    ({"format": "int8_tensorwise", "convrot": True}, {}, r"int8_tensorwise with a ConvRot rotation"),
    ({"format": "nvfp4"}, {"weight_scale_2": None}, r"is nvfp4 but the file has no blocks.0.ffn.0.weight_scale_2"),
    ({"format": "mxfp8"}, {"weight_scale": None}, r"is mxfp8 but the file has no blocks.0.ffn.0.weight_scale"),
    ({"format": "float8_e4m3fn"}, {"weight_scale": None}, r"float8_e4m3fn but the file has no .*weight_scale"),
    ({"format": "nvfp4"}, {"weight": torch.zeros(64, 32, dtype=torch.int8)}, r"declared nvfp4 .* stored as int8"),
    ({"format": "mxfp8"}, {"weight_scale": torch.zeros(7, dtype=torch.uint8)}, r"weight_scale holds 7 values"),
])
def test_refusals_name_the_layer_and_format(entry, tensors, message):
    fmt = entry["format"] if entry["format"] in quant.FORMATS else "nvfp4"
    stored = {f"{LAYER}.{k}": v for k, v in qw.QUANTIZERS[fmt](weight((64, 64))).items()}
    for name, value in tensors.items():
        stored.pop(f"{LAYER}.{name}")
        if value is not None:
            stored[f"{LAYER}.{name}"] = value
    stored[f"{LAYER}.comfy_quant"] = quant.layer_entry(entry)
    with pytest.raises(quant.QuantError, match=message):
        convert.pack_quantized(stored)


def test_damaged_entries_and_header_are_named(tmp_path):
    stored = {f"{LAYER}.weight": weight((64, 64)), "head.modulation": torch.zeros(1, 6, 8),
              "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2),
              f"{LAYER}.comfy_quant": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    with pytest.raises(quant.QuantError, match="not ComfyUI's JSON layer entry"):
        convert.pack_quantized(stored)
    stored.pop(f"{LAYER}.comfy_quant")
    path = _save_path(tmp_path, stored, {"_quantization_metadata": '{"layers": 3}'}, "wan_bad_header.safetensors")
    with pytest.raises(CheckpointError, match="'wan_bad_header.safetensors': its _quantization_metadata header is not"):
        load_dit(path)
    stored[f"{LAYER}.comfy_quant"] = quant.layer_entry({"format": "svdquant_w4a4"})
    with pytest.raises(CheckpointError, match=r"'wan_svd.safetensors': layer 'blocks.0.ffn.0' is quantized as "
                                              r"'svdquant_w4a4'"):
        load_dit(_save_path(tmp_path, stored, None, "wan_svd.safetensors"))
