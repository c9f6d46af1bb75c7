"""LoRA: every key format applied through a real ComfyUI ModelPatcher equals W + s·alpha/rank·B@A (and the diff /
diff_b / norm / modulation deltas) merged by hand, in full and partial loads and on GGUF-quantised weights;
unpatching restores the outputs bit for bit; the key mapping agrees with ComfyUI's own for the formats ComfyUI
reads; unmatched keys are reported; two stacked LoRA loader nodes change a real server's video."""
import functools
import importlib
import json
import logging
import os
import sys
import types

import numpy as np
import pytest
import torch

from conftest import ROOT, SMOKE_MODELS, import_comfy, scale_close
from media import assert_real_video
from wan_core.dit import WanDiT
from fixtures.gguf_writer import quantize
from fixtures.lora import LORA_FORMATS, smoke_lora, write_smoke_lora
from wan_core.lora import diffusers_name, match_lora, merge_lora
from fixtures.smoke import randomize_
from workflow_api import combo_options

TINY = dict(dim=128, ffn_dim=256, num_layers=2, text_dim=32, in_dim=36, clip_dim=32)  # I2V: every module kind
CPU = torch.device("cpu")


def pack_module(name):
    """Import a module of the pack's nodes/ in-process (relative imports intact, nodes/__init__ not run)."""
    import_comfy()
    for pkg, path in (("wanlean_pack", ROOT), ("wanlean_pack.nodes", os.path.join(ROOT, "nodes"))):
        if pkg not in sys.modules:
            module = types.ModuleType(pkg)
            module.__path__ = [path]
            sys.modules[pkg] = module
    return importlib.import_module(f"wanlean_pack.nodes.{name}")


@functools.lru_cache
def tiny_sd():
    return randomize_(WanDiT(**TINY)).state_dict()


def tiny(ops=None):
    """A fresh tiny DiT (own tensors) with the same random weights every time."""
    return WanDiT.from_state_dict({k: v.clone() for k, v in tiny_sd().items()}, ops=ops).eval()


def cast_tiny():
    """The tiny DiT built as the loader node builds it: with ComfyUI's casting ops."""
    return tiny(ops=pack_module("common").casting_ops())


def run(model):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    ctx, clip = torch.randn(1, 8, TINY["text_dim"], generator=g), torch.randn(1, 257, TINY["clip_dim"], generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), ctx, clip=clip, y=y)


def merged_by_hand(sd, lora, s):
    """W + s·alpha/rank·up@down, W + s·diff, b + s·diff_b, read from a LoRA in official names (comfy / lightx2v)."""
    out = dict(sd)
    for key, t in lora.items():
        name = key.removeprefix("diffusion_model.")
        if name.endswith(".lora_up.weight"):
            m = name.removesuffix(".lora_up.weight")
            down, alpha = lora[f"diffusion_model.{m}.lora_down.weight"], lora[f"diffusion_model.{m}.alpha"].item()
            w = out[m + ".weight"]
            out[m + ".weight"] = w + s * alpha / down.shape[0] * (t.flatten(1) @ down.flatten(1)).reshape(w.shape)
        elif name.endswith(".diff_b"):
            b = name.removesuffix(".diff_b") + ".bias"
            out[b] = out[b] + s * t
        elif name.endswith(".diff"):
            m = name.removesuffix(".diff")
            k = m + ".weight" if m + ".weight" in sd else m
            out[k] = out[k] + s * t
    return out


def forward_of(sd):
    model = tiny()
    model.load_state_dict(sd)
    return run(model)


def patcher_for(model):
    import_comfy()
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


# one (format, reference format with official names, strength) per key dialect
CASES = [("comfy", "comfy", 0.8), ("peft", "comfy", 1.0), ("diffusers", "comfy", -1.5), ("kohya", "comfy", 0.6),
         ("lightx2v", "lightx2v", 1.0)]


