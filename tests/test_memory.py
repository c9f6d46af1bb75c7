"""Memory behaviour under ComfyUI's own memory manager (comfy.model_management), measured on the CPU.

ComfyUI never loads partially (nor frees) on its `cpu` device, so `fake_gpu` shows the memory manager a GPU:
device cpu:0 (tensors stay in RAM), `total` bytes of which the weights it has loaded there are in use, NVIDIA's
setting of no minimum weight share, and ComfyUI's fixed 1.2 GiB inference reserve dropped (it would dwarf smoke
models). Which modules load, which stream through the casting ops and which models get unloaded is ComfyUI's own
code. On a GPU, a tensor that a partial load leaves on the offload device and that the model then uses uncast
raises a device mismatch; on the CPU it passes silently, so `OffloadCheck` flags such uses.

The server test (opt-in, `-m slow`) reads a real server's RSS around a run and `/free`; that a model is gone from
`current_loaded_models` is checked in-process (the pack adds no debug route to the server).
"""
import gc
import os
import time
import types
import weakref

import psutil
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from conftest import import_comfy, run_workflow
from test_lora import pack_module
from wan_core.dit import WanDiT
from wan_core.t5 import UMT5Encoder

import_comfy()
import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors run faster on one thread

FAKE = torch.device("cpu", 0)  # the pretend GPU: a device ComfyUI does not take for its CPU
FOLDERS = ("diffusion_models", "vae", "text_encoders", "clip_vision")
T2V, I2V = "wan2.1_t2v_1.3B_fp16.safetensors", "wan2.1_i2v_480p_14B_fp16.safetensors"
HIGH, LOW = "wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors"
SIZE = dict(width=32, height=32, length=5)  # latent 2 x 4 x 4: 8 tokens
SHAPE = (1, 16, 2, 4, 4)


