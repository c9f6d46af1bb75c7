"""Step caching: off means bit-identical output; a fixed interval computes exactly every n-th call; a threshold
skips more as it grows; per-expert caches for A14B. (On random weights the quality meaning is limited.)"""
import torch

from wan_core.cache import StepCache
from wan_core.dit import WanDiT
from wan_core.pipeline import Cond, Expert, generate
from fixtures.smoke import randomize_

ARGS = dict(seed=0, steps=12, shift=5.0, sampler="unipc", width=64, height=64, length=5)


def tiny(seed):
    return randomize_(WanDiT(dim=128, ffn_dim=64, num_layers=2, text_dim=8, freq_dim=32), seed=seed).eval()


def run(model, cache=None, cfg=5.0):
    g = torch.Generator().manual_seed(0)
    cond, uncond = Cond(torch.randn(3, 8, generator=g)), Cond(torch.randn(3, 8, generator=g))
    return generate([Expert(lambda: model, cfg, cache=cache)], cond, uncond, **ARGS)


def test_cache_off_is_exact_and_interval_counts():
    model = tiny(0)
    plain = run(model)
    assert torch.equal(plain, run(model, StepCache(threshold=0.0)))
    cache = StepCache(interval=3)
    out = run(model, cache)
    assert (cache.calls, cache.skipped) == (12, 7)  # call 1 computed (warm-up), then every 3rd of calls 2..12
    assert not torch.equal(out, plain)


def test_threshold_sweep_skips_more_and_changes_little():
    model = tiny(1)
    plain = run(model)
    skipped, diffs = [], []
    for threshold in (0.05, 0.3, 1.0):
        cache = StepCache(threshold=threshold)
        out = run(model, cache)
        skipped.append(cache.skipped)
        diffs.append(((out - plain).abs().max() / plain.abs().max()).item())
    assert skipped == sorted(skipped) and skipped[-1] > skipped[0]
    assert diffs[0] <= diffs[-1]


def test_each_expert_has_its_own_cache():
    high, low = tiny(2), tiny(3)
    caches = [StepCache(interval=2), StepCache(interval=2)]
    g = torch.Generator().manual_seed(0)
    cond, uncond = Cond(torch.randn(3, 8, generator=g)), Cond(torch.randn(3, 8, generator=g))
    generate([Expert(lambda: high, 4.0, 875.0, caches[0]), Expert(lambda: low, 3.0, 0.0, caches[1])], cond, uncond,
             **dict(ARGS, shift=12.0))
    assert caches[0].calls + caches[1].calls == 12 and caches[0].calls > 0 and caches[1].calls > 0
