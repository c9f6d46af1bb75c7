"""Speed and memory of wan_core vs ComfyUI's native Wan on identical random weights.

    .venv/bin/python bench/bench.py --config cpu-small            # a few minutes on 2 CPU cores
    .venv/bin/python bench/bench.py --config gpu-1.3b --cases dit_t2v,sample

Times are medians of interleaved runs (ours, native, ours, native, ...) after a warm-up, in one process.
Peak memory: each (case, implementation) in its own spawned child, after one warm-up call: on CPU the
RSS high-water mark above the RSS before the call ("work") and the child's whole-process peak ("proc");
on CUDA torch.cuda.max_memory_allocated above the allocation before the call, and in all.
DiT cases also report matmul TFLOP/s (model FLOP utilisation = that / the device's peak).
Writes bench/results/<config>-<time>.json (git-ignored) and prints its path.
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import IMPLS, dit_flops, runner, tokens  # noqa: E402
from cache_sweep import sweep, sweep_table  # noqa: E402
from common import ROOT, load_average, peak_probe, rel_diff, release_free_memory, timed, use_cpu_clock  # noqa: E402

_CPU = dict(device="cpu", dtype=torch.float32, vae_dtype=torch.float32, channels=16, text_dim=4096, text_tokens=64,
            batch=1, reps=5, mem=True)
_GPU = dict(_CPU, device="cuda", dtype=torch.bfloat16, vae_dtype=torch.bfloat16, reps=3, sweep_steps=30)
CONFIGS = {
    # 768-wide, 3 layers, 1,920 tokens (384x640, 5 frames): attention ~30%, linears ~70% of the FLOPs.
    # VAE 2.1 at 1/3 of the real width (32) on 128x192x5 frames, tiled as 2 tiles across the width with a
    # 2-latent overlap (8% more pixels decoded); VAE 2.2 at 1/8 of its widths, likewise.
    "cpu-small": dict(_CPU, dim=768, ffn=3072, layers=3, grid=(2, 24, 40), sample_grid=(2, 16, 28), steps=3,
                      sweep_steps=12, vae_dim=32, vae_grid=(2, 16, 24), vae_tile=(16, 13), vae_overlap=2,
                      vae22_dim=20, vae22_dec_dim=32, vae22_grid=(2, 8, 12), vae22_tile=(8, 7), vae22_overlap=1),
    # Real 1.3B (all 30 layers) at 832x480x81 (32,760 tokens); the real VAE on the full video.
    "gpu-1.3b": dict(_GPU, dim=1536, ffn=8960, layers=30, grid=(21, 30, 52), sample_grid=(21, 30, 52), steps=4,
                     vae_dim=96, vae_grid=(21, 60, 104), vae_tile=(32, 32), vae_overlap=8,
                     cases=("dit_t2v", "dit_i2v", "sample", "vae_decode", "vae_encode", "cache_sweep")),
    # TI2V-5B width (48 latent channels), all 30 layers at 1280x704x121 (27,280 tokens); the real 2.2 VAE.
    "gpu-5b": dict(_GPU, dim=3072, ffn=14336, layers=30, channels=48, grid=(31, 22, 40), sample_grid=(31, 22, 40),
                   steps=2, vae22_dim=160, vae22_dec_dim=256, vae22_grid=(31, 44, 80), vae22_tile=(24, 24),
                   vae22_overlap=4, cases=("dit_t2v", "sample", "vae22_decode", "vae22_encode")),
    # 14B width, 4 of its 40 layers, at 1280x720x81 (75,600 tokens); VAE at 720p.
    "gpu-14b": dict(_GPU, dim=5120, ffn=13824, layers=4, grid=(21, 45, 80), sample_grid=(21, 45, 80), steps=2,
                    vae_dim=96, vae_grid=(21, 90, 160), vae_tile=(48, 48), vae_overlap=8,
                    cases=("dit_t2v", "dit_i2v", "sample", "vae_decode")),
}
ALL_CASES = ("dit_t2v", "dit_i2v", "sample", "vae_decode", "vae_encode", "vae22_decode", "vae22_encode",
             "cache_sweep")


def with_overrides(cfg, items):
    """A copy of cfg with --set KEY=VALUE items applied (python literals; keys ending in dtype take a torch dtype name)."""
    import ast
    cfg = dict(cfg)
    for item in items:
        key, _, value = item.partition("=")
        cfg[key] = getattr(torch, value) if key.endswith("dtype") else ast.literal_eval(value)
    return cfg


def impls_for(case, cfg):
    """Implementations to run; native-sdpa only where ComfyUI's default attention is not SDPA already (CPU)."""
    names = IMPLS[case]
    if cfg.get("compile") and case in ("dit_t2v", "dit_i2v", "sample"):
        names = names[:1] + ("ours-compiled",) + names[1:]
    if torch.device(cfg["device"]).type == "cuda":
        names = tuple(n for n in names if n != "native-sdpa")
    return names


