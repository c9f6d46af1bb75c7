"""The file zoo (tests/zoo.py): every checkpoint file a user really has, as its publisher lays it out, against the
fp32 original it was made from.

Every row goes through its loader node's own load() in-process (WanLeanModelLoader, WanLeanTextEncoderLoader,
WanLeanVAELoader, WanLeanCLIPVisionLoader, WanLeanAudioEncoderLoader, and WanLeanLoraLoader on the fp32 original
model, patches applied as ComfyUI's ModelPatcher applies them), with ComfyUI's folder_paths pointing at the zoo. Its
output — a DiT / S2V forward, a umT5 encoding, a VAE decode, CLIP tokens, wav2vec2 hidden states — is compared with
the fp32 original's (plain wan_core classes; for LoRAs the original with the fp32 factors merged by hand): max abs
difference over the original's max abs output, within the row precision's stated error (zoo.TOLERANCE). Files the
pack does not run are refused with a message naming them and what runs them.

Through the shared ComfyUI server (test_zoo_rows_through_server, the rows marked server=True: the T2V-type families
in every layout and precision — ComfyUI fp16 / fp8_e4m3fn / fp8_scaled, Kijai's scaled_KJ, GGUF Q4_K_M, official
shards, a diffusers folder, Wan 2.2 T2V expert and TI2V-5B — both ComfyUI umT5 files and Kijai's official-key one,
and one LoRA of each dialect): one prompt, one chain per row, loader -> (Wan Load LoRA) -> Wan Text Encode ->
Wan Sampler (2 steps) -> SaveLatent, each latent compared with the same chain on the fp32 original. Image, speech
and audio-encoder families need conditioning graphs of their own, so they run in-process only.

The measured figures go to .smoke/zoo-figures.json; `.venv/bin/python tests/zoo.py` prints the README table from it.
"""
import json
import os

import pytest
import torch

from conftest import SMOKE_MODELS, import_comfy
from test_lora import merged_by_hand, pack_module
from wan_core.clip import WanCLIPVision
from wan_core.dit import WanDiT
from wan_core.s2v import WanS2V
from wan_core.t5 import UMT5Encoder, encode_text
from wan_core.tokenizer import UMT5Tokenizer
from wan_core.vae import WanVAE21
from wan_core.vae22 import WanVAE22
from wan_core.wav2vec2 import Wav2Vec2
from workflow_api import combo_options

import zoo

FIGURES = os.path.join(os.path.dirname(SMOKE_MODELS), "zoo-figures.json")
PROMPTS = ["a red fox runs across a snowy forest", "一只红色的狐狸"]
_MEASURED = {}


def record(name, value, where="node"):
    _MEASURED.setdefault(name, {})[where] = value
    old = json.load(open(FIGURES)) if os.path.exists(FIGURES) else {}
    old.setdefault(name, {})[where] = value
    with open(FIGURES, "w") as f:
        json.dump(old, f, indent=1, sort_keys=True)


@pytest.fixture(scope="session")
def zoo_dir(smoke_models):
    """The smoke models folder with ComfyUI's folder_paths (this process) seeing its zoo/ subfolders; each test writes
    the rows it needs (zoo.write_zoo)."""
    zoo.write_zoo(smoke_models, [])
    import_comfy()
    import folder_paths
    for folder in zoo.NODES:
        folder_paths.add_model_folder_path(folder, os.path.join(smoke_models, folder))
    return smoke_models


def rel(ours, ref):
    assert torch.isfinite(ours).all(), "non-finite output"
    assert ref.std() > 0, "constant reference"
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ----------------------------------------------------------------------------- outputs of each kind of model

def dit_inputs(model):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if hasattr(model, "casual_audio_encoder"):  # S2V (the node's model is of the pack's own module copy)
        return dict(x=r(1, 16, 3, 8, 8), t=torch.tensor([600.0]), context=r(1, 7, 64), audio=r(1, 25, 128, 12),
                    ref_latent=r(1, 16, 1, 8, 8))
    extra = {}
    x_channels = model.out_dim if model.in_dim != 48 else 48
    if model.in_dim > x_channels:
        extra["y"] = r(1, model.in_dim - x_channels, 3, 8, 8)
    if model.img_emb is not None:
        tokens = 514 if getattr(model.img_emb, "emb_pos", None) is not None else 257
        extra["clip"] = r(1, tokens, model.img_emb.proj[0].normalized_shape[0])
    return dict(x=r(1, x_channels, 3, 8, 8), t=torch.tensor([600.0]), context=r(1, 12, 64), **extra)


