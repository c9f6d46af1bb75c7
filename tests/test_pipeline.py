"""Generation glue: the Wan 2.2 expert switch (call counts per expert and cfg), I2V/FLF2V masks,
TI2V first-frame conditioning, size checks."""
import pytest
import torch

from wan_core.dit import WanDiT
from wan_core.pipeline import Cond, Expert, check_video_size, frame_mask, generate
from wan_core.sampling import schedule
from wan_core.smoke import randomize_


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
