"""Every widget value of every node of the pack through the real server, enumerated from its /object_info (a new option,
a new number bound or a new node is picked up without editing this file): each COMBO option, True and False, each
number's min, default and max, each string's default, the empty string and another text. Each value must run (or be
refused as EXPECT says) and must change what its node does: a value the node ignored would run as well as any.

Each node runs in a base graph (PLAN: a bundled workflow, shrunk, SaveLatent after every LATENT output and SaveImage
after every IMAGE output of the pack's nodes). A value is tried in a branch: a copy of the node and of everything
downstream of it, with the value set. The values expected to run share one prompt per node (ComfyUI runs the common
upstream once), the others run one prompt each. Per value:
- runs (the default): every latent of the branch is finite and non-constant, its frames are not one flat colour;
- refused (EXPECT): the node under test itself raises a ValueError (or the server's validation rejects that node)
  naming the input, not a raw Python or torch error; a refusal by a node after it does not count;
- either (EXPECT: it depends on the machine: a kernel package, GPUs): one of the two;
- its effect (EFFECTS): the outputs of every pair of values of one input that ran are compared. Values in one class
  of the input give equal outputs (a reason says why they must on this machine), values in different classes give
  different ones (tolerances: EQUAL_REL ... below). A value in no class fails, so a new option must be classified.
File lists (models, LoRAs, audio): a file a bundled workflow picks must run in that workflow; every other listed file
(official layouts, a shard, what other tests put there) is classified in FILES: it runs in the graph of its model
family, or the node under test refuses it for the reason given. An unclassified file fails.
Costly values run cheaply: a size, length, step or clip count is tried with the node's other such inputs at their
cheapest (CHEAP), so width 4096 runs at height 16, length 1 and one step, which the tiny smoke model does at once;
what cannot fit is refused up front by the node's memory estimate (tests/test_bad_input.py: absurd-size)."""
import copy
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_host import ExecutionError, PromptRejected
from conftest import ROOT
from media import frames, probe
from run_workflow import shrink
from test_lora import smoke_loras  # noqa: F401  (fixture: LoRAs for the smoke T2V-1.3B in models/loras)
from test_ux import MODEL_EXTS
from workflow_api import ui_to_api

PREFIX = "WanLean"
SMALL = {"width": 64, "height": 64, "length": 5, "steps": 2}
T2V, I2V, A14B, S2V = "wan21_t2v_1.3B.json", "wan21_i2v_480p.json", "wan22_t2v_a14b.json", "wan22_s2v.json"
LONG, T2V_14B, TI2V = "wan22_t2v_a14b_long.json", "wan21_t2v_14B.json", "wan22_ti2v_5b_t2v.json"
FILE_EXTS = MODEL_EXTS + (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".png", ".jpg", ".mp4")
RUNS, REFUSED, EITHER = "runs", "refused", "either"
# inputs that cost time or memory as they grow, and their cheapest value ("min": the widget's own minimum)
CHEAP = {"width": "min", "height": "min", "length": "min", "steps": "min", "max_clips": 1}
LONGEST_CLIP = 1025  # Wan Long Video's clip_length max
SHARED = ("width", "height", "length")  # must agree along a graph (Wan Image To Video and the sampler after it)
# error texts of Python and torch that no user should have to read
RAW = ("Traceback", "invalid literal", "has no attribute", "unpack", "cannot be multiplied", "size of tensor",
       "out of range", "NoneType", "expected scalar", "must match the size", "not subscriptable")

# Effect tolerances. A latent compares by max |a - b| over the larger one's scale (max |x|); frames by their difference
# in 8-bit levels: PNG (the IMAGE rounded to 0..255) by the largest one, mp4 (H.264-decoded: a 1-level change of a
# pixel it was given can move its whole block) by the mean one. Two branches are equal when every latent and frame is
# within its EQUAL bound; they differ when a file, shape, frame count or fps differs, or a latent or frame differs by
# more than its DIFFER bound. In between is neither, and fails both ways.
EQUAL_REL, DIFFER_REL = 1e-4, 1e-3
PNG_EQUAL, PNG_DIFFER = 1, 2  # levels, largest
MP4_EQUAL, MP4_DIFFER = 1.0, 2.0  # levels, mean
LIMITS = {"latent": (EQUAL_REL, DIFFER_REL), "frames": (PNG_EQUAL, PNG_DIFFER), "video": (MP4_EQUAL, MP4_DIFFER)}


def lora_after_model(api, lora):
    """A Wan Load LoRA between the model loader and the sampler."""
    sampler = api[node_of(api, "WanLeanSampler")]
    api["lora"] = {"class_type": "WanLeanLoraLoader",
                   "inputs": {"model": sampler["inputs"]["model"], "lora_name": lora, "strength": 1.0}}
    sampler["inputs"]["model"] = ["lora", 0]


