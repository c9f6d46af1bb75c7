"""Long video in clips (wan_core/long_video.py): clip k+1 is conditioned on exactly clip k's last decoded frames
through each model family's own path (I2V channels, TI2V t = 0 latents, T2V inpainting), the overlap is
cross-faded in pixel space, the frame arithmetic and bad input."""
import os

import pytest
import torch

from wan_core.dit import WanDiT
from wan_core.long_video import LongJob, clip_prompts, conditioning_kind, count_clips, cross_fade, generate_long
from wan_core.pipeline import Expert, frame_mask, initial_noise
from fixtures.smoke import VAE22_TINY, VAE_TINY, randomize_
from wan_core.vae import WanVAE21
from wan_core.vae22 import WanVAE22

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors run faster on one thread

W = H = 32
CLIP, OVERLAP, CLIPS = 13, 5, 3


class RecordingVAE:
    """A VAE that keeps what it encoded and decoded (in call order)."""

    def __init__(self, vae):
        self.vae, self.encoded, self.decoded = vae, [], []

    def encode(self, video):
        out = self.vae.encode(video)
        self.encoded.append((video.clone(), out))
        return out

    def decode(self, z):
        out = self.vae.decode(z)
        self.decoded.append((z.clone(), out.clone()))
        return out


def run_long(kind, start=True, end=False, clips=CLIPS, seed=0, inputs=None):
    g = torch.Generator().manual_seed(7)
    dims = {"image": dict(in_dim=36), "ti2v": dict(in_dim=48, out_dim=48), "t2v": {}}[kind]
    model = randomize_(WanDiT(dim=128, ffn_dim=64, num_layers=1, text_dim=8, freq_dim=32, **dims), seed=1).eval()
    vae = RecordingVAE(randomize_(WanVAE22(**VAE22_TINY) if kind == "ti2v" else WanVAE21(**VAE_TINY), seed=2).eval())
    size = 64 if kind == "ti2v" else W
    image = lambda: torch.rand(1, 3, size, size, generator=g) * 2 - 1  # noqa: E731
    job = LongJob(kind, [torch.randn(3, 8, generator=g) for _ in range(clips)], torch.randn(4, 8, generator=g),
                  start=image() if start else None, end=image() if end else None)
    if inputs is not None:
        model.register_forward_pre_hook(lambda m, args: inputs.append(args[0][:1].clone()))
    conds = []
    chunks = list(generate_long([Expert(lambda: model, cfg=2.0)], vae, job, clips=clips, clip_length=CLIP,
                                overlap=OVERLAP, seed=seed, steps=2, shift=5.0, sampler="unipc", width=size,
                                height=size, channels=model.out_dim, on_clip=lambda k, n, c: conds.append(c)))
    return torch.cat(chunks, dim=1), conds, vae, job


@pytest.mark.parametrize("kind", ["image", "ti2v", "t2v"])
def test_next_clip_is_conditioned_on_exactly_the_last_frames(kind):
    video, conds, vae, job = run_long(kind)
    assert video.shape[1] == CLIP + (CLIPS - 1) * (CLIP - OVERLAP) and len(conds) == CLIPS == len(vae.decoded)
    assert torch.isfinite(video).all() and video.std() > 0
    clips = [out[0] for _, out in vae.decoded]  # each clip as decoded [3, CLIP, H, W]
    # what each clip was conditioned on: the frames the VAE encoded for it (one encode per clip, before sampling)
    assert len(vae.encoded) == CLIPS
    for k in range(1, CLIPS):
        frames, latent = vae.encoded[k]
        n = OVERLAP
        assert torch.equal(frames[0, :, :n], clips[k - 1][:, -n:])  # clip k-1's final frames, bit for bit
        if kind == "image":
            assert frames.shape[2] == CLIP and frames[:, :, n:].eq(0).all()
            mask = frame_mask(CLIP, latent.shape[-2], latent.shape[-1], first=n)
            assert torch.equal(conds[k].y, torch.cat([mask, latent], dim=1))
        else:
            assert frames.shape[2] == n
            pinned = conds[k].first_frame if kind == "ti2v" else conds[k].pinned
            assert pinned is latent and pinned.shape[2] == 1 + (n - 1) // 4
            # the sampled latent starts with those latent frames exactly
            assert torch.equal(vae.decoded[k][0][:, :, :pinned.shape[2]], pinned)
    # frames out: clip 0 up to its tail, cross-faded overlaps, each clip's middle, the last clip's tail
    step = CLIP - OVERLAP
    assert torch.equal(video[:, :step], clips[0][:, :step])
    for k in range(1, CLIPS):
        seam = video[:, k * step:k * step + OVERLAP]
        assert torch.allclose(seam, cross_fade(clips[k - 1][:, -OVERLAP:], clips[k][:, :OVERLAP]), atol=0)
        assert torch.equal(video[:, k * step + OVERLAP:(k + 1) * step], clips[k][:, OVERLAP:step])
    assert torch.equal(video[:, -OVERLAP:], clips[-1][:, -OVERLAP:])