def time_case(case, cfg, cache):
    """Interleaved timing after one warm-up of each implementation; outputs compared with native."""
    impls = impls_for(case, cfg)
    runs = {name: runner(case, name, cfg, cache) for name in impls}
    outs, times = {}, {name: [] for name in impls}
    first = {}
    for name in impls:  # warm-up; for ours-compiled this call compiles
        first[name], outs[name] = timed(runs[name], cfg["device"])
    for _ in range(cfg["reps"]):
        for name in impls:
            times[name].append(timed(runs[name], cfg["device"])[0])
    ref = outs["native"].float()
    return {name: dict(seconds=statistics.median(times[name]), all_seconds=times[name], first_seconds=first[name],
                       rel_diff=rel_diff(outs[name].float(), ref),
                       mean_abs_diff=(outs[name].float() - ref).abs().mean().item()) for name in impls}


def _mem_child(case, impl, cfg, queue):
    try:
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        run = runner(case, impl, cfg, {})
        run()  # warm-up: one-time library set-up (oneDNN, cuBLAS workspaces) is not the model's memory
        release_free_memory()
        stop = peak_probe(cfg["device"])
        run()
        work, proc = stop()
        queue.put(dict(work_bytes=work, process_bytes=proc))
    except BaseException as e:  # report, never hang the parent
        queue.put(dict(error=f"{type(e).__name__}: {e}"))


def memory_case(case, cfg):
    """Peak memory of each implementation, each in a fresh spawned process. glibc is told to mmap every block
    from 64 KiB (a fixed threshold) so freed tensors leave RSS at once: RSS then follows live memory."""
    ctx, out = mp.get_context("spawn"), {}
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        for impl in impls_for(case, cfg):
            if impl in ("native-sdpa", "ours-compiled"):
                continue  # same model and memory shape as native up to the attention; compiling again per child
            queue = ctx.Queue()
            proc = ctx.Process(target=_mem_child, args=(case, impl, cfg, queue))
            proc.start()
            out[impl] = queue.get()
            proc.join()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return out


def run_case(case, cfg, cache, args):
    t0 = time.time()
    result = time_case(case, cfg, cache)
    if cfg["mem"] and not args.no_memory:
        for impl, mem in memory_case(case, cfg).items():
            result[impl].update(mem)
    if case.startswith("dit") or case == "sample":
        _add_flops(case, cfg, result)
    print(f"  {case} done in {time.time() - t0:.0f} s", flush=True)
    return result


def _add_flops(case, cfg, result):
    if case == "sample":  # CFG: batch 2 per step
        flops = cfg["steps"] * dit_flops(cfg, cfg["sample_grid"], batch=2)
    else:
        flops = dit_flops(cfg)
    for r in result.values():
        r["tflops_per_s"] = flops / r["seconds"] / 1e12
        if case == "sample":
            r["seconds_per_step"] = r["seconds"] / cfg["steps"]


def _mb(b):
    return f"{b / 2**20:,.0f}" if b is not None else "-"


def table(results):
    """Rows: case, impl, median seconds, time ratio to native, work / process peak MB and ratios, and the output
    difference to native: max |d| / max |native| and mean |d|."""
    head = (f"{'case':<12} {'impl':<13} {'sec':>8} {'t/nat':>6} {'work MB':>8} {'w/nat':>6} {'proc MB':>8} "
            f"{'p/nat':>6} {'max diff':>8} {'mean diff':>9} {'TFLOP/s':>8}")
    lines = [head, "-" * len(head)]
    for case, res in results.items():
        if "skipped" in res:
            lines.append(f"{case:<12} skipped: {res['skipped']}")
            continue
        nat = res["native"]
        for impl, r in res.items():
            ratio = lambda k: (f"{r[k] / nat[k]:.2f}" if r.get(k) and nat.get(k) else "-")  # noqa: E731
            lines.append(f"{case:<12} {impl:<13} {r['seconds']:>8.3f} {ratio('seconds'):>6} "
                         f"{_mb(r.get('work_bytes')):>8} {ratio('work_bytes'):>6} {_mb(r.get('process_bytes')):>8} "
                         f"{ratio('process_bytes'):>6} {r['rel_diff']:>8.1e} {r['mean_abs_diff']:>9.1e} "
                         f"{r.get('tflops_per_s', float('nan')):>8.3f}" + (f"  {r['error']}" if "error" in r else ""))
        if "ours-compiled" in res:  # its warm-up call compiled the blocks
            r = res["ours-compiled"]
            lines.append(f"{case:<12} ours-compiled: first call {r['first_seconds']:.1f} s, so compiling took about "
                         f"{r['first_seconds'] - r['seconds']:.1f} s")
    return "\n".join(lines)


