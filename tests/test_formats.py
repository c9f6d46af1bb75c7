"""Every checkpoint layout and precision the loaders read, checked against the official-layout original.

Smoke variants are written by fixtures.variants.write_smoke_variants from the official smoke files and loaded
through what the loader node calls (wan_core.checkpoint.load_dit / load_vae + nodes/ops.py ops_for), with
ComfyUI's casting ops, on the CPU in fp32 compute. Layouts must give bit-identical outputs; precisions stay
within the tolerances below (max abs difference over the fp16 original's max abs output; measured values in
the comments, CPU, torch 2.11, tiny random smoke weights of std 0.05).
"""
import importlib
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, import_comfy, run_workflow
from media import assert_real_video, probe
from workflow_api import combo_options

import_comfy()
import folder_paths  # noqa: E402,F401  (the pack's loaders read ComfyUI's model folders)

DIT, I2V = "wan2.1_t2v_1.3B_fp16.safetensors", "wan2.1_i2v_480p_14B_fp16.safetensors"
DIFFUSERS_SHARD = "Wan2.1-T2V-1.3B-Diffusers/transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
# (file, loader weight dtype, tolerance): measured rel errors 2.3e-3, 3.9e-2, 7.0e-2, 3.3e-2, 3.4e-2, 6.3e-3, 4.1e-2, 1.09e-1
PRECISIONS = [
    (DIT, torch.bfloat16, 5e-3),
    ("wan2.1_t2v_1.3B_fp8_e4m3fn.safetensors", None, 6e-2),
    ("wan2.1_t2v_1.3B_fp8_e5m2.safetensors", None, 1e-1),
    ("wan2.1_t2v_1.3B_fp8_scaled.safetensors", None, 5e-2),
    ("wan2.1_t2v_1.3B_fp8_scaled.safetensors", torch.bfloat16, 5e-2),  # scales folded into bf16 weights
    ("wan2.1-t2v-1.3b-Q8_0.gguf", None, 1e-2),
    ("wan2.1-t2v-1.3b-Q5_K.gguf", None, 6e-2),
    ("wan2.1-t2v-1.3b-Q4_K.gguf", None, 1.6e-1),
]


@pytest.fixture(scope="module")
def pack():
    """The pack imported as ComfyUI imports it (a package holding nodes/ and wan_core/), so the test runs
    the loader's own modules: `pack.core(name)` is wan_core.<name>, `pack.ops` is nodes/ops.py."""
    name = "wanlean_formats_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    module = sys.modules[name]
    module.core = lambda sub: importlib.import_module(f"{name}.wan_core.{sub}")
    module.ops = importlib.import_module(f"{name}.nodes.ops")
    return module


@pytest.fixture(scope="session")
def variants(smoke_models):
    from fixtures.variants import write_smoke_variants
    return write_smoke_variants(smoke_models)


