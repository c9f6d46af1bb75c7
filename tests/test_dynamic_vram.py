"""Dynamic VRAM (comfy-aimdo, ComfyUI's default on NVIDIA since 0.30): with `comfy.memory_management.aimdo_enabled`
set, comfy.ops builds its Linear layers without weight or bias (and its Embeddings on the meta device) until a state
dict is loaded, so a model's state_dict() before loading lacks every Linear tensor. Every loader node must load its
model in that mode and the model must compute exactly what the same file computes loaded in the default mode.

The flag is ComfyUI's own switch (main.py sets it when comfy-aimdo starts on a GPU); set in-process on the CPU it
exercises the construction and loading path (aimdo's VRAM allocator itself needs a GPU: bench/gpu_check.py). The
pack's models stay behind a plain ModelPatcher (nodes/common.py Handle.wrap), which load_models_gpu loads the
estimate-based way beside ComfyUI's dynamic ones; `fake_gpu` (tests/test_memory.py) shows it a GPU to load onto."""
import contextlib
import importlib
import os
import types

import pytest
import torch

from conftest import import_comfy
from test_lora import pack_module
from test_memory import FAKE, fake_gpu, nodes as memory_nodes  # noqa: F401  (fixtures)
from wan_core import clip
from wan_core.checkpoint import read_file
from wan_core.dit import WanDiT
from wan_core.keys import build_on_meta

import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.ops  # noqa: E402
import folder_paths  # noqa: E402


def _aimdo_module():
    """ComfyUI's module holding the dynamic-VRAM switch, or None where the host has none (0.3.75)."""
    try:
        module = importlib.import_module("comfy.memory_management")
    except ImportError:
        return None
    return module if hasattr(module, "aimdo_enabled") else None


AIMDO = _aimdo_module()
pytestmark = [pytest.mark.skipif(AIMDO is None, reason=(
    "this ComfyUI host has no comfy.memory_management.aimdo_enabled (dynamic VRAM, comfy-aimdo): its comfy.ops build "
    "every layer with its weights, which the other loader tests cover")), pytest.mark.usefixtures("one_thread")]

@contextlib.contextmanager
def aimdo(on):
    """comfy.memory_management.aimdo_enabled set to `on` inside, restored after."""
    before = AIMDO.aimdo_enabled
    AIMDO.aimdo_enabled = on
    try:
        yield
    finally:
        AIMDO.aimdo_enabled = before


@pytest.fixture(scope="module")
def nodes(memory_nodes, smoke_models):
    """tests/test_memory.py's node modules (model folders on the smoke models) and the S2V nodes, audio encoders too;
    the fp8 and GGUF variants written (no other module's run may be counted on for them: a fresh clone has none)."""
    from fixtures.variants import write_smoke_variants
    write_smoke_variants(smoke_models)
    path = os.path.join(smoke_models, "audio_encoders")
    folder_paths.add_model_folder_path("audio_encoders", path)
    yield types.SimpleNamespace(loaders=memory_nodes.loaders, image=memory_nodes.image, s2v=pack_module("s2v"))
    folder_paths.folder_names_and_paths["audio_encoders"][0].remove(path)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run_dit(model):
    """One forward of any non-audio DiT on a 2 x 4 x 4 latent, with the image conditioning its config asks for."""
    x = _randn(1, model.out_dim, 2, 4, 4)
    y = _randn(1, model.in_dim - model.out_dim, 2, 4, 4, seed=1) if model.in_dim > model.out_dim else None
    clip = None
    if model.img_emb is not None:
        tokens = 514 if model.img_emb.emb_pos is not None else 257
        clip = _randn(1, tokens, model.img_emb.proj[0].normalized_shape[0], seed=2)
    context = _randn(1, 8, model.text_embedding[0].in_features, seed=3)
    return model(x, torch.tensor([500.0]), context, clip=clip, y=y)


def run_s2v(model):
    enc = model.casual_audio_encoder
    audio = _randn(1, enc.weights.shape[1], enc.encoder.conv1_local.conv.in_channels, 8, seed=1)
    context = _randn(1, 8, model.text_embedding[0].in_features, seed=3)
    return model(_randn(1, 16, 2, 4, 4), torch.tensor([500.0]), context, audio, _randn(1, 16, 1, 4, 4, seed=2))


def run_vae(model):
    return model.decode(_randn(1, model.z_dim, 2, 4, 4))


def run_t5(model):
    ids = torch.randint(0, model.token_embedding.num_embeddings, (1, 8), generator=torch.Generator().manual_seed(0))
    return model(ids, torch.ones(1, 8, dtype=torch.long))


def run_clip(model):
    return model(_randn(1, 3, 32, 32).clamp(-1, 1))


def run_wav2vec2(model):
    return model(_randn(1, 1600) * 0.1)


def dit(name):
    return lambda n: n.loaders.WanLeanModelLoader.execute(name, "default")[0], run_dit


