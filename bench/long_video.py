"""Wan Long Video's continuations measured on the smoke Wan 2.2 I2V-A14B experts and smoke VAE (random weights): per
mode and clip count, CPU time per clip, peak RSS growth beyond the output video (each run in a fresh process), VAE
encodes, how the seams compare with the frame steps inside clips, and whether the carried latent is the sampled one
bit for bit (no VAE round trip between clips).

    .venv/bin/python bench/long_video.py                 # 3 and 6 clips of 13 frames at 128x128, 2 steps per clip
    .venv/bin/python bench/long_video.py --clips 3 --modes pixel,"latent carry"

Random weights say nothing about how a real video looks: the seam column only shows what each path does
to the frames it is given (a cross-fade smooths, a drop cuts); colour drift is not measured here (random weights have
none to speak of: tests/test_long_video_svi.py measures the anchoring on a known synthetic drift); memory and time are
real.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from wan_core.long_video import LongJob, continuation_rule, generate_long  # noqa: E402
from wan_core.pipeline import Expert  # noqa: E402

SIDE, CLIP, STEPS = 128, 13, 2
MODES = {"pixel": 5, "latent carry": 5, "svi 2.0 pro": 5, "svi 2.0": 1}  # mode -> overlap (the reference's)


class Recording:
    """The VAE, counting encodes and keeping each clip's sampled latent (its last frame) for the carry check."""

    def __init__(self, vae):
        self.vae, self.encodes, self.latents = vae, 0, []

    def encode(self, video):
        self.encodes += 1
        return self.vae.encode(video)

    def decode(self, z):
        self.latents.append(z[:, :, -1:].clone())
        return self.vae.decode(z)


def models():
    from conftest import SMOKE_MODELS
    from fixtures.smoke import write_all
    from wan_core.checkpoint import load_dit, load_vae
    from wan_core.dit import WanDiT
    from wan_core.vae import WanVAE21
    write_all(SMOKE_MODELS)
    path = lambda *p: os.path.join(SMOKE_MODELS, *p)  # noqa: E731
    experts = [WanDiT.from_state_dict(load_dit(path("diffusion_models", f"wan2.2_i2v_{n}_noise_14B_fp16.safetensors"),
                                               torch.float32).sd).eval() for n in ("high", "low")]
    vae = WanVAE21.from_state_dict(load_vae(path("vae", "wan_2.1_vae.safetensors")).sd).float().eval()
    return experts, vae


def run(mode, clips, colour=False):
    """One long video; returns (frames [T, H, W, 3], seconds, the Recording VAE, the conditionings)."""
    experts, vae = models()
    text = experts[0].text_embedding[0].in_features
    g = torch.Generator().manual_seed(0)
    start = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, size=(SIDE, SIDE),
                                            mode="bilinear")
    job = LongJob("image", [torch.randn(5, text, generator=g)] * clips, torch.randn(5, text, generator=g), start=start)
    overlap = MODES[mode]
    rule = continuation_rule(mode, "image", False, overlap)
    plan = [Expert(lambda: experts[0], cfg=3.5, min_t=875.0), Expert(lambda: experts[1], cfg=3.5)]
    rec, conds = Recording(vae), []
    out = torch.empty(3, CLIP + (clips - 1) * (CLIP - overlap), SIDE, SIDE)  # as the node collects the frames
    done, t0 = 0, time.process_time()
    for chunk in generate_long(plan, rec, job, clips=clips, clip_length=CLIP, overlap=overlap, seed=0, steps=STEPS,
                               shift=5.0, sampler="euler", width=SIDE, height=SIDE, rule=rule, colour_anchor=colour,
                               on_clip=lambda k, n, c: conds.append(c)):
        out[:, done:done + chunk.shape[1]] = chunk
        done += chunk.shape[1]
    return out, time.process_time() - t0, rec, conds


def seam_ratio(frames, clips, overlap, rule_join):
    """Mean |frame step| at the joins over the median mean |frame step| inside the video (1: a seam looks like
    any other step)."""
    steps = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(0, 2, 3))
    step = CLIP - overlap
    joins = [CLIP + (k - 1) * step - (overlap if rule_join == "drop tail" else 0) for k in range(1, clips)]
    if rule_join == "blend":
        joins = [j - overlap for j in joins]
    return (steps[[j - 1 for j in joins]].mean() / steps.median()).item()


def measure(mode, clips, colour):
    torch.set_num_threads(1)  # timed in process CPU time on one thread: steady on a shared machine
    run(mode, 1)  # warm-up
    from test_memory import _peak_of
    result = {}

    def once():
        frames, seconds, rec, conds = run(mode, clips, colour)
        rule = continuation_rule(mode, "image", False, MODES[mode])
        carried = [torch.equal(conds[k].y[:, 4:, 1:2], rec.latents[k - 1]) for k in range(1, clips)]
        result.update(seconds_per_clip=seconds / clips, frames=frames.shape[1], encodes=rec.encodes,
                      carried_bit_equal=all(carried) if rule.carry == "latents" else None,
                      seam=seam_ratio(frames, clips, MODES[mode], rule.join), output_bytes=frames.numel() * 4)
    result["peak_bytes"] = _peak_of(once)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", default="3,6")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # mode|clips|colour: measure in this process, print JSON
    args = parser.parse_args()
    if args.one:
        mode, clips, colour = args.one.split("|")
        print(json.dumps(measure(mode, int(clips), colour == "1")))
        return
    rows = [(m, int(c), col) for m in args.modes.split(",") for c in args.clips.split(",") for col in (0, 1)
            if not (col and m == "svi 2.0")]
    print(f"smoke Wan 2.2 I2V-A14B experts + smoke VAE, {SIDE}x{SIDE}, {CLIP}-frame clips, {STEPS} euler steps, "
          f"1 thread (process CPU time), each row a fresh process after a warm-up clip\n")
    print(f"{'mode':<14}{'colour':>7}{'clips':>6}{'frames':>7}{'CPU s/clip':>11}{'encodes':>8}{'carry ==':>9}"
          f"{'seam':>7}{'peak - output MiB':>19}")
    for mode, clips, colour in rows:
        out = subprocess.run([sys.executable, __file__, "--one", f"{mode}|{clips}|{colour}"], capture_output=True,
                             text=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"), check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        carry = "-" if r["carried_bit_equal"] is None else str(r["carried_bit_equal"])
        print(f"{mode:<14}{'on' if colour else 'off':>7}{clips:>6}{r['frames']:>7}{r['seconds_per_clip']:>11.2f}"
              f"{r['encodes']:>8}{carry:>9}{r['seam']:>7.2f}"
              f"{(r['peak_bytes'] - r['output_bytes']) / 2 ** 20:>19.1f}")


if __name__ == "__main__":
    main()
