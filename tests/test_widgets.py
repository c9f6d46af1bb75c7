"""Every widget value of every node of the pack through the real server, enumerated from its /object_info (a new option,
a new number bound or a new node is picked up without editing this file): each COMBO option, True and False, each
number's min, default and max, each string's default and the empty string.

Each node runs in a base graph (PLAN: a bundled workflow, shrunk, SaveLatent added after every LATENT output). A value
is tried in a branch: a copy of the node and of everything downstream of it, with the value set. The values expected to
run share one prompt per node (ComfyUI runs the common upstream once), the others run one prompt each. Per value:
- runs (the default): every latent of the branch is finite and non-constant, its mp4 frames are not one flat colour;
- refused (EXPECT): the server reports a ValueError that names the input, not a raw Python or torch error;
- either (EXPECT: it depends on the machine: a kernel package, a compiler, GPUs): one of the two.
File lists (models, LoRAs, audio): a file a bundled workflow picks must run in that workflow; any other listed file
(official layouts, a shard, what other tests put there) must run in the node's base graph or be refused naming it.
Costly values run cheaply: a size, length, step or clip count is tried with the node's other such inputs at their
cheapest (CHEAP), so width 4096 runs at height 16, length 1 and one step, which the tiny smoke model does at once;
what cannot fit is refused up front by the node's memory estimate (tests/test_bad_input.py: absurd-size)."""
import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from comfy_host import ExecutionError, PromptRejected
from conftest import ROOT
from media import frames
from run_workflow import shrink
from test_lora import smoke_loras  # noqa: F401  (fixture: LoRAs for the smoke T2V-1.3B in models/loras)
from test_ux import MODEL_EXTS
from workflow_api import ui_to_api

PREFIX = "WanLean"
SMALL = {"width": 64, "height": 64, "length": 5, "steps": 2}
T2V, I2V, A14B, S2V = "wan21_t2v_1.3B.json", "wan21_i2v_480p.json", "wan22_t2v_a14b.json", "wan22_s2v.json"
LONG = "wan22_t2v_a14b_long.json"
FILE_EXTS = MODEL_EXTS + (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".png", ".jpg", ".mp4")
RUNS, REFUSED, EITHER = "runs", "refused", "either"
# inputs that cost time or memory as they grow, and their cheapest value ("min": the widget's own minimum)
CHEAP = {"width": "min", "height": "min", "length": "min", "steps": "min", "max_clips": 1}
LONGEST_CLIP = 1025  # Wan Long Video's clip_length max
SHARED = ("width", "height", "length")  # must agree along a graph (Wan Image To Video and the sampler after it)
# error texts of Python and torch that no user should have to read
RAW = ("Traceback", "invalid literal", "has no attribute", "unpack", "cannot be multiplied", "size of tensor",
       "out of range", "NoneType", "expected scalar", "must match the size", "not subscriptable")


def lora_after_model(api, lora):
    """A Wan Load LoRA between the model loader and the sampler."""
    sampler = api[node_of(api, "WanLeanSampler")]
    api["lora"] = {"class_type": "WanLeanLoraLoader",
                   "inputs": {"model": sampler["inputs"]["model"], "lora_name": lora, "strength": 1.0}}
    sampler["inputs"]["model"] = ["lora", 0]


def parallel_sampler(api, _lora):
    """The A14B sampler swapped for the multi-device one, on 2 CPU worker processes."""
    node = api[node_of(api, "WanLeanSamplerA14B")]
    renamed = {"high_noise_model": "model", "cfg_high_noise": "cfg"}
    node["class_type"] = "WanLeanParallelSampler"
    node["inputs"] = {renamed.get(k, k): v for k, v in node["inputs"].items() if not k.startswith("cache_")}
    node["inputs"].update(devices="cpu:2", cfg_parallel=False, attention="auto")


