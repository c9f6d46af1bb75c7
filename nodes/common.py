"""Glue shared by the nodes: ComfyUI's memory manager, dtypes, progress, latent previews and interrupts."""
import contextlib
import itertools
from dataclasses import dataclass, field

import torch

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..wan_core.pipeline import preview_frame
from .inputs import checking_first, refusal

CATEGORY = "Wan Lean"
# The pack's own socket types: handles of core models that native types cannot carry
WanLeanModel = io.Custom("WANLEAN_MODEL")
WanLeanVAE = io.Custom("WANLEAN_VAE")
WanLeanTextEncoder = io.Custom("WANLEAN_TEXT_ENCODER")
WanLeanCLIPVision = io.Custom("WANLEAN_CLIP_VISION")
WanLeanAudioEncoder = io.Custom("WANLEAN_AUDIO_ENCODER")
# Memory estimates handed to ComfyUI are the measured peak times a stated margin over run-to-run noise (allocator,
# thread pools: a 64x64 VAE encode measured 73 MiB once, 71 typically): 25% for the VAE's encode and decode (measured
# per pixel at small sizes, where the noise is largest), 15% for the sampler's activations (an analytic count that
# one real-width block's measured peak follows to within 5%)
MARGIN = 1.25
ACTIVATION_MARGIN = 1.15
WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(device, fp16_ok=True):
    """bf16 where the device supports it, else fp16 (if the model tolerates it), else fp32."""
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if fp16_ok and mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


def casting_ops():
    """ComfyUI's casting ops: weights are cast to each input's dtype at use (so fp32 parts such as the
    time embedding run next to bf16 blocks) and streamed from the offload device in low-VRAM mode."""
    return comfy.ops.manual_cast


@dataclass
class Handle:
    """A core model behind a ComfyUI ModelPatcher, plus what the nodes need to run it."""
    patcher: comfy.model_patcher.ModelPatcher
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @classmethod
    def wrap(cls, model, load_device, offload_device, dtype, **extra):
        size = comfy.model_management.module_size(model)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device, size=size)
        return cls(patcher, dtype, extra)

    @property
    def device(self):
        return self.patcher.load_device

    def load(self, memory_required=0):
        """Ask ComfyUI's memory manager for the device: `memory_required` is the call's activation estimate (bytes);
        ComfyUI adds the weights (the patcher's size, in the storage dtype), unloads other models to make room and
        loads this one partially, streaming the rest through the casting ops, when the device is still too small.
        Only this model is asked for, so models used one after the other (A14B experts) take turns."""
        mm.load_models_gpu([self.patcher], memory_required=memory_required)
        return self.patcher.model


@contextlib.contextmanager
def errors_named(node):
    """Prefix the message of a ValueError raised inside with the node's name, keeping its class (the pack's
    CheckpointError, NonFiniteError, ...) and traceback."""
    try:
        yield
    except ValueError as e:
        e.args = (f"{node}: {e.args[0] if e.args else e}",) + e.args[1:]
        raise


class WanLeanNode(io.ComfyNode):
    """Base of the pack's V3 nodes: `schema` builds the declaration, `node_id` reads the node's id for progress bars
    and previews from the hidden inputs ComfyUI hands the node (None when the node is called outside ComfyUI's
    executor, e.g. in-process tests). Every node's execute first checks the values it is given against its schema
    (combo options, number ranges, upload files inside their folder: nodes/inputs.py), on every host."""
    hidden = io.HiddenHolder.from_dict({})

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        checking_first(cls)

    @classmethod
    def input_refusal(cls, **values):
        """The message refusing one of these input values (None: all taken), for a node's validate_inputs hook."""
        return refusal(cls.define_schema(), values)

    @classmethod
    def schema(cls, node_id, display_name, description, inputs, outputs=(), progress=False, output_node=False):
        """The node's io.Schema in the pack's category; progress=True asks for the hidden unique_id."""
        return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                         inputs=list(inputs), outputs=list(outputs), is_output_node=output_node,
                         hidden=[io.Hidden.unique_id] if progress else None)

    @classmethod
    def node_id(cls):
        return cls.hidden.unique_id


# latent channels -> ComfyUI's latent format of that VAE family (its latent-to-RGB factors, its tiny decoder's name)
LATENT_FORMATS = {16: comfy.latent_formats.Wan21, 48: comfy.latent_formats.Wan22}


def previewer(channels, device):
    """ComfyUI's latent previewer for Wan latents of `channels` channels (16: Wan 2.1 VAE, 48: Wan 2.2 VAE), picked as
    its own KSampler picks it from the user's --preview-method: none (ComfyUI's default) -> None; taesd with
    models/vae_approx/lighttaew2_1 (2_2) present -> that tiny video decoder; else (auto, latent2rgb, taesd without the
    file) -> the 1x1 latent-to-RGB projection. None for other channel counts."""
    fmt = LATENT_FORMATS.get(channels)
    return None if fmt is None else latent_preview.get_previewer(device, fmt())


def preview_image(latent_previewer, x0):
    """One step's preview ("JPEG", PIL image, max size) of x0 [B, C, F, H, W] (wan_core.pipeline.preview_frame)."""
    return latent_previewer.decode_latent_to_preview_image("JPEG", preview_frame(x0))


def step_callback(total, node_id=None, channels=None, device=None):
    """A per-step callback(step, steps, x, x0) as wan_core's samplers call it: progress bar, interrupt check (raises
    ComfyUI's InterruptProcessingException) and, given the latent `channels` and previews on, x0's preview sent with
    the progress update."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)
    preview = previewer(channels, device) if channels else None

    def callback(step, _steps=None, _x=None, x0=None):
        mm.throw_exception_if_processing_interrupted()
        image = preview_image(preview, x0) if preview is not None and x0 is not None else None
        bar.update_absolute(step + 1, total, image)

    return callback


def clips_step_callback(steps, clips, node_id=None, channels=None, device=None):
    """step_callback for a loop of `clips` samplings of `steps` steps each: one bar over all of them (with previews
    and interrupts at every step)."""
    inner = step_callback(steps * clips, node_id, channels, device)
    done = itertools.count()
    return lambda _step, _steps, x, x0: inner(next(done), steps * clips, x, x0)
