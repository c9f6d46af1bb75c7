"""Sample a Wan video latent across processes and machines with torchrun (sequence parallel, optional CFG parallel).

Every process loads the model file(s) on its own device (cuda:LOCAL_RANK, or the CPU with gloo when there is no
GPU), all run the same sampler in step, and rank 0 writes the latent as safetensors (key "latent", normalised as
the sampler nodes return it: decode it with Wan VAE Decode after loading it as a LATENT, or with wan_core.vae).

Conditioning comes from a safetensors file: "positive" and "negative" text features [L, text_dim] (umT5 output,
e.g. wan_core.t5 on the prompts), and for image models "clip" (CLIP tokens [1, 257|514, 1280]) and "y"
(mask + image latent [1, 20, F, h, w]) or, for TI2V-5B, "first_frame" [1, 48, 1, h, w]; the image parts serve
both branches, as Wan Image To Video sets them.

One machine, 4 GPUs:
    torchrun --nproc-per-node 4 scripts/torchrun_sample.py --model wan2.1_t2v_14B_bf16.safetensors \\
        --cond cond.safetensors --width 1280 --height 720 --length 81 --steps 50 --cfg 5 --shift 5 --out latent.safetensors
Two machines x 8 GPUs: the same on each with --nnodes 2 --node-rank N --rdzv-backend c10d --rdzv-endpoint HOST:PORT.
Wan 2.2 A14B: --model HIGH.safetensors --model-low LOW.safetensors --boundary 0.875 --cfg 4 --cfg-low 3.
LoRAs: --lora FILE[:STRENGTH] (repeatable; --lora-low for the low-noise expert), merged into each process's copy.
--cfg-parallel splits the world in two halves (prompt / negative pass); --attention ring forces ring attention
(auto: Ulysses when the head count divides the sequence-parallel size, else ring).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan_core.model_source import DiTFiles, ModelSource  # noqa: E402
from wan_core.parallel import ATTENTION_MODES, make_mesh, sample_job  # noqa: E402
from wan_core.pipeline import Cond  # noqa: E402
from wan_core.sampling import SAMPLERS  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def lora_arg(text):
    """FILE or FILE:STRENGTH -> (path, strength)."""
    path, _, strength = text.rpartition(":")
    try:
        return (path, float(strength)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Wan diffusion model file (the high-noise expert for A14B)")
    ap.add_argument("--model-low", help="Wan 2.2 A14B low-noise expert")
    ap.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="a LoRA merged into --model (repeatable, applied in order; strength default 1)")
    ap.add_argument("--lora-low", type=lora_arg, action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="a LoRA merged into --model-low")
    ap.add_argument("--boundary", type=float, default=0.875, help="A14B switch timestep / 1000 (I2V: 0.900)")
    ap.add_argument("--cond", required=True, help="safetensors with positive, negative (+ clip, y, first_frame)")
    ap.add_argument("--out", required=True, help="where rank 0 writes the latent (safetensors, key 'latent')")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--length", type=int, default=81)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--cfg-low", type=float, help="guidance of the low-noise expert (default: --cfg)")
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--sampler", choices=SAMPLERS, default="unipc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: bf16 on GPUs, fp32 on CPUs)")
    ap.add_argument("--cfg-parallel", action="store_true")
    ap.add_argument("--attention", choices=ATTENTION_MODES, default="auto")
    return ap.parse_args(argv)


def conditioning(path):
    t = load_file(path)
    for key in ("positive", "negative"):
        if key not in t:
            raise ValueError(f"{path} has no '{key}' text features (keys: {sorted(t)}); see this script's docstring")
    image = {k: t[k].float() for k in ("clip", "y", "first_frame") if k in t}
    return Cond(t["positive"].float(), **image), Cond(t["negative"].float(), **image)


def main(argv=None):
    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun's env:// rendezvous
    try:
        dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if cuda else torch.float32)
        sources = {"high": ModelSource.of(a.model, loras=a.lora)}
        if a.model_low:
            sources["low"] = ModelSource.of(a.model_low, loras=a.lora_low)
        models = DiTFiles.of(sources, dtype)(device)
        experts = [("high", a.cfg, a.boundary * 1000 if a.model_low else 0.0)]
        if a.model_low:
            experts.append(("low", a.cfg if a.cfg_low is None else a.cfg_low, 0.0))
        cond, uncond = conditioning(a.cond)
        spec = dict(experts=experts, cond=cond, uncond=uncond, seed=a.seed, steps=a.steps, shift=a.shift,
                    sampler=a.sampler, width=a.width, height=a.height, length=a.length, dtype=dtype)
        mesh = make_mesh(cfg_parallel=a.cfg_parallel, attention_mode=a.attention)
        with torch.no_grad():
            latent = sample_job(models, mesh, device, lambda *_: None, spec)
        if dist.get_rank() == 0:
            save_file({"latent": latent.contiguous()}, a.out)
            print(f"wrote {a.out}: latent {tuple(latent.shape)} from {dist.get_world_size()} processes")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