# node -> (bundled workflow it runs in, graph edit or None). Every node of the pack needs a row (checked below).
PLAN = {
    "WanLeanModelLoader": (T2V, None), "WanLeanVAELoader": (T2V, None), "WanLeanTextEncoderLoader": (T2V, None),
    "WanLeanTextEncode": (T2V, None), "WanLeanSampler": (T2V, None), "WanLeanVAEDecode": (T2V, None),
    "WanLeanSaveVideo": (T2V, None), "WanLeanLoraLoader": (T2V, lora_after_model),
    "WanLeanCLIPVisionLoader": (I2V, None), "WanLeanCLIPVisionEncode": (I2V, None), "WanLeanImageToVideo": (I2V, None),
    "WanLeanSamplerA14B": (A14B, None), "WanLeanParallelSampler": (A14B, parallel_sampler),
    "WanLeanAudioEncoderLoader": (S2V, None), "WanLeanLoadAudio": (S2V, None), "WanLeanSpeechToVideo": (S2V, None),
    "WanLeanLongVideo": (LONG, lambda api, lora: short_clips(api)),
}
# (node, input, option / "min" / "default" / "max" / "empty") -> expected outcome where it is not RUNS
EXPECT = {
    ("WanLeanModelLoader", "attention", "flash"): EITHER,  # the flash-attn package
    ("WanLeanModelLoader", "attention", "sage"): EITHER,  # the sageattention package
    ("WanLeanModelLoader", "compile", "blocks"): EITHER,  # a C++ compiler (CPU) or Triton (CUDA)
    ("WanLeanModelLoader", "compile", "blocks (max-autotune)"): EITHER,
    ("WanLeanParallelSampler", "devices", "default"): EITHER,  # 'cuda:all': two GPUs or more
    ("WanLeanParallelSampler", "devices", "empty"): REFUSED,
    ("WanLeanSaveVideo", "filename_prefix", "empty"): REFUSED,
    # the video's size then follows the start image: the sampler's fixed size is refused naming the fix (wire Wan
    # Image To Video's width/height outputs); tests/test_official.py checks official sizing against the official code
    ("WanLeanImageToVideo", "sizing", "official"): EITHER,
    # 100000 frames are no whole number of clips at any clip_length and overlap (both 1 + 4k): refused, naming the
    # nearest valid lengths
    ("WanLeanLongVideo", "length", "max"): REFUSED,
}
# values that take minutes on 2 CPU cores (each S2V branch renders an 80-frame clip; several clips, 200 steps; a
# 1025-frame I2V encode): opt-in, test_costly_widget_values (-m slow). The default run keeps S2V's options and seeds.
SLOW = {("WanLeanSpeechToVideo", name, label) for name in ("width", "height", "steps", "cfg", "shift", "max_clips")
        for label in ("min", "default", "max")} | {("WanLeanImageToVideo", "length", "max")}
# nodes whose every value is opt-in (-m slow): Wan Long Video renders several clips of two experts per value (its
# sampler choices are the samplers' own, which the default run covers on Wan Sampler and the A14B sampler)
SLOW_NODES = {"WanLeanLongVideo"}
_RAN = {}  # bundled workflow -> its history entry (each runs once per session)


# the pack's own error classes (ValueErrors with a sentence: wan_core.checkpoint.CheckpointError, checks.NonFiniteError)
PACK_ERROR = re.compile(r"\.wan_core\.[a-z_0-9]+\.[A-Za-z]+Error$")
# files other tests write into the smoke folders on purpose (test_bad_input's damaged files, the zoo's per-publisher
# rows): they are checked there, with exact messages; here they would make the outcome depend on test order
FIXTURE_FILES = re.compile(r"^(bad/|bad_|zoo/|.*/zoo/)")


def short_clips(api):
    """The long-video workflow at 3 clips of 13 frames, overlap 5 (29 frames), as tests/test_workflows.py runs it."""
    api[node_of(api, "WanLeanLongVideo")]["inputs"].update(length=29, clip_length=13, overlap=5)


def node_of(api, class_type):
    return next(k for k, v in api.items() if v["class_type"] == class_type)


