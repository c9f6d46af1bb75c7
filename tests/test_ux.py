"""The pack as a user meets it before running anything, read from a real ComfyUI server with only this pack installed:
every node described and every input explained, workflows that use only this pack and ComfyUI core, notes that say
where each model file goes, the workflows listed once in ComfyUI's template browser, each with its thumbnail, both
written by scripts/make_workflows.py, and install metadata that the Comfy Registry / ComfyUI-Manager read
(pyproject.toml, requirements.txt)."""
import ast
import collections
import glob
import io
import json
import os
import re
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import HOST, ROOT
from comfy_host import PACK_LINK
from workflow_api import NOTE_TYPES, input_specs, ui_to_api, widget_values

PREFIX = "WanLean"
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
FRONTEND_ONLY = NOTE_TYPES | {"Reroute", "PrimitiveNode"}  # drawn by the frontend; never in /object_info
MODEL_EXTS = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin", ".gguf", ".index.json")
# what the ComfyUI tree itself ships in custom_nodes/ (besides our pack's link)
HOST_CUSTOM_NODES = {"example_node.py.example", "websocket_image_save.py", "__pycache__"}
PACK_SOURCES = ["__init__.py", "nodes", "wan_core"]


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _get(server, path):
    with urllib.request.urlopen(server.url + path, timeout=30) as resp:
        return resp.read()


def _pack_nodes(info):
    nodes = {k: v for k, v in info.items() if k.startswith(PREFIX)}
    assert nodes, f"no {PREFIX}* nodes in /object_info: the pack did not load"
    return nodes


def _node_problems(kind, spec):
    """What a user would miss on one node: description, display name, category, input tooltips, output names."""
    problems = []
    if not str(spec.get("description") or "").strip():
        problems.append(f"{kind}: no DESCRIPTION")
    if not spec.get("display_name") or spec["display_name"] == kind:
        problems.append(f"{kind}: no display name (NODE_DISPLAY_NAME_MAPPINGS)")
    if not str(spec.get("category") or "").startswith("Wan Lean"):
        problems.append(f"{kind}: category {spec.get('category')!r} is not under 'Wan Lean'")
    for group in ("required", "optional"):
        for name, inp in (spec.get("input", {}).get(group) or {}).items():
            opts = inp[1] if len(inp) > 1 and isinstance(inp[1], dict) else {}
            if not str(opts.get("tooltip") or "").strip():
                problems.append(f"{kind}: {group} input {name!r} has no tooltip")
    names = spec.get("output_name") or []
    if len(names) != len(spec.get("output") or []) or not all(str(n).strip() for n in names):
        problems.append(f"{kind}: outputs {spec.get('output')} not all named (RETURN_NAMES): {names}")
    return problems


def test_every_node_has_description_tooltips_and_named_outputs(server):
    nodes = sorted(_pack_nodes(server.object_info()).items())
    problems = [p for kind, spec in nodes for p in _node_problems(kind, spec)]
    assert not problems, "node UX gaps:\n" + "\n".join(problems)


def test_node_ux_check_catches_a_gap():
    """The check above must be able to fail: a node with a missing tooltip, description and output name."""
    spec = {"display_name": "X", "category": "Wan Lean", "input": {"required": {"a": ["INT", {}]},
            "optional": {"b": ["FLOAT", {"tooltip": "b"}]}}, "output": ["LATENT"], "output_name": [""]}
    problems = _node_problems("WanLeanX", spec)
    assert len(problems) == 3 and "'a'" in problems[1], problems


def test_server_has_only_this_pack_installed(server):
    extra = sorted(set(os.listdir(os.path.join(HOST, "custom_nodes"))) - HOST_CUSTOM_NODES - {PACK_LINK})
    assert not extra, f"other custom nodes in the host's custom_nodes/: {extra} (the checks below assume only ours)"
    assert not server.import_errors(), server.import_errors()