def more_steps(api, _lora=None):
    """4 steps on every sampler: at 2 the solvers coincide (UniPC's first and last steps are Euler's) and a step cache
    has no step left to skip after its first computed ones."""
    for entry in api.values():
        if "sampler" in entry["inputs"]:
            entry["inputs"]["steps"] = 4


def both_experts(api):
    """4 steps at shift 1 on the A14B samplers: timesteps 1000 (the high-noise expert) and 750, 500, 250 (the
    low-noise one, with its cfg and its own step cache) fall on both sides of the 0.875 boundary (at the workflows'
    shift 12 the low-noise expert would get no step or one)."""
    more_steps(api)
    for entry in api.values():
        if "boundary" in entry["inputs"]:
            entry["inputs"]["shift"] = 1.0


def short_speech(api, _lora):
    """4 steps, and 3 s of the speech (ComfyUI's TrimAudioDuration): shorter than one clip (77 frames), so
    video_length 'audio' ends the video early (48 frames) where 'whole clips' does not."""
    more_steps(api)
    s2v = api[node_of(api, "WanLeanSpeechToVideo")]
    api["trim"] = {"class_type": "TrimAudioDuration", "inputs": {"audio": s2v["inputs"]["audio"], "start_index": 0.0,
                                                                "duration": 3.0}}
    s2v["inputs"]["audio"] = ["trim", 0]


def parallel_sampler(api, _lora):
    """The A14B sampler swapped for the multi-device one, on 2 CPU worker processes."""
    node = api[node_of(api, "WanLeanSamplerA14B")]
    renamed = {"high_noise_model": "model", "cfg_high_noise": "cfg"}
    node["class_type"] = "WanLeanParallelSampler"
    node["inputs"] = {renamed.get(k, k): v for k, v in node["inputs"].items() if not k.startswith("cache_")}
    node["inputs"].update(devices="cpu:2", cfg_parallel=False, attention="auto")
    both_experts(api)


def sizes_from_image(api, _lora):
    """The sampler takes its width and height from Wan Image To Video's outputs (as its sizing: official asks)."""
    i2v = node_of(api, "WanLeanImageToVideo")
    api[node_of(api, "WanLeanSampler")]["inputs"].update(width=[i2v, 2], height=[i2v, 3])


def wide_frame(api, _lora):
    """One 576 x 64 frame: its 72 latents of width are split by every tile size of Wan VAE Decode (24 to 64 latents,
    overlap 8), each differently, and the untiled decode (about 0.8 GB by the node's estimate) fits in memory."""
    api[node_of(api, "WanLeanSampler")]["inputs"].update(width=576, height=64, length=1)


def short_clips(api):
    """The long-video workflow at 3 clips of 13 frames, overlap 5 (29 frames), as tests/test_workflows.py runs it."""
    api[node_of(api, "WanLeanLongVideo")]["inputs"].update(length=29, clip_length=13, overlap=5)
    both_experts(api)


# node -> (bundled workflow it runs in, graph edit or None). Every node of the pack needs a row (checked below).
PLAN = {
    "WanLeanModelLoader": (T2V, None), "WanLeanVAELoader": (T2V, None), "WanLeanTextEncoderLoader": (T2V, None),
    "WanLeanTextEncode": (T2V, None), "WanLeanSampler": (T2V, more_steps), "WanLeanVAEDecode": (T2V, wide_frame),
    "WanLeanSaveVideo": (T2V, None), "WanLeanLoraLoader": (T2V, lora_after_model),
    "WanLeanCLIPVisionLoader": (I2V, None), "WanLeanCLIPVisionEncode": (I2V, None),
    "WanLeanImageToVideo": (I2V, sizes_from_image),
    "WanLeanSamplerA14B": (A14B, lambda api, lora: both_experts(api)),
    "WanLeanParallelSampler": (A14B, parallel_sampler),
    "WanLeanAudioEncoderLoader": (S2V, None), "WanLeanLoadAudio": (S2V, None),
    "WanLeanSpeechToVideo": (S2V, short_speech),
    "WanLeanLongVideo": (LONG, lambda api, lora: short_clips(api)),
}
# (node, input, option / "min" / "default" / "max" / "empty" / "other") -> expected outcome where it is not RUNS
EXPECT = {
    ("WanLeanModelLoader", "attention", "flash"): EITHER,  # the flash-attn package
    ("WanLeanModelLoader", "attention", "sage"): EITHER,  # the sageattention package
    ("WanLeanModelLoader", "compile", "blocks"): EITHER,  # a C++ compiler (CPU) or Triton (CUDA)
    ("WanLeanModelLoader", "compile", "blocks (max-autotune)"): EITHER,
    ("WanLeanParallelSampler", "devices", "default"): EITHER,  # 'cuda:all': two GPUs or more
    ("WanLeanParallelSampler", "devices", "empty"): REFUSED,
    ("WanLeanParallelSampler", "devices", "other"): REFUSED,  # 'cuda:all_2' is no device name
    ("WanLeanSaveVideo", "filename_prefix", "empty"): REFUSED,
    # 100000 frames are no whole number of clips at any clip_length and overlap (both 1 + 4k): refused, naming the
    # nearest valid lengths
    ("WanLeanLongVideo", "length", "max"): REFUSED,
    # the widget graph is T2V-A14B: the continuations that carry latents or follow SVI are for image models
    **{("WanLeanLongVideo", "continuation", mode): REFUSED
       for mode in ("latent carry", "svi 2.0 pro", "svi 2.0", "svi 1.0 shot", "svi 1.0 film")},
}
# values that take minutes on 2 CPU cores (each S2V branch renders an 80-frame clip; several clips, 200 steps; a
# 1025-frame I2V encode): opt-in, test_costly_widget_values (-m slow). The default run keeps S2V's options and seeds.
SLOW = {("WanLeanSpeechToVideo", name, label) for name in ("width", "height", "steps", "cfg", "shift", "max_clips")
        for label in ("min", "default", "max")} | {("WanLeanImageToVideo", "length", "max")}
