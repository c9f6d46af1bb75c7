"""Latent previews while sampling, the way ComfyUI shows them: each step's x0 goes through ComfyUI's own previewer
(latent_preview.get_previewer with the Wan21 / Wan22 latent format, picked from the model's latent channels) and rides
on the progress update. ComfyUI 0.3.75 takes the preview method only from its command line (--preview-method, default
none; the prompt's extra data carries none), so one server here runs with `--preview-method auto` and listens on /ws
for the binary PREVIEW_IMAGE messages, for a Wan 2.1 (16-ch) and a Wan 2.2 (48-ch) workflow, the A14B pair and S2V;
the shared test server (no flag) must send none. In-process: the preview is exactly the latent-to-RGB projection of
the middle latent frame, the method is respected, and its cost per step is measured."""
import io
import json
import statistics
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_host import ComfyServer
from conftest import SMOKE_INPUT, assert_progress, import_comfy, run_workflow
from example_inputs import write_examples
from test_lora import pack_module

import_comfy()
import comfy.latent_formats  # noqa: E402
import comfy.utils  # noqa: E402
import latent_preview  # noqa: E402
from comfy.cli_args import LatentPreviewMethod, args  # noqa: E402
from protocol import BinaryEventTypes  # noqa: E402

SAMPLERS = ("WanLeanSampler", "WanLeanSamplerA14B", "WanLeanSpeechToVideo", "WanLeanLongVideo")
# workflow -> sizes (width / height multiples of 32 for TI2V-5B; the aspect ratios differ so a swap shows)
CASES = {
    "wan21_t2v_1.3B.json": {"width": 160, "height": 96, "length": 9, "steps": 3},   # Wan 2.1 VAE latents, 16 ch
    "wan22_ti2v_5b_i2v.json": {"width": 224, "height": 96, "length": 9, "steps": 3},  # Wan 2.2 VAE latents, 48 ch
    "wan22_t2v_a14b.json": {"width": 96, "height": 160, "length": 9, "steps": 4},    # two experts, one bar
    "wan22_s2v.json": {"width": 64, "height": 64, "steps": 2},                       # one S2V clip
    "wan22_i2v_a14b_long.json": {"width": 64, "height": 96, "length": 29, "clip_length": 13, "steps": 2},  # 3 clips
}
CLIPS = {"wan22_i2v_a14b_long.json": 3}  # one bar and one preview per step over all clips
# a client that announces supports_preview_metadata (the frontend does) gets previews tagged with their node
FEATURES = {"wan22_t2v_a14b.json": {"supports_preview_metadata": True}}