def test_workflows_exist():
    assert WORKFLOWS, "no workflows in workflows/"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_uses_only_pack_and_core_nodes(server, path):
    workflow, info = _load(path), server.object_info()
    kinds = {n.get("type") for n in workflow.get("nodes", [])}
    for sub in (workflow.get("definitions") or {}).get("subgraphs") or []:
        kinds |= {n.get("type") for n in sub.get("nodes", [])}
    unknown = sorted(k for k in kinds - FRONTEND_ONLY if k not in info)
    assert not unknown, f"{os.path.basename(path)}: node types not in /object_info of ComfyUI + this pack: {unknown}"
    assert any(k.startswith(PREFIX) for k in kinds), f"{os.path.basename(path)} uses none of the pack's nodes"
    api = ui_to_api(workflow, info)
    assert api and all(e["class_type"] in info for e in api.values())


def _model_files(workflow, info):
    """Model file names chosen in the workflow's file pickers (COMBO widgets whose value is a model file)."""
    files = set()
    for node in workflow.get("nodes", []):
        spec = info.get(node.get("type"))
        if spec is None:
            continue
        combos = {n for n, kind, _ in input_specs(spec) if kind == "COMBO"}
        for name, value in widget_values(node, spec).items():
            if name in combos and isinstance(value, str) and value.lower().endswith(MODEL_EXTS):
                files.add(value)
    return files


def _notes_text(workflow):
    return "\n".join(str(v) for n in workflow.get("nodes", []) if n.get("type") in NOTE_TYPES
                     for v in n.get("widgets_values") or [])


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_note_says_where_model_files_go(server, path):
    workflow = _load(path)
    text = _notes_text(workflow)
    assert text.strip(), f"{os.path.basename(path)}: no Note / MarkdownNote"
    files = _model_files(workflow, server.object_info())
    assert files, f"{os.path.basename(path)}: no model file picked in any loader"
    unplaced = sorted(f for f in files if not re.search(r"models/[\w.-]+/(?:\S*/)?" + re.escape(f), text))
    assert not unplaced, f"{os.path.basename(path)}: the note does not say models/<folder>/<file> for {unplaced}"


def _scanned_folder_names():
    """The folder names ComfyUI scans in a custom node for template workflows, read from the host's source."""
    with open(os.path.join(HOST, "app", "custom_node_manager.py"), encoding="utf-8") as f:
        found = re.search(r"example_workflow_folder_names\s*=\s*(\[[^\]]*\])", f.read())
    assert found, "ComfyUI's custom_node_manager.py no longer names its example-workflow folders"
    return ast.literal_eval(found.group(1))


def test_template_folder_is_workflows_only():
    """ComfyUI lists every scanned folder it finds: a second one (an example_workflows copy or symlink) would list
    each workflow twice, and a symlink checked out as a plain file (git on Windows) stops ComfyUI's start-up."""
    present = [n for n in _scanned_folder_names() if os.path.lexists(os.path.join(ROOT, n))]
    assert present == ["workflows"], f"template folders in the pack: {present}; keep only workflows/"
    assert os.path.isdir(os.path.join(ROOT, "workflows")) and not os.path.islink(os.path.join(ROOT, "workflows"))


def test_template_browser_lists_each_workflow_once(server):
    listed = json.loads(_get(server, "/workflow_templates")).get(PACK_LINK, [])
    twice = [n for n, c in collections.Counter(listed).items() if c > 1]
    assert not twice, f"/workflow_templates lists these more than once: {twice}"
    assert sorted(listed) == sorted(os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS)
    for path in WORKFLOWS:  # what the template browser fetches when the user picks one
        served = _get(server, f"/api/workflow_templates/{PACK_LINK}/{urllib.parse.quote(os.path.basename(path))}")
        assert json.loads(served) == _load(path), f"template {os.path.basename(path)} served differently"