# nodes whose every value is opt-in (-m slow): Wan Long Video renders several clips of two experts per value (its
# sampler choices are the samplers' own, which the default run covers on Wan Sampler and the A14B sampler)
SLOW_NODES = {"WanLeanLongVideo"}

# What the values of each input do to what their node makes (the latents, frames and files of its branch): classes
# split by " | ", every value of one input in exactly one of them (refused ones too: they may run elsewhere). Values
# of different classes must give different outputs; values joined by " = " must give equal ones, for the reason given
# beside them (a string: every value is a class of its own).
BOUNDS, SAMPLERS = "min | default | max", "unipc | dpm++ | euler | euler-distilled | lcm-distilled"
SAMPLING = {"seed": "min | max", "steps": BOUNDS, "shift": BOUNDS, "sampler": SAMPLERS, "width": BOUNDS,
            "height": BOUNDS}
SIZES = {"width": BOUNDS, "height": BOUNDS, "length": BOUNDS}
SEED_MODE = ("comfy = official", "on the CPU both draw float32 noise from a CPU generator seeded alike: the same "
                                 "numbers (on a GPU official draws there; S2V's official noise is bfloat16)")
CACHE = {"cache_threshold": "min | max", "cache_interval": "min | max"}
A14B_EXPERTS = {"cfg_low_noise": BOUNDS, "boundary": BOUNDS}
TEXT = "default | empty | other"
EFFECTS = {
    "WanLeanModelLoader": {
        "weight_dtype": ("default = fp16 = fp32 | bf16 | fp8_e4m3fn | fp8_e5m2",
                         "the smoke file is fp16 and the CPU computes in fp32: fp16 weights cast per layer and fp32 "
                         "ones cast at load give the same fp32 numbers"),
        "attention": ("auto = sdpa = flash = sage", "the server runs on the CPU: auto picks PyTorch SDPA there, and "
                                                    "flash / sage (refused where their package is missing) hand every "
                                                    "CPU call to SDPA"),
        "compile": ("off = blocks = blocks (max-autotune)", "compiling the blocks changes how float math is grouped, "
                                                            "not what it computes: equal within the tolerance"),
    },
    "WanLeanLoraLoader": {"strength": BOUNDS},
    "WanLeanTextEncode": {"prompt": TEXT, "negative_prompt": TEXT},
    "WanLeanSampler": {**SAMPLING, **CACHE, "length": BOUNDS, "cfg": BOUNDS, "seed_mode": SEED_MODE},
    "WanLeanSamplerA14B": {**SAMPLING, **CACHE, **A14B_EXPERTS, "length": BOUNDS, "cfg_high_noise": BOUNDS,
                           "seed_mode": SEED_MODE},
    "WanLeanParallelSampler": {
        **SAMPLING, **A14B_EXPERTS, "length": BOUNDS, "cfg": BOUNDS, "seed_mode": SEED_MODE, "devices": TEXT,
        "cfg_parallel": ("True = False", "the same two passes, each split over both CPU processes or each on one: "
                                         "equal within the tolerance"),
        "attention": ("auto = ulysses = ring", "the same attention with the sequence split over the 2 CPU processes "
                                               "in another way: equal within the tolerance"),
    },
    "WanLeanImageToVideo": {**SIZES, "sizing": "crop | official"},
    "WanLeanVAEDecode": {"tiling": ("auto = off | 64 | 48 | 32 | 24",
                                    "auto tiles only a decode that would not fit in free memory, and this one fits")},
    "WanLeanSaveVideo": {"fps": BOUNDS, "crf": BOUNDS, "filename_prefix": TEXT},
    "WanLeanSpeechToVideo": {**SAMPLING, "cfg": BOUNDS, "video_length": "audio | whole clips",
                             "max_clips": ("min = max", "0 renders the clips the audio needs, and 1000 is more than "
                                                        "that: both render the one clip of the 3 s of speech"),
                             "seed_mode": "comfy | official", "sizing": "crop | official"},
    "WanLeanLongVideo": {**SAMPLING, **A14B_EXPERTS, "length": BOUNDS, "cfg": BOUNDS, "clip_length": BOUNDS,
                         "overlap": BOUNDS, "prompts": "default | other", "colour_anchor": "True | False",
                         "join": ("auto = cross-fade | cut", "the widget graph is T2V-A14B (pixel), whose reference "
                                                            "join is the cross-fade"),
                         "continuation": ("auto = pixel | latent carry | svi 2.0 pro | svi 2.0 | svi 1.0 shot | "
                                          "svi 1.0 film", "the widget graph is T2V-A14B, where auto is pixel; the "
                                                          "others are refused there (image models only)")},
}
BASE = "base graph"
# Files no bundled workflow picks, per node: (a full-match pattern of the name, where it must run: BASE, the node's
# PLAN graph, or a bundled workflow with the file set on the node, the graph of its model family; or (REFUSED, a
# pattern of the reason the node under test must give)). The first matching row classifies a file; none: it fails.
FILES = {
    "WanLeanModelLoader": [
        (r"wan2\.1_t2v_1\.3B_(diffusers|fp8_e4m3fn|fp8_e5m2|fp8_scaled)\.safetensors", BASE),
        (r"wan2\.1-t2v-1\.3b-Q\d_[0-9K]\.gguf", BASE),
        (r"Wan2\.1-T2V-1\.3B-Diffusers/transformer/diffusion_pytorch_model-0000[12]-of-00002\.safetensors", BASE),
        (r"Wan2\.1-T2V-14B/diffusion_pytorch_model-0000[12]-of-00002\.safetensors", T2V_14B),
        (r"wan2\.1_i2v_480p_14B_diffusers\.safetensors", I2V),
    ],
    "WanLeanVAELoader": [
        (r"wan_2\.1_vae_diffusers\.safetensors|Wan2\.1_VAE\.pth|Wan2\.1-VAE-Diffusers/vae/diffusion_pytorch_model"
         r"\.safetensors", BASE),
        (r"wan2\.2_vae_diffusers\.safetensors", TI2V),
    ],
    "WanLeanTextEncoderLoader": [(r"models_t5_umt5-xxl-enc-bf16\.pth", BASE)],
    "WanLeanLoraLoader": [(r"wanlean_smoke_(kohya|lightx2v)\.safetensors", BASE)],  # tests/test_lora.py's smoke_loras
    "WanLeanLoadAudio": [(r"wan_(tone_\d+|overwritten|long_recording)\.wav", BASE)],  # tests/test_user_inputs.py's
}
_RAN = {}  # bundled workflow -> its history entry (each runs once per session)


