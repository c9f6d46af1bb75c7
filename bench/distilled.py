"""The 4-step distilled Wan 2.2 A14B preset against the official 40-step run: DiT calls and time.

    .venv/bin/python bench/distilled.py --config cpu-small --threads 1
    .venv/bin/python bench/distilled.py --config gpu-14b --set layers=40 --runs distilled  # A14B width, 4 steps

Both runs go through wan_core.pipeline.generate with two experts of the config's width (our WanDiT, different
random weights each) at the config's `sample_grid`:
- official T2V-A14B: 40 UniPC steps, shift 12, cfg 4 (high noise) / 3 (low noise), switch at 0.875; every call
  batches prompt and negative (2 rows);
- distilled (Wan2.2-Lightning preset): 4 euler-distilled steps, shift 5, cfg 1 / 1, same switch; 1 row a call.
Counts the DiT calls and the rows they computed (a CFG call computes two passes), times each run (median of
--reps), and checks the distilled run's final latent against a hand computation: explicit Euler on sigmas
1, 15/16, 5/6, 5/8, 0 with the experts called at t = 1000 sigma directly. Prints the ratios; writes
bench/results/distilled-<config>-<time>.json.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CONFIGS, with_overrides  # noqa: E402
from cases import _dit_kwargs  # noqa: E402
from common import ROOT, build, load_average, rel_diff, timed  # noqa: E402
from wan_core.dit import WanDiT  # noqa: E402
from wan_core.pipeline import Cond, Expert, generate, initial_noise, latent_shape, pad_context  # noqa: E402

RUNS = {  # name -> (steps, shift, sampler, cfg high, cfg low)
    "official": (40, 12.0, "unipc", 4.0, 3.0),
    "distilled": (4, 5.0, "euler-distilled", 1.0, 1.0),
}
BOUNDARY = 0.875


def experts(cfg):
    """Two experts of the config's width (seeds 0 and 1) with a counter of calls and rows on each."""
    calls = []
    models = [build(lambda: WanDiT(**_dit_kwargs(cfg, False)), cfg["device"], cfg["dtype"], seed=s) for s in (0, 1)]
    for m in models:
        m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    return models, calls


def size_of(cfg):
    f, h, w = cfg["sample_grid"]
    return dict(width=16 * w, height=16 * h, length=1 + 4 * (f - 1), channels=cfg["channels"])


def run(name, models, cond, uncond, cfg):
    steps, shift, sampler, g_high, g_low = RUNS[name]
    plan = [Expert(lambda: models[0], g_high, BOUNDARY * 1000), Expert(lambda: models[1], g_low)]
    return lambda: generate(plan, cond, uncond, seed=0, steps=steps, shift=shift, sampler=sampler,
                            device=cfg["device"], dtype=cfg["dtype"], **size_of(cfg))


@torch.no_grad()
def by_hand(models, cond, cfg):
    """The distilled run written out: x += (sigma' - sigma) * v(x, 1000 sigma), the expert picked by t >= 875."""
    sigmas = [1.0, 15 / 16, 5 / 6, 5 / 8, 0.0]
    x = initial_noise(latent_shape(**size_of(cfg)), 0).to(cfg["device"])
    ctx = pad_context(cond.context).to(cfg["device"], cfg["dtype"])
    for s, s_next in zip(sigmas, sigmas[1:]):
        t = torch.tensor([1000 * s], device=cfg["device"])
        model = models[0] if 1000 * s >= BOUNDARY * 1000 else models[1]
        x = x + (s_next - s) * model(x.to(cfg["dtype"]), t, ctx).float()
    return x


def measure(cfg, reps, names=tuple(RUNS)):
    models, calls = experts(cfg)
    g = torch.Generator().manual_seed(2)
    cond, uncond = (Cond(torch.randn(cfg["text_tokens"], cfg["text_dim"], generator=g)) for _ in range(2))
    run("distilled", models, cond, uncond, cfg)()  # warm-up (one-time library set-up)
    out = {}
    for name in names:
        fn = run(name, models, cond, uncond, cfg)
        calls.clear()
        seconds, latent = timed(fn, cfg["device"])  # also the warm-up
        out[name] = dict(calls=len(calls), rows=sum(calls), latent=latent)
        times = [seconds] + [timed(fn, cfg["device"])[0] for _ in range(reps - 1)]
        out[name].update(seconds=statistics.median(times), all_seconds=times)
    if "distilled" in out:
        out["distilled"]["hand_rel_diff"] = rel_diff(out["distilled"]["latent"].float(), by_hand(models, cond, cfg))
    for r in out.values():
        latent = r.pop("latent").float()
        assert torch.isfinite(latent).all() and latent.std() > 0, "a run made a non-finite or constant latent"
    return out


def report(out):
    lines = [f"{'run':<10} {'DiT calls':>9} {'passes':>7} {'sec':>9}",
             *(f"{n:<10} {r['calls']:>9} {r['rows']:>7} {r['seconds']:>9.3f}" for n, r in out.items())]
    if "distilled" in out:
        lines.append(f"distilled final latent vs the hand computation: max diff / scale "
                     f"{out['distilled']['hand_rel_diff']:.1e}")
    if len(out) < 2:
        return "\n".join(lines)
    o, d = out["official"], out["distilled"]
    lines += [f"fewer DiT calls: {o['calls'] / d['calls']:.1f}x; fewer passes (a CFG call is two): "
              f"{o['rows'] / d['rows']:.1f}x (issue target >= 15x: {'PASS' if o['rows'] / d['rows'] >= 15 else 'FAIL'})",
              f"time official / distilled: {o['seconds'] / d['seconds']:.1f}x"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="cpu-small", choices=sorted(CONFIGS))
    ap.add_argument("--reps", type=int, default=1, help="timed runs of each (median); the first one included")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config entry")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of official,distilled")
    args = ap.parse_args()
    cfg = with_overrides(CONFIGS[args.config], args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"config {args.config}: 2 experts of {cfg['layers']} layers, dim {cfg['dim']}, sample grid "
          f"{cfg['sample_grid']}, {cfg['device']} {cfg['dtype']}, load average {load_average()}", flush=True)
    out = measure(cfg, args.reps, [n for n in RUNS if n in args.runs.split(",")])
    print(report(out))
    folder = os.path.join(ROOT, "bench", "results")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"distilled-{args.config}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(config=args.config, overrides=args.set, load_average=load_average(), runs=RUNS, results=out),
                  f, indent=1)
    print("results written to", path)


if __name__ == "__main__":
    main()