def _inputs(in_dim=16, clip_dim=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    extra = {}
    if in_dim > 16:
        extra["y"] = torch.randn(1, in_dim - 16, 3, 8, 8, generator=g)
    if clip_dim:
        extra["clip"] = torch.randn(1, 257, clip_dim, generator=g)
    return x, torch.tensor([600.0]), torch.randn(1, 12, 64, generator=g), extra


def load_model(pack, variants, name, weight_dtype=None):
    """What WanLeanModelLoader.load does, minus the ModelPatcher."""
    ckpt = pack.core("checkpoint").load_dit(os.path.join(variants, "diffusion_models", name), weight_dtype)
    return pack.core("dit").WanDiT.from_state_dict(ckpt.sd, ops=pack.ops.ops_for(ckpt)), ckpt


@torch.no_grad()
def forward(model):
    x, t, context, extra = _inputs(model.in_dim, model.img_emb and model.img_emb.proj[0].normalized_shape[0])
    return model(x, t, context, **extra)


@pytest.fixture(scope="module")
def reference(pack, variants):
    return forward(load_model(pack, variants, DIT)[0])


@pytest.mark.parametrize("name", ["wan2.1_t2v_1.3B_diffusers.safetensors", DIFFUSERS_SHARD,
                                  os.path.dirname(DIFFUSERS_SHARD)])
def test_diffusers_transformer_is_exact(pack, variants, reference, name):
    model, ckpt = load_model(pack, variants, name)
    assert ckpt.layout == "diffusers"
    assert torch.equal(forward(model), reference)


def test_diffusers_i2v_keys_are_exact(pack, variants):
    """The image branch: image_embedder -> img_emb, add_k_proj/add_v_proj/norm_added_k -> k_img/v_img/norm_k_img."""
    ours = forward(load_model(pack, variants, I2V)[0])
    assert torch.equal(forward(load_model(pack, variants, "wan2.1_i2v_480p_14B_diffusers.safetensors")[0]), ours)


@pytest.mark.parametrize("name,weight_dtype,tol", PRECISIONS)
def test_precision_within_tolerance(pack, variants, reference, name, weight_dtype, tol):
    model, ckpt = load_model(pack, variants, name, weight_dtype)
    rel = ((forward(model) - reference).abs().max() / reference.abs().max()).item()
    print(f"\n{name} ({weight_dtype}): rel error {rel:.2e}")  # the figures of docs/files.md
    assert rel <= tol, f"{name}: rel error {rel:.3e} > {tol}"
    linear = model.blocks[0].ffn[0]
    if name.endswith(".gguf"):  # the blocks stay quantised in the model; dequantised only inside forward
        assert linear.qtype == name.split("-")[-1][:-5] and linear.weight.dtype == torch.uint8
    elif weight_dtype is None:  # fp8 weights stay fp8 (scaled: packed with their scale, decoded at use)
        assert linear.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        assert ("scaled" in name) == (getattr(linear, "qtype", None) == "float8_e4m3fn" and linear.weight_scale != 1)
    else:
        assert linear.weight.dtype == weight_dtype


def test_fp8_weight_dtype_choice(pack, variants):
    """The loader's fp8 choice stores matrices in fp8 (same bits as ComfyUI's fp8 file), modulation untouched."""
    model, _ = load_model(pack, variants, DIT, torch.float8_e4m3fn)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    assert model.blocks[0].modulation.dtype == torch.float16
    assert torch.equal(forward(model), forward(load_model(pack, variants, "wan2.1_t2v_1.3B_fp8_e4m3fn.safetensors")[0]))


def test_gguf_keeps_blocks_and_plain_torch_ops_agree(pack, variants):
    """Q4_K holds ~0.3x the fp16 bytes; wan_core's plain-torch casting layers (the multi-device workers') compute
    what ComfyUI's ops compute."""
    import comfy.model_management as mm
    comfy_model, ckpt = load_model(pack, variants, "wan2.1-t2v-1.3b-Q4_K.gguf")
    fp16_model, _ = load_model(pack, variants, DIT)
    assert mm.module_size(comfy_model) < 0.35 * mm.module_size(fp16_model)
    plain = pack.core("dit").WanDiT.from_state_dict(ckpt.sd, ops=pack.core("castops").casting_ops())
    assert torch.allclose(forward(plain), forward(comfy_model), rtol=0, atol=1e-6)


_DECODED = {}


def _decode(pack, variants, name):
    """Decode of a fixed small latent by the VAE in models/vae/<name>, loaded as WanLeanVAELoader loads it."""
    if name not in _DECODED:
        ckpt = pack.core("checkpoint").load_vae(os.path.join(variants, "vae", name))
        family = pack.core("vae22").WanVAE22 if pack.core("vae22").is_vae22(ckpt.sd) else pack.core("vae").WanVAE21
        vae = family.from_state_dict(ckpt.sd, ops=pack.ops.ops_for(ckpt))
        z = torch.randn(1, vae.z_dim, 2, 2, 2, generator=torch.Generator().manual_seed(1))
        _DECODED[name] = (ckpt.layout, vae.decode(z))
    return _DECODED[name]


@pytest.mark.parametrize("name,official", [("wan_2.1_vae_diffusers.safetensors", "wan_2.1_vae.safetensors"),
                                           ("Wan2.1-VAE-Diffusers/vae/diffusion_pytorch_model.safetensors", "wan_2.1_vae.safetensors"),
                                           ("Wan2.1-VAE-Diffusers/vae", "wan_2.1_vae.safetensors"),
                                           ("wan2.2_vae_diffusers.safetensors", "wan2.2_vae.safetensors")])
def test_diffusers_vae_decode_is_exact(pack, variants, name, official):
    (layout, ours), (official_layout, ref) = _decode(pack, variants, name), _decode(pack, variants, official)
    assert (layout, official_layout) == ("diffusers", "official")
    assert torch.equal(ours, ref)


# official key -> diffusers key, one per renaming rule, as diffusers' conversion script and its classes name them
# (checked against diffusers' own classes by test_matches_diffusers_own_classes where diffusers is installed)
DIT_NAMES = {
    "patch_embedding.weight": "patch_embedding.weight",
    "text_embedding.0.weight": "condition_embedder.text_embedder.linear_1.weight",
    "text_embedding.2.bias": "condition_embedder.text_embedder.linear_2.bias",
    "time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
    "time_embedding.2.weight": "condition_embedder.time_embedder.linear_2.weight",
    "time_projection.1.weight": "condition_embedder.time_proj.weight",
    "img_emb.proj.0.weight": "condition_embedder.image_embedder.norm1.weight",
    "img_emb.proj.1.weight": "condition_embedder.image_embedder.ff.net.0.proj.weight",
    "img_emb.proj.3.weight": "condition_embedder.image_embedder.ff.net.2.weight",
    "img_emb.proj.4.bias": "condition_embedder.image_embedder.norm2.bias",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head.weight": "proj_out.weight",
    "head.modulation": "scale_shift_table",
    "blocks.7.modulation": "blocks.7.scale_shift_table",
    "blocks.7.self_attn.q.weight": "blocks.7.attn1.to_q.weight",
    "blocks.7.self_attn.k.weight": "blocks.7.attn1.to_k.weight",
    "blocks.7.self_attn.v.bias": "blocks.7.attn1.to_v.bias",
    "blocks.7.self_attn.o.weight": "blocks.7.attn1.to_out.0.weight",
    "blocks.7.self_attn.norm_q.weight": "blocks.7.attn1.norm_q.weight",
    "blocks.7.self_attn.norm_k.weight": "blocks.7.attn1.norm_k.weight",
    "blocks.7.cross_attn.q.weight": "blocks.7.attn2.to_q.weight",
    "blocks.7.cross_attn.k.weight": "blocks.7.attn2.to_k.weight",
    "blocks.7.cross_attn.v.weight": "blocks.7.attn2.to_v.weight",
    "blocks.7.cross_attn.o.bias": "blocks.7.attn2.to_out.0.bias",
    "blocks.7.cross_attn.norm_q.weight": "blocks.7.attn2.norm_q.weight",
    "blocks.7.cross_attn.norm_k.weight": "blocks.7.attn2.norm_k.weight",
    "blocks.7.cross_attn.k_img.weight": "blocks.7.attn2.add_k_proj.weight",
    "blocks.7.cross_attn.v_img.bias": "blocks.7.attn2.add_v_proj.bias",
    "blocks.7.cross_attn.norm_k_img.weight": "blocks.7.attn2.norm_added_k.weight",
    "blocks.7.norm3.weight": "blocks.7.norm2.weight",
    "blocks.7.ffn.0.weight": "blocks.7.ffn.net.0.proj.weight",
    "blocks.7.ffn.2.bias": "blocks.7.ffn.net.2.bias",
}
VAE21_NAMES = {
    "conv1.weight": "quant_conv.weight", "conv2.bias": "post_quant_conv.bias",
    "encoder.conv1.weight": "encoder.conv_in.weight", "decoder.conv1.bias": "decoder.conv_in.bias",
    "encoder.head.0.gamma": "encoder.norm_out.gamma", "decoder.head.2.weight": "decoder.conv_out.weight",
    "encoder.middle.0.residual.0.gamma": "encoder.mid_block.resnets.0.norm1.gamma",
    "decoder.middle.2.residual.6.weight": "decoder.mid_block.resnets.1.conv2.weight",
    "decoder.middle.1.to_qkv.weight": "decoder.mid_block.attentions.0.to_qkv.weight",
    "encoder.middle.1.norm.gamma": "encoder.mid_block.attentions.0.norm.gamma",
    "encoder.downsamples.1.residual.2.weight": "encoder.down_blocks.1.conv1.weight",
    "encoder.downsamples.2.shortcut.weight": "encoder.down_blocks.2.conv_shortcut.weight",
    "encoder.downsamples.5.time_conv.weight": "encoder.down_blocks.5.time_conv.weight",
    "encoder.downsamples.5.resample.1.bias": "encoder.down_blocks.5.resample.1.bias",
    "decoder.upsamples.4.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
    "decoder.upsamples.6.residual.3.gamma": "decoder.up_blocks.1.resnets.2.norm2.gamma",
    "decoder.upsamples.7.time_conv.weight": "decoder.up_blocks.1.upsamplers.0.time_conv.weight",
    "decoder.upsamples.11.resample.1.weight": "decoder.up_blocks.2.upsamplers.0.resample.1.weight",
    "decoder.upsamples.14.residual.6.bias": "decoder.up_blocks.3.resnets.2.conv2.bias",
}
VAE22_NAMES = {
    "encoder.downsamples.1.downsamples.0.residual.0.gamma": "encoder.down_blocks.1.resnets.0.norm1.gamma",
    "encoder.downsamples.1.downsamples.2.time_conv.weight": "encoder.down_blocks.1.downsampler.time_conv.weight",
    "encoder.downsamples.0.downsamples.2.resample.1.weight": "encoder.down_blocks.0.downsampler.resample.1.weight",
    "decoder.upsamples.2.upsamples.2.residual.6.weight": "decoder.up_blocks.2.resnets.2.conv2.weight",
    "decoder.upsamples.0.upsamples.3.resample.1.bias": "decoder.up_blocks.0.upsampler.resample.1.bias",
    "decoder.upsamples.3.upsamples.0.residual.2.weight": "decoder.up_blocks.3.resnets.0.conv1.weight",
}


@pytest.mark.parametrize("table,to_diffusers,from_diffusers", [
    (DIT_NAMES, "dit_to_diffusers", "dit_from_diffusers"),
    (VAE21_NAMES, "vae_to_diffusers", "vae_from_diffusers"),
    (VAE22_NAMES, "vae_to_diffusers", "vae_from_diffusers"),
])
def test_key_names_follow_diffusers(table, to_diffusers, from_diffusers):
    from wan_core import convert
    sd = {k: torch.zeros(0) for k in table}
    assert set(getattr(convert, to_diffusers)(sd)) == set(table.values())
    back = getattr(convert, from_diffusers)({v: torch.full((1,), i) for i, v in enumerate(table.values())})
    assert {k: int(v) for k, v in back.items()} == {k: i for i, k in enumerate(table)}


def test_dequantisers_match_gguf_reference():
    """Every supported block type, on random blocks, equals the gguf package's numpy dequantiser."""
    import gguf
    from wan_core.gguf import BLOCK_TYPES, dequantize
    rng = np.random.default_rng(0)
    half_fields = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                   "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for qtype, (block, size) in BLOCK_TYPES.items():
        raw = rng.integers(0, 256, size=(16, size), dtype=np.uint8)
        for pos in half_fields[qtype]:  # finite fp16 scales (random bytes can be NaN/inf)
            raw[:, pos:pos + 2] = rng.uniform(-1, 1, size=(16, 1)).astype(np.float16).view(np.uint8)
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(16, block)
        ours = dequantize(torch.from_numpy(raw), qtype, (16, block)).numpy()
        assert np.array_equal(ours, ref), qtype


@pytest.mark.parametrize("qtype,rms", [("Q4_K", 0.09), ("Q5_K", 0.045), ("Q6_K", 0.025), ("Q8_0", 0.007)])
def test_quantizer_roundtrip(qtype, rms):
    """wan_core's K-quant writer (the gguf package has none) decodes, by the gguf package, to the input
    within the format's precision (measured rms on N(0,1): Q4_K 0.079, Q5_K 0.038, Q6_K 0.019, Q8_0 0.0055)."""
    import gguf
    from fixtures.gguf_writer import quantize
    x = np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)
    back = gguf.quants.dequantize(quantize(x, qtype), gguf.GGMLQuantizationType[qtype])
    assert np.sqrt(((back - x) ** 2).mean()) < rms


