"""The pack's Wan2.2-S2V DiT (wan_core/s2v.py) against the official WanModel_S2V of the `wan22` package
(tests/official.py; flash attention replaced by an exact SDPA) on identical tiny random weights, fp32 on the CPU.

The official model is built with the S2V-14B transformer flags at a tiny width, its weights randomised (the official
zero_init would zero the injector outputs, the token-type embedding and the pose encoder), written as a safetensors
file with the official keys, and the pack's model is loaded from that file the way the loader node does it
(checkpoint.load_dit -> WanS2V.from_state_dict). Inputs are those speech2video.generate() gives the model: reference
latent, 19 motion latents (dropped on clip 0), pose latents (zeros without a pose video), this clip's audio window.
tests/test_s2v.py keeps ComfyUI's native class as the second reference."""
import pytest
import safetensors.torch
import torch

from conftest import scale_close
from official import official_s2v_model, run_official_s2v
from wan_core import checkpoint
from wan_core.s2v import AUDIO_INJECT_LAYERS, WanS2V

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.cuda.amp:FutureWarning"),  # the official code's autocast
              pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning"),
              pytest.mark.usefixtures("one_thread")]

SIZES = dict(dim=256, ffn_dim=384, num_heads=2, num_layers=5, freq_dim=256, text_dim=48, audio_dim=32,
             audio_inject_layers=list(AUDIO_INJECT_LAYERS[:2]))  # head dim 128 as every Wan; injectors after 0 and 4
FRAMES, LAT_H, LAT_W, TEXT = 3, 16, 8, 7  # 8 x 4 tokens per latent frame; frame pack 32 + 8 + 8 motion tokens



def randomize(model, seed=1, std=0.05):
    """N(0, std) everywhere, norm gains 1 + N(0, std); the audio layer weights spread over [0.2, 1.5] so their
    SiLU-normalised mix is not a plain mean."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g) * std
            is_gain = p.ndim == 1 and name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]
            p.copy_(1 + r if is_gain else r)
        model.casual_audio_encoder.weights.copy_(torch.linspace(0.2, 1.5, 25).view(1, 25, 1, 1))
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = randomize(official_s2v_model(**SIZES))
    sd = ref.state_dict()
    assert not any(k.startswith("motioner.") for k in sd) and "frame_packer.proj_4x.weight" in sd
    path = str(tmp_path_factory.mktemp("s2v") / "wan2.2_s2v_tiny.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    ck = checkpoint.load_dit(path)
    assert ck.layout == "official"
    ours = WanS2V.from_state_dict(ck.sd).eval()
    assert set(ours.state_dict()) == set(sd)  # every official weight used, none missing
    return ours, ref


def inputs(seed=2, motion=19, frames=FRAMES):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(1, 16, frames, LAT_H, LAT_W), t=torch.tensor([937]), context=r(TEXT, SIZES["text_dim"]),
                ref_latent=r(1, 16, 1, LAT_H, LAT_W), motion_latent=r(1, 16, motion, LAT_H, LAT_W),
                pose_latent=r(1, 16, frames, LAT_H, LAT_W), audio=r(1, 25, SIZES["audio_dim"], 4 * frames))


CASES = {  # name: (drop motion (clip 0), pose video, audio zeroed (the unconditional pass), motion latent frames,
    #         latent frames of the clip: 20 is the official 80-frame clip, audio window 80 frames + the 73 prefix)
    "clip0": (True, False, False, 19, FRAMES),
    "clip0-pose": (True, True, False, 19, FRAMES),
    "later-clip-pose": (False, True, False, 19, FRAMES),
    "later-clip": (False, False, False, 19, FRAMES),
    "uncond": (False, True, True, 19, FRAMES),
    "short-motion": (False, False, False, 5, FRAMES),
    "whole-clip": (False, True, False, 19, 20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_official(pair, case):
    """Velocity equal within 1e-6 of its scale (measured: 3.5e-7 to 4.7e-7 of the output's scale ~3)."""
    drop, pose, silent, motion, frames = CASES[case]
    ours, ref = pair
    a = inputs(motion=motion, frames=frames)
    if silent:
        a["audio"] = 0.0 * a["audio"]
    official_pose = a["pose_latent"] if pose else torch.zeros_like(a["pose_latent"])
    expected = run_official_s2v(ref, a["x"][0], a["t"], a["context"], a["ref_latent"], a["motion_latent"],
                                official_pose, a["audio"], drop_motion=drop)
    with torch.no_grad():
        out = ours(a["x"], a["t"].float(), a["context"][None], a["audio"], a["ref_latent"],
                   motion_latent=None if drop else a["motion_latent"], pose_latent=a["pose_latent"] if pose else None)
    assert out.shape == (1, 16, frames, LAT_H, LAT_W) and torch.isfinite(out).all() and out.std() > 1e-2
    scale_close(out[0], expected, rel=1e-6)


def test_each_conditioning_changes_the_official_output(pair):
    """A control: the audio, the motion latents, the pose and the reference all move the official output by far more
    than the tolerance, so the agreement above covers each path."""
    _, ref = pair
    a = inputs()
    base = run_official_s2v(ref, a["x"][0], a["t"], a["context"], a["ref_latent"], a["motion_latent"],
                            a["pose_latent"], a["audio"])
    for name in ("audio", "motion_latent", "pose_latent", "ref_latent"):
        b = dict(a, **{name: a[name] * 0.5})
        moved = run_official_s2v(ref, b["x"][0], b["t"], b["context"], b["ref_latent"], b["motion_latent"],
                                 b["pose_latent"], b["audio"])
        assert (moved - base).abs().max() > 1e-3 * base.abs().max(), name