# the pack's own error classes (ValueErrors with a sentence: wan_core.checkpoint.CheckpointError, checks.NonFiniteError)
PACK_ERROR = re.compile(r"\.wan_core\.[a-z_0-9]+\.[A-Za-z]+Error$")
# files other tests write into the smoke folders on purpose (test_bad_input's damaged files, the zoo's per-publisher
# rows): they are checked there, with exact messages; here they would make the outcome depend on test order
FIXTURE_FILES = re.compile(r"^(bad/|bad_|zoo/|.*/zoo/)")


def node_of(api, class_type):
    return next(k for k, v in api.items() if v["class_type"] == class_type)


def is_link(value):
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def string_values(opts):
    """A string widget's default, the empty string and another text (the default with '_2' added)."""
    default = opts.get("default", "")
    return [("default", default), ("empty", ""), ("other", f"{default}_2" if default else "another text")]


def widget_values(spec):
    """{input: [(label, value)]} of a node's widgets from its /object_info entry, duplicates dropped."""
    out = {}
    for group in ("required", "optional"):
        for name, inp in (spec["input"].get(group) or {}).items():
            kind, opts = inp[0], inp[1] if len(inp) > 1 else {}
            if isinstance(kind, list) or kind == "COMBO":
                values = [(str(o), o) for o in (kind if isinstance(kind, list) else opts.get("options", []))]
            elif kind == "BOOLEAN":
                values = [("True", True), ("False", False)]
            elif kind in ("INT", "FLOAT"):
                assert "min" in opts and "max" in opts, f"{name}: a number without min and max"
                values = [(role, opts[role]) for role in ("min", "default", "max") if role in opts]
            elif kind == "STRING":
                values = string_values(opts)
            else:
                continue  # a connection (MODEL, LATENT, ...), not a widget
            seen = set()
            out[name] = [(label, v) for label, v in values if not (repr(v) in seen or seen.add(repr(v)))]
    return out