@pytest.mark.parametrize("fmt,ref_fmt,s", CASES, ids=[c[0] for c in CASES])
def test_lora_through_model_patcher_equals_hand_merge(fmt, ref_fmt, s):
    model = cast_tiny()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    lora = smoke_lora(sd, fmt, seed=3)
    match = match_lora(lora, sd)
    assert not match.unmatched and not match.mismatched, match.summary()
    before = run(model)
    clone = pack_module("lora").add_lora(patcher_for(model), match.patches, s)
    clone.patch_model()
    patched = run(model)
    clone.unpatch_model()
    after = run(model)
    expected = forward_of(merged_by_hand(sd, smoke_lora(sd, ref_fmt, seed=3), s))
    scale_close(patched, expected, rel=1e-5)
    scale_close(forward_of(merge_lora(sd, match.patches, s)), expected, rel=1e-5)  # the plain-PyTorch merge
    assert (patched - before).abs().max() > 1e-2 * before.abs().max(), "the LoRA changed nothing"
    assert torch.equal(after, before), "unpatching did not restore the original outputs bit for bit"
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_lightx2v_patches_every_kind_of_tensor():
    """diff on Linear/head weights, norm gains (RMSNorm, LayerNorm), modulation and head.modulation; diff_b on biases."""
    sd = tiny().state_dict()
    patches = match_lora(smoke_lora(sd, "lightx2v"), sd).patches
    for key in ("blocks.0.self_attn.norm_q.weight", "blocks.1.norm3.weight", "blocks.1.norm3.bias", "blocks.0.modulation",
                "head.modulation", "head.head.weight", "head.head.bias", "blocks.0.ffn.0.bias", "img_emb.proj.0.weight"):
        assert patches[key][0] == "diff", key
    assert patches["blocks.0.cross_attn.k_img.weight"][0] == "lora"
    assert patches["patch_embedding.weight"][1][1].shape == (4, 36, 1, 2, 2)  # Conv3d factors


def test_format_key_names():
    """The dialects use the real trainers' names (diffusers: WanTransformer3DModel's modules)."""
    sd = tiny().state_dict()
    names = {fmt: set(smoke_lora(sd, fmt)) for fmt in LORA_FORMATS}
    assert {"transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.1.attn2.to_out.0.lora_B.weight",
            "transformer.blocks.0.attn2.add_k_proj.lora_A.weight", "transformer.blocks.0.ffn.net.0.proj.lora_A.weight",
            "transformer.condition_embedder.time_proj.lora_B.weight", "transformer.proj_out.lora_A.weight",
            "transformer.condition_embedder.text_embedder.linear_2.lora_A.weight",
            "transformer.condition_embedder.image_embedder.ff.net.0.proj.lora_A.weight"} <= names["diffusers"]
    assert [diffusers_name(m) for m in ("blocks.3.norm3", "blocks.3.modulation", "blocks.0.cross_attn.norm_k_img",
                                        "head.modulation", "img_emb.proj.4", "img_emb.emb_pos")] == [
        "blocks.3.norm2", "blocks.3.scale_shift_table", "blocks.0.attn2.norm_added_k", "scale_shift_table",
        "condition_embedder.image_embedder.norm2", "condition_embedder.image_embedder.pos_embed"]
    assert {"lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_1_ffn_2.alpha"} <= names["kohya"]
    assert {"diffusion_model.blocks.0.cross_attn.v_img.lora_B.weight"} <= names["peft"]
    assert {"blocks.0.self_attn.q.lora_A.default.weight", "blocks.1.ffn.2.lora_B.default.weight"} <= names["diffsynth"]
    assert {"diffusion_model.blocks.0.modulation.diff", "diffusion_model.head.head.diff",
            "diffusion_model.blocks.0.self_attn.norm_k.diff", "diffusion_model.blocks.0.norm3.diff_b"} <= names["lightx2v"]


def pair(name, up, down, up_suffix=".lora_up.weight", down_suffix=".lora_down.weight"):
    return {name + up_suffix: up, name + down_suffix: down}


def test_other_spellings_resolve():
    """Wan-Fun's `lora_unet__`, unprefixed PEFT keys, diffusers' `lora_B.bias` (a bias delta), `.lora.up` pairs and
    OneTrainer-style underscored diffusers names."""
    sd = tiny_sd()
    up, down, bias = torch.randn(128, 2), torch.randn(2, 128), torch.randn(128)
    lora = {**pair("lora_unet__blocks_1_cross_attn_k", up, down),
            **pair("blocks.0.self_attn.v", up, down, ".lora_B.weight", ".lora_A.weight"),
            **pair("transformer.blocks.1.ffn.net.2", up, torch.randn(2, 256), ".lora.up.weight", ".lora.down.weight"),
            **pair("lora_transformer_blocks_0_attn1_to_k", up, down),
            "transformer.blocks.0.attn1.to_out.0.lora_B.bias": bias}
    match = match_lora(lora, sd)
    assert not match.unmatched and not match.mismatched
    assert set(match.patches) == {"blocks.1.cross_attn.k.weight", "blocks.0.self_attn.v.weight", "blocks.0.self_attn.o.bias",
                                  "blocks.1.ffn.2.weight", "blocks.0.self_attn.k.weight"}
    assert match.patches["blocks.0.self_attn.o.bias"] == ("diff", (bias,))


