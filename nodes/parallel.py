"""Multi-device sampling: one worker process per device (wan_core.workers.WorkerPool), each holding its own copy of
the model, sequence-parallel (Ulysses attention, ring attention where the head count does not divide) and optionally
CFG-parallel; the ComfyUI process feeds the job and gets the latent back.

The node takes the loaded model (Wan Load Diffusion Model, optionally through Wan Load LoRA): the workers load the
file it came from with the same weight dtype and merge the same LoRAs (the handle's `extra["source"]`). The pool is
kept while model, LoRAs, devices and layout stay the same. It is closed on an interrupt, a worker error, ComfyUI's
exit, and whenever ComfyUI unloads it: a weightless stand-in model sits in ComfyUI's memory manager on its main
device, so /free (unload models), or another model needing that device's memory, ends the workers."""
import atexit
import logging
import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
from comfy.patcher_extension import CallbacksMP
from comfy_api.latest import io

from ..wan_core.convert import FP8
from ..wan_core.dit import HEAD_DIM
from ..wan_core.gguf import BLOCK_TYPES as GGUF_TYPES
from ..wan_core.model_source import DiTFiles, ModelSource
from ..wan_core.parallel import ATTENTION_MODES, sample_job
from ..wan_core.pipeline import Cond
from ..wan_core.workers import WorkerPool, check_devices, check_layout, parse_devices
from .common import WanLeanNode, WanLeanModel, compute_dtype, step_callback
from .loaders import DIT_WEIGHT_DTYPES
from .sampler import (activation_memory, cfg_input, check_experts, checked_inputs, cond_inputs, low_noise_inputs, passes,
                      sampling_inputs, seed_mode_input)

_POOL = {"pool": None, "stand_in": None}


def close_pool():
    pool, _POOL["pool"], _POOL["stand_in"] = _POOL["pool"], None, None
    if pool is not None:
        pool.close()


atexit.register(close_pool)


class WanLeanWorkerPool(torch.nn.Module):
    """Weightless: what ComfyUI's memory manager sees (and logs) of the worker pool."""


