"""torch.compile of the DiT blocks (wan_core.compile) and the model loader's `attention` / `compile` widgets.

Fast tests compile with dynamo's "eager" backend: tracing, guards, graph breaks and graph reuse are those of inductor,
the captured graphs just run as they are (inductor's code generation takes ~20-40 s here even for the tiny model: the
inductor tests are `slow`)."""
import logging
import os
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from conftest import ROOT, import_comfy, scale_close
from workflow_api import combo_options
from test_memory import T2V, conds, fake_gpu, nodes, sample  # noqa: F401  (fixtures)
from test_s2v import TINY as S2V_TINY, inputs as s2v_inputs
from wan_core import attention
from wan_core.compile import compile_blocks
from wan_core.dit import Block, WanDiT
from wan_core.pipeline import Cond, Expert, generate
from wan_core.s2v import WanS2V
from fixtures.smoke import randomize_

import_comfy()
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors run faster on one thread

FAST = "eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny(seed=0, layers=3, cls=WanDiT, **cfg):
    """A small model built as the loader builds it inside ComfyUI's inference mode: weights adopted from a state dict
    (inference tensors, as ComfyUI's LoRA patches are too), ComfyUI's casting ops."""
    cfg = cfg or dict(dim=256, ffn_dim=512, text_dim=32, freq_dim=64)
    sd = randomize_(cls(num_layers=layers, **cfg), seed=seed).state_dict()
    with torch.inference_mode():
        return cls.from_state_dict({k: v.clone() for k, v in sd.items()}, ops=comfy.ops.manual_cast).eval()


def graphs():
    """(frames dynamo compiled, distinct graphs) so far: both stay put when nothing recompiles."""
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def run_sampler(model, steps=4, cfg=5.0, size=(64, 64, 5), callback=None):
    g = torch.Generator().manual_seed(3)
    cond, uncond = Cond(torch.randn(7, 32, generator=g)), Cond(torch.randn(4, 32, generator=g))
    width, height, length = size
    with torch.inference_mode():  # as ComfyUI runs nodes
        return generate([Expert(lambda: model, cfg)], cond, uncond, seed=0, steps=steps, shift=5.0, sampler="unipc",
                        width=width, height=height, length=length, callback=callback)