@pytest.fixture(scope="module")
def preview_server(smoke_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("preview-output")
    with ComfyServer(models_dir=smoke_models, output_dir=str(out), input_dir=write_examples(SMOKE_INPUT),
                     extra_args=["--preview-method", "auto"]) as srv:
        yield srv


class Listening:
    """A server whose run() listens on /ws, for conftest.run_workflow: keeps the last prompt and its messages."""

    def __init__(self, server, features=None):
        self.server, self.features, self.api, self.messages = server, features, None, []

    def object_info(self):
        return self.server.object_info()

    def output_files(self, entry):
        return self.server.output_files(entry)

    def run(self, api):
        self.api = api
        entry, self.messages = self.server.run_listening(api, timeout=300, features=self.features)
        return entry

    def sampler_id(self):
        ids = [k for k, node in self.api.items() if node["class_type"] in SAMPLERS]
        assert len(ids) == 1, ids
        return ids[0]


def listen(server, name, overrides=None, features=None):
    heard = Listening(server, features)
    run_workflow(heard, name, overrides, CASES[name])
    return heard


def previews(messages):
    """(event type, metadata or None, decoded image) of each binary preview message, in order."""
    out = []
    for msg in messages:
        if not isinstance(msg, bytes):
            continue
        event, word = struct.unpack(">II", msg[:8])
        if event == BinaryEventTypes.PREVIEW_IMAGE:  # then the image type (1 JPEG, 2 PNG), then the image
            meta, data = None, msg[8:]
        elif event == BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA:  # then the metadata's length, its JSON, the image
            meta, data = json.loads(msg[8:8 + word]), msg[8 + word:]
        else:
            continue
        image = Image.open(io.BytesIO(data))
        image.load()  # raises on a truncated or undecodable image
        out.append((event, meta, image))
    return out


def sampler_progress(heard):
    """Indices and values of the sampler node's progress events."""
    node = heard.sampler_id()
    return [(i, m["data"]["value"]) for i, m in enumerate(heard.messages)
            if isinstance(m, dict) and m["type"] == "progress" and m["data"]["node"] == node]


def check_size(image, sizes):
    """The preview keeps the video's aspect ratio, scaled to ComfyUI's preview size (--preview-size, 512)."""
    w, h = sizes["width"], sizes["height"]
    assert max(image.size) == args.preview_size, image.size
    assert abs(image.height * w - image.width * h) <= max(w, h), (image.size, (w, h))


@pytest.mark.parametrize("name", CASES)
def test_one_preview_per_step(preview_server, name):
    heard = listen(preview_server, name, features=FEATURES.get(name))
    steps = CASES[name]["steps"] * CLIPS.get(name, 1)
    progress = sampler_progress(heard)
    assert [v for _, v in progress] == list(range(1, steps + 1)), progress
    tagged = name in FEATURES
    for i, _ in progress:  # each step's progress update carries its preview: sent next to it (tagged ones first)
        assert isinstance(heard.messages[i - 1 if tagged else i + 1], bytes), heard.messages[i - 2:i + 2]
    shown = previews(heard.messages)
    assert len(shown) == steps, f"{len(shown)} previews for {steps} steps"
    for event, meta, image in shown:
        assert event == (BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA if tagged else BinaryEventTypes.PREVIEW_IMAGE)
        assert image.format == "JPEG"
        if tagged:
            assert meta["node_id"] == heard.sampler_id() and meta["image_type"] == "image/jpeg", meta
        check_size(image, CASES[name])
    assert len({image.tobytes() for *_, image in shown}) == steps, "the previews do not change between steps"


def test_no_previews_when_off(server):
    """ComfyUI's default (no --preview-method): the progress bar moves, no preview is sent."""
    assert "--preview-method" not in server.extra_args
    heard = listen(server, "wan21_t2v_1.3B.json", {"WanLeanSampler.seed": 12})
    assert_progress([v for _, v in sampler_progress(heard)], 3)
    assert not [m for m in heard.messages if isinstance(m, bytes)]


# -- in-process: what the preview is, which method, what it costs -------------------------------------------------
@pytest.fixture
def hooked(monkeypatch):
    """The pack's nodes/common.py with a recording progress hook: calls [(value, total, preview, node_id)]."""
    calls = []
    hook = lambda value, total, preview, node_id=None: calls.append((value, total, preview, node_id))  # noqa: E731
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    return pack_module("common"), calls


def latent2rgb(x0_frame, fmt):
    """Wan's latent-to-RGB projection written out: [C, H, W] -> uint8 [H, W, 3] (ComfyUI's factors, -1..1 -> 0..255)."""
    factors, bias = torch.tensor(fmt.latent_rgb_factors), torch.tensor(fmt.latent_rgb_factors_bias)
    rgb = torch.einsum("chw,cr->hwr", x0_frame, factors) + bias
    return (((rgb + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("channels,fmt", [(16, comfy.latent_formats.Wan21), (48, comfy.latent_formats.Wan22)])
def test_preview_is_the_middle_frames_projection(hooked, monkeypatch, channels, fmt):
    common, calls = hooked
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    x0 = torch.randn(1, channels, 5, 6, 10, generator=torch.Generator().manual_seed(channels)) * 2
    common.step_callback(4, "9", channels, torch.device("cpu"))(1, 4, torch.zeros_like(x0), x0)
    (value, total, (kind, image, size), node), = calls
    assert (value, total, kind, size, node) == (2, 4, "JPEG", args.preview_size, "9")
    got = np.asarray(image).astype(int)
    assert np.abs(got - latent2rgb(x0[0, :, 2], fmt())).max() <= 1
    assert np.abs(got - latent2rgb(x0[0, :, 0], fmt())).max() > 8, "frame 0 would look the same: weak check"


@pytest.mark.parametrize("method,kind", [("none", None), ("auto", latent_preview.Latent2RGBPreviewer),
                                         ("latent2rgb", latent_preview.Latent2RGBPreviewer),
                                         ("taesd", latent_preview.Latent2RGBPreviewer)])  # no lighttaew2_* here
def test_preview_method_respected(hooked, monkeypatch, method, kind):
    common, calls = hooked
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod(method))
    for channels in (16, 48):
        assert type(common.previewer(channels, torch.device("cpu"))) is (kind or type(None))
    assert common.previewer(36, torch.device("cpu")) is None  # not a Wan latent: no preview, no error
    common.step_callback(1, None, 16, torch.device("cpu"))(0, 1, None, torch.zeros(1, 16, 3, 4, 4))
    assert (calls[0][2] is None) == (kind is None)


def test_preview_cost_is_negligible(hooked, monkeypatch):
    """Per step at the official sizes: the projection of one frame plus ComfyUI's JPEG encoding of it."""
    from PIL import ImageOps
    common, _ = hooked
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    for label, shape in (("2.1 1280x720x81", (1, 16, 21, 90, 160)), ("2.2 TI2V 1280x704x121", (1, 48, 31, 44, 80))):
        x0, previewer = torch.randn(shape), common.previewer(shape[1], torch.device("cpu"))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            _, image, size = common.preview_image(previewer, x0)
            ImageOps.contain(image, (size, size)).save(io.BytesIO(), format="JPEG", quality=95)  # as ComfyUI's server
            times.append(time.perf_counter() - start)
        print(f"preview {label}: {1000 * statistics.median(times):.1f} ms per step")
        assert statistics.median(times) < 0.25, times