@torch.no_grad()
def run_model(kind, model, extra=None):
    g = torch.Generator().manual_seed(1)
    if kind == "dit":
        return model(**dit_inputs(model))
    if kind == "umt5":
        return torch.cat(encode_text(model, extra, PROMPTS))
    if kind == "vae":
        return model.decode(torch.randn(1, model.z_dim, 2, 4, 4, generator=g))
    if kind == "clip":
        return model(torch.rand(1, 3, 64, 48, generator=g) * 2 - 1)
    return model(torch.randn(1, 4000, generator=g) * 0.1)


def kind_of(row):
    return {"diffusion_models": "dit", "loras": "dit", "text_encoders": "umt5", "vae": "vae", "clip_vision": "clip",
            "audio_encoders": "wav2vec2"}[row.folder]


_REFERENCE = {}


def reference_output(row, lora=None):
    """The fp32 original's output (plain wan_core classes), with a LoRA's fp32 factors merged by hand."""
    key = (row.model, lora)
    if key not in _REFERENCE:
        sd, extra = zoo.original(row.model)
        kind = kind_of(row)
        if lora is not None:
            sd = merged_by_hand(sd, zoo.reference_lora(lora, sd), 1.0)
        if kind == "dit":
            model = (WanS2V if row.model == "s2v" else WanDiT).from_state_dict(sd)
        elif kind == "umt5":
            model, extra = UMT5Encoder.from_state_dict(sd), UMT5Tokenizer(extra)
        elif kind == "vae":
            model = (WanVAE21 if row.model == "vae-2.1" else WanVAE22).from_state_dict(sd)
        elif kind == "clip":
            model = WanCLIPVision.from_state_dict({"vision_model." + k: v for k, v in sd.items()})
        else:
            model = Wav2Vec2.from_state_dict(sd)
        _REFERENCE[key] = run_model(kind, model.eval(), extra)
    return _REFERENCE[key]


def node_load(row):
    """The row's file through its loader node's load(): the node's Handle."""
    if row.folder == "diffusion_models":
        return pack_module("loaders").WanLeanModelLoader.execute(row.path, "default")[0]
    if row.folder == "text_encoders":
        return pack_module("loaders").WanLeanTextEncoderLoader.execute(row.path)[0]
    if row.folder == "vae":
        return pack_module("loaders").WanLeanVAELoader.execute(row.path)[0]
    if row.folder == "clip_vision":
        return pack_module("image").WanLeanCLIPVisionLoader.execute(row.path)[0]
    return pack_module("s2v").WanLeanAudioEncoderLoader.execute(row.path)[0]


def node_output(row):
    if row.folder != "loras":
        handle = node_load(row)
        return run_model(kind_of(row), handle.patcher.model, handle.extra.get("tokenizer"))
    base = node_load(zoo.Row(f"reference/{row.model}_fp32.safetensors", "diffusion_models", "", row.model, "", "fp32"))
    patched = pack_module("lora").WanLeanLoraLoader.execute(base, row.path, 1.0)[0].patcher
    patched.patch_model()
    try:
        return run_model("dit", patched.model)
    finally:
        patched.unpatch_model()


def params(rows):
    """One row per (publisher, layout, precision, kind of file), and every server row, in the default suite; the
    other rows (the same layout for more model families) are marked slow."""
    seen, out = set(), []
    for row in rows:
        key = (row.publisher, row.layout, row.precision, row.folder)
        out.append(pytest.param(row, id=row.name, marks=() if row.server or key not in seen else pytest.mark.slow))
        seen.add(key)
    return out


