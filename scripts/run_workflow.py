"""Run a workflow JSON (UI or API format) through a real headless ComfyUI server with the pack loaded.

    python scripts/run_workflow.py workflows/X.json [--models DIR] [--set Class.input=value ...] [--out DIR] [--smoke]

Without --models the tiny smoke checkpoints in .smoke/models are used (written first by `python -m fixtures.smoke`
when missing or when --smoke is given), at a reduced size (SMOKE_SIZE) unless --full-size. Prints the written files; exits 1 with the server's error on failure.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_host import REPO_ROOT, ComfyServer, HostError, host_python, host_version  # noqa: E402
from example_inputs import WRITERS, write_examples  # noqa: E402
from workflow_api import combo_options, set_inputs, ui_to_api  # noqa: E402

SMOKE_MODELS = os.path.join(REPO_ROOT, ".smoke", "models")
INPUT = os.path.join(REPO_ROOT, ".smoke", "input")  # the example images LoadImage nodes name
# On the tiny random smoke weights a full 832x480x81, 50-step render only burns CPU time: shrink it
# (every node input of these names), unless --full-size. Explicit --set values still win.
SMOKE_SIZE = {"width": 320, "height": 192, "length": 17, "steps": 8}


def shrink(api, sizes=SMOKE_SIZE):
    """Set every widget named in `sizes` (width, height, length, steps) on every node that has it."""
    for node in api.values():
        inputs = node["inputs"]
        inputs.update({k: v for k, v in sizes.items() if k in inputs and not isinstance(inputs[k], list)})
    return api


# The ComfyUI models subfolder each file input of the pack's loaders reads.
MODEL_FOLDERS = {"model_name": "diffusion_models", "vae_name": "vae", "text_encoder_name": "text_encoders",
                 "clip_name": "clip_vision", "lora_name": "loras", "audio_encoder_name": "audio_encoders"}


def example_names(workflow, overrides):
    """The bundled example inputs (scripts/example_inputs.py) a workflow names, in any widget or override value."""
    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, (list, tuple, dict)):
            for v in x.values() if isinstance(x, dict) else x:
                yield from strings(v)
    return {v for v in strings([workflow, overrides]) if v in WRITERS}


def missing_models(api, object_info, models_dir):
    """'<file> -> <models_dir>/<folder>/' for each model file the prompt names that the server does not offer."""
    lines = []
    for node in api.values():
        info = object_info.get(node["class_type"], {}).get("input", {})
        for name, folder in MODEL_FOLDERS.items():
            spec = (info.get("required") or {}).get(name) or (info.get("optional") or {}).get(name)
            value = node["inputs"].get(name)
            is_combo = spec and (isinstance(spec[0], list) or spec[0] == "COMBO")
            if is_combo and isinstance(value, str) and value not in combo_options(spec):
                lines.append(f"{value} -> {os.path.join(models_dir, folder)}{os.sep}")
    return lines


def host_args(comfyui):
    """ComfyServer arguments for a user's own ComfyUI folder (None: the selected host of scripts/setup.sh). A pack
    already installed in its custom_nodes is used as it is; else the pack is linked in (custom_nodes/ComfyUI-WanLean)."""
    if comfyui is None:
        return {}
    host = os.path.abspath(os.path.expanduser(comfyui))
    if not os.path.isfile(os.path.join(host, "main.py")):
        raise HostError(f"--comfyui {comfyui}: no ComfyUI there (main.py missing)")
    nodes = os.path.join(host, "custom_nodes")
    installed = any(os.path.realpath(os.path.join(nodes, d)) == os.path.realpath(REPO_ROOT)
                    for d in (os.listdir(nodes) if os.path.isdir(nodes) else []))
    return {"host_dir": host, "python": sys.executable, "pack_dir": None if installed else REPO_ROOT}


def parse_override(text):
    """'Class.input=value' -> (key, value); the value is JSON when it parses, else the raw string."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"expected Class.input=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workflow")
    ap.add_argument("--models", help="ComfyUI-style models folder (default: .smoke/models)")
    ap.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                    metavar="Class.input=value")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "output"), help="output directory")
    ap.add_argument("--input", default=INPUT, help="ComfyUI input folder; the workflow's example inputs are written "
                    "there when missing (default: .smoke/input)")
    ap.add_argument("--smoke", action="store_true", help="rewrite the smoke checkpoints first")
    ap.add_argument("--full-size", action="store_true", help="with smoke weights, keep the workflow's own sizes")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--comfyui", help="your own ComfyUI folder to run on (its server runs with this Python); "
                    "default: the newest host scripts/setup.sh installed")
    args = ap.parse_args(argv)

    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    if args.models is None:  # idempotent: writes only what a previous run did not
        force = ["--force"] if args.smoke else []
        smoke_python = sys.executable if args.comfyui else host_python()
        if subprocess.run([smoke_python, "-m", "fixtures.smoke", SMOKE_MODELS, *force], cwd=REPO_ROOT).returncode:
            print("error: writing the smoke checkpoints failed", file=sys.stderr)
            return 1
    models = os.path.abspath(args.models or SMOKE_MODELS)
    try:
        inputs = write_examples(args.input, example_names(workflow, args.overrides))
        with ComfyServer(models_dir=models, output_dir=args.out, input_dir=inputs, **host_args(args.comfyui)) as srv:
            print(f"ComfyUI {host_version(srv.host_dir)} at {srv.host_dir}", file=sys.stderr)
            for err in srv.import_errors():
                print(f"warning: custom node import failed: {err}", file=sys.stderr)
            info = srv.object_info()
            api = ui_to_api(workflow, info) if "nodes" in workflow else workflow
            if args.models is None and not args.full_size:
                api = shrink(api)
            api = set_inputs(api, dict(args.overrides))
            missing = missing_models(api, info, models)
            if missing:
                print("error: model files missing; put each file in the folder named:\n  " + "\n  ".join(missing),
                      file=sys.stderr)
                return 1
            files = srv.output_files(srv.run(api, timeout=args.timeout))
    except (HostError, KeyError, ValueError, OSError, RuntimeError) as e:  # TimeoutError is an OSError
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    print("\n".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
