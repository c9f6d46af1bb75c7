"""Opt-in soak (`bash scripts/test.sh -m slow`): 20 consecutive runs of a workflow on one server; the server's
RSS after run 20 stays within 5% of its RSS after run 2 (the figures are printed)."""
import psutil
import pytest

from conftest import run_workflow


@pytest.mark.slow
def test_twenty_runs_do_not_grow_memory(server):
    proc = psutil.Process(server.proc.pid)
    rss = []
    for run in range(20):
        run_workflow(server, "wan22_ti2v_5b_i2v.json" if run % 2 else "wan21_t2v_1.3B.json",
                     {"WanLeanSampler.seed": run}, sizes={"width": 128, "height": 64, "length": 9, "steps": 3})
        rss.append(proc.memory_info().rss)
    print("RSS after each run (MiB):", " ".join(f"{r / 2**20:.0f}" for r in rss))
    growth = rss[19] / rss[1] - 1
    print(f"run 2 -> run 20: {rss[1] / 2**20:.0f} -> {rss[19] / 2**20:.0f} MiB ({growth:+.1%})")
    assert abs(growth) <= 0.05
