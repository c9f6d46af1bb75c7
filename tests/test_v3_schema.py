"""The nodes on ComfyUI's V3 schema (comfy_api.latest) keep what saved workflows depend on.

tests/data/object_info_v1.json is the real server's /object_info for every pack node as the V1 declarations (INPUT_TYPES
classes, before the V3 schema) served it; tests/data/wan21_i2v_saved_v1.json is a UI-format workflow saved then (the
bundled I2V workflow with non-default widget values everywhere) and wan21_i2v_saved_v1_api.json the API prompt the
frontend's rules made of it with that /object_info. The server of today must serve the same inputs (names, order,
types, required/optional split, widget options, defaults, bounds, tooltips) and outputs, turn that workflow into the
same prompt, and run it."""
import json
import os

import pytest

from conftest import ROOT
from media import assert_real_video, probe
from workflow_api import ui_to_api

DATA = os.path.join(ROOT, "tests", "data")
# file lists: their options are whatever the model/input folders hold when the server starts (other tests add files)
FILE_LISTS = {("WanLeanModelLoader", "model_name"), ("WanLeanVAELoader", "vae_name"),
              ("WanLeanTextEncoderLoader", "text_encoder_name"), ("WanLeanCLIPVisionLoader", "clip_name"),
              ("WanLeanLoraLoader", "lora_name"), ("WanLeanAudioEncoderLoader", "audio_encoder_name"),
              ("WanLeanLoadAudio", "audio_file")}
# widget options the frontend reads when it builds a node's widgets (and so the positions of widgets_values)
WIDGET_KEYS = ("default", "min", "max", "step", "round", "tooltip", "control_after_generate", "forceInput",
               "audio_upload", "image_upload", "defaultInput")


