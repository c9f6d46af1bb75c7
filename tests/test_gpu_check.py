"""bench/gpu_check.py checks itself on the CPU (--cpu: every part at toy sizes), so the one-command GPU run cannot rot
between the sessions that are lent a GPU."""
import json
import os
import subprocess
import sys

from comfy_host import HOSTS, select_host
from conftest import ROOT


def dynamic_vram_host():
    """Whether the newest host of HOSTS is here and has the dynamic-VRAM switch (read in its source: the check runs
    in another process)."""
    path = os.path.join(select_host(list(HOSTS)[-1])[0], "comfy", "memory_management.py")
    return os.path.isfile(path) and "aimdo_enabled" in open(path, encoding="utf-8").read()


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-check"
    parts = report["parts"]
    assert set(parts) == {"device", "tests", "1.3b", "kernels", "14b-block", "a14b", "vae", "dynamic-vram"}
    dynamic = parts.pop("dynamic-vram")
    assert not [k for k, v in parts.items() if "skipped" in v], parts
    if not dynamic_vram_host():
        assert "dynamic VRAM" in dynamic["skipped"], dynamic
    else:  # both DiTs built the aimdo way from one state dict, run in turns through ComfyUI's memory manager
        assert "skipped" not in dynamic, dynamic
        assert dynamic["rel_diff"] < 1e-4 and dynamic["native_repeatable"] and dynamic["finite"], dynamic
        assert set(dynamic["ours"]["after"]["resident"]) == {"WanDiT (ModelPatcher)", "WanModel (ModelPatcher)"}
    assert all(t["outcome"] == "skipped" for t in parts["tests"]["tests"].values())  # no CUDA here
    for case in ("dit_t2v", "sample"):
        assert parts["1.3b"][case]["ours"]["rel_diff"] < 1e-4  # the same model as native, in fp32
    assert parts["a14b"]["dit_calls"] == parts["a14b"]["steps"] and parts["a14b"]["finite"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| 1.3B" in table and "A14B width" in table and "vae_decode" in table
    assert ("| native_again |" in table) == ("skipped" not in dynamic)
