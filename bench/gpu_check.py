"""The first GPU run in one command: the CUDA-only tests, the real-width benchmarks, one JSON and a README table.

    python3 bench/gpu_check.py --out DIR              # on a CUDA machine (bench/gpu_check.sh sets it up first)
    python3 bench/gpu_check.py --out DIR --cpu        # checks the script itself on the CPU at toy sizes

Parts, in order, each inside what is left of `--budget` seconds (a part that would not fit is recorded as skipped;
the JSON is rewritten after every part, so a run cut short keeps what it measured):
  device     name, capability, torch / CUDA, the dense bf16 peak the MFU figures divide by, a measured bf16 matmul
  tests      pytest -m cuda (tests/test_cuda.py: flash / sage kernels, ring-attention blocks, inductor, scaled-fp8
             matmul, NCCL with one process per visible GPU)
  1.3b       the real 1.3B (30 layers, dim 1536) at 832x480x81: DiT forward and 2 sampling steps with CFG, ours vs
             ComfyUI native at the same kernel (SDPA on CUDA): seconds, s/step, TFLOP/s, MFU, peak VRAM
  kernels    the same 1.3B forward through each attention kernel installed (sdpa, flash, sage): time, difference
  14b-block  one 14B-width block (dim 5120) at 1280x720x81 (75,600 tokens), ours vs native
  a14b       a 4-step cfg-1 Wan 2.2 A14B-width run (two experts of dim 5120, boundary 0.875, 832x480x81) on a few
             layers per expert: DiT calls, s/step, peak VRAM (the 40-layer figure is a stated extrapolation)
  vae        the real Wan 2.1 VAE decode (untiled and tiled) and encode at 832x480x81, ours vs native
  dynamic-vram  under dynamic VRAM (comfy-aimdo, ComfyUI's NVIDIA default since 0.30; the newest host of
             scripts/comfy_host.HOSTS, .host/ComfyUI-0.33.0, with comfy-aimdo importable): the real-width 1.3B as the
             pack loads it (plain ModelPatcher) beside ComfyUI's native one (its dynamic patcher), in turns: load and
             run seconds, torch / device / aimdo VRAM, what stays resident (bench/dynamic_vram.py, own process)
"""
import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CONFIGS, _add_flops, time_case  # noqa: E402
from cases import dit_model, tokens  # noqa: E402
from common import ROOT, peak_probe, timed  # noqa: E402
from comfy_host import HOSTS, select_host  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets; MFU divides by these.
PEAK_BF16 = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
             "H800": 989.4, "A100": 312.0, "L40S": 362.1, "RTX 6000 Ada": 364.2, "RTX 4090": 165.2, "L4": 121.0}

_1_3B = dict(CONFIGS["gpu-1.3b"], steps=2, reps=3)
_14B_BLOCK = dict(CONFIGS["gpu-14b"], layers=1, reps=3)
_A14B = dict(CONFIGS["gpu-14b"], layers=2, grid=(21, 30, 52), steps=4)
_VAE = dict(CONFIGS["gpu-1.3b"], reps=2)
_TOY = dict(CONFIGS["cpu-small"], dim=256, ffn=512, layers=2, grid=(2, 6, 8), sample_grid=(2, 6, 8), steps=2, reps=1,
            vae_dim=16, vae_grid=(2, 8, 8), vae_tile=(8, 5), vae_overlap=2, text_tokens=16)


def peak_tflops(name):
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def part_device(cfg):
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0])
    if cfg["device"] != "cuda":
        return dict(info, name="cpu", peak_bf16_tflops=None)
    props = torch.cuda.get_device_properties(0)
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = min(timed(lambda: a @ b, "cuda")[0] for _ in range(10))
    return dict(info, name=props.name, capability=f"{props.major}.{props.minor}", count=torch.cuda.device_count(),
                memory_gib=round(props.total_memory / 2**30, 1), peak_bf16_tflops=peak_tflops(props.name),
                matmul_8192_bf16_tflops=round(2 * n**3 / seconds / 1e12, 1))


def part_tests(cfg, out_dir):
    """pytest -m cuda; each test's outcome from the junit XML (skips carry their reason)."""
    xml = os.path.join(out_dir, "cuda-tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}",
           os.path.join("tests", "test_cuda.py")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cfg.get("tests_timeout", 300))
    tests = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name")
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, detail = tag, (node.get("message") or "")[:300]
        tests[name] = dict(outcome=outcome, detail=detail, seconds=float(case.get("time", 0)))
    return dict(returncode=proc.returncode, summary=proc.stdout.strip().splitlines()[-1:], tests=tests)


def _weights(model):
    return sum(t.numel() * t.element_size() for t in model.parameters())