def is_link(value):
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


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
                values = [("default", opts.get("default", "")), ("empty", "")]
            else:
                continue  # a connection (MODEL, LATENT, ...), not a widget
            seen = set()
            out[name] = [(label, v) for label, v in values if not (repr(v) in seen or seen.add(repr(v)))]
    return out


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
    everything downstream of it (ids prefixed b<i>_), the variant set on the node's copy (sizes on every copy)."""
    down = downstream(api, node_id)
    prompt = {k: v for k, v in api.items() if k not in down}
    for i, sets in enumerate(variants):
        for nid in down:
            entry = copy.deepcopy(api[nid])
            inputs = entry["inputs"]
            for name, value in inputs.items():
                if is_link(value) and value[0] in down:
                    inputs[name] = [f"b{i}_{value[0]}", value[1]]
            inputs.update({k: v for k, v in sets.items() if nid == node_id or (k in SHARED and k in inputs)})
            prompt[f"b{i}_{nid}"] = entry
    return prompt


def base_graph(server, node, lora):
    """The node's base graph (PLAN), small, with SaveLatent after every LATENT output; (api, the node's id)."""
    workflow, edit = PLAN[node]
    info = server.object_info()
    with open(os.path.join(ROOT, "workflows", workflow), encoding="utf-8") as f:
        api = shrink(ui_to_api(json.load(f), info), SMALL)
    if edit is not None:
        edit(api, lora)
    for nid, entry in list(api.items()):
        for slot, kind in enumerate(info[entry["class_type"]]["output"]):
            if kind == "LATENT":
                api[f"{nid}_latent{slot}"] = {"class_type": "SaveLatent",
                                              "inputs": {"samples": [nid, slot], "filename_prefix": "widgets/latent"}}
    return api, node_of(api, node)


def check_outputs(server, entry, prefix, what):
    """Every latent a branch saved is finite and non-constant; every mp4 it wrote is not one flat colour."""
    outputs = {k: v for k, v in entry.get("outputs", {}).items() if k.startswith(prefix)}
    files = server.output_files({"outputs": outputs})
    assert files, f"{what}: the prompt ran but wrote nothing"
    for path in files:
        if path.endswith(".latent"):
            x = load_file(path)["latent_tensor"]
            assert torch.isfinite(x).all(), f"{what}: the latent holds NaN/inf ({path})"
            assert x.std() > 0, f"{what}: the latent is constant ({path})"
        elif path.endswith(".mp4"):
            assert frames(path).std() > 0, f"{what}: the video is one flat colour ({path})"


def check_clear(err, name, value, what):
    """A refusal a user can act on: a ValueError (or the server's own input validation) naming the input (or the
    file it was given), with no raw Python or torch error text in it. A file that loads but is of another model
    family may instead be refused by the node downstream that meets it, naming the mismatch and the fix (e.g. "this
    is an image-to-video model: connect Wan Image To Video")."""
    message = str(err)
    assert isinstance(err, PromptRejected) or err.exception_type in ("ValueError", "FileNotFoundError") \
        or PACK_ERROR.search(err.exception_type or ""), \
        f"{what}: a raw {err.exception_type}, not a clear refusal: {message}"
    is_file = isinstance(value, str) and value.lower().endswith(FILE_EXTS)
    downstream = is_file and err.node_type not in (None, what.split(".")[0])
    named = name in message or downstream or (isinstance(value, str) and value and os.path.basename(value) in message)
    assert named, f"{what}: the error does not name the input {name!r}: {message}"
    assert not any(r in message for r in RAW), f"{what}: a raw error text: {message}"


def try_alone(server, api, node_id, name, value, sets, expect, what):
    """One prompt for one value; asserts the outcome `expect` allows. Returns "ran" or "refused"."""
    try:
        entry = server.run(branched(api, node_id, [sets]), timeout=600)
    except ExecutionError as err:
        assert expect != RUNS, f"{what}: {err}"
        check_clear(err, name, value, what)
        return "refused"
    assert expect != REFUSED, f"{what}: ran, but it must be refused"
    check_outputs(server, entry, "b0_", what)
    return "ran"


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
        try:
            _RAN[workflow] = server.run(shrink(api, SMALL), timeout=600)
        except ExecutionError as err:
            pytest.fail(f"{what}: {err}")
    check_outputs(server, _RAN[workflow], "", what)
    return True


