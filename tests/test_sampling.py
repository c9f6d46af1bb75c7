"""wan_core.sampling: official Wan schedules and solvers, checked against ComfyUI's independent solver code."""
import numpy as np
import pytest
import torch

from conftest import import_comfy, scale_close
from wan_core import sampling

SHAPE = (1, 4, 2, 3, 3)  # tiny video latent [B, C, F, H, W]


def velocity_net(seed=0, c=SHAPE[1]):
    """A fixed non-linear 'velocity network' v(x, sigma), computed in float64, returned in x's dtype."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, generator=g, dtype=torch.float64) / c ** 0.5
    b = torch.randn(1, c, 1, 1, 1, generator=g, dtype=torch.float64)

    def v(x, sigma):
        xd = x.double()
        return (torch.einsum("oc,bc...->bo...", w, xd).tanh() * 2 + (1 - sigma) * b + sigma * xd).to(x.dtype)
    return v


def noise(seed=1, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def run_ours(sampler, steps, shift, seed=0):
    v = velocity_net(seed)
    return sampling.sample(lambda x, s, t: v(x, s), noise(), sampler=sampler, steps=steps, shift=shift)


# ---------------------------------------------------------------- schedules

def test_unipc_schedule_matches_official_formula():
    """sigma = shift(linspace(0.999, 0, 51)[:-1]) + [0]; timesteps = int64(sigma * 1000), truncated."""
    sigmas, timesteps = sampling.schedule("unipc", 50, 5.0)
    ref = np.linspace(0.999, 0, 51)[:-1]
    ref = 5.0 * ref / (1 + 4.0 * ref)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (51,) and sigmas[-1] == 0
    np.testing.assert_allclose(sigmas[:-1].numpy(), ref, rtol=0, atol=1e-7)
    assert timesteps.dtype == torch.int64 and timesteps.tolist() == (ref * 1000).astype(np.int64).tolist()
    assert sampling.schedule("unipc", 12, 5.0)[1][:4].tolist() == [999, 981, 961, 937]
    assert sampling.schedule("euler", 12, 5.0)[1].tolist() == sampling.schedule("unipc", 12, 5.0)[1].tolist()


def test_dpmpp_schedule_and_shift():
    """dpm++: get_sampling_sigmas = shift(linspace(1, 0, steps+1)[:steps]), final 0; first timestep 1000."""
    sigmas, timesteps = sampling.schedule("dpm++", 10, 3.0)
    ref = np.linspace(1, 0, 11)[:10]
    ref = 3.0 * ref / (1 + 2.0 * ref)
    np.testing.assert_allclose(sigmas.numpy(), np.append(ref, 0.0), rtol=0, atol=1e-12)
    assert timesteps[0] == 1000 and timesteps.tolist() == (ref * 1000).astype(np.int64).tolist()
    assert torch.allclose(sampling.shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 1.0), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError):
        sampling.schedule("heun", 10, 5.0)


def test_distilled_schedule_is_the_training_timesteps():
    """4 steps, shift 5: sigmas shift(1, 3/4, 1/2, 1/4) + [0]; the model sees 1000, 937.5, 833.33.., 625 as floats."""
    for sampler in sampling.DISTILLED:
        sigmas, timesteps = sampling.schedule(sampler, 4, 5.0)
        assert sigmas.tolist() == pytest.approx([1.0, 15 / 16, 5 / 6, 5 / 8, 0.0], abs=1e-15)
        assert timesteps.dtype == torch.float64
        assert timesteps.tolist() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-12)
    # the official UniPC schedule at the same settings shows the model other (truncated) timesteps
    assert sampling.schedule("unipc", 4, 5.0)[1].tolist() == [999, 937, 833, 624]


def toy_velocity(b):
    """A known model v(x, t) = 0.3 x + (t / 1000) b - 0.2 x^2 / (1 + x^2): the timestep it is shown matters."""
    return lambda x, t: 0.3 * x + (float(t) / 1000) * b - 0.2 * x * x / (1 + x * x)


def test_distilled_euler_final_latent_by_hand():
    """euler-distilled = explicit flow Euler x += (sigma_next - sigma) v(x, 1000 sigma), written out step by step."""
    b = noise(seed=3).double()
    v, shown = toy_velocity(b), []

    def denoise(x, sigma, t):
        shown.append(t.item())
        return v(x.double(), t).float()

    out = sampling.sample(denoise, noise(), "euler-distilled", steps=4, shift=5.0)
    x = noise().double()
    x = x + (15 / 16 - 1) * v(x, 1000.0)
    x = x + (5 / 6 - 15 / 16) * v(x, 937.5)
    x = x + (5 / 8 - 5 / 6) * v(x, 2500 / 3)
    x = x + (0 - 5 / 8) * v(x, 625.0)
    assert shown == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-12)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.std() > 0.1
    assert (out.double() - x).abs().max().item() < 1e-5


def test_lcm_distilled_final_latent_by_hand():
    """lcm-distilled: x0 = x - sigma v, then (1 - sigma') x0 + sigma' n with n the generator's next draws; the
    last step returns x0. Seeded: the same generator state gives the same latent, another one a different one."""
    b = noise(seed=3).double()
    v = toy_velocity(b)
    run = lambda seed: sampling.sample(lambda x, s, t: v(x.double(), t).float(), noise(), "lcm-distilled",  # noqa: E731
                                       steps=4, shift=5.0, generator=torch.Generator().manual_seed(seed))
    out = run(11)
    g = torch.Generator().manual_seed(11)
    x, sig = noise().double(), [1.0, 15 / 16, 5 / 6, 5 / 8, 0.0]
    for i in range(4):
        x0 = x - sig[i] * v(x, 1000 * sig[i])
        x = x0 if i == 3 else (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn(SHAPE, generator=g).double()
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert (out.double() - x).abs().max().item() < 1e-5
    assert torch.equal(run(11), out) and (run(12) - out).abs().max() > 0.1


# ---------------------------------------------------------------- parity with ComfyUI's solver code

class FlowSchedule:
    """Flow-matching noise schedule in the interface of ComfyUI's UniPC: alpha = 1 - t, sigma = t."""

    def marginal_log_mean_coeff(self, t):
        return torch.log(1 - t)

    def marginal_alpha(self, t):
        return 1 - t

    def marginal_std(self, t):
        return t

    def marginal_lambda(self, t):
        return torch.log(1 - t) - torch.log(t)


@pytest.mark.parametrize("steps,shift", [(3, 5.0), (5, 3.0), (12, 5.0)])
def test_unipc_bh2_matches_comfy_unipc(steps, shift, monkeypatch):
    """Ours vs ComfyUI's UniPC core (comfy/extra_samplers/uni_pc.py, UniPC.sample, variant 'bh2').

    ComfyUI's own `sample_unipc_bh2` wrapper differs from the official Wan scheduler on purpose
    (order 3, sigmas treated as VE and mapped to a VP schedule, final sigma 0 replaced by 0.001, the
    penultimate sigma discarded), so the test drives the solver core directly, as the official one
    runs: the same flow sigmas ending in 0, a flow noise schedule, multistep, order 2,
    lower_order_final, data prediction, corrector after every model call but the last.
    (ComfyUI's loop needs steps > order: with steps == order it never takes the final step.)
    The model is a fixed non-linear velocity net, turned into ComfyUI's noise prediction
    eps = (x - alpha * x0) / sigma with x0 = x - sigma * v. Without the corrector ours must NOT match.
    """
    import_comfy()
    from comfy.extra_samplers.uni_pc import UniPC

    v = velocity_net()
    sigmas, _ = sampling.schedule("unipc", steps, shift)

    def eps(x, t):
        s = float(t[0])
        return (x - (1 - s) * (x - s * v(x, s))) / s

    solver = UniPC(eps, FlowSchedule(), predict_x0=True, variant="bh2")
    ref = solver.sample(noise(), timesteps=sigmas.float(), method="multistep", order=2,
                        lower_order_final=True, disable_pbar=True)
    scale_close(run_ours("unipc", steps, shift), ref)
    monkeypatch.setattr(sampling, "_unic_rhos", lambda r, h: (0.0, 0.0))
    with pytest.raises(AssertionError):
        scale_close(run_ours("unipc", steps, shift), ref)


@pytest.mark.parametrize("steps,shift", [(3, 5.0), (10, 3.0)])
def test_dpmpp_2m_matches_comfy_dpmpp_2m(steps, shift):
    """Ours vs ComfyUI's k-diffusion `sample_dpmpp_2m` (float64), on the same schedule.

    k-diffusion's DPM-Solver++(2M) is written for alpha = 1 (VE). Flow DPM-Solver++ depends only on
    lambda, so it is exactly that solver on y = x / (1 - sigma) with VE sigma s = sigma / (1 - sigma)
    (lambda = -log s). The official first step starts at sigma = 1 (alpha 0, s infinite), where it is
    an Euler step x1 = x - (1 - sigma_1) * v; the test takes that step by hand and hands the rest of
    the schedule to ComfyUI (whose first step is first order, as the official second step is: its
    previous lambda is -inf).
    """
    import_comfy()
    from comfy.k_diffusion.sampling import sample_dpmpp_2m

    v = velocity_net()
    sigmas, _ = sampling.schedule("dpm++", steps, shift)
    assert sigmas[0] == 1.0
    x = noise().double()
    x1 = x - (1 - sigmas[1]) * v(x, 1.0)
    ve = sigmas[1:] / (1 - sigmas[1:])

    def denoised(y, s_ve):
        s = float(s_ve[0] / (1 + s_ve[0]))
        xt = y * (1 - s)
        return xt - s * v(xt, s)

    ref = sample_dpmpp_2m(denoised, x1 / (1 - sigmas[1]), ve, disable=True)
    ours = run_ours("dpm++", steps, shift)
    scale_close(ours, ref)
    with pytest.raises(AssertionError):  # the 2M correction matters: plain Euler is off
        scale_close(run_ours("euler", steps, shift), ref)


@pytest.mark.parametrize("steps", [1, 7])
def test_euler_matches_comfy_euler(steps):
    """Ours vs ComfyUI's `sample_euler` on the same (UniPC) sigmas, denoised = x - sigma * v (CONST)."""
    import_comfy()
    from comfy.k_diffusion.sampling import sample_euler

    v = velocity_net()
    sigmas, _ = sampling.schedule("euler", steps, 5.0)

    def denoised(x, s):
        s = float(s[0])
        return x - s * v(x, s)

    ref = sample_euler(denoised, noise().double(), sigmas, disable=True)
    scale_close(run_ours("euler", steps, 5.0), ref)


def test_euler_distilled_matches_comfy_euler():
    """euler-distilled vs ComfyUI's `sample_euler` on the distilled sigmas (what its 'simple' scheduler gives at
    shift 5 and 4 steps: 1, 0.9375, 0.8333, 0.625, 0)."""
    import_comfy()
    from comfy.k_diffusion.sampling import sample_euler

    v = velocity_net()
    sigmas, _ = sampling.schedule("euler-distilled", 4, 5.0)

    def denoised(x, s):
        s = float(s[0])
        return x - s * v(x, s)

    ref = sample_euler(denoised, noise().double(), sigmas, disable=True)
    scale_close(run_ours("euler-distilled", 4, 5.0), ref)


# ---------------------------------------------------------------- loop behaviour

def test_callback_indices_dtype_and_exceptions():
    seen, shown = [], []
    v = velocity_net()

    def denoise(x, sigma, t):
        assert x.dtype == torch.float32 and t.dtype == torch.int64 and t.dim() == 0
        shown.append(int(t))
        return v(x, sigma)

    def cb(i, n, x, x0):
        assert x.shape == x0.shape == SHAPE
        seen.append((i, n))

    out = sampling.sample(denoise, noise(dtype=torch.bfloat16), "unipc", steps=6, shift=5.0, callback=cb)
    assert out.dtype == torch.bfloat16
    assert seen == [(i, 6) for i in range(6)]
    assert shown == sampling.schedule("unipc", 6, 5.0)[1].tolist()

    calls = []

    def boom(i, n, x, x0):
        calls.append(i)
        if i == 2:
            raise InterruptedError("stop")

    with pytest.raises(InterruptedError):
        sampling.sample(denoise, noise(), "dpm++", steps=6, shift=5.0, callback=boom)
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_exact_velocity_recovers_x0(sampler):
    """With the true velocity of a fixed x0, v = (x_t - x0) / sigma, every sampler lands on x0."""
    x0 = noise(seed=7)
    out = sampling.sample(lambda x, s, t: (x - x0) / s, noise(), sampler=sampler, steps=9, shift=5.0)
    assert (out - x0).abs().max().item() < 1e-5
