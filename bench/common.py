"""Bench helpers: the ComfyUI host on sys.path, identical deterministic weights, timers and memory probes."""
import os
import sys
import time
import zlib

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
from comfy_host import HOST_DIR as HOST  # noqa: E402  ($WANLEAN_HOST, else the newest installed host)


def import_comfy(device="cpu"):
    """Put the host tree on sys.path; force ComfyUI's CPU mode unless benchmarking on a GPU."""
    if not os.path.isfile(os.path.join(HOST, "main.py")):
        raise SystemExit("ComfyUI host tree missing: run `bash scripts/setup.sh` first")
    if HOST not in sys.path:
        sys.path.append(HOST)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = torch.device(device).type == "cpu"
    import comfy.model_management  # noqa: F401  (initialises with the chosen device)
    return sys.modules["comfy"]


@torch.no_grad()
def fill_(module, seed=0):
    """Deterministic random weights keyed by parameter name, so two implementations with the same
    state-dict keys get identical tensors whatever their construction order. Weights ~ N(0, 1/fan_in),
    biases and modulations ~ N(0, 0.02), norm gains 1 + N(0, 0.05)."""
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if not p.is_floating_point():
            continue
        g = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gamma",) or (leaf == "weight" and p.ndim == 1):
            r = 1 + 0.05 * r
        elif leaf == "weight":
            r = r / p[0].numel() ** 0.5
        else:
            r = 0.02 * r
        p.copy_(r.to(p.dtype))
    return module


def build(ctor, device, dtype, seed=0, keep_fp32=()):
    """ctor() on the meta device, materialised on `device`, filled, cast to dtype (names in keep_fp32 stay fp32)."""
    with torch.device("meta"):
        model = ctor()
    model = fill_(model.to_empty(device=device), seed)
    for name, p in model.named_parameters():
        if not name.startswith(tuple(keep_fp32)):
            p.data = p.data.to(dtype)
    return model.eval().requires_grad_(False)


def rel_diff(ours, ref):
    """max |ours - ref| / max |ref| (the tests' scale_close measure)."""
    d = (ours.double() - ref.double()).abs().max().item()
    return d / max(ref.double().abs().max().item(), 1e-12)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = {"clock": time.perf_counter}


def use_cpu_clock():
    """Time CPU runs by this process's CPU time (time.process_time) instead of the wall clock: with --threads 1 that
    is the work itself, whatever else runs on a shared machine (the wall clock counts the waits for a core too)."""
    CLOCK["clock"] = time.process_time


def timed(fn, device):
    """(seconds, result) of one call, synchronised on CUDA (always wall-clock there)."""
    clock = time.perf_counter if torch.device(device).type == "cuda" else CLOCK["clock"]
    sync(device)
    t0 = clock()
    out = fn()
    sync(device)
    return clock() - t0, out


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def release_free_memory():
    """Return freed heap memory to the OS (glibc malloc_trim) so the next RSS window starts clean."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_probe(device):
    """Start a peak-memory window; returns stop() -> (peak bytes above the start, process peak bytes).

    CUDA: torch.cuda.max_memory_allocated. CPU: the RSS high-water mark (VmHWM, reset through
    /proc/self/clear_refs) above the RSS at the start; the process peak is VmHWM over the whole process
    (not ru_maxrss: a spawned child inherits its parent's peak at the fork through exec).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        return lambda: (torch.cuda.max_memory_allocated(device) - base, torch.cuda.max_memory_allocated(device))
    before, base = _status("VmHWM"), _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # Linux: resets VmHWM to the current RSS
        f.write("5")
    return lambda: (_status("VmHWM") - base, max(before, _status("VmHWM")))


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
