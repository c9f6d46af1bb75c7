"""Wan Sampler (multi-GPU) inside a real ComfyUI server: the T2V smoke workflow with a Wan Load LoRA, its sampler
swapped for the multi-device node on 2 CPU worker processes (ring attention, a token count that does not divide),
saves the latent of the single-process sampler and reports each step to the progress bar; the workers start without re-running ComfyUI's main.py;
/interrupt during a run and /free after one end the workers."""
import json
import os
import time

import psutil
import pytest
from safetensors.torch import load_file

from comfy_host import ExecutionError, Interrupted
from conftest import ROOT, assert_progress, scale_close
from run_workflow import shrink
from test_lora import smoke_loras  # noqa: F401  (a fixture: two LoRAs for the smoke T2V-1.3B)
from workflow_api import ui_to_api

SIZE = {"width": 144, "height": 80, "length": 9, "steps": 4}  # latent 3 x 5 x 9 = 135 tokens
PARALLEL = {"devices": "cpu:2", "cfg_parallel": False, "attention": "ring"}


def t2v_latent_api(server, lora, parallel=False, prefix="parallel", model=None, **inputs):
    """The T2V workflow (small) with a LoRA loader before the sampler (None: none) and SaveLatent as its only output;
    the sampler is the multi-device one when `parallel`; model: (file, weight dtype) of the model loader."""
    with open(os.path.join(ROOT, "workflows", "wan21_t2v_1.3B.json"), encoding="utf-8") as f:
        api = shrink(ui_to_api(json.load(f), server.object_info()), SIZE)
    sampler_id = next(k for k, v in api.items() if v["class_type"] == "WanLeanSampler")
    sampler = api[sampler_id]
    if lora is not None:
        api["lora"] = {"class_type": "WanLeanLoraLoader",
                       "inputs": {"model": sampler["inputs"]["model"], "lora_name": lora, "strength": 0.8}}
        sampler["inputs"]["model"] = ["lora", 0]
    if model is not None:
        loader = next(v for v in api.values() if v["class_type"] == "WanLeanModelLoader")
        loader["inputs"].update(model_name=model[0], weight_dtype=model[1])
    if parallel:
        sampler["class_type"] = "WanLeanParallelSampler"
        sampler["inputs"] = {k: v for k, v in sampler["inputs"].items() if not k.startswith("cache_")}
        sampler["inputs"].update(PARALLEL)
    sampler["inputs"].update(inputs)
    for node_id in [k for k, v in api.items() if v["class_type"] in ("WanLeanVAEDecode", "WanLeanSaveVideo")]:
        del api[node_id]
    api["save"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_id, 0], "filename_prefix": prefix}}
    return api


def latent_of(server, entry):
    path = next(p for p in server.output_files(entry) if p.endswith(".latent"))
    return load_file(path)["latent_tensor"]


def workers(server):
    """The server's spawned worker processes (multiprocessing's spawn entry point in their command line)."""
    found = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_gone(server, pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not set(pids) & set(workers(server)):
            return True
        time.sleep(0.1)
    return False


def test_parallel_node_in_server(server, smoke_loras):  # noqa: F811
    lora = smoke_loras[0]
    reference = latent_of(server, server.run(t2v_latent_api(server, lora, prefix="single")))
    entry, messages = server.run_listening(t2v_latent_api(server, lora, parallel=True))
    out = latent_of(server, entry)
    steps = [m["data"]["value"] for m in messages if isinstance(m, dict) and m.get("type") == "progress"]
    assert_progress(steps, SIZE["steps"])
    pids = workers(server)
    assert len(pids) == 2, pids
    assert out.shape == reference.shape == (1, 16, 3, 10, 18)
    scale_close(out, reference, rel=1e-5)
    assert server.log_text().count("Setting output directory") == 1, "the workers ran ComfyUI's main.py again"

    long_run = server.queue(t2v_latent_api(server, lora, parallel=True, steps=200))  # the same pool, reused
    deadline = time.monotonic() + 60
    while long_run not in server.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)
    assert set(workers(server)) == set(pids), "the pool was not reused"
    server.interrupt()
    with pytest.raises(Interrupted):
        server.wait(long_run, timeout=60)
    assert wait_gone(server, pids), "the workers outlived the interrupt"

    server.run(t2v_latent_api(server, lora, parallel=True, seed=11))  # a new pool after the interrupt
    pids = workers(server)
    assert len(pids) == 2, pids
    server.free()
    assert wait_gone(server, pids), "the workers outlived /free"


