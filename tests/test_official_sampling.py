"""The pack's schedules and solvers (wan_core.sampling) against the official Wan 2.2 schedulers (the `wan22` package,
tests/official.py): FlowUniPCMultistepScheduler (unipc, the default of every official generate()) and
FlowDPMSolverMultistepScheduler (dpm++), set up and stepped exactly as the official text2video / speech2video loops
do, on a fixed deterministic non-linear "model" that sees only the integer timestep it is shown."""
import numpy as np
import pytest
import torch

from conftest import scale_close
from official import official_sample
from wan_core import sampling

SHAPE = (1, 4, 3, 5, 6)


def model(seed=0, c=SHAPE[1]):
    """v(x, t): a fixed non-linear velocity net of the latent and the timestep the sampler shows it, in float64
    (the official loop passes the timestep tensor, the pack the same timestep as a 0-dim tensor)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, generator=g, dtype=torch.float64) / c ** 0.5
    b = torch.randn(1, c, 1, 1, 1, generator=g, dtype=torch.float64)

    def v(x, t):
        s = float(torch.as_tensor(t).reshape(-1)[0]) / 1000
        xd = x.double()
        return (torch.einsum("oc,bc...->bo...", w, xd).tanh() * 2 + (1 - s) * b + s * xd).float()
    return v


def start_noise(seed=1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


CASES = [("unipc", 1, 5.0), ("unipc", 2, 5.0), ("unipc", 4, 3.0), ("unipc", 12, 5.0), ("unipc", 40, 3.0),
         ("unipc", 50, 12.0), ("dpm++", 1, 5.0), ("dpm++", 3, 5.0), ("dpm++", 10, 3.0), ("dpm++", 40, 12.0)]


@pytest.mark.parametrize("solver, steps, shift", CASES)
def test_schedule_and_latents_match_the_official_scheduler(solver, steps, shift):
    """Timesteps shown to the model equal (int64, as the official scheduler gives them); the sigmas equal the
    official float32 ones within float32 rounding; the final latent within 1e-6 of its scale (measured: at most
    6.9e-7, unipc 40 steps shift 3; 0 for 1-2 steps; the pack keeps its coefficients in float64 where the official scheduler rounds sigmas to float32)."""
    v = model()
    x = start_noise()
    ref, ref_timesteps, ref_sigmas, shown = official_sample(solver, steps, shift, v, x)
    sigmas, timesteps = sampling.schedule(solver, steps, shift)
    assert timesteps.dtype == ref_timesteps.dtype == torch.int64
    assert timesteps.tolist() == ref_timesteps.tolist()
    np.testing.assert_allclose(sigmas.numpy(), ref_sigmas.double().numpy(), rtol=2e-7, atol=0)
    seen = []

    def denoise(xt, sigma, t):
        seen.append(int(t))
        return v(xt, t)
    mine = sampling.sample(denoise, x.clone(), sampler=solver, steps=steps, shift=shift)
    assert seen == shown == ref_timesteps.tolist()
    assert torch.isfinite(mine).all() and mine.std() > 0.1
    scale_close(mine, ref, rel=1e-6)


def test_the_official_corrector_matters():
    """A control: the UniC corrector off (or plain Euler on the same schedule) is far from the official result,
    so the 1e-6 agreement above is not loose."""
    v = model()
    ref = official_sample("unipc", 12, 5.0, v, start_noise())[0]
    euler = sampling.sample(lambda xt, s, t: v(xt, t), start_noise(), sampler="euler", steps=12, shift=5.0)
    with pytest.raises(AssertionError):
        scale_close(euler, ref, rel=1e-3)
