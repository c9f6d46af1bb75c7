"""The pack checks its own inputs on every host (issue 22 item 4): a combo value outside its options, a number outside
its range and a file name that leads outside ComfyUI's input folder are refused by the node, naming node, input and
what it takes, before any file outside is opened. Through the real server (where ComfyUI 0.33 may refuse some at
/prompt already: either refusal counts) and by calling the nodes' execute in-process on the selected host."""
import math
import os
import shutil
import uuid

import pytest

from comfy_host import ExecutionError, PromptRejected
from conftest import ROOT, SMOKE_INPUT, import_comfy
from test_bad_input import S, SMALL, T2V, prompt
from test_lora import pack_module

SPEECH = "wan_example_speech.wav"
OUTSIDE = "outside ComfyUI's input folder"
LINK_OUT, LINK_IN = "wanlean_link_outside.wav", "wanlean_link_inside.wav"


@pytest.fixture(scope="module")
def outside_wav(tmp_path_factory):
    """A real, decodable wav outside the input folder: were it ever opened, Wan Load Audio would return its sound."""
    path = str(tmp_path_factory.mktemp("outside") / "speech.wav")
    shutil.copyfile(os.path.join(SMOKE_INPUT, SPEECH), path)
    return path


@pytest.fixture(scope="module")
def links(outside_wav):
    """Two links in the input folder: one to the wav outside it, one to a wav inside it; removed afterwards."""
    made = {LINK_OUT: outside_wav, LINK_IN: os.path.join(SMOKE_INPUT, SPEECH)}
    for name, target in made.items():
        path = os.path.join(SMOKE_INPUT, name)
        if os.path.lexists(path):
            os.remove(path)
        os.symlink(target, path)
    yield made
    for name in made:
        os.remove(os.path.join(SMOKE_INPUT, name))


def escapes(outside_wav):
    """Names that lead outside the input folder: .. to /etc/passwd, absolute paths, .. to a real wav, a link."""
    return ["../../../../../../../../etc/passwd", "/etc/hostname", os.path.relpath(outside_wav, SMOKE_INPUT),
            outside_wav, LINK_OUT]


def load_audio_prompt(name):
    return {"1": {"class_type": "WanLeanLoadAudio", "inputs": {"audio_file": name}},
            "2": {"class_type": "PreviewAudio", "inputs": {"audio": ["1", 0]}}}


def refused(server, api):
    """(message, 'server' or 'node'): who refused the prompt; fails when it ran."""
    with pytest.raises(ExecutionError) as err:
        server.run(api, timeout=300)
    return str(err.value), "server" if isinstance(err.value, PromptRejected) else "node"


# ---- through the real server

def test_audio_names_outside_the_input_folder_are_refused(server, links, outside_wav):
    for name in escapes(outside_wav):
        message, _ = refused(server, load_audio_prompt(name))
        assert f"Wan Load Audio, input 'audio_file': {name!r} " in message, message
        assert OUTSIDE in message, message  # refused for where it is, not read and found no audio
        assert ("is a link to a file" in message) == (name == LINK_OUT), message
    assert "WanLeanLoadAudio" in server.object_info()  # the server is still up


def test_audio_names_inside_the_input_folder_load(server, links):
    """Negative control: the same wav inside the folder, annotated, through a link that stays inside, and copies added
    after start-up (one in a subfolder, as uploads with a subfolder are named) all load."""
    sub = f"wanlean_added_{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.join(SMOKE_INPUT, sub))
    added = [f"{sub}.wav", f"{sub}/speech.wav"]
    for name in added:
        shutil.copyfile(os.path.join(SMOKE_INPUT, SPEECH), os.path.join(SMOKE_INPUT, name))
    try:
        for name in (SPEECH, f"{SPEECH} [input]", LINK_IN, *added):
            entry = server.run(load_audio_prompt(name), timeout=300)
            assert entry["outputs"]["2"]["audio"], (name, entry["outputs"])
    finally:
        os.remove(os.path.join(SMOKE_INPUT, added[0]))
        shutil.rmtree(os.path.join(SMOKE_INPUT, sub))


def test_unknown_sampler_is_refused(server, smoke_models):
    message, by = refused(server, prompt(server, T2V, {f"{S}.sampler": "no_such_sampler"}, None))
    if by == "node":
        assert "Wan Sampler, input 'sampler': 'no_such_sampler' is not one of its options; its options: unipc" \
            in message, message
    assert "sampler" in message and "no_such_sampler" in message, message


def linked_steps(value):
    """A graph edit: the sampler's steps from ComfyUI's Int primitive (a link: no widget range check at /prompt)."""
    def edit(api):
        api["910"] = {"class_type": "PrimitiveInt", "inputs": {"value": value}}
        api[next(k for k, v in api.items() if v["class_type"] == S)]["inputs"]["steps"] = ["910", 0]
    return edit


@pytest.mark.parametrize("how", ["widget", "link"])
def test_steps_out_of_range_are_refused(server, smoke_models, how):
    edit, overrides = (None, {f"{S}.steps": 500}) if how == "widget" else (linked_steps(500), {})
    message, by = refused(server, prompt(server, T2V, overrides, edit))
    if by == "node":
        assert "Wan Sampler, input 'steps': 500 is out of range: it must be between 1 and 200" in message, message
    assert "steps" in message and "500" in message, message