def test_lora_and_diff_on_one_weight_combine():
    """A LoRA and a `.diff` on the same weight become one dense diff with the same arithmetic."""
    sd, key = tiny_sd(), "blocks.0.self_attn.q.weight"
    up, down, diff = torch.randn(128, 2), torch.randn(2, 128), torch.randn(128, 128)
    lora = {**pair("diffusion_model.blocks.0.self_attn.q", up, down),
            "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0),
            "diffusion_model.blocks.0.self_attn.q.diff": diff}
    patch = match_lora(lora, sd).patches[key]
    torch.testing.assert_close(merge_lora(sd, {key: patch}, -2.0)[key], sd[key] - 2.0 * (0.5 * up @ down + diff))


@pytest.mark.parametrize("fmt", ["comfy", "peft", "kohya", "lightx2v"])
def test_key_mapping_matches_comfyui(fmt):
    """For the formats ComfyUI itself reads, our patches are ComfyUI's (comfy.lora.load_lora + model_lora_keys_unet on
    the same weights under its `diffusion_model.` prefix): same keys, same tensors, same alpha."""
    import_comfy()
    import comfy.lora
    sd = tiny().state_dict()
    lora = smoke_lora(sd, fmt, seed=1)

    class Native:  # what model_lora_keys_unet reads of a ComfyUI BaseModel
        model_config = types.SimpleNamespace(unet_config={})

        def state_dict(self):
            return {"diffusion_model." + k: v for k, v in sd.items()}

    theirs = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(Native(), {}), log_missing=False)
    ours = match_lora(lora, sd).patches
    assert set(ours) == {k.removeprefix("diffusion_model.") for k in theirs}
    for key, patch in ours.items():
        other = theirs["diffusion_model." + key]
        if patch[0] == "lora":
            assert all(a is b or a == b for a, b in zip(patch[1], other.weights)), key
        else:
            assert other[0] == "diff" and other[1][0] is patch[1][0], key


def test_stacked_loras_and_modulation_stack():
    """Two LoRAs on one model (clone of a clone), both with modulation diffs, equal both merged by hand in order."""
    model = cast_tiny()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    lora_mod = pack_module("lora")
    a, b = smoke_lora(sd, "lightx2v", seed=1), smoke_lora(sd, "lightx2v", seed=2)
    first = lora_mod.add_lora(patcher_for(model), match_lora(a, sd).patches, 0.5)
    second = lora_mod.add_lora(first, match_lora(b, sd).patches, -0.7)
    second.patch_model()
    out = run(model)
    second.unpatch_model()
    scale_close(out, forward_of(merged_by_hand(merged_by_hand(sd, a, 0.5), b, -0.7)), rel=1e-5)


def test_switching_models_and_partial_load():
    """Through ComfyUI's memory manager: LoRA'd and plain handles of one model each give their own output when
    loaded in turn; a partial (low-VRAM) load with ComfyUI's casting ops applies the same LoRA at cast time."""
    lora_mod, common = pack_module("lora"), pack_module("common")
    model = cast_tiny()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    lora = smoke_lora(sd, "lightx2v", seed=4)
    base = common.Handle.wrap(model, CPU, CPU, torch.float32)
    with_lora = common.Handle(lora_mod.add_lora(base.patcher, match_lora(lora, sd).patches, 1.0), torch.float32)
    ref, expected = run(base.load()), forward_of(merged_by_hand(sd, lora, 1.0))
    scale_close(run(with_lora.load()), expected, rel=1e-5)
    assert torch.equal(run(base.load()), ref)
    with_lora.patcher.patch_model(lowvram_model_memory=1)  # every cast layer streamed, patches applied at cast
    assert model.model_lowvram
    scale_close(run(model), expected, rel=1e-5)
    with_lora.patcher.unpatch_model()
    assert torch.equal(run(model), ref)


