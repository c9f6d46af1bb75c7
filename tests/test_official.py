"""The pack against the official Wan 2.2 code (tests/official.py) run on the CPU, device cpu standing in for cuda:
the official generate() functions with stub models that record what they are given (the noise, the image fed to
the VAE), compared with the pack's seed_mode / sizing "official"."""
import importlib.machinery
import sys
import types

import pytest
import torch

from official import official
from wan_core.conditioning import official_i2v_pixels, official_s2v_size
from wan_core.pipeline import initial_noise


class Stop(Exception):
    pass


class RecordingVAE:
    """Records the videos the official code encodes; returns zero latents of the right shape."""

    def __init__(self):
        self.encoded = []
        self.model = types.SimpleNamespace(z_dim=16)

    def encode(self, videos):
        self.encoded.append([v.clone() for v in videos])
        return [torch.zeros(16, (v.shape[1] - 1) // 4 + 1, v.shape[2] // 8, v.shape[3] // 8) for v in videos]


def first_model_input(cls, call, **attrs):
    """Run cls.generate (via `call`) on a bare instance whose model raises Stop with its first input."""
    def model(x, t=None, **_):
        raise Stop(x)
    obj = object.__new__(cls)
    obj.__dict__.update(device=torch.device("cpu"), vae_stride=(4, 8, 8), patch_size=(1, 2, 2), sp_size=1,
                        sample_neg_prompt="", t5_cpu=True, text_encoder=lambda texts, device: [torch.zeros(3, 8)],
                        vae=RecordingVAE(), lightning=False, boundary=0.9, num_train_timesteps=1000,
                        param_dtype=torch.float32, rank=0, low_noise_model=None, high_noise_model=None,
                        _prepare_model_for_timestep=lambda t, boundary, offload: model, **attrs)
    with pytest.raises(Stop) as stop:
        call(obj)
    x = stop.value.args[0]
    return (x[0] if isinstance(x, list) else x), obj


@pytest.mark.parametrize("seed", [0, 42, 2**40 + 7])
def test_official_seed_mode_draws_the_official_t2v_noise(seed):
    t2v = official("text2video").WanT2V
    noise, _ = first_model_input(t2v, lambda o: o.generate("p", size=(64, 48), frame_num=9, sampling_steps=2,
                                                           seed=seed, offload_model=False))
    mine = initial_noise((1, 16, 3, 6, 8), seed, "official", "cpu")
    assert noise.shape == (16, 3, 6, 8) and torch.equal(mine[0], noise)
    assert mine.dtype == torch.float32 and mine.std() > 0.5


def test_official_sizing_and_noise_match_official_i2v():
    """Official image2video on a 37 x 53 image at max_area 64 x 48: the image the official code encodes (frame 0 of
    the video it hands the VAE) equals the pack's official sizing; its noise equals seed_mode official's."""
    i2v = official("image2video").WanI2V
    from PIL import Image
    g = torch.Generator().manual_seed(3)
    pixels = (torch.rand(37, 53, 3, generator=g) * 255).round().to(torch.uint8)
    img = Image.fromarray(pixels.numpy())
    noise, obj = first_model_input(i2v, lambda o: o.generate("p", img, max_area=64 * 48, frame_num=5, sampling_steps=2,
                                                             seed=5, offload_model=False))
    video = obj.vae.encoded[0][0]
    start = pixels.permute(2, 0, 1)[None].float() / 255 * 2 - 1
    mine, _ = official_i2v_pixels(start, None, 64 * 48)
    assert video.shape[-2:] == mine.shape[-2:] == (32, 64)  # 53:37 at about 64 x 48 pixels, sides of 16
    torch.testing.assert_close(mine[0], video[:, 0], rtol=0, atol=1e-6)
    assert not video[:, 1:].any()
    h, w = mine.shape[-2:]
    assert torch.equal(initial_noise((1, 16, 2, h // 8, w // 8), 5, "official", "cpu")[0], noise)


def stub_video_modules():
    """speech2video imports decord and librosa at the top; neither is used by the size function."""
    for name in ("decord", "librosa"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # diffusers asks find_spec about librosa
            module.VideoReader = module.load = None
            sys.modules[name] = module


@pytest.mark.parametrize("area", [832 * 480, 1280 * 720, 1024 * 704, 64 * 64, 320 * 192])
def test_official_s2v_size_matches_get_size_less_than_area(area):
    stub_video_modules()
    s2v = official("speech2video").WanS2V
    for h, w in [(480, 832), (720, 1280), (1024, 1024), (37, 53), (1080, 1920), (500, 333), (96, 4000), (2000, 90)]:
        assert official_s2v_size(h, w, area) == tuple(s2v.get_size_less_than_area(None, h, w, target_area=area)), (h, w)


@pytest.mark.parametrize("size, area", [((53, 37), 64 * 64), ((200, 120), 128 * 64), ((90, 300), 128 * 128)])
def test_official_s2v_pixels_match_the_official_pil_path(size, area):
    """The official S2V reference image: torchvision Resize(min side) + CenterCrop on the PIL image, ToTensor, * 2 - 1.
    The pack resizes the tensor (bilinear, antialias) and rounds to 8-bit levels: within 2 levels of PIL's, mean
    difference under a quarter level (PIL's fixed-point filter rounds differently)."""
    from PIL import Image
    from torchvision import transforms
    from wan_core.conditioning import official_s2v_pixels
    w, h = size
    g = torch.Generator().manual_seed(w)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(h, w), mode="bicubic")
    pixels = (smooth.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    th, tw = official_s2v_size(h, w, area)
    ref = transforms.ToTensor()(transforms.CenterCrop((th, tw))(transforms.Resize(min(th, tw))(
        Image.fromarray(pixels.numpy())))) * 2 - 1
    mine = official_s2v_pixels(pixels.permute(2, 0, 1)[None].float() / 255 * 2 - 1, th, tw)[0]
    assert mine.shape == ref.shape == (3, th, tw)
    diff = (mine - ref).abs() * 127.5  # in 8-bit levels
    assert diff.max() <= 2 and diff.mean() < 0.25, (diff.max().item(), diff.mean().item())


class S2VStubVAE:
    """Zero latents/videos of the right shapes for the official speech2video loop (dtype/device as it reads them)."""
    dtype, device = torch.bfloat16, torch.device("cpu")

    def encode(self, videos):
        return [torch.zeros(16, (v.shape[1] - 1) // 4 + 1, v.shape[2] // 8, v.shape[3] // 8) for v in videos]

    def decode(self, latents):
        return [torch.zeros(3, (z.shape[1] - 1) * 4 + 1, z.shape[2] * 8, z.shape[3] * 8) for z in latents]


@pytest.mark.parametrize("seed", [7, 2**64 - 1])
def test_official_seed_mode_draws_the_official_s2v_noise_per_clip(seed, tmp_path):
    """The official speech2video generate(), 2 clips of 80 frames, 1 step, cfg 1, its DiT a stub that records what
    it is given: clip r's noise (bfloat16, torch.Generator(device) seeded seed + r) equals what the pack's S2V draws
    in seed_mode official (wan_core.s2v_pipeline: initial_noise(..., seed + clip, "official", device, bfloat16)).
    The official code overflows at seed + 1 = 2^64 (the pack wraps), so the second seed checks clip 0 only."""
    from PIL import Image
    from wan_core.s2v_pipeline import LATENTS_PER_CLIP
    stub_video_modules()
    s2v = official("speech2video").WanS2V
    Image.new("RGB", (64, 64), (90, 120, 30)).save(tmp_path / "ref.png")
    seen = []

    def noise_model(x, t=None, **_):
        seen.append(x[0].clone())
        return [torch.zeros_like(x[0])]
    obj = object.__new__(s2v)
    obj.__dict__.update(device=torch.device("cpu"), param_dtype=torch.bfloat16, motion_frames=73, drop_first_motion=True,
                        fps=16, sample_neg_prompt="", t5_cpu=True, text_encoder=lambda texts, device: [torch.zeros(3, 8)],
                        vae=S2VStubVAE(), encode_audio=lambda path, infer_frames: (torch.zeros(1, 8, 2 * infer_frames), 2),
                        noise_model=noise_model, num_train_timesteps=1000, init_on_cpu=False, rank=0)
    clips = 2 if seed + 1 < 2**63 else 1
    obj.generate("p", str(tmp_path / "ref.png"), "speech.wav", False, None, None, None, num_repeat=clips,
                 max_area=64 * 64, sampling_steps=1, guide_scale=1.0, seed=seed, offload_model=False)
    assert len(seen) == clips
    for clip, noise in enumerate(seen):
        assert noise.dtype == torch.bfloat16 and noise.shape == (16, LATENTS_PER_CLIP, 8, 8)
        mine = initial_noise((1, 16, LATENTS_PER_CLIP, 8, 8), seed + clip, "official", "cpu", torch.bfloat16)
        assert torch.equal(mine[0], noise.float()), clip