def test_steps_in_range_over_a_link_run(server, smoke_models):
    """Negative control: the same link with 1 step renders."""
    entry = server.run(prompt(server, T2V, {}, linked_steps(1)), timeout=600)
    assert any(f.endswith(".mp4") for f in server.output_files(entry))


# ---- the nodes' own checks, in-process on the selected host

def node_classes():
    """Every node class of the pack: the NODES of each module in nodes/."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "nodes")) if f.endswith(".py") and f != "__init__.py")
    return [node for name in names for node in getattr(pack_module(name), "NODES", [])]


@pytest.fixture
def input_folder():
    """ComfyUI's input folder (in this process) set to the smoke input folder, as the server has it."""
    import_comfy()
    import folder_paths
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(SMOKE_INPUT)
    yield SMOKE_INPUT
    folder_paths.set_input_directory(old)


def bad_values(spec, io):
    """Values input `spec` must refuse (combo: an unknown option, upload combo: a file outside its folder, number:
    one past a bound, NaN for floats) with the words the refusal must contain."""
    if isinstance(spec, io.Combo.Input):
        if spec.upload is not None:
            return [("/etc/hostname", OUTSIDE)]
        return [("wanlean-no-such-option", "is not one of its options")]
    if isinstance(spec, (io.Int.Input, io.Float.Input)):
        past = [(spec.max + 1 if spec.max is not None else spec.min - 1, "is out of range")]
        return past + ([(math.nan, "is out of range")] if isinstance(spec, io.Float.Input) else [])
    return []


def good_values(spec, io):
    """Values input `spec` takes: its default, a static option, its bounds."""
    if isinstance(spec, io.Combo.Input):
        return [] if spec.upload is not None or spec.default is None else [spec.default]
    if isinstance(spec, (io.Int.Input, io.Float.Input)):
        return [v for v in (spec.default, spec.min, spec.max) if v is not None]
    return []


def test_every_node_checks_every_input_itself(input_folder):
    """Each node's execute, given one bad value (every other input left out), refuses it naming node and input before
    it runs; given a good value of the same input, the check passes (what fails then is the missing rest)."""
    from comfy_api.latest import io
    nodes, checked, failures = node_classes(), 0, []
    for node in nodes:
        schema = node.define_schema()
        for spec in schema.inputs:
            refusal = f"{schema.display_name}, input '{spec.id}': "
            for value, words in bad_values(spec, io):
                checked += 1
                try:
                    node.execute(**{spec.id: value})
                    failures.append(f"{schema.node_id}.{spec.id}={value!r}: accepted")
                except Exception as e:  # noqa: BLE001  (anything but the refusal is a failure)
                    if not (type(e) is ValueError and str(e).startswith(refusal) and words in str(e)):
                        failures.append(f"{schema.node_id}.{spec.id}={value!r}: {type(e).__name__}: {e}")
            for value in good_values(spec, io):
                try:
                    node.execute(**{spec.id: value})
                except Exception as e:  # noqa: BLE001  (the other inputs are missing: it fails past the check)
                    if str(e).startswith(refusal):
                        failures.append(f"{schema.node_id}.{spec.id}={value!r} refused: {e}")
    assert len(nodes) >= 17 and checked > 60, (len(nodes), checked)
    assert not failures, "\n".join(failures)


def test_load_audio_node_refuses_outside_names(input_folder, links, outside_wav):
    node = pack_module("s2v").WanLeanLoadAudio
    for name in escapes(outside_wav):
        with pytest.raises(ValueError, match=f"^Wan Load Audio, input 'audio_file': .* {OUTSIDE}"):
            node.execute(audio_file=name)
        assert OUTSIDE in node.validate_inputs(audio_file=name)
        assert node.fingerprint_inputs(audio_file=name) == name  # not hashed: not read
    for name in (SPEECH, f"{SPEECH} [input]", LINK_IN):  # negative control
        audio = node.execute(audio_file=name)[0]
        assert audio["waveform"].abs().max() > 0.01 and audio["sample_rate"] > 0
        assert node.validate_inputs(audio_file=name) is True
        assert len(node.fingerprint_inputs(audio_file=name)) == 64  # sha256 of the file
    assert node.validate_inputs() is True  # a name over a link is checked when the node runs


def test_sampler_node_refuses_bad_sampler_and_steps():
    node = pack_module("sampler").WanLeanSampler
    args = dict(model=None, positive=None, negative=None, seed=0, steps=50, cfg=5.0, shift=5.0, sampler="unipc",
                width=832, height=480, length=81)
    with pytest.raises(ValueError, match=r"^Wan Sampler, input 'sampler': 'no_such_sampler' is not one of its "
                                                r"options; its options: unipc, "):
        node.execute(**{**args, "sampler": "no_such_sampler"})
    with pytest.raises(ValueError, match=r"^Wan Sampler, input 'steps': 500 is out of range: it must be between "
                                                r"1 and 200"):
        node.execute(**{**args, "steps": 500})
    with pytest.raises(ValueError, match=r"^Wan Sampler, input 'steps': 2.5 is not a whole number"):
        node.execute(**{**args, "steps": 2.5})
    with pytest.raises(AttributeError):  # negative control: good values pass the check (then the None model fails)
        node.execute(**args)
