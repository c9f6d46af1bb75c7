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
from comfy_host import REPO_ROOT, ComfyServer, HostError, host_python  # noqa: E402
from example_inputs import write_examples  # noqa: E402
from workflow_api import set_inputs, ui_to_api  # noqa: E402

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
    ap.add_argument("--smoke", action="store_true", help="rewrite the smoke checkpoints first")
    ap.add_argument("--full-size", action="store_true", help="with smoke weights, keep the workflow's own sizes")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)

    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    if args.models is None:  # idempotent: writes only what a previous run did not
        force = ["--force"] if args.smoke else []
        if subprocess.run([host_python(), "-m", "fixtures.smoke", SMOKE_MODELS, *force], cwd=REPO_ROOT).returncode:
            print("error: writing the smoke checkpoints failed", file=sys.stderr)
            return 1
    try:
        with ComfyServer(models_dir=args.models or SMOKE_MODELS, output_dir=args.out,
                         input_dir=write_examples(INPUT)) as srv:
            for err in srv.import_errors():
                print(f"warning: custom node import failed: {err}", file=sys.stderr)
            api = ui_to_api(workflow, srv.object_info()) if "nodes" in workflow else workflow
            if args.models is None and not args.full_size:
                api = shrink(api)
            api = set_inputs(api, dict(args.overrides))
            files = srv.output_files(srv.run(api, timeout=args.timeout))
    except (HostError, KeyError, ValueError, TimeoutError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    print("\n".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