def stand_in(memory_required):
    """A weightless model registered with ComfyUI's memory manager for the pool (asking for `memory_required` bytes on
    ComfyUI's device first): when ComfyUI unloads it, the pool is closed."""
    patcher = comfy.model_patcher.ModelPatcher(WanLeanWorkerPool(), load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    patcher.add_callback(CallbacksMP.ON_DETACH, lambda *_: close_pool() if _POOL["stand_in"] is patcher else None)
    mm.load_models_gpu([patcher], memory_required=memory_required)
    return patcher


def experts(model, cfg, low_noise_model=None, cfg_low_noise=3.0, boundary=0.875):
    """({name: ModelSource}, [(name, cfg, min_t)]): one model, or the two A14B experts switching at boundary*1000."""
    if low_noise_model is None:
        return {"model": model_source(model)}, [("model", cfg, 0.0)]
    check_experts([model, low_noise_model])
    sources = {"high": model_source(model), "low": model_source(low_noise_model, "low_noise_model")}
    return sources, [("high", cfg, boundary * 1000), ("low", cfg_low_noise, 0.0)]


def get_pool(factory, devices, cfg_parallel, attention, memory_required=0):
    """The running pool when it holds these models on these devices, else a new one (the old one closed)."""
    key = (factory, tuple(devices), bool(cfg_parallel), attention)
    pool = _POOL["pool"]
    if pool is not None and pool.key == key and pool.alive:
        return pool
    close_pool()
    patcher = stand_in(memory_required if mm.get_torch_device() in map(torch.device, devices) else 0)
    _POOL["pool"] = WorkerPool(factory, devices, cfg_parallel, attention,
                               poll=mm.throw_exception_if_processing_interrupted)
    _POOL["stand_in"] = patcher
    return _POOL["pool"]


def model_source(handle, name="model"):
    """The file, weight dtype and LoRAs a loaded model came from, as the workers rebuild it."""
    source = handle.extra.get("source")
    if source is None:
        raise ValueError(f"{name}: this model carries no record of the file it was loaded from, which every worker "
                         "loads: connect Wan Load Diffusion Model (optionally through Wan Load LoRA) to this node")
    gguf = any(getattr(m, "qtype", None) in GGUF_TYPES for m in handle.patcher.model.modules())
    if source["path"].endswith(".gguf") or gguf:
        raise ValueError(f"{name}: {os.path.basename(source['path'])} is GGUF-quantised, which the multi-device "
                         "sampler does not run: load a bf16/fp16/fp8 file of the model, or use Wan Sampler")
    return ModelSource.of(source["path"], DIT_WEIGHT_DTYPES[source["weight_dtype"]], source["loras"],
                          handle.patcher.model.attention_backend)


class WanLeanParallelSampler(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanParallelSampler", "Wan Sampler (multi-GPU)", (
            "Samples a Wan video latent on several local devices at once: the video tokens are split across them "
            "(sequence parallel: Ulysses attention, or ring attention when the head count does not divide the device "
            "count), and with cfg_parallel the prompt and negative passes run on different halves. Each worker loads "
            "the model's file with its LoRAs and stays loaded for the next run with the same settings; /free (unload "
            "models) ends the workers. Wan 2.2 A14B: connect the high-noise expert as model and the low-noise one as "
            "low_noise_model (every worker then holds both)."), [
            WanLeanModel.Input("model", tooltip="A Wan T2V/I2V/FLF2V/TI2V model from Wan Load Diffusion Model or Wan Load "
                                            "LoRA; every worker loads its file and LoRAs (not GGUF)."),
            *cond_inputs(),
            *sampling_inputs(50, [cfg_input("cfg", 5.0, "")], 5.0),
            io.String.Input("devices", default="cuda:all", tooltip="'cuda:all', a list such as 'cuda:0,cuda:1', or "
                                                                   "'cpu:2' (CPU processes over gloo, for tests)."),
            io.Boolean.Input("cfg_parallel", default=False, tooltip="Run the prompt and the negative pass on different "
                                                                    "halves of the devices (even count)."),
            io.Combo.Input("attention", options=list(ATTENTION_MODES), default="auto", tooltip=(
                "auto: Ulysses when the head count divides the devices per pass, else ring; ring: always ring "
                "attention.")),
            *low_noise_inputs("Wan 2.2 A14B only: the low-noise expert; `model` is then the high-noise one and `cfg` "
                              "its guidance.", "A14B only: s"),
            seed_mode_input(),  # added after the V1 schema: last, so that workflows saved before keep their values
        ], [io.Latent.Output(display_name="latent")], progress=True)

    @classmethod
    def execute(cls, model, positive, negative, seed, steps, cfg, shift, sampler, width, height, length, devices,
                cfg_parallel, attention, low_noise_model=None, cfg_low_noise=3.0, boundary=0.875, seed_mode="comfy"):
        devices = check_devices(parse_devices(devices), devices)
        check_layout(len(devices), cfg_parallel, attention, model.patcher.model.dim // HEAD_DIM)
        device = torch.device(devices[0])
        dtype = torch.float32 if device.type == "cpu" else compute_dtype(device)
        net = model.patcher.model
        handles = [model] if low_noise_model is None else [model, low_noise_model]
        cond, uncond, shape = checked_inputs(handles, positive, negative, width, height, length)
        sources, plan = experts(model, cfg, low_noise_model, cfg_low_noise, boundary)
        batch = max(passes(g) for _, g, _ in plan)
        if cfg_parallel and batch == 1:
            logging.warning("Wan Sampler (multi-GPU): cfg 1 has no negative pass to put on the other half of the "
                            "devices, so cfg_parallel makes both halves run the same pass: turn it off to split the "
                            "video over all of them")
        factory = DiTFiles.of(sources, dtype)
        spec = dict(experts=plan, cond=Cond(**vars(cond)), uncond=Cond(**vars(uncond)), seed=seed,
                    steps=steps, shift=shift, sampler=sampler, width=width, height=height, length=length, dtype=dtype,
                    noise_mode=seed_mode)
        # per worker: fp8 matrices stay fp8 (1 byte), the rest in the compute dtype (wan_core.castops.storage_dtypes)
        weights = len(sources) * sum(p.numel() * (p.element_size() if p.dtype in FP8 else dtype.itemsize)
                                     for p in net.parameters())
        act = activation_memory(net, shape, dtype, batch)
        pool = get_pool(factory, devices, cfg_parallel, attention, weights + act // len(devices))
        here = mm.get_torch_device()  # the previewer runs in this process, on ComfyUI's device
        step = step_callback(steps, cls.node_id(), net.out_dim, here)  # progress bar, interrupts, previews
        latent = pool.run(sample_job, spec, poll=mm.throw_exception_if_processing_interrupted,
                          progress=lambda i, n, x0: step(i, n, None, x0.to(here)))
        return io.NodeOutput({"samples": latent})


NODES = [WanLeanParallelSampler]