def test_first_clip_and_anchor():
    """Clip 0 starts on the start image; FLF2V's end image closes only the last clip; the CLIP tokens (the anchor)
    are the same for every clip."""
    video, conds, vae, job = run_long("image", end=True)
    first, _ = vae.encoded[0]
    assert first.shape[2] == CLIP and torch.equal(first[0, :, 0], job.start[0]) and first[:, :, 1:].eq(0).all()
    assert all(c.y[:, :4, -1].eq(0).all() for c in conds[:-1])
    last, _ = vae.encoded[-1]
    assert torch.equal(last[0, :, -1], job.end[0]) and conds[-1].y[0, :4, -1, 0, 0].tolist() == [0, 0, 0, 1]
    _, t2v_conds, t2v_vae, _ = run_long("t2v", start=False, clips=2)
    assert t2v_conds[0].pinned is None and len(t2v_vae.encoded) == 1  # text-only first clip


def test_seeds_per_clip():
    """Clip k starts from the noise of seed + k (as S2V); the same seed gives the same video."""
    inputs = []
    a, conds, *_ = run_long("t2v", start=False, clips=3, seed=5, inputs=inputs)
    shape = (1, 16, 1 + (CLIP - 1) // 4, H // 8, W // 8)
    for k in range(3):  # 2 steps per clip; the model's first input of a clip is its initial noise
        assert torch.equal(inputs[2 * k], initial_noise(shape, 5 + k)), k
    b, *_ = run_long("t2v", start=False, clips=3, seed=5)
    c, *_ = run_long("t2v", start=False, clips=3, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_frame_arithmetic_and_bad_input():
    assert count_clips(233, 81, 5) == 3 and count_clips(81, 81, 5) == 1 and count_clips(121 + 112, 121, 9) == 2
    with pytest.raises(ValueError, match=r"length 100 is not a whole number of clips.*use 81 \(1 clip\) or 157 \(2 clips\)"):
        count_clips(100, 81, 5)
    with pytest.raises(ValueError, match="clip_length 80 is not 1\\+4k"):
        count_clips(233, 80, 5)
    for bad in (0, 4, 41, 45):
        with pytest.raises(ValueError, match=f"overlap {bad} must be 1\\+4j"):
            count_clips(233, 81, bad)
    assert clip_prompts(["a", "b"], 3) == ["a", "b", "b"]
    with pytest.raises(ValueError, match="prompts has 4 lines but the length makes 3 clips"):
        clip_prompts(["a", "b", "c", "d"], 3)
    assert [conditioning_kind(*d) for d in ((36, 16), (48, 48), (16, 16))] == ["image", "ti2v", "t2v"]
    with pytest.raises(ValueError, match="needs a start image"):
        run_long("image", start=False)


# ---------------------------------------------------------------------------------------------- through the server

SERVER_SIZE = {"width": 64, "height": 64, "length": CLIP + 2 * (CLIP - OVERLAP), "steps": 2}


def run_in_process(api, classes, load_image):
    """Evaluate an API-format prompt in this process with the given node classes (outputs of `skip` nodes unused)."""
    done = {}

    def value(node_id):
        if node_id not in done:
            node = api[node_id]
            kwargs = {k: value(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            if node["class_type"] == "LoadImage":
                done[node_id] = (load_image(kwargs["image"]),)
            else:
                cls = classes[node["class_type"]]
                done[node_id] = cls.execute(**kwargs)
        return done[node_id]
    return value


@pytest.mark.parametrize("workflow", ["wan22_i2v_a14b_svi_pro_long.json", "wan22_i2v_a14b_long.json",
                                      "wan22_t2v_a14b_long.json"])
def test_three_clips_through_the_server(server, smoke_models, workflow, monkeypatch):
    """A bundled A14B long-video workflow, 3 clips, through a real ComfyUI server (frames saved as PNG); the same
    graph in this process through the pack's node classes gives the same frames, and there: SVI 2.0 Pro (with its
    LoRAs) and the I2V default (latent carry) condition every clip k+1 on clip k's last sampled latent frame bit for
    bit, with one VAE encode in the whole run (the anchor), y equal to SVI's construction; T2V-A14B on exactly clip
    k's last `overlap` decoded frames as pinned latents, a prompt line per clip. The frames are the clips joined as
    the mode's reference joins them."""
    import json

    import numpy as np
    from PIL import Image

    import official_svi as ref
    from conftest import ROOT, SMOKE_INPUT
    from run_workflow import shrink
    from test_lora import pack_module
    from workflow_api import set_inputs, ui_to_api

    with open(os.path.join(ROOT, "workflows", workflow), encoding="utf-8") as f:
        api = ui_to_api(json.load(f), server.object_info())
    api = set_inputs(shrink(api, SERVER_SIZE), {"WanLeanLongVideo.clip_length": CLIP, "WanLeanLongVideo.overlap": OVERLAP,
                                                "WanLeanLongVideo.seed": 3})
    long_id = next(k for k, v in api.items() if v["class_type"] == "WanLeanLongVideo")
    prefix = f"long_{workflow[:-5]}"
    api["951"] = {"class_type": "SaveImage", "inputs": {"images": [long_id, 0], "filename_prefix": prefix}}
    pngs = sorted(p for p in server.output_files(server.run(api, timeout=900)) if os.path.basename(p).startswith(prefix))
    served = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
    assert served.shape == (SERVER_SIZE["length"], 64, 64, 3)

    mods = [pack_module(m) for m in ("loaders", "conditioning", "lora", "long_video")]
    lv = mods[-1]
    classes = {node.GET_SCHEMA().node_id: node for m in mods for node in m.NODES}
    import folder_paths
    for kind in ("diffusion_models", "vae", "text_encoders", "loras"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind,
                            ([os.path.join(smoke_models, kind)], folder_paths.folder_names_and_paths[kind][1]))
    vaes, conds, real_long = [], [], lv.generate_long
    real_vae = lv.VAEOnDevice
    monkeypatch.setattr(lv, "VAEOnDevice", lambda h: vaes.append(RecordingVAE(real_vae(h))) or vaes[-1])

    def spy(*args, **kw):
        inner = kw["on_clip"]
        kw["on_clip"] = lambda k, n, c: (conds.append(c), inner(k, n, c))
        return real_long(*args, **kw)
    monkeypatch.setattr(lv, "generate_long", spy)
    image = lambda name: torch.from_numpy(np.asarray(Image.open(os.path.join(SMOKE_INPUT, name)).convert("RGB"),  # noqa: E731
                                                     dtype=np.float32) / 255)[None]
    frames, = run_in_process(api, classes, image)(long_id)
    out = np.clip(255.0 * frames.numpy(), 0, 255).astype(np.uint8)  # as SaveImage writes them
    diff = np.abs(out.astype(int) - served.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())  # the server ran this very computation
    assert frames.std() > 0.01 and torch.isfinite(frames).all()

    vae, = vaes
    clips = [((d[0].float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0) for _, d in vae.decoded]
    assert len(conds) == 3 and len(vae.decoded) == 3
    if "i2v" in workflow:
        assert len(vae.encoded) == 1  # the anchor; nothing decoded is ever encoded again
        sampled = [z for z, _ in vae.decoded]
        for k in range(3):
            encode = lambda videos: torch.cat([vae.vae.encode(v[None]) for v in videos])  # noqa: E731
            expect = ref.svi_pro_y(encode, vae.encoded[0][0][0, :, 0], sampled[k - 1][0] if k else None, CLIP, 64, 64)
            assert torch.equal(conds[k].y, expect.to(conds[k].y)), k
            if k:
                assert torch.equal(conds[k].y[:, 4:, 1], sampled[k - 1][:, :, -1])
        assert torch.equal(frames, torch.cat([clips[0]] + [c[OVERLAP:] for c in clips[1:]]))
    else:
        assert len(vae.encoded) == 2
        for k in (1, 2):
            known, latent = vae.encoded[k - 1]
            assert torch.equal(known[:, :, :OVERLAP], vae.decoded[k - 1][1][:, :, -OVERLAP:])  # bit for bit
            assert conds[k].pinned is latent and torch.equal(vae.decoded[k][0][:, :, :latent.shape[2]], latent)
        assert not torch.equal(conds[0].context, conds[1].context) and not torch.equal(conds[1].context, conds[2].context)


# ---------------------------------------------------------------------------------------------- memory

MEM_SIDE, MEM_CLIPS = 128, (1, 3, 6)


def _long_peak(clips, side=MEM_SIDE):
    """Peak RSS growth (bytes) of a `clips`-clip T2V run on the smoke 1.3B weights and the smoke VAE, frames
    collected into a preallocated IMAGE-like tensor as the node does; measured after a warm-up clip."""
    from conftest import SMOKE_MODELS
    from test_memory import _peak_of
    from wan_core.checkpoint import load_dit, load_vae
    torch.set_num_threads(2)
    model = WanDiT.from_state_dict(load_dit(os.path.join(SMOKE_MODELS, "diffusion_models",
                                                         "wan2.1_t2v_1.3B_fp16.safetensors"), torch.float32).sd).eval()
    vae = WanVAE21.from_state_dict(load_vae(os.path.join(SMOKE_MODELS, "vae", "wan_2.1_vae.safetensors")).sd).float().eval()
    text = model.text_embedding[0].in_features

    def run(n):
        job = LongJob("t2v", [torch.randn(5, text)] * n, torch.randn(5, text))
        out = torch.empty(CLIP + (n - 1) * (CLIP - OVERLAP), side, side, 3)
        done = 0
        for chunk in generate_long([Expert(lambda: model, cfg=2.0)], vae, job, clips=n, clip_length=CLIP,
                                   overlap=OVERLAP, seed=0, steps=2, shift=5.0, sampler="unipc", width=side, height=side):
            out[done:done + chunk.shape[1]] = chunk.permute(1, 2, 3, 0)
            done += chunk.shape[1]
    run(1)  # warm-up
    return _peak_of(lambda: run(clips))


def test_memory_grows_with_the_output_only():
    """Each clip count in a fresh process (large allocations mmapped so RSS follows live tensors): the peak RSS
    growth minus the output video's bytes is the same for 3 and 6 clips (within 2 MiB; one clip's decoded frames
    are 2.4 MiB), and no larger for 1 clip (whose T2V clip 0 has nothing to encode)."""
    import subprocess
    import sys

    from conftest import ROOT
    peaks = {}
    for n in MEM_CLIPS:
        code = f"import sys; sys.path[:0] = ['tests', '.']; import test_long_video as t; print(t._long_peak({n}))"
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"),
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        peaks[n] = int(out.split()[-1])
    work = {}
    for n, peak in peaks.items():
        output = (CLIP + (n - 1) * (CLIP - OVERLAP)) * 3 * MEM_SIDE ** 2 * 4
        work[n] = peak - output
        print(f"{n} clips ({MEM_SIDE}x{MEM_SIDE}, {CLIP}-frame clips): peak RSS growth {peak / 2**20:.1f} MiB, "
              f"output {output / 2**20:.1f} MiB, the rest {work[n] / 2**20:.1f} MiB")
    assert abs(work[6] - work[3]) <= 2 * 2 ** 20 and work[1] <= work[3] + 2 * 2 ** 20, work


def test_interrupt_stops_a_long_run(server):
    """/interrupt during a long run (3 clips of 200 steps) ends the prompt as interrupted (within a step)."""
    import json
    import time

    from comfy_host import Interrupted
    from conftest import ROOT
    from run_workflow import shrink
    from workflow_api import set_inputs, ui_to_api
    with open(os.path.join(ROOT, "workflows", "wan22_t2v_a14b_long.json"), encoding="utf-8") as f:
        api = ui_to_api(json.load(f), server.object_info())
    api = set_inputs(shrink(api, dict(SERVER_SIZE, steps=200)), {"WanLeanLongVideo.clip_length": CLIP,
                                                                 "WanLeanLongVideo.seed": 11})
    prompt_id = server.queue(api)
    deadline = time.monotonic() + 120
    while prompt_id not in server.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3.0)
    asked = time.monotonic()
    server.interrupt()
    with pytest.raises(Interrupted):
        server.wait(prompt_id, timeout=120)
    assert time.monotonic() - asked < 30