def _memory(case, cfg, cache, impls):
    """Peak device memory of one call per implementation: the call's own peak above what was allocated before it,
    plus that model's weights (both models stay resident, so the process peak would count the other one too)."""
    from cases import runner
    out = {}
    for impl in impls:
        run = runner(case, impl, cfg, cache)
        stop = peak_probe(cfg["device"])
        run()
        work, _ = stop()
        model = dit_model(cfg, impl, cache, case == "dit_i2v") if case.startswith(("dit", "sample")) else None
        out[impl] = dict(work_bytes=work, weight_bytes=_weights(model) if model is not None else None)
    return out


def bench_dit(cfg, cases):
    """time_case (interleaved medians, outputs compared with native) + FLOPs + peak memory, per case."""
    cache, results = {}, {}
    for case in cases:
        res = time_case(case, cfg, cache)
        if cfg["device"] == "cuda":
            for impl, mem in _memory(case, cfg, cache, list(res)).items():
                res[impl].update(mem)
        _add_flops(case, cfg, res)
        results[case] = res
    cache.clear()
    return results


def part_kernels(cfg):
    """One DiT forward at the config's size through each attention kernel installed here (the model's own
    `attention_backend`, as the loader's `attention` widget sets it): seconds, ratio and difference to SDPA."""
    from cases import dit_runner
    from wan_core import attention
    cache, out, ref = {}, {}, None
    run = dit_runner("ours", cfg, cache)
    model = dit_model(cfg, "ours", cache)
    for name in ["sdpa"] + [n for n in ("flash", "sage") if n in attention.available_backends()]:
        model.attention_backend = name
        try:
            timed(run, cfg["device"])  # warm-up (Triton kernels compile here)
            seconds = min(timed(run, cfg["device"])[0] for _ in range(cfg["reps"]))
            result = run().float()
        except Exception as e:  # a kernel that does not run on this device: recorded, the others go on
            out[name] = dict(error=f"{type(e).__name__}: {e}"[:300])
            continue
        ref = result if ref is None else ref
        out[name] = dict(seconds=seconds, time_ratio=seconds / out["sdpa"]["seconds"] if "sdpa" in out else 1.0,
                         rel_diff=(result - ref).abs().max().item() / ref.abs().max().item())
    model.attention_backend = None
    return out


def part_a14b(cfg):
    """Two experts (high noise above t = 875, low noise below), 4 steps of the distilled schedule (euler-distilled,
    Lightning's training timesteps) at shift 5, cfg 1: one DiT call a step. Counted calls against the official 40 steps with CFG (two branches a step, batched)."""
    from wan_core.pipeline import Cond, Expert, generate
    cache, calls = {}, []
    high = dit_model(cfg, "ours", cache)
    low = dit_model(cfg, "ours", {})  # a second copy (same random weights: only the switch and memory matter)
    for m in (high, low):
        m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    g = torch.Generator().manual_seed(2)
    cond = Cond(torch.randn(cfg["text_tokens"], cfg["text_dim"], generator=g))
    f, h, w = cfg["grid"]
    size = dict(width=16 * w, height=16 * h, length=1 + 4 * (f - 1))
    run = lambda: generate([Expert(lambda: high, 1.0, min_t=875.0), Expert(lambda: low, 1.0)], cond,  # noqa: E731
                           cond, seed=0, steps=cfg["steps"], shift=5.0, sampler="euler-distilled",
                           device=cfg["device"], dtype=cfg["dtype"], **size)
    run()
    calls.clear()
    stop = peak_probe(cfg["device"])
    seconds, latent = timed(run, cfg["device"])
    work, total = stop()
    per_layer_step = seconds / cfg["steps"] / cfg["layers"]
    return dict(layers_per_expert=cfg["layers"], tokens=tokens(cfg["grid"]), steps=cfg["steps"], dit_calls=len(calls),
                batch_per_call=sorted(set(calls)), official_calls=40, official_batch=2,
                call_ratio=40 / len(calls), seconds=seconds, seconds_per_step=seconds / cfg["steps"],
                work_bytes=work, peak_bytes=total, weight_bytes=_weights(high) + _weights(low),
                finite=bool(torch.isfinite(latent).all()),
                est_seconds_per_step_40_layers=per_layer_step * 40,
                est_run_seconds_40_layers=per_layer_step * 40 * cfg["steps"])


def part_vae(cfg):
    cache, out = {}, {}
    for case in ("vae_decode", "vae_encode"):
        out[case] = time_case(case, cfg, cache)
        if cfg["device"] == "cuda":
            for impl, mem in _memory(case, cfg, cache, list(out[case])).items():
                out[case][impl].update(mem)
    return out