def load(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return json.load(f)


def loading_view(node, entry):
    """What a saved workflow's loading depends on in one /object_info entry, in one form for V1 and V3 declarations:
    a COMBO's options as V1's [options, {...}] or V3's ["COMBO", {"options": [...]}]; a string's multiline flag
    (absent in V1 = False, V3 writes False)."""
    view = {"inputs": {}, "outputs": list(zip(entry["output"], entry["output_name"], entry["output_is_list"]))}
    for group in ("required", "optional"):
        specs = entry["input"].get(group, {})
        for name in entry["input_order"].get(group, []):
            kind, opts = specs[name][0], specs[name][1] if len(specs[name]) > 1 else {}
            options = kind if isinstance(kind, list) else opts.get("options")
            item = {"group": group, "type": "COMBO" if isinstance(kind, list) else kind,
                    **{k: opts[k] for k in WIDGET_KEYS if k in opts}}
            if item["type"] == "COMBO":
                item["options"] = "<files>" if (node, name) in FILE_LISTS else options
            if item["type"] == "STRING":
                item["multiline"] = bool(opts.get("multiline"))
            view["inputs"][name] = item
    view["order"] = {g: entry["input_order"].get(g, []) for g in ("required", "optional")}
    for key in ("display_name", "category", "description", "output_node"):
        view[key] = entry[key]
    return view


# inputs added since the snapshot: optional, appended after every older input, so that a workflow saved before
# (positional widgets_values) keeps its values and the new input takes its default
ADDED_SINCE_V1 = [("WanLeanParallelSampler", "seed_mode"), ("WanLeanLongVideo", "continuation"),
                  ("WanLeanLongVideo", "colour_anchor"), ("WanLeanLongVideo", "join"), ("WanLeanLongVideo", "clip_vision")]
# words only (no effect on loading): tooltips and descriptions rewritten since, where the behaviour they describe grew
REWORDED_SINCE_V1 = {("WanLeanLongVideo", "overlap"), ("WanLeanLongVideo", None)}


def without_added(node, view):
    added = [name for n, name in ADDED_SINCE_V1 if n == node]
    optional = view["order"]["optional"]
    assert optional[len(optional) - len(added):] == added, (node, optional)  # last, in the order added
    assert all(view["inputs"][name]["group"] == "optional" for name in added), node
    view["order"]["optional"] = optional[:len(optional) - len(added)]
    view["inputs"] = {k: v for k, v in view["inputs"].items() if k not in added}
    return view


def without_words(node, view):
    """The view less the tooltips / description listed in REWORDED_SINCE_V1."""
    for n, name in REWORDED_SINCE_V1:
        if n == node:
            if name is None:
                view["description"] = None
            else:
                view["inputs"][name].pop("tooltip", None)
    return view


def test_object_info_matches_the_v1_snapshot(server):
    """Every pack node, as the server serves it now, against the snapshot taken from the V1 declarations (less the
    inputs added since, which must be optional and last)."""
    before, now = load("object_info_v1.json"), server.object_info()
    assert {n for n in now if n.startswith("WanLean")} == set(before)
    for node, entry in before.items():
        old = without_words(node, loading_view(node, entry))
        new = without_words(node, without_added(node, loading_view(node, now[node])))
        for name in set(old["inputs"]) | set(new["inputs"]):
            assert old["inputs"].get(name) == new["inputs"].get(name), (node, name)
        assert old == new, node


def test_progress_nodes_ask_for_their_id(server):
    """The nodes that report progress (bars and previews carry the node's id) get it as the V3 hidden unique_id."""
    info = server.object_info()
    for node, entry in load("object_info_v1.json").items():
        if "hidden" in entry["input"]:  # V1: {"node_id": "UNIQUE_ID"}
            assert info[node]["input"].get("hidden") == {"unique_id": ["UNIQUE_ID"]}, node


def test_workflow_saved_before_v3_converts_to_the_same_prompt_and_runs(server):
    """The UI workflow saved with the V1 nodes (positional widgets_values) maps every value onto the same input, and
    runs: an mp4 of its own non-default size, length and frame rate, with real pixels."""
    workflow = load("wan21_i2v_saved_v1.json")
    api = ui_to_api(workflow, server.object_info())
    assert api == load("wan21_i2v_saved_v1_api.json")
    files = server.output_files(server.run(api))
    videos = [f for f in files if f.endswith(".mp4")]
    assert len(videos) == 1 and "v1_saved" in os.path.basename(videos[0]), files
    info = probe(videos[0])
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (5, 64, 48, 12)
    assert_real_video(videos[0])


@pytest.mark.parametrize("name", ["wan21_i2v_saved_v1.json"])
def test_saved_workflow_uses_non_default_values(name):
    """The saved workflow is worth its keep only if its values differ from the defaults (a shifted widget would then
    land a value on the wrong input and show up above)."""
    info = load("object_info_v1.json")
    api = load(name.replace(".json", "_api.json"))
    for node_id in ("2", "9", "10", "11", "12"):
        entry = api[node_id]
        spec = {**info[entry["class_type"]]["input"]["required"], **info[entry["class_type"]]["input"].get("optional", {})}
        changed = [k for k, v in entry["inputs"].items() if not isinstance(v, list) and v != spec[k][1].get("default")]
        assert changed, entry


def test_pack_registers_each_node_once_through_comfy_entrypoint(server):
    """Imported as ComfyUI imports a custom node folder, the pack offers only the V3 entry point (ComfyUI takes
    NODE_CLASS_MAPPINGS first when both exist and would never call it); its extension lists every node once, each
    with a valid schema, and the server logged no complaint about the entry point."""
    import asyncio
    import importlib.util
    import sys

    from conftest import import_comfy
    import_comfy()
    import folder_paths  # noqa: F401  (the pack registers its nodes only when ComfyUI is there)
    name = "wanlean_entrypoint_pack"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and callable(pack.comfy_entrypoint)
    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    ids = [node.GET_SCHEMA().node_id for node in nodes]
    assert sorted(ids) == sorted(load("object_info_v1.json")) and len(set(ids)) == len(ids)
    assert "comfy_entrypoint" not in server.log_text()
