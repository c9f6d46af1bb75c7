"""Step-cache sweep: our sampler uncached, then with each cache setting, on the same weights, noise and prompts.

For each setting: the fraction of DiT calls that reused a cached residual, the sampling time against the uncached
run, and the final latent's difference to the uncached latent (max |d| / max |uncached| and mean |d|). On random
weights the difference says how far the shortcut moves the result, not whether a real video still looks right.
"""
import time

from cases import sample_runner
from common import rel_diff
from wan_core.cache import StepCache

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
INTERVALS = (2, 3)


def settings():
    return [("off", None)] + [(f"threshold {t}", dict(threshold=t)) for t in THRESHOLDS] + \
        [(f"interval {n}", dict(interval=n)) for n in INTERVALS]


def sweep(cfg, cache):
    """{setting: {seconds, time_ratio, skipped, calls, skipped_fraction, rel_diff, mean_abs_diff}}."""
    steps = cfg.get("sweep_steps", 12)
    out, ref = {}, None
    sample_runner("ours", dict(cfg, steps=1), cache)()  # warm-up (one-time library set-up)
    for name, kw in settings():
        step_cache = StepCache(**kw) if kw else None
        run = sample_runner("ours", dict(cfg, steps=steps), cache, step_cache=step_cache)
        t0 = time.perf_counter()
        latent = run().float()
        seconds = time.perf_counter() - t0
        if ref is None:
            ref, base = latent, seconds
        calls, skipped = (step_cache.calls, step_cache.skipped) if step_cache else (steps, 0)
        out[name] = dict(seconds=seconds, time_ratio=seconds / base, calls=calls, skipped=skipped,
                         skipped_fraction=skipped / calls, rel_diff=rel_diff(latent, ref),
                         mean_abs_diff=(latent - ref).abs().mean().item())
    return out


def sweep_table(result, steps):
    head = f"{'step cache':<14} {'skipped':>9} {'sec':>7} {'t/off':>6} {'max diff':>9} {'mean diff':>9}"
    lines = [f"step-cache sweep: ours, {steps} UniPC steps, CFG batch 2 (random weights: the diff is how far the "
             "shortcut moves the latent, not a quality measure)", head, "-" * len(head)]
    for name, r in result.items():
        lines.append(f"{name:<14} {r['skipped']:>3}/{r['calls']:<5} {r['seconds']:>7.2f} {r['time_ratio']:>6.2f} "
                     f"{r['rel_diff']:>9.1e} {r['mean_abs_diff']:>9.1e}")
    return "\n".join(lines)