def is_file(value):
    return isinstance(value, str) and value.lower().endswith(FILE_EXTS)


def settings(spec, name, value):
    """The inputs to set to try `name`=`value`: a costly input with the node's other costly ones at their cheapest."""
    opts = {n: s[1] if len(s) > 1 else {} for g in ("required", "optional") for n, s in (spec["input"].get(g) or {}).items()}
    sets = {name: value}
    if name in CHEAP:
        sets.update({peer: opts[peer]["min"] if cheap == "min" else cheap for peer, cheap in CHEAP.items()
                     if peer != name and peer in opts})
    if "clip_length" in opts:  # Wan Long Video: a length, clip_length and overlap that make whole clips
        sets.update(clip_trio(name, sets))
    return sets


def clip_trio(name, sets):
    """Wan Long Video's length / clip_length / overlap around the one tried, at the fewest frames: one clip of
    `length` (or of `clip_length`), or two clips of 2 x overlap + 3 frames (the shortest clip it is less than half
    of) when the overlap is tried. A length past the
    longest clip keeps the base graph's 13-frame clips (whole clips or refused, EXPECT says which)."""
    one_prompt = {"prompts": ""}  # the workflow's 3 prompt lines would be more lines than clips
    if name == "overlap":
        clip = 2 * sets["overlap"] + 3
        return {"clip_length": clip, "length": 2 * clip - sets["overlap"], **one_prompt}
    if name == "clip_length":
        return {"length": sets["clip_length"], "overlap": 1, **one_prompt}
    if "length" in sets and sets["length"] <= LONGEST_CLIP:
        return {"clip_length": sets["length"], "overlap": 1, **one_prompt}
    return {}


def downstream(api, node_id):
    """`node_id` and every node that takes its outputs, directly or not."""
    found, grew = {node_id}, True
    while grew:
        grew = False
        for nid, entry in api.items():
            if nid not in found and any(is_link(v) and v[0] in found for v in entry["inputs"].values()):
                found.add(nid)
                grew = True
    return found


def branched(api, node_id, variants):
    """One prompt: the graph upstream of `node_id` once and, per variant ({input: value}), a copy of `node_id` and of
    everything downstream of it (ids prefixed b<i>_), the variant set on the node's copy (sizes on every copy that
    takes them as a widget, not through a link)."""
    down = downstream(api, node_id)
    prompt = {k: v for k, v in api.items() if k not in down}
    for i, sets in enumerate(variants):
        for nid in down:
            entry = copy.deepcopy(api[nid])
            inputs = entry["inputs"]
            for name, value in inputs.items():
                if is_link(value) and value[0] in down:
                    inputs[name] = [f"b{i}_{value[0]}", value[1]]
            inputs.update({k: v for k, v in sets.items()
                           if nid == node_id or (k in SHARED and k in inputs and not is_link(inputs[k]))})
            prompt[f"b{i}_{nid}"] = entry
    return prompt


def graph(server, workflow, edit=None, lora=None):
    """A bundled workflow, small, edited, with SaveLatent after every LATENT output and SaveImage after every IMAGE
    output of the pack's nodes (the frames losslessly, as the effect checks compare them)."""
    info = server.object_info()
    with open(os.path.join(ROOT, "workflows", workflow), encoding="utf-8") as f:
        api = shrink(ui_to_api(json.load(f), info), SMALL)
    if edit is not None:
        edit(api, lora)
    savers = {"LATENT": ("SaveLatent", "samples", "widgets/latent"), "IMAGE": ("SaveImage", "images", "widgets/frames")}
    for nid, entry in list(api.items()):
        for slot, kind in enumerate(info[entry["class_type"]]["output"]):
            if kind in savers and (kind == "LATENT" or entry["class_type"].startswith(PREFIX)):
                saver, name, prefix = savers[kind]
                api[f"{nid}_{kind.lower()}{slot}"] = {"class_type": saver,
                                                     "inputs": {name: [nid, slot], "filename_prefix": prefix}}
    return api