def plan_values(spec, node, keep):
    """[(input, label, value, expected outcome)] of a node's values for which keep((node, input, label)) holds, its
    listed files apart: (values, files)."""
    values, files = [], []
    for name, options in widget_values(spec).items():
        for label, value in options:
            if not keep((node, name, label)):
                continue
            if isinstance(value, str) and value.lower().endswith(FILE_EXTS):
                if not FIXTURE_FILES.match(value.replace("\\", "/")):
                    files.append((name, label, value, EITHER))
            else:
                values.append((name, label, value, EXPECT.get((node, name, label), RUNS)))
    return values, files


def run_grouped(server, api, node_id, node, spec, values):
    """The values expected to run, one branch each, in one prompt; every branch's outputs checked."""
    runs = [(name, label, settings(spec, name, value)) for name, label, value, expect in values if expect == RUNS]
    if not runs:
        return 0
    try:
        entry = server.run(branched(api, node_id, [sets for _, _, sets in runs]), timeout=900)
    except ExecutionError as err:
        branch = str(err.node_id or "").partition("_")[0][1:]
        which = runs[int(branch)][:2] if branch.isdigit() else "?"
        pytest.fail(f"{node} {which}: {err}")
    for i, (name, label, _) in enumerate(runs):
        check_outputs(server, entry, f"b{i}_", f"{node}.{name}={label}")
    return len(runs)


def check_node(server, node, lora, keep):
    """Every value of `node` that keep() selects runs, or is refused clearly, as expected; prints the counts."""
    spec = server.object_info()[node]
    api, node_id = base_graph(server, node, lora)
    values, files = plan_values(spec, node, keep)
    tried = {"ran": run_grouped(server, api, node_id, node, spec, values), "refused": 0}
    for name, label, value, expect in files:
        if run_picking_workflow(server, node, name, value):
            tried["ran"] += 1
        else:
            what = f"{node}.{name}={label!r}"
            tried[try_alone(server, api, node_id, name, value, settings(spec, name, value), expect, what)] += 1
    for name, label, value, expect in [v for v in values if v[3] != RUNS]:
        what = f"{node}.{name}={label!r}"
        tried[try_alone(server, api, node_id, name, value, settings(spec, name, value), expect, what)] += 1
    if node == "WanLeanParallelSampler":
        server.free()  # ends its worker processes
    print(f"{node}: {tried['ran']} values ran, {tried['refused']} refused clearly")


def test_every_pack_node_has_a_plan_and_options(server, smoke_loras):  # noqa: F811
    info = server.object_info()
    pack = {k for k in info if k.startswith(PREFIX)}
    assert pack == set(PLAN), f"nodes without a base graph in PLAN: {sorted(pack - set(PLAN))}; " \
                              f"PLAN rows of no node: {sorted(set(PLAN) - pack)}"
    empty = [f"{n}.{name}" for n in pack for name, vals in widget_values(info[n]).items() if not vals]
    assert not empty, f"COMBO inputs with no option to pick: {empty}"
    labels = {(n, name, label) for n in pack for name, vals in widget_values(info[n]).items() for label, _ in vals}
    unknown = sorted(set(EXPECT) - labels) + sorted({k[:2] for k in SLOW} - {k[:2] for k in labels})
    assert not unknown, f"EXPECT / SLOW rows of no widget: {unknown}"


@pytest.mark.parametrize("node", sorted(PLAN))
def test_every_widget_value(server, smoke_loras, node):  # noqa: F811
    check_node(server, node, smoke_loras[0], lambda key: key not in SLOW and key[0] not in SLOW_NODES)


@pytest.mark.slow
@pytest.mark.parametrize("node", sorted({k[0] for k in SLOW} | SLOW_NODES))
def test_costly_widget_values(server, smoke_loras, node):  # noqa: F811
    check_node(server, node, smoke_loras[0], lambda key: key in SLOW or key[0] in SLOW_NODES)
