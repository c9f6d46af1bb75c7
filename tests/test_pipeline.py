"""Generation glue: the Wan 2.2 expert switch (call counts per expert and cfg), I2V/FLF2V masks,
TI2V first-frame conditioning, size checks."""
import pytest
import torch

from wan_core.dit import WanDiT
from wan_core.pipeline import Cond, Expert, check_video_size, frame_mask, generate
from wan_core.sampling import schedule
from fixtures.smoke import randomize_


def tiny(seed, **kw):
    return randomize_(WanDiT(dim=128, ffn_dim=64, num_layers=1, text_dim=8, freq_dim=32, **kw), seed=seed).eval()


def recorder(model, log, name):
    model.register_forward_pre_hook(lambda m, args: log.append((name, args[0].shape[0], args[1].clone())))
    return model


def text(n=3):
    return torch.randn(n, 8)


@pytest.mark.parametrize("boundary,shift,high,low", [(0.875, 12.0, 26, 14), (0.900, 5.0, 15, 25)])
def test_expert_switch_counts_calls(boundary, shift, high, low):
    """40 steps: the high-noise expert runs exactly for t >= boundary*1000 (official split), each with its own cfg."""
    log = []
    experts = [Expert(lambda m=recorder(tiny(0), log, "high"): m, cfg=4.0, min_t=boundary * 1000),
               Expert(lambda m=recorder(tiny(1), log, "low"): m, cfg=1.0)]
    generate(experts, Cond(text()), Cond(text()), seed=0, steps=40, shift=shift, sampler="unipc",
             width=32, height=32, length=1)
    _, ts = schedule("unipc", 40, shift)
    assert [n for n, *_ in log] == ["high"] * high + ["low"] * low
    assert all(t[0] >= boundary * 1000 for n, _, t in log if n == "high")
    assert [float(t[0]) for *_, t in log] == [float(t) for t in ts]
    assert {b for n, b, _ in log if n == "high"} == {2} and {b for n, b, _ in log if n == "low"} == {1}  # cfg 1: no uncond pass


def test_i2v_and_flf2v_masks():
    m = frame_mask(9, 2, 3)
    assert m.shape == (1, 4, 3, 2, 3)
    assert m[:, :, 0].eq(1).all() and m[:, :, 1:].eq(0).all()
    f = frame_mask(9, 2, 3, last=True)
    assert f[0, :, -1, 0, 0].tolist() == [0, 0, 0, 1] and f[:, :, 1].eq(0).all()


def test_i2v_y_reaches_the_model():
    log, seen = [], {}
    model = recorder(tiny(2, in_dim=36), log, "m")
    model.register_forward_hook(lambda m, args, kw, out: seen.update(y=kw["y"]), with_kwargs=True)
    y = torch.randn(1, 20, 2, 4, 4)
    generate([Expert(lambda: model, cfg=3.0)], Cond(text(), y=y), Cond(text(), y=y), seed=0, steps=2, shift=5.0,
             sampler="euler", width=32, height=32, length=5)
    assert torch.equal(seen["y"], torch.cat([y, y]))


def test_ti2v_first_frame():
    log = []
    model = recorder(tiny(3, in_dim=48, out_dim=48), log, "m")
    first = torch.randn(1, 48, 1, 4, 4)
    out = generate([Expert(lambda: model, cfg=5.0)], Cond(text(), first_frame=first), Cond(text(), first_frame=first),
                   seed=0, steps=3, shift=5.0, sampler="unipc", width=64, height=64, length=9, channels=48)
    assert out.shape == (1, 48, 3, 4, 4)
    assert torch.equal(out[:, :, :1], first)
    _, batch, t = log[0]
    assert t.shape == (2, 3 * 2 * 2) and t[:, :4].eq(0).all() and t[:, 4:].gt(900).all()


def test_size_errors_name_the_input_and_fix():
    with pytest.raises(ValueError, match="width 830 is not a multiple of 16; use 816 or 832"):
        check_video_size(830, 480, 81)
    with pytest.raises(ValueError, match="length 80 is not 1\\+4k frames; use 77 or 81"):
        check_video_size(832, 480, 80)
    with pytest.raises(ValueError, match="height 720 is not a multiple of 32; use 704 or 736"):
        check_video_size(1280, 720, 121, 32)