def _quantized_tiny_sd(fmt):
    """tiny_sd() with its Linear weights packed as the loader packs a file of format `fmt` (a GGUF block type, or one
    of ComfyUI's formats in its per-layer layout, fixtures.quant_writer), the rest fp32; classes the pack's ops know."""
    convert = sys.modules["wanlean_pack.wan_core.convert"]
    if fmt in convert.quant.FORMATS:
        from fixtures.quant_writer import comfy_quant_file
        return convert.pack_quantized(comfy_quant_file(tiny_sd(), lambda key: fmt, rest=torch.float32)[0])
    gguf = sys.modules["wanlean_pack.wan_core.gguf"]
    quantised = lambda k, v: k.endswith(".weight") and v.ndim == 2  # noqa: E731
    return {k: gguf.GGUFWeight(torch.from_numpy(quantize(v.numpy(), fmt)), fmt, v.shape) if quantised(k, v)
            else v.clone() for k, v in tiny_sd().items()}


@pytest.mark.parametrize("fmt,storage", [("Q8_0", torch.uint8), ("nvfp4", torch.uint8), ("mxfp8", torch.float8_e4m3fn),
                                         ("float8_e4m3fn", torch.float8_e4m3fn), ("int8_tensorwise", torch.int8)])
def test_lora_on_quantized_model(fmt, storage):
    """A quantized model (GGUF blocks, ComfyUI's formats: kept packed in the pack's ops, nodes/ops.py): the LoRA matches
    by the logical shapes and patches the decoded weights at use, in a full and a partial load (every layer streamed
    by ComfyUI); the plain model is unchanged after."""
    if not os.path.isfile(os.path.join(ROOT, "nodes", "ops.py")):
        pytest.skip("no quantized ops (nodes/ops.py) in this checkout")
    lora_mod, ops = pack_module("lora"), pack_module("ops")
    qsd = _quantized_tiny_sd(fmt)
    model = WanDiT.from_state_dict(dict(qsd), ops=ops.QuantOps).eval()
    assert model.blocks[0].self_attn.q.weight.dtype == storage and model.blocks[0].self_attn.q.qtype == fmt
    packed = sys.modules["wanlean_pack.wan_core.quant"].PackedWeight
    dequantised = {k: v.dequantize() if isinstance(v, packed) else v for k, v in qsd.items()}
    lora = smoke_lora(dequantised, "lightx2v", seed=6)
    match = match_lora(lora, lora_mod.model_shapes(model))
    assert not match.unmatched and not match.mismatched, match.summary()
    common = pack_module("common")
    base = common.Handle.wrap(model, CPU, CPU, torch.float32)
    with_lora = common.Handle(lora_mod.add_lora(base.patcher, match.patches, 0.9), torch.float32)
    before, expected = run(base.load()), forward_of(merged_by_hand(dequantised, lora, 0.9))
    scale_close(run(with_lora.load()), expected, rel=1e-5)  # full load: the wrapper runs after dequantisation
    assert torch.equal(run(base.load()), before)
    with_lora.patcher.patch_model(lowvram_model_memory=1)  # every layer streamed
    scale_close(run(model), expected, rel=1e-5)
    with_lora.patcher.unpatch_model()
    assert torch.equal(run(model), before)


def test_unmatched_and_foreign_keys_are_reported():
    sd = tiny().state_dict()
    lora = smoke_lora(sd, "comfy")
    with torch.device("meta"):  # a wider model (only its shapes are read)
        wide = WanDiT(dim=256, ffn_dim=256, num_layers=1, text_dim=32).state_dict()
    big = smoke_lora(wide, "kohya")
    extra = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
             "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(128, 4),
             "diffusion_model.blocks.0.self_attn.q.hada_w1_a": torch.zeros(4, 4),
             "lora_unet_blocks_0_self_attn_q.lora_up.weight": big["lora_unet_blocks_0_self_attn_q.lora_up.weight"],
             "lora_unet_blocks_0_self_attn_q.lora_down.weight": big["lora_unet_blocks_0_self_attn_q.lora_down.weight"]}
    match = match_lora({**lora, **extra}, sd)
    assert len(match.patches) == len(lora) // 3
    assert sorted(match.unmatched) == sorted(list(extra)[:3])
    assert sorted(match.mismatched) == sorted(list(extra)[3:])
    assert "3 keys unmatched" in match.summary() and "2 keys of another shape" in match.summary()
    with pytest.raises(ValueError, match="another Wan size"):
        match_lora(big, sd).check("'big.safetensors'")
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9, 4)}
    with pytest.raises(ValueError, match="no key of 'flux.safetensors' matched this model: it is a LoRA for another model"):
        match_lora(flux, sd).check("'flux.safetensors'")