def targets(results):
    """The CPU targets (issue 16): every part at most 0.9x native at the same kernel with unchanged outputs: the DiT
    forward and sampling against native-sdpa, each VAE encode / decode (untiled and tiled) against native."""
    out = {}
    for case, res in results.items():
        if "native" not in res or "ours" not in res:
            continue
        ref = res.get("native-sdpa", res["native"])
        for impl in ("ours", "ours-tiled"):
            if impl in res:
                r = res[impl]["seconds"] / ref["seconds"]
                exact = impl == "ours-tiled" or res[impl]["rel_diff"] <= 1e-4
                name = "native-sdpa" if "native-sdpa" in res else "native"
                out[f"{case} {impl}/{name} <= 0.9"] = (round(r, 3), r <= 0.9 and exact)
    return out


def _jsonable(cfg):
    return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()}


def main():
    ap = argparse.ArgumentParser(description="wan_core vs ComfyUI native Wan: speed and memory")
    ap.add_argument("--config", default="cpu-small", choices=sorted(CONFIGS))
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {','.join(ALL_CASES)}")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per implementation (median)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true", help="CPU: time by the process's CPU time, not the wall clock "
                                                            "(steady on a shared machine; use with --threads 1)")
    ap.add_argument("--compile", action="store_true", help="add ours-compiled (torch.compile'd blocks, inductor) to "
                                                           "the DiT and sampling cases; its first call is the compile")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config entry (python literal; dtypes by name), e.g. --set layers=1 "
                         "--set 'grid=(1,8,8)' --set dtype=bfloat16")
    args = ap.parse_args()
    cfg = with_overrides(CONFIGS[args.config], args.set)
    if args.reps:
        cfg["reps"] = args.reps
    if args.compile:
        cfg["compile"] = True
    if args.threads:
        cfg["threads"] = args.threads
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        use_cpu_clock()
        cfg["clock"] = "process CPU time"
    cases = args.cases.split(",") if args.cases else cfg.get("cases", ALL_CASES)
    torch.manual_seed(0)
    print(f"config {args.config}: {cfg['layers']} layers of dim {cfg['dim']}, {tokens(cfg['grid'])} tokens, "
          f"{cfg['device']} {cfg['dtype']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load_average()}, clock: {cfg.get('clock', 'wall')}", flush=True)
    results, cache = {}, {}
    for case in (c for c in cases if c != "cache_sweep"):
        results[case] = run_case(case, cfg, cache, args)
    print(table(results))
    if "cache_sweep" in cases:  # ours only (cached vs uncached): its own table
        results["cache_sweep"] = sweep(cfg, cache)
        print(sweep_table(results["cache_sweep"], cfg["sweep_steps"]))
    goals = targets(results) if cfg["dtype"] == torch.float32 else {}  # the issue's targets are fp32 CPU ones
    for name, (value, ok) in goals.items():
        print(f"target {name}: {value} {'PASS' if ok else 'FAIL'}")
    path = write_json(args.config, cfg, results, goals)
    print("results written to", path)


def write_json(name, cfg, results, goals):
    device = torch.cuda.get_device_name() if torch.device(cfg["device"]).type == "cuda" else platform.processor()
    folder = os.path.join(ROOT, "bench", "results")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(config=name, settings=_jsonable(cfg), device=device or platform.machine(),
                       torch=torch.__version__, threads=torch.get_num_threads(), load_average=load_average(),
                       results=results, targets={k: dict(value=v, ok=ok) for k, (v, ok) in goals.items()}),
                  f, indent=1)
    return path


if __name__ == "__main__":
    main()
