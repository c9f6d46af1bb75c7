"""The pack's DiT beside a native ComfyUI one under dynamic VRAM (comfy-aimdo, ComfyUI's default on NVIDIA since 0.30).

    python bench/dynamic_vram.py --out FILE.json          # CUDA; the host of $WANLEAN_HOST must have comfy-aimdo
    python bench/dynamic_vram.py --out FILE.json --cpu    # the same steps at toy size on the CPU (the flag set only)

Both models are built under aimdo (comfy.ops Linear layers without weights until loaded) from one random state dict
of the real 1.3B (30 x dim 1536; the official keys, which ComfyUI's Wan and the pack share): ComfyUI's own WanModel
(comfy.ldm.wan) behind its dynamic patcher (comfy.model_patcher.CoreModelPatcher, which ComfyUI's main.py points at
ModelPatcherDynamic when aimdo starts: weights fault into VRAM per layer as it runs), and the pack's WanDiT behind the
plain ModelPatcher its loader hands ComfyUI (nodes/common.py Handle.wrap: load_models_gpu loads it fully, or
partially within its estimate, unloading other models first). They run in turns on one latent: native, ours, native
again. Per turn: seconds of the load and of the forward, the torch peak (what torch allocated), the device's used
memory (torch.cuda.mem_get_info: aimdo's allocations included), aimdo's own usage, and which models stay resident
with how much of their weights. The JSON's `skipped` says why nothing ran (no aimdo in this host or interpreter).
"""
import argparse
import json
import os
import sys
import time

AIMDO = None
if "--cpu" not in sys.argv:  # as ComfyUI's main.py: aimdo's allocator hooks load before torch starts CUDA
    try:
        import comfy_aimdo.control as AIMDO
    except ImportError:
        pass
    if AIMDO is not None and not AIMDO.init():
        AIMDO = None

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import dit_inputs  # noqa: E402
from common import HOST, build, import_comfy, rel_diff, timed  # noqa: E402
from wan_core.dit import WanDiT  # noqa: E402

REAL = dict(dim=1536, ffn_dim=8960, num_layers=30, text_dim=4096, grid=(6, 30, 52), text_tokens=64, batch=1,
            channels=16, device="cuda", dtype=torch.bfloat16)  # 480x832, 21 frames: 9,360 tokens
TOY = dict(dim=256, ffn_dim=512, num_layers=2, text_dim=64, grid=(2, 4, 6), text_tokens=16, batch=1, channels=16,
           device="cpu", dtype=torch.float32)
MODEL_KEYS = ("dim", "ffn_dim", "num_layers", "text_dim")


def start_dynamic_vram(cfg):
    """The host's comfy.memory_management with aimdo on, as ComfyUI's main.py turns it on (devices registered with
    aimdo, CoreModelPatcher -> ModelPatcherDynamic); on the CPU only the switch (layers are built the aimdo way).
    Returns a reason string where that cannot be done."""
    comfy = import_comfy(cfg["device"])
    import comfy.model_patcher
    try:
        import comfy.memory_management as memory
    except ImportError:
        memory = None
    if not hasattr(memory, "aimdo_enabled"):
        return f"the host at {HOST} has no comfy.memory_management.aimdo_enabled (no dynamic VRAM)"
    if cfg["device"] == "cuda":
        if AIMDO is None:
            return "comfy_aimdo is not importable here or found no library for this machine"
        if not AIMDO.init_devices([(torch.cuda.current_device(), 0)]):
            return "comfy-aimdo did not start on this GPU"
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    memory.aimdo_enabled = True
    return None


def random_state_dict(cfg):
    """The official-key state dict of a plain WanDiT of cfg's size, random (bench.common.fill_), in cfg's dtype."""
    model = build(lambda: WanDiT(**{k: cfg[k] for k in MODEL_KEYS}), "cpu", torch.float32)
    return {k: v.to(cfg["dtype"]) for k, v in model.state_dict().items()}


def native_model(cfg, sd):
    """ComfyUI's WanModel built with its casting ops under aimdo, the tensors of sd assigned, behind CoreModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    with torch.device("meta"):
        model = WanModel(model_type="t2v", num_heads=cfg["dim"] // 128, operations=comfy.ops.manual_cast,
                         **{k: cfg[k] for k in MODEL_KEYS})
    model.load_state_dict(sd, strict=True, assign=True)
    return comfy.model_patcher.CoreModelPatcher(model.eval(), load_device=mm.get_torch_device(),
                                                offload_device=mm.unet_offload_device())


def pack_model(sd):
    """The pack's DiT as its loader node makes it (WanDiT.from_state_dict with ComfyUI's casting ops) behind the plain
    ModelPatcher of nodes/common.py Handle.wrap."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    model = WanDiT.from_state_dict(sd, ops=comfy.ops.manual_cast)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device(), size=mm.module_size(model))


def memory_state(cfg):
    """What the device holds now: torch's allocations, the device's used memory, aimdo's usage (bytes; None on the
    CPU), and the models ComfyUI keeps loaded with the bytes of their weights on the device."""
    import comfy.model_management as mm
    out = dict(resident={f"{type(p.model).__name__} ({type(p).__name__})": p.loaded_size() for p in mm.loaded_models()})
    if cfg["device"] == "cuda":
        free, total = torch.cuda.mem_get_info()
        out.update(torch_allocated=torch.cuda.memory_allocated(), device_used=total - free,
                   aimdo_usage=AIMDO.get_total_vram_usage() if AIMDO is not None else None)
    return out


def turn(cfg, patcher, call, memory_required):
    """One model's turn: load_models_gpu (timed), one forward (timed), the peaks and what stays resident."""
    import comfy.model_management as mm
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    load_s, _ = timed(lambda: mm.load_models_gpu([patcher], memory_required=memory_required), cfg["device"])
    with torch.no_grad():
        run_s, out = timed(call, cfg["device"])
    peak = torch.cuda.max_memory_allocated() if cfg["device"] == "cuda" else None
    return dict(load_seconds=load_s, run_seconds=run_s, torch_peak=peak, after=memory_state(cfg)), out.float()


def run(cfg):
    reason = start_dynamic_vram(cfg)
    if reason:
        return dict(skipped=reason)
    sd = random_state_dict(cfg)
    native, ours = native_model(cfg, sd), pack_model(sd)
    x, t, context, _ = dit_inputs(cfg)  # the text zero-padded to 512 slots, as both models take it
    weights = sum(v.numel() * v.element_size() for v in sd.values())
    report = dict(host=HOST, model=f"{cfg['num_layers']} x dim {cfg['dim']}", weights_bytes=weights, tokens=x.shape[2] * x.shape[3] * x.shape[4] // 4,
                  patchers={"native": type(native).__name__, "ours": type(ours).__name__}, before=memory_state(cfg))
    report["native"], ref = turn(cfg, native, lambda: native.model(x, t, context), 0)
    work = report["native"]["torch_peak"] or 0  # the forward's activations: ours asks for the same room
    report["ours"], out = turn(cfg, ours, lambda: ours.model(x, t, context), work)
    report["native_again"], again = turn(cfg, native, lambda: native.model(x, t, context), 0)
    report.update(rel_diff=rel_diff(out, ref), native_repeatable=bool(torch.equal(again, ref)),
                  finite=bool(torch.isfinite(out).all()))
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--cpu", action="store_true", help="toy size on the CPU: checks the script itself")
    args = ap.parse_args()
    cfg = TOY if args.cpu else REAL
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu to check the script itself")
    start = time.time()
    report = dict(run(cfg), mode="cpu-check" if args.cpu else "cuda", seconds=round(time.time() - start, 1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
