"""Opt-in torch.compile of the DiT's transformer blocks (WanDiT and WanS2V), not of the whole model.

`compile_blocks(model, "blocks")` routes every block through one compiled function, `Block.forward` itself. One code
object: dynamo traces it once and every block reuses that graph (parameters are graph inputs under torch's
inline_inbuilt_nn_modules, so blocks differ only in the tensors they hold), and so do other models of the same
shapes and kind (the two A14B experts). Weights replaced by ComfyUI's LoRA patching or a reload keep the graph: the
weights are frozen (requires_grad False) as ComfyUI's patched ones are, and made inside torch.inference_mode as
ComfyUI makes both (guards compare requires_grad and inference-ness: a mix would compile a second variant).

Recompiles (each costs one compile; dynamo then marks the changed size dynamic): a new resolution or length (token
count), a new batch (CFG on = 2 per call, cfg 1 = 1), another model layout (t2v / i2v / per-token-timestep TI2V /
other widths), S2V's first clip (no motion tokens) vs the later ones, another compute dtype or attention backend.
Torch keeps at most `torch._dynamo.config.recompile_limit` (8) variants per code object, then runs new ones eagerly.
Not across steps: timesteps, text, CFG scale and step caching change only tensor values.

Blocks run uncompiled (logged once per reason) where `eager_when(model)` names a reason, e.g. the node layer's
"partially loaded" (weights streamed through casting ops with per-module patch functions). On the CPU, inductor needs
a C++ compiler (gcc/clang). A block is one graph: attention.py's per-model backend and wan_core.parallel's
sequence-parallel context live in threading.locals, which dynamo traces (a ContextVar read would break the graph).
"""
import functools
import importlib.util
import logging
import os
import shutil
import weakref

import torch

# loader choice -> torch.compile options (None: eager); max-autotune without CUDA graphs (weights are inputs)
MODES = {"off": None, "blocks": {}, "blocks (max-autotune)": {"mode": "max-autotune-no-cudagraphs"}}


@functools.lru_cache(maxsize=None)
def _compiled(forward, backend, options):
    return torch.compile(forward, backend=backend, **dict(options))


class CompiledBlocks:
    """What `compile_blocks` installs: `model.compiled_blocks`, and each block's `forward` calling `run`."""

    def __init__(self, model, mode, backend, eager_when):
        self.mode, self.backend, self.eager_when = mode, backend, eager_when
        self.model = weakref.ref(model)  # no reference cycle: a freed model frees its blocks at once
        self.forward = type(model.blocks[0]).forward
        self.fn = _compiled(self.forward, backend, tuple(sorted(MODES[mode].items())))
        self.reported = set()

    def run(self, block_ref, *args, **kwargs):
        block = block_ref()
        reason = self.eager_when(self.model()) if self.eager_when is not None else None
        self.report(reason)
        return self.forward(block, *args, **kwargs) if reason else self.fn(block, *args, **kwargs)

    def report(self, reason):
        """One log line per way the blocks run (compiled, or uncompiled for a given reason)."""
        if reason in self.reported:
            return
        self.reported.add(reason)
        if reason is None:
            logging.info("Wan Lean compile: the DiT blocks run through torch.compile (%s, backend %s); a first call "
                         "at a new size compiles, which takes a while", self.mode, self.backend)
        else:
            logging.info("Wan Lean compile: %s, so the DiT blocks run uncompiled", reason)


def check_toolchain(device, backend="inductor"):
    """A ValueError naming the fix when inductor cannot build kernels for `device` (torch.device): a C++ compiler on
    the CPU (the CXX variable, else g++ / c++ / clang++), Triton on CUDA."""
    if backend != "inductor":
        return
    if device.type == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            raise ValueError("torch.compile on the CPU needs a C++ compiler (g++ or clang++; none is on PATH): install "
                             "one (e.g. the build-essential package) or set compile to off")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ValueError("torch.compile on NVIDIA GPUs needs Triton (pip install triton), or set compile to off")


def compile_blocks(model, mode="blocks", backend="inductor", eager_when=None):
    """Compile `model`'s blocks (mode: a key of MODES; "off" restores eager). eager_when(model) -> None or the reason
    to run this call's blocks uncompiled, asked per block call. Compiling happens at the first call, not here."""
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(MODES)}")
    for block in model.blocks:
        block.__dict__.pop("forward", None)
    model.compiled_blocks = None
    if MODES[mode] is None:
        return model
    model.requires_grad_(False)  # as ComfyUI's patched weights are: a mix would recompile (guards check requires_grad)
    runner = CompiledBlocks(model, mode, backend, eager_when)
    for block in model.blocks:
        block.forward = functools.partial(runner.run, weakref.ref(block))
    model.compiled_blocks = runner
    return model
