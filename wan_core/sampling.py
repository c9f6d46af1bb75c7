"""Flow-matching samplers of the Wan release (UniPC bh2, DPM++ 2M, Euler) and of the step-distilled Wan models.

Flow matching with velocity prediction: x_t = (1 - sigma) * x0 + sigma * noise, the model predicts
v = noise - x0, so x0 = x_t - sigma * v. Solvers use alpha = 1 - sigma and the half log-SNR
lambda = log(alpha / sigma). Sample tensors are float32 on x's device; schedules and the scalar
solver coefficients are float64 (the official scheduler rounds sigmas to float32 and computes the
coefficients in float32: results agree to ~1e-7 relative). Euler is plain flow Euler on the UniPC
schedule (not an official solver).

Distilled (Wan2.2-Lightning / lightx2v 4-step LoRAs and models): sigma = shift(linspace(1, 0, steps+1)[:-1]), final 0,
and the model is shown the float timestep sigma * 1000 (not truncated): at 4 steps and shift 5 exactly the training
timesteps 1000, 937.5, 833.33, 625. As read in ModelTC/Wan2.2-Lightning `wan/utils/fm_solvers_euler.py` (its
generate.py warns to use that Euler solver with the LoRAs) and ModelTC/LightX2V
`lightx2v/models/schedulers/wan/step_distill/scheduler.py` (denoising_step_list [1000, 750, 500, 250] picks the same
sigmas from a 1000-entry shifted table): "euler-distilled" is their flow Euler (Wan 2.2 A14B), "lcm-distilled"
their Wan 2.1 step (x0 = x - sigma*v, then fresh Gaussian noise mixed in at the next sigma: (1 - s')x0 + s' noise).
"""
import math

import numpy as np
import torch

from .checks import MODEL_CAUSE, check_finite

SAMPLERS = ("unipc", "dpm++", "euler", "euler-distilled", "lcm-distilled")  # append only: saved workflows
DISTILLED = ("euler-distilled", "lcm-distilled")
TRAIN_STEPS = 1000
# The official FlowUniPCMultistepScheduler's sigma_max: 1 - 1/1000 stored as float32, then read back.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / TRAIN_STEPS))


def shift_sigmas(sigmas, shift):
    """sigma' = s * sigma / (1 + (s - 1) * sigma), elementwise, dtype kept (float64 for arrays/lists)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64) if not torch.is_tensor(sigmas) else sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def schedule(sampler, steps, shift):
    """(sigmas float64 [steps+1] ending in 0, timesteps [steps]).

    unipc / euler: linspace(0.999, 0, steps+1)[:-1]; dpm++ and the distilled ones: linspace(1, 0, steps+1)[:-1];
    shifted, then a final 0. The model is shown int64(sigma * 1000), truncated, as the official scheduler; the
    distilled samplers show it the float64 sigma * 1000, as their training did.
    """
    _check(sampler, steps)
    start = UNIPC_SIGMA_MAX if sampler in ("unipc", "euler") else 1.0
    sigmas = shift_sigmas(np.linspace(start, 0.0, steps + 1)[:-1], shift)  # numpy's linspace, as official
    timesteps = sigmas * TRAIN_STEPS
    if sampler not in DISTILLED:
        timesteps = timesteps.to(torch.int64)
    return torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps


def _check(sampler, steps):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}, expected one of {SAMPLERS}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def half_log_snr(sigma):
    """lambda = log((1 - sigma) / sigma); +inf at sigma 0, -inf at sigma 1."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _coef(s, t):
    """c = alpha_t - alpha_s * sigma_t / sigma_s = -alpha_t * expm1(-h), h = lambda_t - lambda_s."""
    return (1.0 - t) - (1.0 - s) * (t / s)


def first_order(x, x0, s, t):
    """Exact data-prediction step s -> t for constant x0 (DDIM / DPM-Solver++ 1 / UniP-1).

    x_t = (sigma_t / sigma_s) * x + c * x0; at sigma_t = 0 it returns x0 exactly.
    """
    return (t / s) * x + _coef(s, t) * x0


def _unic_rhos(r, h):
    """UniC bh2 weights (rho_old for the older x0 difference, rho_new for the new one).

    Order 2 solves [[1, 1], [r, 1]] @ rho = [b1, b2] with hh = -h, B = expm1(hh),
    b1 = (B/hh - 1) / B, b2 = 2 * ((B/hh - 1)/hh - 1/2) / B. Order 1 (r None): rho_new = 0.5, as official.
    """
    if r is None:
        return 0.0, 0.5
    hh = -h
    e = math.expm1(hh)
    phi1 = e / hh - 1.0
    b1 = phi1 / e
    b2 = 2.0 * (phi1 / hh - 0.5) / e
    rho_old = (b1 - b2) / (1.0 - r)
    return rho_old, b1 - rho_old


def _lambdas(sigmas):
    return [half_log_snr(s) for s in sigmas]


class _Euler:
    """Plain flow Euler on the given sigmas: x += (sigma_next - sigma) * v."""

    def __init__(self, sigmas):
        self.sigmas = sigmas

    def step(self, i, x, v, x0):
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * v


