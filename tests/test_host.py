"""The host machinery: UI->API conversion, media probing, and a real headless ComfyUI server run (core nodes only)."""
import math
import os
import sys
import time

import av
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import import_comfy  # noqa: E402

# pytest imports the repo-root __init__.py (the pack, which imports comfy) as a package: make comfy importable
import_comfy()

from comfy_host import (ComfyServer, ExecutionError, Interrupted, PromptRejected, ServerError,  # noqa: E402
                        history_error, parse_import_errors, parse_tracebacks)
from media import probe  # noqa: E402
from workflow_api import set_inputs, ui_to_api  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# ui_to_api / set_inputs on a handmade graph and object_info
def _node(node_id, kind, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    node = {"id": node_id, "type": kind, "mode": mode, "widgets_values": widgets if widgets is not None else [],
            "inputs": [dict(name=n, type=t, link=l) for n, t, l in inputs], "outputs": [{"type": t} for t in outputs]}
    if title:
        node["title"] = title
    return node


OBJECT_INFO = {
    "Source": {"input": {"required": {"mode": [["a", "b"], {}], "width": ["INT", {}], "seed": ["INT", {}]},
                         "optional": {"label": ["STRING", {}]}},
               "input_order": {"required": ["width", "seed", "mode"], "optional": ["label"]}},
    "Text": {"input": {"required": {"value": ["STRING", {}]}}},
    "Filter": {"input": {"required": {"mask": ["MASK", {}], "image": ["IMAGE", {}]}}},
    "Sink": {"input": {"required": {"image": ["IMAGE", {}], "steps": ["INT", {"control_after_generate": True}],
                                    "sampler": ["COMBO", {"options": ["x", "y"], "control_after_generate": True}],
                                    "seed": ["INT", {"control_after_generate": False}],
                                    "text": ["STRING", {"forceInput": True}]},
                       "optional": {"points": ["STRING", {}]}},
             "display_name": "Sink Node"},
    "Sink2": {"input": {"required": {}, "optional": {"image": ["IMAGE", {}]}}},
}


def _workflow():
    nodes = [
        _node(1, "Source", [64, 7, "randomize", "b", "hello"], [("width", "INT", 10)], ["IMAGE"]),
        _node(5, "PrimitiveNode", [96, "fixed"], outputs=["INT"]),
        _node(2, "Reroute", inputs=[("", "*", 11)], outputs=["*"]),
        _node(6, "Filter", inputs=[("mask", "MASK", None), ("image", "IMAGE", 12)], outputs=["IMAGE"], mode=4),
        _node(4, "Text", ["hi"], outputs=["STRING"]),
        _node(3, "Sink", [20, "fixed", "y", "increment", "", 3, [1, 2]],
              [("image", "IMAGE", 13), ("text", "STRING", 14)], title="My Sink"),
        _node(7, "Filter", inputs=[("mask", "MASK", None), ("image", "IMAGE", 15)], outputs=["IMAGE"], mode=2),
        _node(8, "Sink2", inputs=[("image", "IMAGE", 16)]),
        _node(9, "Note", ["just a note"]),
        _node(10, "MarkdownNote", ["# note"]),
    ]
    links = [[10, 5, 0, 1, 0, "INT"], [11, 1, 0, 2, 0, "IMAGE"], [12, 2, 0, 6, 1, "IMAGE"], [13, 6, 0, 3, 0, "IMAGE"],
             [14, 4, 0, 3, 1, "STRING"], [15, 1, 0, 7, 1, "IMAGE"], [16, 7, 0, 8, 0, "IMAGE"]]
    return {"nodes": nodes, "links": links}


def test_ui_to_api_widgets_links_and_virtual_nodes():
    api = ui_to_api(_workflow(), OBJECT_INFO)
    assert sorted(api) == ["1", "3", "4", "8"]  # notes, reroute, primitive, muted and bypassed nodes are gone
    # input_order (not dict order) decides widget order; seed's hidden control value is skipped; primitive inlined
    assert api["1"]["inputs"] == {"width": 96, "seed": 7, "mode": "b", "label": "hello"}
    sink = api["3"]["inputs"]
    # INT/COMBO controls skipped (1 and 2 extra values), explicit control_after_generate False honoured,
    # forceInput is no widget, list values wrapped, reroute + bypass (exact type match, not slot 0) resolved
    assert sink == {"image": ["1", 0], "steps": 20, "sampler": "y", "seed": 3, "points": {"__value__": [1, 2]},
                    "text": ["4", 0]}
    assert api["8"]["inputs"] == {}  # fed by a muted node: input dropped
    assert api["3"]["_meta"]["title"] == "My Sink" and api["4"]["_meta"]["title"] == "Text"


def test_ui_to_api_dict_links_dict_widgets_and_unknown_types():
    wf = {"nodes": [_node(1, "Source", {"seed": 5, "width": 8, "mode": "a", "control_after_generate": "fixed"}),
                    _node(2, "Sink2", inputs=[("image", "IMAGE", 3)])],
          "links": [{"id": 3, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"}]}
    api = ui_to_api(wf, OBJECT_INFO)
    assert api["1"]["inputs"] == {"width": 8, "seed": 5, "mode": "a"}
    assert api["2"]["inputs"] == {"image": ["1", 0]}
    wf["nodes"].append(_node(3, "NotInstalled"))
    with pytest.raises(ValueError, match="NotInstalled"):
        ui_to_api(wf, OBJECT_INFO)


def test_set_inputs_by_class_title_and_id():
    api = ui_to_api(_workflow(), OBJECT_INFO)
    out = set_inputs(api, {"Source.width": 128, "My Sink.steps": 4, "4.value": "bye"})
    assert (out["1"]["inputs"]["width"], out["3"]["inputs"]["steps"], out["4"]["inputs"]["value"]) == (128, 4, "bye")
    assert api["1"]["inputs"]["width"] == 96  # the original is untouched
    with pytest.raises(KeyError, match="Nope"):
        set_inputs(api, {"Nope.width": 1})
    with pytest.raises(KeyError, match="no input"):
        set_inputs(api, {"Source.widht": 1})


# ---------------------------------------------------------------------------------------------------------------
# log and history parsing
def test_parse_import_errors():
    log = ("Traceback (most recent call last):\nModuleNotFoundError: No module named 'kornia'\n"
           "Cannot import /h/comfy_extras/nodes_canny.py module for custom nodes: No module named 'kornia'\n"
           "Cannot import /h/custom_nodes/Pack module for custom nodes: No module named 'wan_core.nope'\n"
           "Import times for custom nodes:\n   0.0 seconds: /h/custom_nodes/ok.py\n"
           "   0.1 seconds (IMPORT FAILED): /h/custom_nodes/Pack\n")
    assert parse_import_errors(log, host_dir="/h") == ["/h/custom_nodes/Pack: No module named 'wan_core.nope'"]
    assert parse_import_errors("   0.0 seconds: /h/custom_nodes/ok.py\n", host_dir="/h") == []


def test_parse_tracebacks_ignores_builtin_optional_imports():
    builtin = ('Traceback (most recent call last):\n  File "/h/nodes.py", line 2146, in load_custom_node\n'
               '    exec_module(module)\n  File "/h/comfy_extras/nodes_canny.py", line 1, in <module>\n'
               "ModuleNotFoundError: No module named 'kornia'\n")
    ours = ('Traceback (most recent call last):\n  File "/h/execution.py", line 1, in execute\n    f()\n'
            "ValueError: bad shape\n")
    assert parse_tracebacks(builtin + "\nStarting server\n" + ours, host_dir="/h") == [ours.rstrip("\n")]
    assert parse_tracebacks(builtin, host_dir="/h") == []


def test_history_error_kinds():
    assert history_error({"status": {"status_str": "success", "messages": []}}) is None
    err = history_error({"status": {"status_str": "error", "messages": [
        ["execution_start", {}], ["execution_error", {"node_id": "7", "node_type": "X", "exception_type": "ValueError",
                                                     "exception_message": "bad shape", "traceback": ["tb"]}]]}})
    assert isinstance(err, ExecutionError) and "bad shape" in str(err) and err.node_id == "7"
    err = history_error({"status": {"status_str": "error", "messages": [["execution_interrupted", {"node_id": "2"}]]}})
    assert isinstance(err, Interrupted) and not isinstance(err, ExecutionError)


# ---------------------------------------------------------------------------------------------------------------
# probe
def _write_mp4(path, frames=9, size=(64, 48), fps=16, audio_seconds=None, rate=24000):
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = out.add_stream("aac", rate=rate, layout="mono") if audio_seconds else None
        for i in range(frames):
            img = np.full((size[1], size[0], 3), i * 20, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(video.encode())
        if audio is not None:
            n = int(audio_seconds * rate)
            wave = (0.3 * np.sin(2 * math.pi * 440 * np.arange(n) / rate)).astype(np.float32)[None]
            for start in range(0, n, 1024):
                frame = av.AudioFrame.from_ndarray(wave[:, start:start + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = rate, start
                out.mux(audio.encode(frame))
            out.mux(audio.encode())


def test_probe_video_without_and_with_audio(tmp_path):
    _write_mp4(tmp_path / "v.mp4")
    info = probe(tmp_path / "v.mp4")
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (9, 64, 48, 16.0)
    assert info["codec"] == "h264" and info["audio_duration"] is None
    assert info["duration"] == pytest.approx(9 / 16)
    _write_mp4(tmp_path / "va.mp4", audio_seconds=0.5)
    info = probe(tmp_path / "va.mp4")
    assert info["frames"] == 9 and info["audio_rate"] == 24000
    assert info["audio_duration"] == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------------------------------------------------------
# a real server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    for sub, name in (("diffusion_models", "tiny_dit.safetensors"), ("vae", "tiny_vae.safetensors")):
        os.makedirs(models / sub)
        (models / sub / name).write_bytes(b"")
    srv = ComfyServer(models_dir=str(models), output_dir=str(tmp_path_factory.mktemp("out")))
    with srv:
        pid = srv.proc.pid
        yield srv
    with pytest.raises(ProcessLookupError):  # stop() leaves no process behind
        os.killpg(pid, 0)


def test_object_info_core_nodes_and_model_folders(server):
    info = server.object_info()
    assert {"EmptyImage", "ImageInvert", "SaveImage", "KSampler"} <= set(info)
    assert "tiny_dit.safetensors" in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert "tiny_vae.safetensors" in info["VAELoader"]["input"]["required"]["vae_name"][0]
    assert isinstance(server.import_errors(), list)
    assert not [tb for tb in server.tracebacks() if "comfy_extras" in tb]  # optional-dependency noise left out


def _ui_image_workflow(prefix):
    """EmptyImage (width from a PrimitiveNode) -> Reroute -> ImageInvert -> bypassed ImageInvert -> SaveImage,
    plus a Note and a muted SaveImage."""
    nodes = [
        _node(1, "EmptyImage", [512, 24, 1, 0], [("width", "INT", 20)], ["IMAGE"]),
        _node(2, "PrimitiveNode", [40, "fixed"], outputs=["INT"]),
        _node(3, "Reroute", inputs=[("", "*", 21)], outputs=["IMAGE"]),
        _node(4, "ImageInvert", inputs=[("image", "IMAGE", 22)], outputs=["IMAGE"]),
        _node(5, "ImageInvert", inputs=[("image", "IMAGE", 23)], outputs=["IMAGE"], mode=4),
        _node(6, "SaveImage", [prefix], [("images", "IMAGE", 24)]),
        _node(7, "SaveImage", [prefix + "_muted"], [("images", "IMAGE", 25)], mode=2),
        _node(8, "Note", ["not executed"]),
    ]
    links = [[20, 2, 0, 1, 0, "INT"], [21, 1, 0, 3, 0, "IMAGE"], [22, 3, 0, 4, 0, "IMAGE"], [23, 4, 0, 5, 0, "IMAGE"],
             [24, 5, 0, 6, 0, "IMAGE"], [25, 1, 0, 7, 0, "IMAGE"]]
    return {"nodes": nodes, "links": links}


def test_ui_workflow_runs_and_writes_png(server):
    api = ui_to_api(_ui_image_workflow("host/img"), server.object_info())
    assert sorted(api) == ["1", "4", "6"]
    entry = server.run(set_inputs(api, {"EmptyImage.height": 30}), timeout=60)
    files = server.output_files(entry)
    assert len(files) == 1 and files[0].endswith(".png") and files[0].startswith(server.output_dir)
    with Image.open(files[0]) as img:
        assert img.size == (40, 30)
        assert img.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # black inverted once (bypass passed through)
    assert "got prompt" in server.log_text()
    server.free()


def test_failures_raise_with_the_server_message(server):
    api = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../../escape"}}}
    with pytest.raises(ExecutionError, match="outside the output folder") as exc:
        server.run(api, timeout=60)
    assert exc.value.node_type == "SaveImage" and exc.value.node_id == "2"
    api["1"]["inputs"]["width"] = -5
    with pytest.raises(PromptRejected, match="smaller than min"):
        server.queue(api)


def test_interrupt_is_reported_distinctly(server):
    api = {"1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 0}}}
    for i in range(2, 10):  # ~1 s per blur here; the interrupt takes effect at the next node
        api[str(i)] = {"class_type": "ImageBlur", "inputs": {"image": [str(i - 1), 0], "blur_radius": 31, "sigma": 9.0}}
    api["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "host/blur"}}
    prompt_id = server.queue(api)
    deadline = time.monotonic() + 30
    while prompt_id not in server.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    server.interrupt()
    with pytest.raises(Interrupted):
        server.wait(prompt_id, timeout=60)


def test_server_that_dies_fails_early_with_its_log(tmp_path):
    t0 = time.monotonic()
    srv = ComfyServer(output_dir=str(tmp_path), extra_args=["--no-such-flag"], pack_dir=None)
    with pytest.raises(ServerError, match="no-such-flag"):
        srv.start()
    assert srv.proc is None and time.monotonic() - t0 < 60