# every model kind through its loader node: what it loads -> how it runs on a tiny input
CASES = {
    "t2v": dit("wan2.1_t2v_1.3B_fp16.safetensors"),
    "t2v-fp8": dit("wan2.1_t2v_1.3B_fp8_e4m3fn.safetensors"),
    "t2v-gguf": dit("wan2.1-t2v-1.3b-Q8_0.gguf"),
    "i2v": dit("wan2.1_i2v_480p_14B_fp16.safetensors"),
    "flf2v": dit("wan2.1_flf2v_720p_14B_fp16.safetensors"),
    "i2v-a14b": dit("wan2.2_i2v_high_noise_14B_fp16.safetensors"),
    "ti2v": dit("wan2.2_ti2v_5B_fp16.safetensors"),
    "s2v": (lambda n: n.loaders.WanLeanModelLoader.execute("wan2.2_s2v_14B_bf16.safetensors", "default")[0], run_s2v),
    "vae21": (lambda n: n.loaders.WanLeanVAELoader.execute("wan_2.1_vae.safetensors")[0], run_vae),
    "vae22": (lambda n: n.loaders.WanLeanVAELoader.execute("wan2.2_vae.safetensors")[0], run_vae),
    "umt5": (lambda n: n.loaders.WanLeanTextEncoderLoader.execute("umt5_xxl_fp16.safetensors")[0], run_t5),
    "clip": (lambda n: n.image.WanLeanCLIPVisionLoader.execute("clip_vision_h.safetensors")[0], run_clip),
    "wav2vec2": (lambda n: n.s2v.WanLeanAudioEncoderLoader.execute("wav2vec2_large_english_fp16.safetensors")[0],
                 run_wav2vec2),
}


def load_and_run(nodes, case, on):
    """(handle, output) of CASES[case] loaded through its node with aimdo_enabled = `on`, run through ComfyUI's
    memory manager (Handle.load: load_models_gpu with the plain ModelPatcher) in the same mode."""
    load, run = CASES[case]
    with aimdo(on), torch.no_grad():
        handle = load(nodes)
        model = handle.load()
        return handle, run(model).float()


@pytest.mark.parametrize("case", list(CASES))
def test_every_loader_loads_under_dynamic_vram_and_computes_the_same(nodes, case):
    _, ref = load_and_run(nodes, case, False)
    handle, out = load_and_run(nodes, case, True)
    model = handle.patcher.model
    assert torch.isfinite(out).all() and out.std() > 0, case
    assert torch.equal(out, ref), f"{case}: max abs diff {(out - ref).abs().max().item():.3e}"
    unloaded = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight is None]
    assert not unloaded, f"{case}: Linear layers left without weights: {unloaded[:3]}"


def test_partially_loaded_beside_dynamic_vram(nodes, fake_gpu):
    """A GPU with room for half the weights: ComfyUI's load_models_gpu loads the plain ModelPatcher partially (the rest
    streams through the casting ops) with aimdo on, and the model computes what it computes fully loaded."""
    for case in ("t2v", "clip"):
        _, ref = load_and_run(nodes, case, False)
        fake_gpu.fit = 0.5
        handle, out = load_and_run(nodes, case, True)
        assert handle.patcher.model.model_lowvram, f"{case}: expected a partial load"
        assert 0 < fake_gpu.loads[-1][2][handle.patcher] < handle.patcher.model_size()
        assert torch.equal(out, ref), f"{case}: max abs diff {(out - ref).abs().max().item():.3e}"
        fake_gpu.fit = None
        mm.free_memory(1e30, FAKE)


def _clip_builder(smoke_models):
    """(make(ops) for the smoke CLIP's config, its state dict in the model's own keys)."""
    sd = clip.to_internal(read_file(os.path.join(smoke_models, "clip_vision", "clip_vision_h.safetensors")))
    config = clip.infer_config(sd)
    return (lambda ops: clip.WanCLIPVision(**config, heads=clip.HEADS, ops=ops)), sd


def test_under_aimdo_a_model_built_with_comfy_ops_does_not_list_its_linears(smoke_models):
    """Negative control: why the keys come from build_on_meta. Under aimdo the model's own state_dict() (what the
    loaders read before) has no Linear weight or bias; loading only those keys is what failed ("Missing key(s)")."""
    make, sd = _clip_builder(smoke_models)
    with aimdo(True):
        model, expected = build_on_meta(make, comfy.ops.manual_cast)
        own = model.state_dict()
        linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(model.get_submodule(name).weight is None for name in linears)
        assert set(expected) - set(own) == {f"{name}.{p}" for name in linears for p in ("weight", "bias")}
        with pytest.raises(RuntimeError, match="Missing key"):
            model.load_state_dict({k: sd[k] for k in own}, strict=True, assign=True)  # the old key collection
        model.load_state_dict({k: sd[k] for k in expected}, strict=True, assign=True)
    with aimdo(False):  # the default mode: the model lists every tensor, the same keys and shapes
        model, default = build_on_meta(make, comfy.ops.manual_cast)
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in expected.items()}
        assert default.keys() == expected.keys()


def test_under_aimdo_a_wrong_linear_shape_is_refused_before_loading(smoke_models):
    """check_weights checks Linear weights that the layers do not hold yet: under aimdo ComfyUI's lazy Linear adopts
    whatever tensor it is given (negative control below), so a damaged file would only fail inside the sampler."""
    sd = read_file(os.path.join(smoke_models, "diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors"))
    key = "blocks.0.ffn.2.weight"
    bad = {**sd, key: sd[key][:, :-1]}
    with aimdo(True):
        with pytest.raises(ValueError, match=rf"{key} \[\d+, \d+\] \(expected \[\d+, \d+\]\)"):
            WanDiT.from_state_dict(bad, ops=comfy.ops.manual_cast)
        model, _ = build_on_meta(lambda ops: WanDiT(**WanDiT.config_from_state_dict(sd), ops=ops), comfy.ops.manual_cast)
        model.load_state_dict(bad, strict=False, assign=True)  # no error from torch or ComfyUI
        assert model.get_submodule("blocks.0.ffn.2").weight.shape == bad[key].shape