class _Renoise:
    """lightx2v's Wan 2.1 step-distill step: jump to the x0 estimate, then noise it afresh to the next sigma,
    (1 - sigma_next) * x0 + sigma_next * n with n ~ N(0, 1) drawn on `generator`'s device (LightX2V: the generator
    that drew the initial noise, going on); the last step returns x0."""

    def __init__(self, sigmas, generator):
        self.sigmas, self.generator = sigmas, generator

    def step(self, i, x, v, x0):
        t = self.sigmas[i + 1]
        if t <= 0.0:
            return x0
        n = torch.randn(x.shape, generator=self.generator, dtype=torch.float32, device=self.generator.device)
        n = n.to(x.device)
        return (1.0 - t) * x0 + t * n


class _DPMpp2M:
    """Official FlowDPMSolverMultistep: dpmsolver++ midpoint, order 2, first order on the first and final step.

    D = x0 + (x0 - x0_prev) / (2 * r), r = (lambda_i - lambda_{i-1}) / (lambda_{i+1} - lambda_i);
    a previous sigma of 1 (lambda -inf) gives r = inf, i.e. a first-order step.
    """

    def __init__(self, sigmas):
        self.sigmas, self.lambdas, self.prev = sigmas, _lambdas(sigmas), None

    def step(self, i, x, v, x0):
        s, t = self.sigmas[i], self.sigmas[i + 1]
        d = x0
        if self.prev is not None and t > 0.0:
            lam = self.lambdas
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            d = x0 + (0.5 / r) * (x0 - self.prev)
        self.prev = x0
        return first_order(x, d, s, t)


class _UniPC:
    """Official FlowUniPCMultistep: UniP-2 predictor + UniC corrector, bh2, data prediction.

    Order min(2, steps left, steps done + 1) (warm-up and lower_order_final). At each model call the
    sample from the last predictor is first corrected with the new x0 (UniC), then predicted onward;
    the model itself always sees the uncorrected sample, as in the official scheduler.
    """

    def __init__(self, sigmas):
        self.sigmas, self.lambdas = sigmas, _lambdas(sigmas)
        self.m = []         # the last two x0 predictions, newest last
        self.prev = None    # (sample the last predictor started from, that predictor's order)

    def step(self, i, x, v, x0):
        if self.prev is not None:
            x = self._correct(i, x0)
        self.m = (self.m + [x0])[-2:]
        order = min(2, len(self.sigmas) - 1 - i, i + 1)
        self.prev = (x, order)
        return self._predict(i, x, order)

    def _r(self, k_old, k0, h):
        """r = (lambda_old - lambda_0) / h (negative: older nodes have lower lambda)."""
        return (self.lambdas[k_old] - self.lambdas[k0]) / h

    def _predict(self, i, x, order):
        """UniP sigma_i -> sigma_{i+1}: order 2 adds c * rho_p * D1, rho_p = 0.5, D1 = (x0_prev - x0) / r."""
        s, t = self.sigmas[i], self.sigmas[i + 1]
        out = first_order(x, self.m[-1], s, t)
        if order == 2:
            r = self._r(i - 1, i, self.lambdas[i + 1] - self.lambdas[i])
            out = out + (0.5 * _coef(s, t) / r) * (self.m[-2] - self.m[-1])
        return out

    def _correct(self, i, x0):
        """UniC for the step sigma_{i-1} -> sigma_i, re-done with the new x0 at sigma_i (B(h) = c / -alpha_t)."""
        x_last, order = self.prev
        s, t, m0 = self.sigmas[i - 1], self.sigmas[i], self.m[-1]
        h = self.lambdas[i] - self.lambdas[i - 1]
        r, d1 = None, 0.0
        if order == 2:
            r = self._r(i - 2, i - 1, h)
            d1 = (self.m[-2] - m0) / r
        rho_old, rho_new = _unic_rhos(r, h)
        return first_order(x_last, m0, s, t) + _coef(s, t) * (rho_old * d1 + rho_new * (x0 - m0))


_SOLVERS = {"unipc": _UniPC, "dpm++": _DPMpp2M, "euler": _Euler, "euler-distilled": _Euler}  # + lcm-distilled


@torch.no_grad()
def sample(denoise, x, sampler="unipc", steps=50, shift=5.0, callback=None, generator=None):
    """Integrate from noise x (sigma ~ 1) to sigma 0; returns x0 in x's dtype.

    denoise(x_t float32, sigma: float, timestep: 0-dim CPU tensor, int64 or for the distilled samplers float64)
    -> velocity (CFG done by the caller). callback(i, steps, x_next, x0_pred) after each step; exceptions
    propagate (interrupts). Euler runs on the UniPC schedule. generator: the CPU torch.Generator lcm-distilled
    draws its fresh noise from (the one that made x, so a seed fixes the whole run; default: seeded 0). A step whose
    prediction holds NaN/inf stops the run (checks.NonFiniteError naming the step and the likely cause) instead of
    carrying it into a black video.
    """
    sigmas, timesteps = schedule(sampler, steps, shift)
    if sampler == "lcm-distilled":
        solver = _Renoise(sigmas.tolist(), generator if generator is not None else torch.Generator().manual_seed(0))
    else:
        solver = _SOLVERS[sampler](sigmas.tolist())
    xt = x.to(torch.float32)
    for i in range(steps):
        sigma = float(sigmas[i])
        v = denoise(xt, sigma, timesteps[i]).to(xt)
        x0 = check_finite(xt - sigma * v, f"the diffusion model's prediction at step {i + 1} of {steps}", MODEL_CAUSE)
        xt = solver.step(i, xt, v, x0)
        if callback is not None:
            callback(i, steps, xt, x0)
    return xt.to(x.dtype)