def test_another_wan_core_first_on_the_path(smoke_models, smoke_loras, tmp_path, monkeypatch):  # noqa: F811
    """Another installed top-level package named `wan_core`, first on the server's PYTHONPATH: the pack still loads,
    and the multi-device sampler's workers (which import the pack's core by its package path) never touch it."""
    from comfy_host import ComfyServer
    fake = tmp_path / "site" / "wan_core"
    fake.mkdir(parents=True)
    marker = tmp_path / "fake-wan_core-imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'a').close()\n"
                                      "raise ImportError('the fake wan_core was imported')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    with ComfyServer(models_dir=smoke_models, output_dir=str(tmp_path / "out")) as server:
        assert "WanLeanParallelSampler" in server.object_info(), server.log_tail()
        assert not server.import_errors(), server.import_errors()
        reference = latent_of(server, server.run(t2v_latent_api(server, smoke_loras[0], prefix="single")))
        out = latent_of(server, server.run(t2v_latent_api(server, smoke_loras[0], parallel=True)))
        scale_close(out, reference, rel=1e-5)
        server.free()
    assert not marker.exists(), "a process imported the other wan_core"


@pytest.mark.parametrize("model", [("wan2.1_t2v_1.3B_fp8_scaled.safetensors", "default"),
                                   ("wan2.1_t2v_1.3B_fp16.safetensors", "fp8_e4m3fn")])
def test_parallel_node_fp8_in_server(server, smoke_models, model):
    """An fp8 model (ComfyUI's scaled fp8 file; the loader's fp8 weight dtype) on the multi-device node: the workers
    keep its matrices in fp8 (wan_core.castops) and save the single-device sampler's latent."""
    from fixtures.variants import write_smoke_variants
    write_smoke_variants(smoke_models)
    reference = latent_of(server, server.run(t2v_latent_api(server, None, prefix="single_fp8", model=model)))
    out = latent_of(server, server.run(t2v_latent_api(server, None, parallel=True, prefix="parallel_fp8", model=model)))
    assert out.shape == reference.shape == (1, 16, 3, 10, 18)
    assert out.isfinite().all() and out.std() > 0
    scale_close(out, reference, rel=1e-5)
    server.free()


def test_parallel_node_seed_mode_official(server, smoke_models):
    """seed_mode official on the multi-device node: every rank draws the official noise (its own device's generator,
    seeded alike), so the latent equals Wan Sampler's in seed_mode official. (On the CPU the official T2V draw is the
    same float32 CPU generator as comfy's, so the two modes agree here; tests/test_official.py checks the draw.)"""
    official = dict(seed=11, seed_mode="official")
    reference = latent_of(server, server.run(t2v_latent_api(server, None, prefix="single_official", **official)))
    out = latent_of(server, server.run(t2v_latent_api(server, None, parallel=True, prefix="parallel_official", **official)))
    scale_close(out, reference, rel=1e-5)
    assert out.isfinite().all() and out.std() > 0
    server.free()


def test_parallel_node_refuses_the_s2v_model(server):
    api = t2v_latent_api(server, None, parallel=True, model=("wan2.2_s2v_14B_bf16.safetensors", "default"))
    with pytest.raises(ExecutionError, match="S2V-14B model, which samples only with its audio"):
        server.run(api)