@pytest.mark.parametrize("boundary", [0.875, 0.900])
def test_distilled_a14b_four_steps_cfg1(boundary):
    """The Lightning 4-step preset: high-noise expert at t 1000 and 937.5, low-noise at 833.33 and 625 (both T2V and
    I2V boundaries), shown as floats, one batch-1 pass per step (cfg 1: no negative pass); the multi-device job
    (wan_core.parallel.sample_job behind ParallelDiT, here a CFG-parallel layout in one process) does the same."""
    from wan_core.parallel import Mesh, sample_job
    log = []
    models = {"high": recorder(tiny(0), log, "high"), "low": recorder(tiny(1), log, "low")}
    cond, uncond = Cond(text()), Cond(text())
    args = dict(seed=5, steps=4, shift=5.0, sampler="euler-distilled", width=32, height=32, length=5)
    out = generate([Expert(lambda: models["high"], cfg=1.0, min_t=boundary * 1000), Expert(lambda: models["low"], 1.0)],
                   cond, uncond, **args)
    assert [(n, b) for n, b, _ in log] == [("high", 1), ("high", 1), ("low", 1), ("low", 1)]
    assert [t.dtype for *_, t in log] == [torch.float32] * 4
    assert [float(t[0]) for *_, t in log] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-4)
    assert torch.isfinite(out).all() and out.std() > 0
    log.clear()
    spec = dict(args, experts=[("high", 1.0, boundary * 1000), ("low", 1.0, 0.0)], cond=cond, uncond=uncond,
                dtype=torch.float32)
    parallel_out = sample_job(models, Mesh(2, 0, None, None), "cpu", None, spec)
    assert [(n, b) for n, b, _ in log] == [("high", 1), ("high", 1), ("low", 1), ("low", 1)]
    assert torch.equal(parallel_out, out)


def test_cfg_above_1_batches_the_negative_pass():
    """The other side of the skip: cfg != 1 runs prompt and negative as one batch of 2 per step; a float widget's
    1.0000000000000002 counts as 1 (within 1e-6, as Lightning's use_cfg)."""
    for cfg, batch in ((1.5, 2), (1.0000000000000002, 1), (1.001, 2)):
        log = []
        model = recorder(tiny(0), log, "m")
        generate([Expert(lambda: model, cfg=cfg)], Cond(text()), Cond(text()), seed=0, steps=2, shift=5.0,
                 sampler="lcm-distilled", width=32, height=32, length=1)
        assert [b for _, b, _ in log] == [batch, batch], cfg


@pytest.mark.parametrize("mode", ["comfy", "official"])
def test_lcm_distilled_renoises_with_the_initial_noises_generator(mode):
    """LightX2V's Wan 2.1 step-distill step re-noises with fresh draws of the generator that drew the initial noise
    (official: torch.Generator(device) seeded with the seed; comfy: ComfyUI's CPU generator), never the initial noise
    again. A model predicting v = 0 makes the 2-step result (1 - s1) * n0 + s1 * n1, n0 and n1 the generator's first
    two draws."""
    model = tiny(0)
    with torch.no_grad():
        model.head.head.weight.zero_()
        model.head.head.bias.zero_()
    out = generate([Expert(lambda: model, cfg=1.0)], Cond(text()), Cond(text()), seed=5, steps=2, shift=5.0,
                   sampler="lcm-distilled", width=32, height=32, length=5, noise_mode=mode)
    g = torch.Generator("cpu").manual_seed(5)
    n0, n1 = torch.randn(out.shape, generator=g), torch.randn(out.shape, generator=g)
    s1 = schedule("lcm-distilled", 2, 5.0)[0][1].item()
    assert 0 < s1 < 1 and not torch.equal(n0, n1)
    assert (out - ((1 - s1) * n0 + s1 * n1)).abs().max() < 1e-6


def test_text_rows_are_counted_once_per_prompt(monkeypatch):
    """Counting the text rows the DiT embeds reads a result on the host (a device sync on a GPU): once per sampling
    call, not once per step (the denoiser hands the model the same context tensor at every step)."""
    calls = []
    real = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model = tiny(0)
    out = generate([Expert(lambda: model, cfg=2.0)], Cond(text()), Cond(text()), seed=1, steps=3, shift=5.0,
                   sampler="euler", width=32, height=32, length=1)
    assert torch.isfinite(out).all() and len(calls) == 1
    changed = text()
    model(out, torch.tensor([500.0]), changed[None])
    changed[0] += 1  # an in-place change is counted again
    model(out, torch.tensor([500.0]), changed[None])
    assert len(calls) == 3
