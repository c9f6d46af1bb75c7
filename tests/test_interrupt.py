"""Cancel works: /interrupt during a long sampling run ends the prompt as interrupted within about one step,
and the next run on the same loaded model gives exactly the latent of a freshly loaded model's run. Both runs sample
(none is served from ComfyUI's cache: 0.33's default cache keeps earlier prompts' outputs, so they use a seed never
run before, and the reference loads the model anew through an input that changes no value: attention sdpa, which is
what auto picks on the CPU)."""
import json
import os
import time

import pytest
from safetensors.torch import load_file

from comfy_host import Interrupted
from conftest import ROOT
from run_workflow import shrink
from workflow_api import set_inputs, ui_to_api

SIZE = {"width": 256, "height": 160, "length": 9}


def t2v_with_latent(server, steps, prefix, seed=7, attention="auto"):
    with open(os.path.join(ROOT, "workflows", "wan21_t2v_1.3B.json"), encoding="utf-8") as f:
        api = shrink(ui_to_api(json.load(f), server.object_info()), dict(SIZE, steps=steps))
    api = set_inputs(api, {"WanLeanSampler.seed": seed, "WanLeanModelLoader.attention": attention})
    sampler = next(k for k, v in api.items() if v["class_type"] == "WanLeanSampler")
    api["950"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    return api, sampler


def timed_run(server, api):
    start = time.monotonic()
    entry = server.run(api, timeout=600)
    return time.monotonic() - start, entry


def latent_of(server, entry):
    path = next(p for p in server.output_files(entry) if p.endswith(".latent"))
    return load_file(path)["latent_tensor"]


def cached_nodes(entry):
    msgs = entry.get("status", {}).get("messages", [])
    return {n for kind, data in msgs if kind == "execution_cached" for n in data.get("nodes", [])}


def test_interrupt_within_one_step_and_clean_next_run(server):
    api_a, sampler = t2v_with_latent(server, 4, "interrupt/a")
    server.run(api_a, timeout=600)  # warm: models loaded, text encoded
    t4, _ = timed_run(server, t2v_with_latent(server, 4, "interrupt/t4", seed=8)[0])
    t12, _ = timed_run(server, t2v_with_latent(server, 12, "interrupt/t12", seed=8)[0])
    step = max((t12 - t4) / 8, 0.01)

    long_api, _ = t2v_with_latent(server, 200, "interrupt/long")
    prompt_id = server.queue(long_api)
    deadline = time.monotonic() + 120
    while prompt_id not in server.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(max(2.0, 10 * step))  # well inside the sampling loop (200 steps take far longer)
    asked = time.monotonic()
    server.interrupt()
    with pytest.raises(Interrupted):
        server.wait(prompt_id, timeout=120)
    latency = time.monotonic() - asked
    print(f"step {step:.3f} s, interrupt latency {latency:.3f} s")
    assert latency <= 1.5 * step + 1.0, f"interrupt took {latency:.2f} s, one step is {step:.2f} s"

    again = server.run(t2v_with_latent(server, 4, "interrupt/a2", seed=9)[0], timeout=600)
    assert sampler not in cached_nodes(again)  # it really sampled again
    fresh_api, _ = t2v_with_latent(server, 4, "interrupt/ref", seed=9, attention="sdpa")
    loader = next(k for k, v in fresh_api.items() if v["class_type"] == "WanLeanModelLoader")
    fresh = server.run(fresh_api, timeout=600)
    assert not {loader, sampler} & cached_nodes(fresh)  # the model loaded anew and sampled
    assert (latent_of(server, again) == latent_of(server, fresh)).all()