def base_graph(server, node, lora):
    """The node's base graph (PLAN): (api, the node's id)."""
    workflow, edit = PLAN[node]
    api = graph(server, workflow, edit, lora)
    return api, node_of(api, node)


def read_outputs(server, paths, what):
    """[(kind, name, data)] of one output node's files, each checked: a latent (float64 tensor, finite, not constant),
    frames (a SaveImage's PNGs stacked, uint8 [N, H, W, 3], not one flat colour) or a video (its mp4 frames, the same;
    the name carries its fps). Names drop ComfyUI's counter: a file name is what a filename_prefix sets."""
    items, pngs = [], []
    for path in sorted(paths):
        name = re.sub(r"_\d{5}_?(?=\.\w+$)", "", os.path.relpath(path, server.output_dir))
        if path.endswith(".latent"):
            x = load_file(path)["latent_tensor"]
            assert torch.isfinite(x).all(), f"{what}: the latent holds NaN/inf ({path})"
            assert x.std() > 0, f"{what}: the latent is constant ({path})"
            items.append(("latent", name, x.double()))
        elif path.endswith(".png"):
            pngs.append((name, np.asarray(Image.open(path).convert("RGB"))))
        elif path.endswith(".mp4"):
            video = frames(path)
            assert video.std() > 0, f"{what}: the video is one flat colour ({path})"
            items.append(("video", f"{name} at {probe(path)['fps']:g} fps", video))
    if pngs:
        stack = np.stack([px for _, px in pngs])
        assert stack.std() > 0, f"{what}: the frames are one flat colour ({pngs[0][0]})"
        items.append(("frames", pngs[0][0], stack))
    return items


def observe(server, entry, prefix, what):
    """What the outputs of a prompt whose ids start with `prefix` wrote: {node id less the prefix: read_outputs}."""
    seen = {nid[len(prefix):]: read_outputs(server, server.output_files({"outputs": {nid: out}}), what)
            for nid, out in entry.get("outputs", {}).items() if nid.startswith(prefix)}
    assert any(seen.values()), f"{what}: the prompt ran but wrote nothing"
    return seen


def gap(kind, x, y):
    """How far apart two outputs of one kind are, in the unit of their LIMITS."""
    if kind == "latent":
        return ((x - y).abs().max() / max(x.abs().max().item(), y.abs().max().item(), 1e-12)).item()
    levels = np.abs(x.astype(np.int16) - y.astype(np.int16))
    return float(levels.max() if kind == "frames" else levels.mean())


def difference(a, b):
    """('equal' | 'differ' | 'between', what was measured) of two branches' observe()s, by LIMITS."""
    layout = {nid: [(kind, name, tuple(data.shape)) for kind, name, data in a[nid]] for nid in a}
    other = {nid: [(kind, name, tuple(data.shape)) for kind, name, data in b[nid]] for nid in b}
    if layout != other:
        return "differ", f"files {layout} vs {other}"
    gaps = [(kind, name, gap(kind, x, y)) for nid in a for (kind, name, x), (_, _, y) in zip(a[nid], b[nid])]
    told = ", ".join(f"{name}: {g:.3g}" for _, name, g in gaps)
    if any(g > LIMITS[kind][1] for kind, _, g in gaps):
        return "differ", told
    return ("equal" if all(g <= LIMITS[kind][0] for kind, _, g in gaps) else "between"), told


def effect_classes(node, name):
    """{label: its class} of one input (EFFECTS) and the reason its joined values are equal (None: none joined)."""
    row = EFFECTS.get(node, {}).get(name, "")
    spec, why = row if isinstance(row, tuple) else (row, None)
    return {label: i for i, group in enumerate(spec.split(" | ")) for label in group.split(" = ") if spec}, why


def check_effects(node, seen):
    """Every pair of values of one input that ran ({(input, label): observe()}): equal outputs when EFFECTS joins
    them, different ones when it does not; a value EFFECTS does not list fails. Returns the number of pairs."""
    problems, pairs = [], 0
    for name in sorted({n for n, _ in seen}):
        classes, why = effect_classes(node, name)
        labels = sorted(label for n, label in seen if n == name)
        problems += [f"{node}.{name}={label}: in no class of EFFECTS[{node!r}][{name!r}]: classify it"
                     for label in labels if label not in classes]
        for a, b in itertools.combinations([label for label in labels if label in classes], 2):
            expected = "equal" if classes[a] == classes[b] else "differ"
            got, measured = difference(seen[(name, a)], seen[(name, b)])
            pairs += 1
            if got != expected:
                reason = f" ({why})" if expected == "equal" else ""
                problems.append(f"{node}.{name}: {a} vs {b}: {got} ({measured}), but must {expected}{reason}")
    assert not problems, "\n".join(problems)
    return pairs