def test_loader_node_reports_and_refuses(tmp_path, caplog):
    lora_mod, common = pack_module("lora"), pack_module("common")
    import folder_paths
    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    model = cast_tiny()
    handle = common.Handle.wrap(model, CPU, CPU, torch.float32)
    lora = smoke_lora(model.state_dict(), "kohya")
    n_patches = len(lora) // 3  # up, down, alpha per layer
    lora["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    from safetensors.torch import save_file
    save_file(lora, str(tmp_path / "mixed.safetensors"))
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9, 4)}
    save_file(flux, str(tmp_path / "flux.safetensors"))
    node = lora_mod.WanLeanLoraLoader
    spec = node.INPUT_TYPES()["required"]
    assert all("tooltip" in opts for _, opts in spec.values())
    assert spec["strength"][1]["default"] == 1.0 and (spec["strength"][1]["min"], spec["strength"][1]["max"]) == (-10, 10)
    assert node.execute(handle, "mixed.safetensors", 0.0)[0] is handle
    with caplog.at_level(logging.WARNING):
        out, = node.execute(handle, "mixed.safetensors", 1.0)
    assert "1 keys unmatched (e.g. lora_te_text_model_encoder_layers_0_mlp_fc1" in caplog.text
    assert out.patcher is not handle.patcher and out.patcher.model is model and len(out.patcher.patches) == n_patches
    assert not handle.patcher.patches, "the input model was changed"
    with pytest.raises(ValueError, match="no key of 'flux.safetensors' matched this model: it is a LoRA for another model"):
        node.execute(handle, "flux.safetensors", 1.0)


# ---- through a real ComfyUI server -------------------------------------------------------------------------------
SMOKE_LORAS = {"wanlean_smoke_kohya.safetensors": ("kohya", 1), "wanlean_smoke_lightx2v.safetensors": ("lightx2v", 2)}


@pytest.fixture(scope="session")
def smoke_loras(smoke_models):
    """Two LoRAs for the smoke T2V-1.3B in .smoke/models/loras/ (kohya and lightx2v layouts), fp16 like real ones."""
    from wan_core.checkpoint import read_file
    dit = read_file(os.path.join(smoke_models, "diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors"))
    for name, (fmt, seed) in SMOKE_LORAS.items():
        write_smoke_lora(os.path.join(SMOKE_MODELS, "loras", name), dit, fmt, seed=seed, std=0.2, dtype=torch.float16)
    return list(SMOKE_LORAS)


def t2v_frames(server, loras=()):
    """Run workflows/wan21_t2v_1.3B.json (small) with LoRA loader nodes chained between model loader and sampler."""
    import av
    from run_workflow import shrink
    from workflow_api import ui_to_api
    with open(os.path.join(ROOT, "workflows", "wan21_t2v_1.3B.json"), encoding="utf-8") as f:
        api = shrink(ui_to_api(json.load(f), server.object_info()), {"width": 128, "height": 64, "length": 5, "steps": 3})
    sampler = next(e for e in api.values() if e["class_type"] == "WanLeanSampler")
    for i, (name, strength) in enumerate(loras):
        api[f"lora{i}"] = {"class_type": "WanLeanLoraLoader",
                           "inputs": {"model": sampler["inputs"]["model"], "lora_name": name, "strength": strength}}
        sampler["inputs"]["model"] = [f"lora{i}", 0]
    videos = [p for p in server.output_files(server.run(api)) if p.endswith(".mp4")]
    assert len(videos) == 1, videos
    assert_real_video(videos[0])
    with av.open(videos[0]) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_stacked_lora_nodes_through_server(smoke_loras, server):
    info = server.object_info()["WanLeanLoraLoader"]
    assert set(smoke_loras) <= set(combo_options(info["input"]["required"]["lora_name"]))
    plain = t2v_frames(server)
    stacked = t2v_frames(server, [(smoke_loras[0], 1.0), (smoke_loras[1], 0.8)])
    assert stacked.shape == plain.shape == (5, 64, 128, 3)
    assert np.abs(stacked.astype(int) - plain.astype(int)).mean() > 1.0, "the LoRAs did not change the video"
