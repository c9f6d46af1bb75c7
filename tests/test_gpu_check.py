"""bench/gpu_check.py checks itself on the CPU (--cpu: every part at toy sizes), so the one-command GPU run cannot rot
between the sessions that are lent a GPU."""
import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-check"
    parts = report["parts"]
    assert set(parts) == {"device", "tests", "1.3b", "kernels", "14b-block", "a14b", "vae"}
    assert not [k for k, v in parts.items() if "skipped" in v], parts
    assert all(t["outcome"] == "skipped" for t in parts["tests"]["tests"].values())  # no CUDA here
    for case in ("dit_t2v", "sample"):
        assert parts["1.3b"][case]["ours"]["rel_diff"] < 1e-4  # the same model as native, in fp32
    assert parts["a14b"]["dit_calls"] == parts["a14b"]["steps"] and parts["a14b"]["finite"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| 1.3B" in table and "A14B width" in table and "vae_decode" in table