@pytest.mark.parametrize("row", params(r for r in zoo.ZOO if not r.refused))
def test_zoo_row_through_its_loader_node(zoo_dir, row):
    zoo.write_zoo(zoo_dir, [row])
    ours = node_output(row)
    ref = reference_output(row, row if row.folder == "loras" else None)
    err = rel(ours, ref)
    record(row.name, err)
    assert err <= zoo.TOLERANCE[row.precision], f"{row.name}: error {err:.2e} > stated {zoo.TOLERANCE[row.precision]:.0e}"


@pytest.mark.parametrize("row", [r for r in zoo.ZOO if r.refused], ids=lambda r: r.name)
def test_unsupported_files_are_refused_by_name(zoo_dir, row):
    import re
    zoo.write_zoo(zoo_dir, [row])
    with pytest.raises(ValueError, match=re.escape(f"'{os.path.basename(row.name)}' ") + ".*" + row.refused):
        node_load(row)


def test_scaled_umt5_keeps_fp8_and_its_scales(zoo_dir):
    """The bug this zoo was started for: umt5_xxl_fp8_e4m3fn_scaled ran with its scales dropped (output off by 1.6x
    its own scale). The node now keeps the fp8 weights packed with their scales (wan_core.quant), decoded at use."""
    row = next(r for r in zoo.ZOO if r.name == "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    zoo.write_zoo(zoo_dir, [row])
    handle = node_load(row)
    q = handle.patcher.model.blocks[0].attn.q
    assert q.qtype == "float8_e4m3fn" and q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.item() != 1.0


def _negative_controls():
    """(row, damage) for every quantized row's damages that apply: scales dropped (every ComfyUI-layout row, one
    legacy scaled-fp8 DiT and the umT5), block scales unswizzled (nvfp4, mxfp8), nibbles swapped (nvfp4)."""
    legacy = {"Wan2_1-T2V-14B_fp8_e4m3fn_scaled_KJ.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"}
    out = []
    for row in zoo.ZOO:
        if row.layout in zoo.QUANT_LAYOUTS or row.name in legacy:
            out.append((row, "no_scales"))
        if "nvfp4" in row.precision or "mxfp8" in row.precision:
            out.append((row, "unswizzled"))
        if "nvfp4" in row.precision:
            out.append((row, "nibbles_swapped"))
    return [pytest.param(r, d, id=f"{d}-{r.name}") for r, d in out]


@pytest.mark.parametrize("row,damage", _negative_controls())
def test_quantized_rows_negative_controls(zoo_dir, row, damage):
    """Each quantized row's file with one thing wrong (zoo.DAMAGES) must fail: refused by the loader node with the
    layer and the missing scale named (a ComfyUI-layout file says which scales it has), or off the original by more
    than the row's stated error, or non-finite (a legacy scaled fp8 file without its scales is a plain fp8 file of
    weights up to 448 times too large; wrongly ordered block scales or nibbles load and compute wrong values)."""
    zoo.write_zoo(zoo_dir, [row])
    damaged = zoo.Row(zoo.write_damaged(zoo_dir, row, damage)[len("zoo/"):], row.folder, row.publisher, row.model,
                      row.layout, row.precision)
    if damage == "no_scales" and row.layout in zoo.QUANT_LAYOUTS:
        with pytest.raises(ValueError, match=r"layer '[\w.]+' is [\w+]+ but the file has no [\w.]+\.weight_scale"):
            node_output(damaged)
        return
    out = node_output(damaged)
    err = rel(out, reference_output(row)) if torch.isfinite(out).all() else float("inf")  # 448x weights overflow
    print(f"\n{damage} {row.name}: error {err:.2e} (stated {zoo.TOLERANCE[row.precision]:.0e})")
    assert err > zoo.TOLERANCE[row.precision], f"{damage} {row.name}: {err:.2e} passes as the intact file"


# ----------------------------------------------------------------------------- through the server

def _chain(api, tag, model_file, te_file, lora=None):
    """Nodes of one loader -> (LoRA) -> sampler -> SaveLatent chain; returns the SaveLatent node id."""
    api[f"{tag}_te"] = {"class_type": "WanLeanTextEncoderLoader", "inputs": {"text_encoder_name": te_file}}
    api[f"{tag}_enc"] = {"class_type": "WanLeanTextEncode", "inputs": {"text_encoder": [f"{tag}_te", 0],
                                                                      "prompt": PROMPTS[0], "negative_prompt": ""}}
    api[f"{tag}_model"] = {"class_type": "WanLeanModelLoader", "inputs": {"model_name": model_file,
                                                                        "weight_dtype": "default"}}
    model = [f"{tag}_model", 0]
    if lora:
        api[f"{tag}_lora"] = {"class_type": "WanLeanLoraLoader", "inputs": {"model": model, "lora_name": lora,
                                                                          "strength": 1.0}}
        model = [f"{tag}_lora", 0]
    api[f"{tag}_sample"] = {"class_type": "WanLeanSampler", "inputs": {
        "model": model, "positive": [f"{tag}_enc", 0], "negative": [f"{tag}_enc", 1], "seed": 3, "steps": 2,
        "cfg": 1.0, "shift": 5.0, "sampler": "unipc", "width": 64, "height": 64, "length": 5}}
    api[f"{tag}_save"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{tag}_sample", 0],
                                                               "filename_prefix": f"zoo/{tag}"}}
    return f"{tag}_save"


