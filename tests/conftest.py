"""Shared test setup: the real ComfyUI host tree ($WANLEAN_HOST, see scripts/comfy_host.select_host) importable as
the parity reference and run as the server."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_MODELS = os.path.join(ROOT, ".smoke", "models")
SMOKE_INPUT = os.path.join(ROOT, ".smoke", "input")
for _p in (ROOT, os.path.join(ROOT, "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
from comfy_host import HOST_DIR as HOST, host_version  # noqa: E402


def pytest_report_header(config):
    return f"ComfyUI host: {host_version(HOST)} at {HOST}" if os.path.isfile(os.path.join(HOST, "main.py")) else None


def import_comfy(cpu=True):
    """Put the host tree on sys.path and force ComfyUI's CPU mode (unless cpu=False: its own device choice, e.g.
    CUDA) before its model management loads; the first call in a process decides."""
    if not os.path.isfile(os.path.join(HOST, "main.py")):
        pytest.fail("ComfyUI host tree missing: run `bash scripts/setup.sh` (the README test command does)")
    if HOST not in sys.path:
        sys.path.append(HOST)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (initialises with the CPU device)
    return sys.modules["comfy"]


def assert_progress(values, total):
    """The progress values a node of `total` steps sent through comfy.utils.ProgressBar, as the host sends them: every
    step, in order, on a host without throttling (0.3.75); newer hosts (0.33: PROGRESS_THROTTLE_MIN_INTERVAL in
    comfy/utils.py) drop updates closer than 100 ms or 0.5% when no preview goes with them, but always send the first
    and the last."""
    with open(os.path.join(HOST, "comfy", "utils.py"), encoding="utf-8") as f:
        throttled = "PROGRESS_THROTTLE_MIN_INTERVAL" in f.read()
    if not throttled:
        assert values == list(range(1, total + 1)), f"progress {values}, expected every step of {total}"
        return
    assert values[:1] == [1] and values[-1:] == [total], f"progress {values}: the first and last step must be sent"
    assert values == sorted(set(values)) and set(values) <= set(range(1, total + 1)), f"progress {values}"


def scale_close(ours, ref, rel=1e-4):
    """Max abs difference within `rel` of the reference output's scale (max abs value)."""
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert diff <= rel * max(scale, 1e-12), f"max abs diff {diff:.3e} vs scale {scale:.3e} (rel {diff / max(scale, 1e-12):.3e})"
    return diff / max(scale, 1e-12)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits (several times faster on a busy 2-core box). A module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_models():
    """The smoke models folder (tiny random checkpoints in the real layouts), written once."""
    from fixtures.smoke import write_all
    return write_all(SMOKE_MODELS)


@pytest.fixture(scope="session")
def server(smoke_models, tmp_path_factory):
    """One real ComfyUI server on 127.0.0.1 with the pack loaded and the smoke models visible."""
    from comfy_host import ComfyServer
    from example_inputs import write_examples
    out = tmp_path_factory.mktemp("comfy-output")
    with ComfyServer(models_dir=smoke_models, output_dir=str(out), input_dir=write_examples(SMOKE_INPUT)) as srv:
        yield srv


def run_workflow(server, name, overrides=None, sizes=None):
    """Load workflows/<name> (UI format), convert it with the project's converter, set `sizes` (width, height,
    length, steps on every node that has them) and `overrides` ({"Class.input": value}), run it."""
    import json
    from run_workflow import shrink
    from workflow_api import set_inputs, ui_to_api
    with open(os.path.join(ROOT, "workflows", name), encoding="utf-8") as f:
        api = ui_to_api(json.load(f), server.object_info())
    entry = server.run(set_inputs(shrink(api, sizes or {}), overrides or {}))
    return server.output_files(entry)