def test_clear_errors(tmp_path, variants):
    from safetensors.torch import save_file
    from wan_core.checkpoint import CheckpointError, load_dit, load_vae
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "sd_vae.safetensors")
    with pytest.raises(CheckpointError, match="image VAE in diffusers layout"):
        load_vae(str(tmp_path / "sd_vae.safetensors"))
    shard = os.path.join(variants, "diffusion_models", DIFFUSERS_SHARD)
    os.makedirs(tmp_path / "lonely")
    os.symlink(shard, tmp_path / "lonely" / os.path.basename(shard))
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors is missing beside it"):
        load_dit(str(tmp_path / "lonely" / os.path.basename(shard)))
    (tmp_path / "cut.gguf").write_bytes(open(os.path.join(variants, "diffusion_models", "wan2.1-t2v-1.3b-Q8_0.gguf"), "rb").read(200))
    with pytest.raises(CheckpointError, match="cannot read 'cut.gguf' as GGUF"):
        load_dit(str(tmp_path / "cut.gguf"))


def test_matches_diffusers_own_classes():
    """Optional (runs where diffusers is installed): diffusers' WanTransformer3DModel and AutoencoderKLWan with
    the converted weights compute what ours compute."""
    diffusers = pytest.importorskip("diffusers")
    from wan_core.convert import dit_to_diffusers, vae_to_diffusers
    from wan_core.dit import WanDiT
    from fixtures.smoke import randomize_
    from wan_core.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE21
    ours = randomize_(WanDiT(dim=256, ffn_dim=512, num_layers=1, in_dim=36, text_dim=64, clip_dim=64), seed=1)
    theirs = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=36, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=512, num_layers=1, image_dim=64, added_kv_proj_dim=256)
    theirs.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)
    x, t, context, extra = _inputs(36, 64)
    with torch.no_grad():
        a = ours(x, t, torch.nn.functional.pad(context, (0, 0, 0, 500)), **extra)
        b = theirs(torch.cat([x, extra["y"]], 1), t, torch.nn.functional.pad(context, (0, 0, 0, 500)),
                   encoder_hidden_states_image=extra["clip"], return_dict=False)[0]
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    vae = randomize_(WanVAE21(dim=8), seed=2)
    their_vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16)
    their_vae.load_state_dict(vae_to_diffusers(vae.state_dict()), strict=True)
    z = torch.randn(1, 16, 2, 4, 4)
    mean, std = (torch.tensor(c).view(1, -1, 1, 1, 1) for c in (WAN21_LATENT_MEAN, WAN21_LATENT_STD))
    with torch.no_grad():
        assert torch.allclose(vae.decode(z), their_vae.decode(z * std + mean, return_dict=False)[0], atol=1e-5)


@pytest.mark.parametrize("files", [
    {"WanLeanModelLoader.model_name": DIFFUSERS_SHARD,
     "WanLeanVAELoader.vae_name": "Wan2.1-VAE-Diffusers/vae/diffusion_pytorch_model.safetensors"},
    {"WanLeanModelLoader.model_name": "wan2.1-t2v-1.3b-Q4_K.gguf"},
], ids=["diffusers", "gguf"])
def test_server_loads_diffusers_and_gguf(variants, server, files):
    """Through a real ComfyUI server: the loader node lists and loads the file, the graph writes its mp4."""
    assert files["WanLeanModelLoader.model_name"] in combo_options(
        server.object_info()["WanLeanModelLoader"]["input"]["required"]["model_name"])
    out = run_workflow(server, "wan21_t2v_1.3B.json", files, sizes={"width": 64, "height": 64, "length": 5, "steps": 2})
    videos = [f for f in out if f.endswith(".mp4")]
    assert len(videos) == 1 and probe(videos[0])["frames"] == 5
    assert_real_video(videos[0])