def check_clear(err, node_id, name, value, what):
    """A refusal a user can act on, made by the node under test (`node_id`: its copy in the prompt; a node after it
    refusing what it was handed does not show that this value was checked): a ValueError (or the server's own
    validation of that node) naming the input (or the file it was given), with no raw Python or torch error text."""
    message = str(err)
    if isinstance(err, PromptRejected):
        assert node_id in err.node_errors, f"{what}: the server rejected nodes {sorted(err.node_errors)}, not the " \
                                           f"one under test ({node_id}): {message}"
    else:
        assert err.node_id == node_id, f"{what}: refused by node {err.node_id} ({err.node_type}), not by the one " \
                                       f"under test ({node_id}): {message}"
        clear = err.exception_type in ("ValueError", "FileNotFoundError") or PACK_ERROR.search(err.exception_type or "")
        assert clear, f"{what}: a raw {err.exception_type}, not a clear refusal: {message}"
    named = name in message or (isinstance(value, str) and value and os.path.basename(value) in message)
    assert named, f"{what}: the error does not name the input {name!r}: {message}"
    assert not any(r in message for r in RAW), f"{what}: a raw error text: {message}"


def try_alone(server, api, node_id, sets, expect, what, reason=None):
    """One prompt for one value (`sets`: {input: value}, the input tried first); asserts the outcome `expect` allows,
    a refusal matching `reason` when given. Returns what the branch wrote (observe()), None when it was refused."""
    name, value = next(iter(sets.items()))
    try:
        entry = server.run(branched(api, node_id, [sets]), timeout=600)
    except ExecutionError as err:
        assert expect != RUNS, f"{what}: {err}"
        check_clear(err, f"b0_{node_id}", name, value, what)
        assert reason is None or re.search(reason, str(err)), f"{what}: refused, but not because {reason!r}: {err}"
        return None
    assert expect != REFUSED, f"{what}: ran, but it must be refused"
    return observe(server, entry, "b0_", what)


def picking_workflow(server, node, name, value):
    """A bundled workflow whose `node` has `name` set to `value` (a file it picks), or None."""
    for workflow in sorted(f for f in os.listdir(os.path.join(ROOT, "workflows")) if f.endswith(".json")):
        with open(os.path.join(ROOT, "workflows", workflow), encoding="utf-8") as f:
            api = ui_to_api(json.load(f), server.object_info())
        if any(e["class_type"] == node and e["inputs"].get(name) == value for e in api.values()):
            return workflow, api
    return None


def run_picking_workflow(server, node, name, value):
    """The bundled workflow that picks file `value` (small): it must run; False when no workflow picks it."""
    found = picking_workflow(server, node, name, value)
    if found is None:
        return False
    workflow, api = found
    what = f"{node}.{name}={value!r} in {workflow}"
    if workflow not in _RAN:
        api = shrink(api, SMALL)
        if any(e["class_type"] == "WanLeanLongVideo" for e in api.values()):
            short_clips(api)  # 5 frames are no whole number of clips
        try:
            _RAN[workflow] = server.run(api, timeout=600)
        except ExecutionError as err:
            pytest.fail(f"{what}: {err}")
    observe(server, _RAN[workflow], "", what)
    return True


def file_class(node, value):
    """Where FILES says file `value` runs (BASE or a workflow), (REFUSED, reason), or None when no row matches."""
    return next((where for pattern, where in FILES.get(node, ()) if re.fullmatch(pattern, value.replace("\\", "/"))),
                None)


def check_files(server, node, base, files):
    """Each listed file: the bundled workflow that picks it runs, or it runs where FILES says (its node's base graph
    `base`, or the bundled workflow of its model family with the file set on the node), or the node under test
    refuses it for the reason FILES gives. Returns {"ran": n, "refused": m}."""
    counts = {"ran": 0, "refused": 0}
    for name, value in files:
        if run_picking_workflow(server, node, name, value):
            counts["ran"] += 1
            continue
        where, what = file_class(node, value), f"{node}.{name}={value!r}"
        assert where is not None, f"{what}: no bundled workflow picks this file and no FILES row classifies it"
        if isinstance(where, tuple):
            outcome = try_alone(server, *base, {name: value}, REFUSED, what, reason=where[1])
        else:
            api = base[0] if where == BASE else graph(server, where)
            outcome = try_alone(server, api, base[1] if where == BASE else node_of(api, node), {name: value}, RUNS,
                                f"{what} in {where}")
        counts["ran" if outcome is not None else "refused"] += 1
    return counts