def test_workflows_are_what_make_workflows_writes():
    """scripts/make_workflows.py is the single source of workflows/: every JSON and thumbnail in the folder is what it
    writes now (thumbnails compared decoded, so another JPEG or font build cannot fail it); nothing else is there."""
    import make_workflows
    stems = {os.path.splitext(n)[0] for n in make_workflows.WORKFLOWS}
    present = {f for f in os.listdir(os.path.join(ROOT, "workflows"))}
    assert present == {s + ext for s in stems for ext in (".json", ".jpg")}, "run `python scripts/make_workflows.py`"
    for name, graph in make_workflows.WORKFLOWS.items():
        path = os.path.join(ROOT, "workflows", name)
        assert _load(path) == json.loads(json.dumps(graph.workflow())), f"{name} differs: run scripts/make_workflows.py"
        fresh = Image.open(io.BytesIO(make_workflows.jpeg(make_workflows.thumbnail(graph)))).convert("RGB")
        committed = Image.open(path[:-5] + ".jpg").convert("RGB")
        # a changed word moves ~1000 pixels by more than 48 levels; re-encoding at quality 60 moves ~60
        moved = (np.abs(np.asarray(fresh, dtype=int) - np.asarray(committed, dtype=int)).max(-1) > 48).sum()
        assert moved < 300, f"{name[:-5]}.jpg is not what make_workflows.py draws now ({moved} pixels differ): rerun it"


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_has_a_small_thumbnail_served_where_the_frontend_asks(server, path):
    """The template browser (frontend 1.32.9) shows a custom node's template with the image at
    /api/workflow_templates/<pack folder>/<name>.jpg; ComfyUI serves the pack's workflows/ folder there."""
    thumb = path[:-len(".json")] + ".jpg"
    assert os.path.isfile(thumb), f"no thumbnail {os.path.basename(thumb)}: run scripts/make_workflows.py"
    with open(thumb, "rb") as f:
        data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()
    assert (image.format, image.size) == ("JPEG", (256, 256)), (image.format, image.size)
    assert len(data) < 32_000, f"{os.path.basename(thumb)}: {len(data)} bytes"
    url = f"{server.url}/api/workflow_templates/{PACK_LINK}/{urllib.parse.quote(os.path.basename(thumb))}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.headers["Content-Type"] == "image/jpeg" and resp.read() == data


def _req_names(path):
    """Normalised distribution names in a requirements file."""
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
            if m:
                names.add(_norm(m.group(1)))
    return names


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports():
    """Top-level modules the pack imports that are neither stdlib, the pack itself, nor the ComfyUI tree."""
    host_modules = {os.path.splitext(n)[0] for n in os.listdir(HOST)}  # comfy, folder_paths, nodes, ...
    found = set()
    for entry in PACK_SOURCES:
        base = os.path.join(ROOT, entry)
        files = [base] if entry.endswith(".py") else glob.glob(os.path.join(base, "**", "*.py"), recursive=True)
        for path in files:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return sorted(found - set(sys.stdlib_module_names) - {"wan_core"} - host_modules)


def test_requirements_list_only_what_comfyui_lacks():
    ours = _req_names(os.path.join(ROOT, "requirements.txt"))
    comfy = _req_names(os.path.join(HOST, "requirements.txt"))
    assert not ours & comfy, f"requirements.txt repeats what ComfyUI brings: {sorted(ours & comfy)}"
    import importlib.metadata
    dists = importlib.metadata.packages_distributions()
    missing = []
    for module in _third_party_imports():
        names = {_norm(d) for d in dists.get(module, [])}
        if not names & (ours | comfy):
            missing.append(f"{module} (distribution {sorted(names) or 'not installed'})")
    assert not missing, f"the pack imports what neither ComfyUI nor requirements.txt brings: {missing}"


def test_pyproject_complete_for_registry():
    """pyproject.toml as ComfyUI's own parser (comfy_config, shared with comfy-cli) reads it."""
    if HOST not in sys.path:
        sys.path.append(HOST)
    from comfy_config import config_parser
    cfg = config_parser.extract_node_configuration(ROOT)
    project, comfy = cfg.project, cfg.tool_comfy
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", project.name) and len(project.name) < 100
    assert "comfyui" not in project.name.lower(), "the registry asks for node ids without 'ComfyUI'"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project.version), project.version
    assert project.description.strip(), "[project] description missing"
    assert project.license.file and os.path.isfile(os.path.join(ROOT, project.license.file)), project.license
    assert project.supported_os and project.supported_comfyui_version, "classifiers / requires-comfyui missing"
    deps = {_norm(re.split(r"[^A-Za-z0-9._-]", d)[0]) for d in project.dependencies}
    assert deps == _req_names(os.path.join(ROOT, "requirements.txt")), "[project] dependencies != requirements.txt"
    assert comfy.publisher_id and comfy.display_name
    assert all(os.path.exists(os.path.join(ROOT, p)) for p in comfy.includes), comfy.includes