def test_blocks_compile_once_and_never_recompile_across_steps(monkeypatch):
    """UniPC with CFG, 4 steps: everything compiles during the first step (all blocks through one cache entry of
    Block.forward, also when the attention kernels were never looked up before), nothing after; the latent equals
    eager's within 1e-5 of its scale. A second run of the same size with recompiles made errors passes too."""
    model = tiny()
    eager = run_sampler(model)
    compile_blocks(model, "blocks", backend=FAST)
    monkeypatch.setattr(attention, "_modules", {})  # a fresh process: no kernel package looked up yet
    seen = []
    out = run_sampler(model, callback=lambda step, *_: seen.append(graphs()))
    assert seen[0][0] > 0 and len(set(seen)) == 1, seen
    assert len(_debug_get_cache_entry_list(Block.forward.__code__)) == 1
    assert not counters["graph_break"], list(counters["graph_break"])
    print(f"compiled frames, graphs: {seen[0]}; graph breaks: {sum(counters['graph_break'].values())}")
    scale_close(out, eager, rel=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(run_sampler(model), out, rtol=0, atol=0)
    compile_blocks(model, "off")
    assert "forward" not in model.blocks[0].__dict__ and model.compiled_blocks is None
    torch.testing.assert_close(run_sampler(model), eager, rtol=0, atol=0)


def test_a_block_is_one_graph():
    """Casting ops, RoPE, modulation, attention.py's per-model backend and wan_core.parallel's sequence-parallel
    lookup all trace into the graph: one graph per block, no break."""
    model = tiny(layers=1)
    model.attention_backend = "sdpa"
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    x, t, ctx = torch.randn(2, 16, 2, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 512, 32)
    with torch.inference_mode():
        model(x, t, ctx)
        with attention.use_backend("sdpa"):
            explained = torch._dynamo.explain(Block.forward)(model.blocks[0], *seen["args"], **seen["kwargs"])
    places = {f"{os.path.basename(r.user_stack[-1].filename)}:{r.user_stack[-1].name}" for r in explained.break_reasons}
    print(f"{explained.graph_count} graphs, breaks at {places}")
    assert explained.graph_count == 1 and not places, places


def test_what_recompiles_and_what_does_not():
    """A second model of the same shapes (the other A14B expert) reuses the graph; a new size compiles once more
    (then the token count is dynamic: a third size reuses that); cfg 1 (batch 1) once more."""
    first, second = tiny(seed=0), tiny(seed=1)
    for m in (first, second):
        compile_blocks(m, "blocks", backend=FAST)
    run_sampler(first, steps=1)
    before = graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_sampler(second, steps=2)
    assert graphs() == before
    run_sampler(first, steps=1, size=(96, 64, 5))
    resized = graphs()
    assert resized[0] > before[0]
    with torch._dynamo.config.patch(error_on_recompile=True):  # the token count is dynamic from now on
        run_sampler(first, steps=1, size=(64, 96, 9))
    run_sampler(first, steps=1, cfg=1.0)
    assert graphs()[0] > resized[0]


def test_lora_patches_through_model_patcher_keep_the_graph():
    """ComfyUI's ModelPatcher (loaded before the first forward, as the sampler node does) replaces patched weights with
    new Parameters: no recompile, the patch shows in the output, unpatching restores it exactly."""
    model = tiny()
    compile_blocks(model, "blocks", backend=FAST)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    x, t, ctx = torch.randn(2, 16, 2, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 512, 32)
    with torch.inference_mode():
        mm.load_models_gpu([patcher])
        plain = model(x, t, ctx)
        before = graphs()
        weight = model.blocks[1].ffn[0].weight
        patcher.add_patches({"blocks.1.ffn.0.weight": (0.5 * torch.randn_like(weight),)}, 1.0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            mm.load_models_gpu([patcher])
            assert model.blocks[1].ffn[0].weight is not weight  # a new Parameter, as ComfyUI sets it
            patched = model(x, t, ctx)
            patcher.unpatch_model()
            restored = model(x, t, ctx)
    mm.unload_all_models()
    assert graphs() == before
    assert (patched - plain).abs().max() > 1e-3
    torch.testing.assert_close(restored, plain, rtol=0, atol=0)


def test_s2v_blocks_compile():
    """WanS2V's blocks (segments of noisy vs reference/motion tokens, the audio injector between blocks)."""
    model = tiny(cls=WanS2V, layers=S2V_TINY["num_layers"], **{k: v for k, v in S2V_TINY.items() if k != "num_layers"})
    a = s2v_inputs()
    a["context"] = a["context"][:, :7]
    with torch.inference_mode():
        eager = model(**a)
        compile_blocks(model, "blocks", backend=FAST)
        out = model(**a)
        before = graphs()
        with torch._dynamo.config.patch(error_on_recompile=True):
            model(**dict(a, t=a["t"] * 0.5))
    assert before[0] > 0 and graphs() == before
    scale_close(out, eager, rel=1e-5)


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; choose one of off, blocks, blocks"):
        compile_blocks(tiny(layers=1), "fast")


# ---- the loader's widgets

def pack(name):
    return sys.modules[f"wanlean_pack.wan_core.{name}"]


def test_loader_defaults_and_choices(nodes, monkeypatch):
    loader = nodes.loaders.WanLeanModelLoader
    optional = loader.INPUT_TYPES()["optional"]
    assert combo_options(optional["attention"]) == ["auto", "sdpa", "flash", "sage"]
    assert combo_options(optional["compile"]) == ["off", "blocks", "blocks (max-autotune)"]
    assert (optional["attention"][1]["default"], optional["compile"][1]["default"]) == ("auto", "off")
    net = loader.execute(T2V, "default")[0].patcher.model  # old workflows: no such inputs
    assert net.attention_backend is None and net.compiled_blocks is None
    net = loader.execute(T2V, "default", attention="sdpa", compile="blocks (max-autotune)")[0].patcher.model
    assert net.attention_backend == "sdpa" and net.compiled_blocks.mode == "blocks (max-autotune)"
    monkeypatch.setitem(pack("attention")._modules, "flash", None)  # as on this CPU machine, also where it exists
    with pytest.raises(ValueError, match=r"Wan Load Diffusion Model, input 'attention': attention backend 'flash' "
                                         r"is not installed here \(pip install flash-attn\); available: auto, sdpa"):
        loader.execute(T2V, "default", attention="flash")


def test_loader_compile_through_the_sampler_node(nodes, monkeypatch):
    """Loader (compile on) -> ComfyUI's memory manager -> the sampler node: 3 steps, no recompile after the first,
    the latent of the uncompiled model."""
    real = pack("compile").compile_blocks
    monkeypatch.setattr(nodes.loaders, "compile_blocks", lambda m, mode, **kw: real(m, mode, **kw, backend=FAST))
    positive, negative = conds()
    eager = sample(nodes, nodes.loaders.WanLeanModelLoader.execute(T2V, "default")[0], positive, negative)
    model, = nodes.loaders.WanLeanModelLoader.execute(T2V, "default", compile="blocks")
    sampler, seen = nodes.sampler, []
    step_callback = sampler.step_callback

    def counting(*args, **kwargs):
        inner = step_callback(*args, **kwargs)
        return lambda *a: (seen.append(graphs()), inner(*a))
    monkeypatch.setattr(sampler, "step_callback", counting)
    compiled = sample(nodes, model, positive, negative)
    assert seen[0][0] > 0 and len(set(seen)) == 1, seen
    scale_close(compiled["samples"], eager["samples"], rel=1e-5)


def test_partial_load_runs_blocks_uncompiled_with_a_log_line(nodes, fake_gpu, caplog):
    """A device that holds half the weights: ComfyUI loads partially, the blocks run eagerly (said once in the log),
    dynamo never runs, and the latent equals the full load's."""
    positive, negative = conds()
    full = sample(nodes, nodes.loaders.WanLeanModelLoader.execute(T2V, "default")[0], positive, negative)
    mm.free_memory(1e30, torch.device("cpu", 0))
    fake_gpu.fit = 0.5
    model, = nodes.loaders.WanLeanModelLoader.execute(T2V, "default", compile="blocks")
    with caplog.at_level(logging.INFO):
        partial = sample(nodes, model, positive, negative)
    assert model.patcher.model.model_lowvram
    message = "Wan Lean compile: the model is partially loaded (low VRAM), so the DiT blocks run uncompiled"
    assert caplog.text.count(message) == 1
    assert counters["frames"]["total"] == 0
    torch.testing.assert_close(partial["samples"], full["samples"], rtol=0, atol=0)


def t2v_api(server):
    """The smoke T2V workflow in API form at 64x64x5, 3 steps, and its model loader's inputs."""
    import json
    from run_workflow import shrink
    from workflow_api import ui_to_api
    with open(os.path.join(ROOT, "workflows", "wan21_t2v_1.3B.json"), encoding="utf-8") as f:
        api = ui_to_api(json.load(f), server.object_info())
    api = shrink(api, {"width": 64, "height": 64, "length": 5, "steps": 3})
    return api, next(n["inputs"] for n in api.values() if n["class_type"] == "WanLeanModelLoader")


def test_server_refuses_a_kernel_that_is_not_installed(server):
    """Through the real server: the widgets are optional (old workflows keep working) and a missing kernel stops the
    run at the loader with the message naming the input."""
    from comfy_host import ExecutionError
    if attention._module("flash") is not None:
        pytest.skip("flash-attn is installed here")
    optional = server.object_info()["WanLeanModelLoader"]["input"]["optional"]
    assert (optional["attention"][1]["default"], optional["compile"][1]["default"]) == ("auto", "off")
    api, loader = t2v_api(server)
    loader["attention"] = "flash"
    with pytest.raises(ExecutionError, match=r"input 'attention': attention backend 'flash' is not installed here "
                                             r"\(pip install flash-attn\)") as err:
        server.run(api)
    assert err.value.node_type == "WanLeanModelLoader"


# ---- inductor (slow: code generation and a C++ compiler)

@pytest.mark.slow
def test_inductor_blocks_match_eager_without_recompiles():
    model = tiny()
    eager = run_sampler(model)
    compile_blocks(model, "blocks")
    seen = []
    out = run_sampler(model, callback=lambda step, *_: seen.append(graphs()))
    assert len(set(seen)) == 1, seen
    print(f"inductor vs eager: {scale_close(out, eager, rel=1e-4):.1e} of the scale")


@pytest.mark.slow
def test_server_runs_a_workflow_with_compile_on(server):
    """The loader's widgets through the real server: a smoke T2V workflow with compile on and attention sdpa."""
    from media import assert_real_video, probe
    api, loader = t2v_api(server)
    loader.update(attention="sdpa", compile="blocks")
    files = server.output_files(server.run(api))
    video = next(f for f in files if f.endswith(".mp4"))
    info = probe(video)
    assert (info["frames"], info["width"], info["height"]) == (5, 64, 64)
    assert_real_video(video)
    assert "Wan Lean compile: the DiT blocks run through torch.compile (blocks, backend inductor)" in server.log_text()


def test_compile_without_a_toolchain_is_refused_at_load(nodes, monkeypatch):
    """No C++ compiler on the CPU: the loader names the input and the fix before reading the file; off still loads."""
    import shutil
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="input 'compile': torch.compile on the CPU needs a C\\+\\+ compiler"):
        nodes.loaders.WanLeanModelLoader.execute(T2V, "default", compile="blocks")
    model, = nodes.loaders.WanLeanModelLoader.execute(T2V, "default", compile="off")
    assert model.patcher.model.compiled_blocks is None