@pytest.fixture(scope="module")
def nodes(smoke_models):
    """The pack's node modules, with ComfyUI's model folders pointing at the smoke models."""
    added = [(kind, os.path.join(smoke_models, kind)) for kind in FOLDERS]
    for kind, path in added:
        folder_paths.add_model_folder_path(kind, path)
    modules = ("loaders", "conditioning", "sampler", "decode", "image")
    yield types.SimpleNamespace(**{name: pack_module(name) for name in modules})
    for kind, path in added:
        folder_paths.folder_names_and_paths[kind][0].remove(path)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A pretend GPU for comfy.model_management. `gpu.total`: its memory (or `gpu.fit`: each load finds the
    estimate plus this share of the model's weights free); `gpu.loads`: per load_models_gpu call (patcher,
    memory_required, {patcher: bytes loaded on the device}); `gpu.on_load`: callbacks after each load."""
    gpu = types.SimpleNamespace(total=2 ** 40, fit=None, loads=[], on_load=[])
    real = types.SimpleNamespace(free=mm.get_free_memory, total=mm.get_total_memory, cpu=mm.is_device_cpu,
                                 load=mm.load_models_gpu)

    def loaded():
        return {m.model: m.model_loaded_memory() for m in mm.current_loaded_models if m.device == FAKE and m.model}

    def free(dev=None, torch_free_too=False):
        if dev is not None and dev != FAKE:
            return real.free(dev, torch_free_too)
        left = gpu.total - sum(loaded().values())
        return (left, 0) if torch_free_too else left

    def load(models, memory_required=0, **kwargs):
        if gpu.fit is not None:
            gpu.total = memory_required + int(gpu.fit * models[0].model_size())
        real.load(models, memory_required=memory_required, **kwargs)
        gpu.loads.append((models[0], memory_required, loaded()))
        for callback in gpu.on_load:
            callback(models)

    patches = dict(get_torch_device=lambda: FAKE, text_encoder_device=lambda: FAKE, get_free_memory=free,
                   get_total_memory=lambda dev=None, torch_total_too=False: gpu.total if dev in (None, FAKE)
                   else real.total(dev, torch_total_too),
                   is_device_cpu=lambda dev: real.cpu(dev) and dev != FAKE, load_models_gpu=load,
                   vram_state=mm.VRAMState.NORMAL_VRAM, MIN_WEIGHT_MEMORY_RATIO=0.0, EXTRA_RESERVED_VRAM=0,
                   minimum_inference_memory=lambda: 0)
    for name, value in patches.items():
        monkeypatch.setattr(mm, name, value)
    yield gpu
    mm.free_memory(1e30, FAKE)  # unload what is on the pretend GPU while it still exists


class OffloadCheck(TorchFunctionMode):
    """Records torch calls that mix a tensor a partial load left on the offload device (outside ComfyUI's casting
    ops and outside what it loaded) with tensors on the compute device: on a GPU each raises "Expected all tensors
    to be on the same device". Casting it (`.to(x)`, `.to(device)`, `type_as`, `copy_`) is fine; whatever is
    computed from such tensors alone stays behind too. 0-dim tensors mix freely, as on a GPU. `mixed`: "call:
    parameter" for each offence."""

    def __init__(self):
        super().__init__()
        self.behind, self.mixed = {}, []  # id -> (tensor, the parameter it comes from); kept alive: ids stay unique

    def add(self, model):
        """After a load: every parameter/buffer of a partially loaded model that ComfyUI neither moved nor casts."""
        if not getattr(model, "model_lowvram", False):
            return
        for name, m in model.named_modules():
            if not (getattr(m, "comfy_patched_weights", False) or getattr(m, "comfy_cast_weights", False)):
                for key, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                    self.behind[id(t)] = (t, f"{name}.{key}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.ndim]
        origins = [self.behind[id(t)][1] for t in tensors if id(t) in self.behind]
        name = getattr(func, "__name__", repr(func))
        moves = "device" in kwargs or name in ("copy_", "type_as") or (
            name == "to" and any(isinstance(a, (torch.Tensor, torch.device, str)) for a in args[1:]))
        if not origins or moves:
            return out
        if len(origins) == len(tensors):
            self.behind.update((id(t), (t, origins[0])) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        else:
            self.mixed.append(f"{name}: {origins[0]}")
        return out


def load(nodes, dit=T2V, vae="wan_2.1_vae.safetensors"):
    """(text encoder, diffusion model, VAE) handles from the loader nodes."""
    t5, = nodes.loaders.WanLeanTextEncoderLoader.execute("umt5_xxl_fp16.safetensors")
    model, = nodes.loaders.WanLeanModelLoader.execute(dit, "default")
    return t5, model, nodes.loaders.WanLeanVAELoader.execute(vae)[0]


def conds(text_dim=64, **extras):
    """Random positive / negative CONDITIONING (what the sampler would get from Wan Text Encode)."""
    g = torch.Generator().manual_seed(1)
    return ([[torch.randn(1, 9, text_dim, generator=g), dict(extras)]],
            [[torch.randn(1, 5, text_dim, generator=g), dict(extras)]])


def sample(nodes, model, positive, negative, seed=0):
    return nodes.sampler.WanLeanSampler.execute(model, positive, negative, seed=seed, steps=3, cfg=5.0, shift=5.0,
                                                 sampler="unipc", **SIZE)[0]


def run_chain(nodes, t5, model, vae):
    """Text encode -> sample -> decode through the nodes; the decoded frames."""
    positive, negative = nodes.conditioning.WanLeanTextEncode.execute(t5, "a cat on the grass", "blurry")
    return nodes.decode.WanLeanVAEDecode.execute(vae, sample(nodes, model, positive, negative))[0]


GiB = 2 ** 30
# DiT configs with their VAE's stride; runs: (model, width, height, frames, published peak GB of the official
# single-GPU run, WAN_FACTS.md; 14B: Wan 2.2 A14B's, one 14B expert on the device at a time)
REAL = {"1.3B": (dict(dim=1536, ffn_dim=8960, num_layers=30), 8),
        "14B": (dict(dim=5120, ffn_dim=13824, num_layers=40), 8),
        "5B": (dict(dim=3072, ffn_dim=14336, num_layers=30, in_dim=48, out_dim=48), 16)}
RUNS = [("1.3B", 832, 480, 81, 8.19), ("1.3B", 1280, 720, 81, None), ("14B", 832, 480, 81, 41.3),
        ("14B", 1280, 720, 81, 59.8), ("5B", 1280, 704, 121, 22.9)]


def test_estimates_for_real_sizes(nodes):
    """The estimates at the real model sizes (bf16 weights and compute; models built on the meta device): each
    covers its analytic floor (the CFG batch's fp32 residual stream plus one FFN hidden state; the decoded video;
    the umT5-XXL position bias) and weights + activations stay under the official runs' published peak memory."""
    bf16 = torch.bfloat16
    print(f"{'model':>5} {'video':>16} {'weights':>8} {'sampler':>8} {'decode':>7} (GiB, bf16)")
    for name, width, height, frames, published in RUNS:
        cfg, stride = REAL[name]
        with torch.device("meta"):
            model = WanDiT(**cfg)
        weights = 2 * sum(p.numel() for p in model.parameters())
        shape = (1, model.out_dim, (frames - 1) // 4 + 1, height // stride, width // stride)
        tokens = shape[2] * shape[3] * shape[4] // 4
        act = nodes.sampler.activation_memory(model, shape, bf16)
        decode = nodes.decode.decode_memory(shape, bf16, stride)
        print(f"{name:>5} {f'{width}x{height}x{frames}':>16} {weights / GiB:8.1f} {act / GiB:8.1f} {decode / GiB:7.1f}")
        assert act >= 2 * tokens * (4 * model.dim + 2 * model.blocks[0].ffn[0].out_features)
        assert decode >= 3 * frames * width * height * (2 + 8)
        assert published is None or weights + act < published * 1e9
    with torch.device("meta"):
        t5 = UMT5Encoder()
    handle = types.SimpleNamespace(patcher=types.SimpleNamespace(model=t5), dtype=torch.float32)
    text = nodes.conditioning.text_memory(handle, 2)
    print(f"umT5-XXL, 2 prompts: {text / GiB:.2f} GiB (fp32)")
    assert text >= 3 * 64 * 512 ** 2 * 4


@pytest.mark.slow
def test_block_peak_is_within_the_sampler_estimate():
    """Measured: one real-width DiT block (1.3B, bf16, CFG batch) at 1024 and 2048 tokens, in a subprocess with
    large allocations mmapped (so RSS follows the live tensors); the peak's growth per token lies within 70-100%
    of activation_memory's per-token figure before its 15% margin (up to 5% above it: run-to-run noise), so at least
    9% below the estimate itself."""
    peaks = dict(zip((1024, 2048), _in_child("[_block_peak(n) for n in (1024, 2048)]")))
    measured = (peaks[2048] - peaks[1024]) / (2 * 1024)
    with torch.device("meta"):
        model = WanDiT(**REAL["1.3B"][0])
    margin = pack_module("common").ACTIVATION_MARGIN
    estimate = pack_module("sampler").activation_memory(model, (1, 16, 1, 2, 2), torch.bfloat16) / 2
    print(f"1.3B block, bf16: peak grows {measured / 1e3:.1f} KB per token, estimate {estimate / 1e3:.1f} KB")
    assert 0.7 * estimate / margin <= measured <= 1.05 * estimate / margin and 1.09 * measured <= estimate


def _in_child(call):
    """The ints `call` (an expression on this module) prints in a fresh process whose large allocations are
    mmapped, so that RSS follows the live tensors."""
    import subprocess
    import sys
    code = f"import sys; sys.path[:0] = ['tests', '.']; import test_memory as t; print(eval({call!r}, vars(t)))"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    return [int(v) for v in out.split("\n")[-2].strip("[]").split(",")]


def _rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _peak_of(fn):
    """Peak RSS growth (bytes) of fn() above the RSS before it."""
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM)
    fn()
    return _rss("VmHWM") - base


ENCODES, SIDE = [("2.1", 5), ("2.1", 9), ("2.2", 5)], 64


def _encode_peaks(size=SIDE):
    """Peak RSS growth of real-width Wan VAE encodes (fp32, random weights) of [1, 3, frames, size, size] videos."""
    from wan_core.vae import WanVAE21
    from wan_core.vae22 import WanVAE22
    torch.set_num_threads(2)
    peaks, vaes = [], {"2.1": WanVAE21, "2.2": WanVAE22}
    for family, frames in ENCODES:
        vae = vaes[family]().eval()
        video = torch.rand(1, 3, frames, size, size) * 2 - 1
        with torch.no_grad():
            vae.encode(video[:, :, :5, :size // 2, :size // 2])  # kernels warmed up
            peaks.append(_peak_of(lambda: vae.encode(video)))
    return peaks


def test_encode_estimate_covers_the_measured_peak(nodes):
    """A real-width VAE encode (Wan 2.1 at 5 and 9 frames, 2.2 at 5; 64x64) peaks at least 15% below encode_memory,
    the estimate the image-to-video and S2V nodes hand to load_models_gpu (it carries MARGIN = 1.25 over the measured
    per-pixel figures: 10% of run-to-run noise stays covered), and above 35% of it (no gross over-estimate)."""
    assert nodes.decode.MARGIN >= 1.15
    for (family, frames), measured in zip(ENCODES, _in_child("_encode_peaks()")):
        stride = 16 if family == "2.2" else 8
        estimate = nodes.decode.encode_memory((1, 3, frames, SIDE, SIDE), torch.float32, stride)
        print(f"VAE {family} encode {SIDE}x{SIDE}x{frames}: peak {measured / 2**20:.0f} MiB, "
              f"estimate {estimate / 2**20:.0f} MiB")
        assert 0.35 * estimate <= measured and 1.15 * measured <= estimate


def _block_peak(tokens, dim=1536, ffn=8960):
    """Peak RSS growth (bytes) of one bf16 block forward on [2, tokens] (run in a fresh process)."""
    from wan_core.dit import HEAD_DIM, Block, rope_table
    torch.set_num_threads(2)
    with torch.device("meta"):
        block = Block(dim, ffn, dim // HEAD_DIM, 1e-6, pack_module("common").casting_ops())
    block = block.to_empty(device="cpu").to(torch.bfloat16)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x, e0, ctx = torch.randn(2, tokens, dim), torch.randn(2, 1, 6, dim), torch.randn(2, 512, dim).bfloat16()
    rope = rope_table((tokens // 256, 16, 16), HEAD_DIM, "cpu")
    with torch.no_grad():
        block(x[:, :256].contiguous(), e0, tuple(r[:256] for r in rope), ctx)  # kernels warmed up
        return _peak_of(lambda: block(x, e0, rope, ctx))


def test_estimates_reach_load_models_gpu_and_partial_loads_match(nodes, fake_gpu):
    """Unconstrained, each node asks load_models_gpu for its model with its activation estimate for the asked size
    (the weights part is the model's own size in its storage dtype, which ComfyUI adds) and gets it loaded fully.
    Then each model finds only its estimate plus half its weights free: ComfyUI loads it partially, streaming the
    rest through the casting ops, and the decoded frames equal those of the full loads."""
    handles = load(nodes)
    full = run_chain(nodes, *handles)
    t5, model, vae = handles
    assert [(p, m) for p, m, _ in fake_gpu.loads] == [
        (t5.patcher, nodes.conditioning.text_memory(t5, 2)),
        (model.patcher, nodes.sampler.activation_memory(model.patcher.model, SHAPE, model.dtype)),
        (vae.patcher, nodes.decode.decode_memory(SHAPE, vae.dtype, 8))]
    for patcher, _, on_device in fake_gpu.loads:
        assert on_device[patcher] == patcher.model_size() == sum(t.nbytes for t in patcher.model.state_dict().values())
    mm.free_memory(1e30, FAKE)
    fake_gpu.loads.clear()
    fake_gpu.fit = 0.5
    streamed = []
    fake_gpu.on_load.append(lambda models: streamed.append(
        (models[0].model.model_lowvram, sum(getattr(m, "prev_comfy_cast_weights", None) is not None
                                            for m in models[0].model.modules()))))
    partial = run_chain(nodes, *handles)
    for (patcher, _, on_device), (lowvram, n) in zip(fake_gpu.loads, streamed):
        name = type(patcher.model).__name__
        print(f"{name}: {on_device[patcher] / 2**20:.2f} of {patcher.model_size() / 2**20:.2f} MiB loaded, "
              f"{n} modules streamed")
        assert lowvram and n > 0 and 0 < on_device[patcher] < patcher.model_size(), name
    print(f"partial vs full load: max abs diff of the frames {(partial - full).abs().max().item():.1e}")
    assert torch.equal(partial, full)


def test_a14b_experts_take_turns_on_the_device(nodes, fake_gpu):
    """A budget that fits one expert (plus the activations): the low-noise expert's load unloads the high-noise
    one, the device never holds more than the budget, and the latent equals the unconstrained run's."""
    high, = nodes.loaders.WanLeanModelLoader.execute(HIGH, "default")
    low, = nodes.loaders.WanLeanModelLoader.execute(LOW, "default")
    positive, negative = conds()

    def run():
        return nodes.sampler.WanLeanSamplerA14B.execute(
            high, low, positive, negative, seed=3, steps=4, cfg_high_noise=4.0, cfg_low_noise=3.0, shift=12.0,
            sampler="unipc", boundary=0.875, **SIZE)[0]["samples"]

    free_run = run()
    assert set(fake_gpu.loads[-1][2]) == {high.patcher, low.patcher}  # unconstrained: both stay on the device
    mm.free_memory(1e30, FAKE)
    fake_gpu.loads.clear()
    act = nodes.sampler.activation_memory(high.patcher.model, SHAPE, high.dtype)
    fake_gpu.total = act + high.patcher.model_size()
    out = run()
    (first, _, at_first), (second, _, at_second) = fake_gpu.loads
    assert (first, second) == (high.patcher, low.patcher)
    print(f"on the device: high {at_first[high.patcher] / 2**20:.2f} MiB, then high "
          f"{at_second.get(high.patcher, 0) / 2**20:.2f} + low {at_second[low.patcher] / 2**20:.2f} MiB "
          f"(budget for weights {(fake_gpu.total - act) / 2**20:.2f} MiB)")
    assert at_second.get(high.patcher, 0) == 0 and at_second[low.patcher] > 0
    assert max(sum(d.values()) for *_, d in fake_gpu.loads) <= fake_gpu.total - act
    assert torch.equal(out, free_run)


def test_cfg1_experts_ask_for_one_pass_of_activations(nodes, fake_gpu):
    """The 4-step preset (cfg 1 / 1): each A14B expert asks load_models_gpu for half the CFG batch's activations
    (one pass a step); with cfg 4 on the high-noise expert only that one asks for the CFG batch."""
    high, = nodes.loaders.WanLeanModelLoader.execute(HIGH, "default")
    low, = nodes.loaders.WanLeanModelLoader.execute(LOW, "default")
    positive, negative = conds()
    cfg_batch = nodes.sampler.activation_memory(high.patcher.model, SHAPE, high.dtype)
    for cfgs, asked in (((1.0, 1.0), [cfg_batch // 2] * 2), ((4.0, 1.0), [cfg_batch, cfg_batch // 2])):
        mm.free_memory(1e30, FAKE)
        fake_gpu.loads.clear()
        latent = nodes.sampler.WanLeanSamplerA14B.execute(
            high, low, positive, negative, seed=3, steps=4, cfg_high_noise=cfgs[0], cfg_low_noise=cfgs[1], shift=5.0,
            sampler="euler-distilled", boundary=0.875, **SIZE)[0]["samples"]
        assert [(p, m) for p, m, _ in fake_gpu.loads] == list(zip((high.patcher, low.patcher), asked))
        assert torch.isfinite(latent).all() and latent.std() > 0

def _text(nodes):
    t5, = nodes.loaders.WanLeanTextEncoderLoader.execute("umt5_xxl_fp16.safetensors")
    nodes.conditioning.WanLeanTextEncode.execute(t5, "a cat", "")


def _clip(nodes):
    clip, = nodes.image.WanLeanCLIPVisionLoader.execute("clip_vision_h.safetensors")
    nodes.image.WanLeanCLIPVisionEncode.execute(clip, torch.rand(1, 64, 64, 3))


def _dit(name, **extras):
    def run(nodes):
        model, = nodes.loaders.WanLeanModelLoader.execute(name, "default")
        sample(nodes, model, *conds(**extras))
    return run


def _vae(name):
    def run(nodes):
        vae, = nodes.loaders.WanLeanVAELoader.execute(name)
        positive, _ = conds()
        out, *_ = nodes.image.WanLeanImageToVideo.execute(positive, positive, vae, torch.rand(1, 32, 32, 3), 32, 32, 5)
        extras = out[0][1]
        latent = extras.get("wanlean_y", extras.get("wanlean_first_frame"))[:, -vae.patcher.model.z_dim:]
        nodes.decode.WanLeanVAEDecode.execute(vae, {"samples": latent})
    return run


def _s2v(nodes):
    model, = nodes.loaders.WanLeanModelLoader.execute("wan2.2_s2v_14B_bf16.safetensors", "default")
    net, g = model.load(0), torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    with torch.no_grad():
        net(r(1, 16, 2, 8, 8), torch.tensor([500.0]), r(1, 7, 64), audio=r(1, 25, 128, 8), ref_latent=r(1, 16, 1, 8, 8),
            motion_latent=r(1, 16, 19, 8, 8), pose_latent=r(1, 16, 2, 8, 8))


_G = torch.Generator().manual_seed(2)
CASES = {"text encoder": _text, "clip vision": _clip, "vae 2.1": _vae("wan_2.1_vae.safetensors"),
         "vae 2.2": _vae("wan2.2_vae.safetensors"), "dit t2v": _dit(T2V),
         "dit i2v": _dit(I2V, wanlean_y=torch.randn(1, 20, 2, 4, 4, generator=_G),
                         wanlean_clip=torch.randn(1, 257, 64, generator=_G)),
         "s2v": _s2v}


def offload_check(fake_gpu):
    """An OffloadCheck fed by every load on a pretend GPU where no weight fits."""
    fake_gpu.fit = 0.0
    check = OffloadCheck()
    fake_gpu.on_load.append(lambda models: check.add(models[0].model))
    return check


@pytest.mark.parametrize("run", list(CASES.values()), ids=list(CASES))
def test_partial_load_leaves_nothing_uncast_behind(nodes, fake_gpu, run):
    """Everything streamed: no call mixes a tensor left on the offload device with device tensors, i.e. the
    model runs in ComfyUI's low-VRAM mode on a GPU."""
    with offload_check(fake_gpu) as check:
        run(nodes)
    assert check.behind, "nothing was left behind: the budget did not force a partial load"
    assert not check.mixed, f"calls mixing offloaded and device tensors: {sorted(set(check.mixed))}"


def test_offload_check_flags_an_uncast_weight(nodes, fake_gpu, monkeypatch):
    """The check can fail: umT5's RMS norm with its gain used uncast (no `.to(x)`) is flagged."""
    t5 = __import__(nodes.loaders.__package__.rpartition(".")[0] + ".wan_core.t5", fromlist=["T5LayerNorm"])
    monkeypatch.setattr(t5.T5LayerNorm, "forward", lambda self, x: x.float() * self.weight)
    with offload_check(fake_gpu) as check:
        _text(nodes)
    assert any(m.endswith("norm1.weight") for m in check.mixed), check.mixed


def test_unloaded_models_are_freed(nodes):
    """What /free makes ComfyUI do (unload_all_models, then reset its cache of node outputs), in-process: after
    the unload no model of the pack is in current_loaded_models, the node outputs (ComfyUI's cache) still hold
    the handles, and once they are dropped every model and weight is freed by reference counting alone."""
    handles = load(nodes)
    run_chain(nodes, *handles)
    refs = [weakref.ref(obj) for h in handles
            for obj in (h.patcher, h.patcher.model, next(h.patcher.model.parameters()))]

    def ours():
        return [m for m in mm.current_loaded_models if any(m.model is not None and m.model is r() for r in refs)]

    assert len(ours()) == 3
    mm.unload_all_models()
    assert not ours() and all(r() is not None for r in refs)
    gc.disable()
    try:
        del handles
        alive = [type(r()).__name__ for r in refs if r() is not None]
    finally:
        gc.enable()
    assert not alive, f"still referenced after the outputs were dropped: {alive}"


def _write_big_dit(folder, layers=6):
    """A 1.3B-wide DiT with a few blocks (about 0.6 GB in fp16): big enough to show in the server's RSS."""
    from safetensors.torch import save_file
    from fixtures.smoke import randomize_
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "wanlean_rss_probe_fp16.safetensors")
    model = randomize_(WanDiT(dim=1536, ffn_dim=8960, num_layers=layers, text_dim=64))
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _settled_rss(proc, seconds=20.0):
    """The process RSS once it stops moving (three readings 0.5 s apart within 1%)."""
    readings, deadline = [proc.memory_info().rss], time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        readings.append(proc.memory_info().rss)
        last = readings[-3:]
        if len(last) == 3 and max(last) - min(last) <= 0.01 * max(last):
            break
    return readings[-1]


def _free(srv, proc, **flags):
    """POST /free and read the settled RSS. ComfyUI applies /free when its prompt worker next wakes; one that lands
    while the worker finishes the previous prompt (its post-prompt gc) is applied only after the next prompt, so
    it is sent again once the worker is idle (repeating /free changes nothing)."""
    for _ in range(2):
        srv.free(**flags)
        rss = _settled_rss(proc)
    return rss


@pytest.mark.slow
def test_free_returns_the_server_rss(tmp_path, smoke_models):
    """A real server runs the T2V workflow with a ~0.6 GB diffusion model, then gets /free. RSS before the first
    run; after a warm-up run with the 4 MB smoke model and /free (what a first run leaves behind for good: imports,
    codecs, allocator pools); after the big run; after /free {"unload_models": true} (on the CPU the weights stay:
    ComfyUI's cache of node outputs still holds the loaders' outputs, for the next run); after /free
    {"unload_models": true, "free_memory": true} (ComfyUI resets that cache): within 10% of the level before the
    big model was loaded, after one big run and after two. What stays is glibc's: freed heap it keeps (5 to 100 MiB
    here, varying run to run, not growing per load); in-process, every module and weight of the pack is freed."""
    from comfy_host import ComfyServer
    models = tmp_path / "models"
    models.mkdir()
    for kind in ("vae", "text_encoders"):
        (models / kind).symlink_to(os.path.join(smoke_models, kind))
    big = _write_big_dit(str(models / "diffusion_models"))
    name, size = os.path.basename(big), os.path.getsize(big)
    (models / "diffusion_models" / T2V).symlink_to(os.path.join(smoke_models, "diffusion_models", T2V))
    gc.collect()
    sizes = {"width": 64, "height": 64, "length": 5, "steps": 2}
    try:
        with ComfyServer(models_dir=str(models), output_dir=str(tmp_path / "out")) as srv:
            proc = psutil.Process(srv.proc.pid)
            rss = {"before the first run": _settled_rss(proc)}
            run_workflow(srv, "wan21_t2v_1.3B.json", {"WanLeanModelLoader.model_name": T2V}, sizes=sizes)
            rss["after a smoke-model run and /free"] = _free(srv, proc)
            run_workflow(srv, "wan21_t2v_1.3B.json", {"WanLeanModelLoader.model_name": name}, sizes=sizes)
            rss["after the big-model run"] = _settled_rss(proc)
            rss["after /free unload_models"] = _free(srv, proc, unload_models=True, free_memory=False)
            rss["after /free unload_models + free_memory"] = _free(srv, proc, unload_models=True, free_memory=True)
            run_workflow(srv, "wan21_t2v_1.3B.json", {"WanLeanModelLoader.model_name": name}, sizes=sizes)
            rss["after a second big-model run and /free"] = _free(srv, proc)
            log = srv.log_text()
    finally:
        os.remove(big)  # 0.6 GB: not left in pytest's kept temp folders
    print(f"server RSS (model file {size / 2**20:.0f} MiB):")
    for what, value in rss.items():
        print(f"  {what}: {value / 2**20:.0f} MiB")
    assert log.count("Requested to load UMT5Encoder") == 3  # each free_memory /free reset the output cache
    _, warm, loaded, unloaded, freed, again = rss.values()
    assert loaded - warm > 0.8 * size and unloaded - warm > 0.8 * size  # the model really was in memory
    assert max(freed, again) <= 1.1 * warm


def test_long_video_experts_take_turns_in_every_clip(nodes, fake_gpu):
    """Wan Long Video with the A14B pair, 2 clips, on a device that fits one expert (plus the activations): in every
    clip the high-noise expert is loaded and then the low-noise one in its place, the VAE between the clips; the
    frames equal the unconstrained run's."""
    long_video = pack_module("long_video")
    high, = nodes.loaders.WanLeanModelLoader.execute(HIGH, "default")
    low, = nodes.loaders.WanLeanModelLoader.execute(LOW, "default")
    vae, = nodes.loaders.WanLeanVAELoader.execute("wan_2.1_vae.safetensors")
    positive, negative = conds()

    def run():
        return long_video.WanLeanLongVideo.execute(
            high, vae, positive, negative, seed=3, steps=4, cfg=4.0, shift=12.0, sampler="unipc", width=32, height=32,
            length=9 + 8, clip_length=9, overlap=1, low_noise_model=low, cfg_low_noise=3.0, boundary=0.875)[0]

    free_run = run()
    mm.free_memory(1e30, FAKE)
    fake_gpu.loads.clear()
    act = nodes.sampler.activation_memory(high.patcher.model, (1, 16, 3, 4, 4), high.dtype)
    fake_gpu.total = act + high.patcher.model_size()
    out = run()
    order = [p for p, *_ in fake_gpu.loads]
    assert [p for p in order if p is not vae.patcher] == [high.patcher, low.patcher] * 2, order
    assert order.index(vae.patcher) > order.index(low.patcher)  # clip 0 decoded after its low-noise steps
    for patcher, _, on_device in fake_gpu.loads:
        if patcher is low.patcher:
            assert on_device.get(high.patcher, 0) == 0 and on_device[low.patcher] > 0
    assert out.shape == (17, 32, 32, 3) and torch.equal(out, free_run)
