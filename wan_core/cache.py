"""Training-free step caching for the DiT (off by default).

`StepCache(threshold)`: TeaCache-class. Before running the blocks, measure how much block 0's time-modulated
input changed since the last computed step (relative L1, accumulated over skipped steps); while the
accumulated change stays below `threshold`, reuse the last computed residual (blocks' output minus input)
instead of running the blocks. `StepCache(interval=n)`: compute every n-th call, reuse in between (for
distilled or short schedules). The first `warmup` calls are always computed. One cache per model (per
A14B expert) and per batch layout; `skipped`/`calls` report what it did. The official TeaCache rescales the
change with polynomials fitted per model on real weights; none are fitted here, so thresholds are not
comparable with TeaCache's published ones."""
import torch


class StepCache:
    def __init__(self, threshold=0.0, interval=0, warmup=1):
        self.threshold, self.interval, self.warmup = threshold, interval, warmup
        self.calls = self.skipped = 0
        self.accumulated = 0.0
        self.previous = self.residual = None

    def should_skip(self, signal):
        """Decide for this call from `signal` (block 0's modulated input); updates the accumulated change."""
        self.calls += 1
        previous, self.previous = self.previous, signal.detach()
        if self.residual is None or self.calls <= self.warmup or previous is None or previous.shape != signal.shape:
            return False
        if self.interval:
            skip = (self.calls - self.warmup - 1) % self.interval != 0
        else:
            change = ((signal - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()
            self.accumulated += change
            skip = self.accumulated < self.threshold
            if not skip:
                self.accumulated = 0.0
        self.skipped += skip
        return skip

    def run(self, blocks, x, signal):
        """x after the blocks: computed by `blocks(x)` (and remembered as a residual) or reused."""
        if self.should_skip(signal):
            return x + self.residual
        out = blocks(x)
        self.residual = out - x
        return out

    def report(self):
        return f"{self.skipped} of {self.calls} DiT calls reused a cached residual"


def enabled(threshold, interval):
    return threshold > 0 or interval > 1


def block0_signal(block, x, e0):
    """Block 0's modulated input LN(x) * (1 + scale1) + shift1, the quantity the skip decision watches."""
    shift, scale = (block.modulation.to(e0)[:, None] + e0).unbind(2)[:2]
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=block.eps) * (1 + scale) + shift