NEGATIVE_TE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"  # run through the server with its scales dropped too


def server_graph(rows):
    """(API prompt, {row name: (its SaveLatent id, the reference's)}) for `rows` (server rows, and a damaged one)."""
    ref_te = "zoo/reference/umt5_fp32.safetensors"
    ref_model = lambda fam: f"zoo/reference/{fam}_fp32.safetensors"  # noqa: E731
    api, pairs = {}, {}
    for i, row in enumerate(rows):
        if row.folder == "text_encoders":
            ours, ref = _chain(api, f"r{i}", ref_model("t2v-1.3B"), row.path), _chain(api, "ref_t2v-1.3B",
                                                                                      ref_model("t2v-1.3B"), ref_te)
        elif row.folder == "loras":
            ours = _chain(api, f"r{i}", ref_model(row.model), ref_te, lora=row.path)
            ref = _chain(api, f"ref{i}", zoo.merged_reference_path(row), ref_te)
        else:
            ours, ref = _chain(api, f"r{i}", row.path, ref_te), _chain(api, f"ref_{row.model}", ref_model(row.model),
                                                                       ref_te)
        pairs[row.name] = (ours, ref)
    return api, pairs


def test_zoo_rows_through_server(zoo_dir, server):
    from safetensors.torch import load_file
    zoo.write_zoo(zoo_dir, [r for r in zoo.ZOO if r.server])
    listed = combo_options(server.object_info()["WanLeanModelLoader"]["input"]["required"]["model_name"])
    assert {r.path for r in zoo.ZOO if r.server and r.folder == "diffusion_models"} <= set(listed)
    te = next(r for r in zoo.ZOO if r.name == NEGATIVE_TE)
    damaged = zoo.Row(zoo.write_damaged(zoo_dir, te, "no_scales")[len("zoo/"):], te.folder, te.publisher, te.model,
                      te.layout, te.precision)
    api, pairs = server_graph([r for r in zoo.ZOO if r.server] + [damaged])
    entry = server.run(api)

    def latent(node):
        item = entry["outputs"][node]["latents"][0]
        return load_file(os.path.join(server.output_dir, item["subfolder"], item["filename"]))["latent_tensor"]

    failures = []
    for row in (r for r in zoo.ZOO if r.server):
        ours, ref = (latent(n) for n in pairs[row.name])
        err = rel(ours, ref)
        record(row.name, err, "server")
        if err > zoo.server_tolerance(row):
            failures.append(f"{row.name}: {err:.2e} > {zoo.server_tolerance(row):.0e}")
    assert not failures, failures
    err = rel(*(latent(n) for n in pairs[damaged.name]))  # the negative control: this row's check catches it
    print(f"\n{damaged.name} through the server: {err:.2e} (bound {zoo.server_tolerance(te):.0e})")
    assert err > zoo.server_tolerance(te), f"{damaged.name}: {err:.2e} passes as the intact file"