def part_dynamic_vram(out_dir, toy):
    """bench/dynamic_vram.py in its own process (aimdo must start before torch does) on the newest host of HOSTS, with
    that host's venv where it exists, else this interpreter (bench/gpu_check.sh puts comfy-aimdo on its path)."""
    tree, python = select_host(list(HOSTS)[-1])
    if not os.path.isfile(os.path.join(tree, "main.py")):
        return dict(skipped=f"no ComfyUI host with dynamic VRAM at {tree} (bash scripts/setup-host.sh, or carry it)")
    python = python if os.path.isfile(python) else sys.executable
    out = os.path.join(out_dir, "dynamic_vram.json")
    cmd = [python, os.path.join("bench", "dynamic_vram.py"), "--out", out] + (["--cpu"] if toy else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, WANLEAN_HOST=tree), capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        return dict(skipped=f"failed: {proc.stderr.strip()[-400:]}")
    with open(out) as f:
        return json.load(f)


def _dynamic_lines(d):
    """The dynamic-vram part in words: per turn load / run seconds and VRAM, what stays resident."""
    if not d or "skipped" in d:
        return []
    lines = ["", f"Dynamic VRAM (comfy-aimdo), DiT {d['model']}, {d['tokens']:,} tokens, weights {_gib(d['weights_bytes'])} "
                 f"GiB each; native behind {d['patchers']['native']}, ours behind {d['patchers']['ours']}; "
                 f"ours vs native max diff/scale {d['rel_diff']:.1e}:", "",
             "| turn | load s | run s | torch peak GiB | device used GiB | aimdo GiB | resident after (GiB on device) |",
             "|---|---|---|---|---|---|---|"]
    for name in ("native", "ours", "native_again"):
        t, after = d[name], d[name]["after"]
        resident = ", ".join(f"{k} {_gib(v)}" for k, v in after["resident"].items()) or "-"
        lines.append(f"| {name} | {t['load_seconds']:.2f} | {t['run_seconds']:.2f} | {_gib(t['torch_peak'])} | "
                     f"{_gib(after.get('device_used'))} | {_gib(after.get('aimdo_usage'))} | {resident} |")
    return lines


def _gib(b):
    return f"{b / 2**30:.1f}" if b else "-"


def _dit_rows(name, res, peak):
    rows = []
    for case, impls in res.items():
        nat = impls["native"]
        for impl, r in impls.items():
            mfu = f"{100 * r['tflops_per_s'] / peak:.0f}%" if peak else "-"
            step = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "-"
            vram = _gib((r.get("work_bytes") or 0) + (r.get("weight_bytes") or 0))
            rows.append(f"| {name} {case} | {impl} | {r['seconds']:.3f} | {step} | {r['seconds'] / nat['seconds']:.2f} | "
                        f"{r['tflops_per_s']:.3g} | {mfu} | {vram} | {r['rel_diff']:.1e} |")
    return rows


def _shape(cfg):
    f, h, w = cfg["grid"]
    pixels = f"{16 * w}x{16 * h}x{1 + 4 * (f - 1)}"
    return f"{cfg['layers']} x dim {cfg['dim']}, {pixels}, {tokens(cfg['grid']):,} tokens"