def plan_values(spec, node, keep):
    """[(input, label, value, expected outcome)] of a node's values for which keep((node, input, label)) holds, its
    listed files apart: (values, [(input, file)])."""
    values, files = [], []
    for name, options in widget_values(spec).items():
        for label, value in options:
            if not keep((node, name, label)):
                continue
            if is_file(value):
                if not FIXTURE_FILES.match(value.replace("\\", "/")):
                    files.append((name, value))
            else:
                values.append((name, label, value, EXPECT.get((node, name, label), RUNS)))
    return values, files


def run_grouped(server, api, node_id, node, spec, values):
    """The values expected to run, one branch each, in one prompt: {(input, label): what its branch wrote}."""
    runs = [(name, label, settings(spec, name, value)) for name, label, value, expect in values if expect == RUNS]
    if not runs:
        return {}
    try:
        entry = server.run(branched(api, node_id, [sets for _, _, sets in runs]), timeout=900)
    except ExecutionError as err:
        branch = str(err.node_id or "").partition("_")[0][1:]
        which = runs[int(branch)][:2] if branch.isdigit() else "?"
        pytest.fail(f"{node} {which}: {err}")
    return {(name, label): observe(server, entry, f"b{i}_", f"{node}.{name}={label}")
            for i, (name, label, _) in enumerate(runs)}


def check_node(server, node, lora, keep):
    """Every value of `node` that keep() selects runs, or is refused clearly, as expected, and changes the node's
    outputs as EFFECTS says; every listed file runs or is refused as classified. Prints the counts."""
    spec = server.object_info()[node]
    api, node_id = base_graph(server, node, lora)
    values, files = plan_values(spec, node, keep)
    seen, refused = run_grouped(server, api, node_id, node, spec, values), 0
    for name, label, value, expect in [v for v in values if v[3] != RUNS]:
        got = try_alone(server, api, node_id, settings(spec, name, value), expect, f"{node}.{name}={label!r}")
        if got is None:
            refused += 1
        else:
            seen[(name, label)] = got
    pairs = check_effects(node, seen)
    tried = check_files(server, node, (api, node_id), files)
    if node == "WanLeanParallelSampler":
        server.free()  # ends its worker processes
    print(f"{node}: {len(seen)} values ran ({pairs} pairs compared), {refused} refused clearly; "
          f"files: {tried['ran']} ran, {tried['refused']} refused clearly")


def check_tables(info):
    """EFFECTS lists every non-file value of every node once, and nothing else; EXPECT and SLOW name real values."""
    pack = {k for k in info if k.startswith(PREFIX)}
    labels = {(n, name, label) for n in pack for name, vals in widget_values(info[n]).items() for label, v in vals
              if not is_file(v)}
    listed, problems = set(), []
    for node, rows in EFFECTS.items():
        for name in rows:
            classes, why = effect_classes(node, name)
            if len(set(classes.values())) < len(classes) and not why:
                problems.append(f"EFFECTS[{node!r}][{name!r}] joins values without a reason")
            listed |= {(node, name, label) for label in classes}
    problems += [f"{n}.{name}={label}: not in EFFECTS" for n, name, label in sorted(labels - listed)]
    problems += [f"EFFECTS row of no widget value: {k}" for k in sorted(listed - labels)]
    problems += [f"EXPECT / SLOW row of no widget: {k}" for k in sorted(set(EXPECT) - labels)
                 + sorted({k[:2] for k in SLOW} - {k[:2] for k in labels})]
    problems += [f"FILES row of no node: {k}" for k in sorted(set(FILES) - pack)]
    assert not problems, "\n".join(problems)


def test_every_pack_node_has_a_plan_and_options(server, smoke_loras):  # noqa: F811
    info = server.object_info()
    pack = {k for k in info if k.startswith(PREFIX)}
    assert pack == set(PLAN), f"nodes without a base graph in PLAN: {sorted(pack - set(PLAN))}; " \
                              f"PLAN rows of no node: {sorted(set(PLAN) - pack)}"
    empty = [f"{n}.{name}" for n in pack for name, vals in widget_values(info[n]).items() if not vals]
    assert not empty, f"COMBO inputs with no option to pick: {empty}"
    check_tables(info)


@pytest.mark.parametrize("node", sorted(PLAN))
def test_every_widget_value(server, smoke_loras, node):  # noqa: F811
    check_node(server, node, smoke_loras[0], lambda key: key not in SLOW and key[0] not in SLOW_NODES)


@pytest.mark.slow
@pytest.mark.parametrize("node", sorted({k[0] for k in SLOW} | SLOW_NODES))
def test_costly_widget_values(server, smoke_loras, node):  # noqa: F811
    # the costly values with the others of their inputs (cheap ones run again), so they are compared with them
    slow_inputs = {k[:2] for k in SLOW}
    check_node(server, node, smoke_loras[0], lambda key: key[:2] in slow_inputs or key[0] in SLOW_NODES)
