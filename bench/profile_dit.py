"""torch.profiler of one DiT forward, ours vs native, on a bench config (CPU by default).

    .venv/bin/python bench/profile_dit.py --config cpu-small [--rows 25] [--impl ours,native-sdpa]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CONFIGS  # noqa: E402
from cases import runner  # noqa: E402


def profile(impl, cfg, cache, rows):
    run = runner("dit_t2v", impl, cfg, cache)
    run()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                + ([torch.profiler.ProfilerActivity.CUDA] if cfg["device"] == "cuda" else [])) as prof:
        run()
    sort = "self_cuda_time_total" if cfg["device"] == "cuda" else "self_cpu_time_total"
    print(f"==== {impl}")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="cpu-small", choices=sorted(CONFIGS))
    ap.add_argument("--impl", default="ours,native-sdpa")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    cfg, cache = dict(CONFIGS[args.config]), {}
    for impl in args.impl.split(","):
        profile(impl, cfg, cache, args.rows)


if __name__ == "__main__":
    main()