def markdown(report):
    dev = report["parts"].get("device", {})
    peak = dev.get("peak_bf16_tflops")
    lines = [f"Device: {dev.get('name')} ({dev.get('memory_gib', '-')} GiB, capability {dev.get('capability', '-')}), "
             f"torch {dev.get('torch')} CUDA {dev.get('cuda')}; dense bf16 peak {peak} TFLOP/s "
             f"(measured 8192^3 bf16 matmul: {dev.get('matmul_8192_bf16_tflops', '-')} TFLOP/s); bf16 weights and "
             f"activations, ComfyUI's casting ops on both sides.", "",
             "| run | impl | seconds | s/step | t/native | TFLOP/s | MFU | peak VRAM GiB | max diff/scale |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, name in (("1.3b", "1.3B"), ("14b-block", "14B-width block")):
        res = report["parts"].get(key, {})
        if "skipped" not in res and res:
            lines += _dit_rows(f"{name} ({report['shapes'][key]})", res, peak)
    a = report["parts"].get("a14b", {})
    if "seconds" in a:
        lines += ["", f"A14B width, {a['steps']} steps cfg 1 (euler-distilled, shift 5, boundary 875), "
                      f"{a['layers_per_expert']} of 40 layers "
                      f"per expert, {a['tokens']:,} tokens: {a['dit_calls']} DiT calls of batch {a['batch_per_call']} "
                      f"(official 40 steps with CFG: {a['official_calls']} calls of batch 2, {a['call_ratio']:.0f}x "
                      f"more calls, {2 * a['call_ratio']:.0f}x more samples); {a['seconds_per_step']:.2f} s/step; peak "
                      f"memory {_gib(a['peak_bytes'])} GiB. Extrapolated to 40 layers: {a['est_seconds_per_step_40_layers']:.1f} "
                      f"s/step, {a['est_run_seconds_40_layers']:.0f} s for the 4 steps (an estimate: layers scale "
                      f"linearly)."]
    kern = report["parts"].get("kernels", {})
    if kern and "skipped" not in kern:
        lines += ["", f"Attention kernels, one 1.3B DiT forward ({report['shapes']['1.3b']}): " + "; ".join(
            f"{k} {v['seconds']:.3f} s ({v['time_ratio']:.2f}x sdpa, diff {v['rel_diff']:.1e})" if "seconds" in v
            else f"{k} failed: {v['error'][:100]}" for k, v in kern.items())]
    vae = report["parts"].get("vae", {})
    if isinstance(vae, dict) and "skipped" not in vae and vae:
        lines += ["", f"| VAE 2.1 ({report['shapes']['vae']}) | impl | seconds | t/native | peak VRAM GiB | max diff/scale |",
                  "|---|---|---|---|---|---|"]
        for case, impls in vae.items():
            for impl, r in impls.items():
                lines.append(f"| {case} | {impl} | {r['seconds']:.2f} | {r['seconds'] / impls['native']['seconds']:.2f} "
                             f"| {_gib(r.get('work_bytes'))} | {r['rel_diff']:.1e} |")
    lines += _dynamic_lines(report["parts"].get("dynamic-vram"))
    tests = report["parts"].get("tests", {}).get("tests", {})
    if tests:
        lines += ["", "CUDA tests: " + "; ".join(f"{k} {v['outcome']}" + (f" ({v['detail'][:80]})"
                                                                          if v['outcome'] != 'passed' else "")
                                                 for k, v in tests.items())]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--cpu", action="store_true", help="check the script itself: every part at toy sizes on the CPU")
    ap.add_argument("--budget", type=float, default=420, help="seconds for all parts (the rest are skipped)")
    ap.add_argument("--parts", default="device,1.3b,14b-block,a14b,kernels,tests,vae,dynamic-vram")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu to check the script itself")
    torch.backends.cuda.matmul.allow_tf32 = False
    toy = args.cpu
    dev = dict(device="cpu", dtype=torch.float32, vae_dtype=torch.float32) if toy else {}
    plans = {  # part -> (estimated seconds on an H100-class GPU, callable)
        "device": (10, lambda: part_device(dict(_TOY, **dev) if toy else _1_3B)),
        "tests": (120, lambda: part_tests({}, args.out)),
        "1.3b": (60, lambda: bench_dit(dict(_TOY, **dev) if toy else _1_3B, ("dit_t2v", "sample"))),
        "kernels": (40, lambda: part_kernels(dict(_TOY, **dev) if toy else _1_3B)),
        "14b-block": (30, lambda: bench_dit(dict(_TOY, **dev) if toy else _14B_BLOCK, ("dit_t2v",))),
        "a14b": (40, lambda: part_a14b(dict(_TOY, **dev) if toy else _A14B)),
        "vae": (120, lambda: part_vae(dict(_TOY, **dev) if toy else _VAE)),
        "dynamic-vram": (60, lambda: part_dynamic_vram(args.out, toy)),
    }
    report = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), mode="cpu-check" if toy else "cuda", parts={},
                  shapes={k: _shape(_TOY if toy else c) for k, c in (("1.3b", _1_3B), ("14b-block", _14B_BLOCK),
                                                                     ("a14b", _A14B), ("vae", _VAE))})
    t0 = time.time()
    for name in args.parts.split(","):
        estimate, fn = plans[name]
        left = args.budget - (time.time() - t0)
        if not toy and left < estimate:
            report["parts"][name] = dict(skipped=f"{left:.0f} s of the budget left, the part needs ~{estimate} s")
        else:
            start = time.time()
            try:
                report["parts"][name] = fn()
            except Exception as e:  # keep the other parts' figures
                report["parts"][name] = dict(skipped=f"failed: {type(e).__name__}: {e}"[:500])
            report.setdefault("seconds", {})[name] = round(time.time() - start, 1)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"[gpu_check] {name}: {report['seconds'].get(name, 0) if 'seconds' in report else 0} s", flush=True)
        _write(report, args.out)
    print(markdown(report))
    print("written:", _write(report, args.out))


def _write(report, out):
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    return os.path.join(out, "gpu_check.json")


if __name__ == "__main__":
    main()
