"""Wan2.2-S2V DiT parity against ComfyUI's native WanModel_S2V on identical random weights (fp32), RoPE positions
against the official rope_precompute, config from shapes, wrong-file and wrong-input errors.

ComfyUI 0.3.75 departs from the official code in two places the parity test corrects on the reference
(wan_core/s2v.py keeps the official ones): it feeds the clip's audio without the official 73-frame prefix
(first frame repeated; the first 19 encoded frames dropped), and gives the frame-pack motion buckets other RoPE
positions (4x bucket times -19..-16 instead of -19, -14, -9, -4; fractional instead of truncated spatial samples).
"""
import pytest
import torch

from conftest import import_comfy, scale_close
from wan_core.dit import WanDiT
from wan_core.s2v import AUDIO_INJECT_LAYERS, WanS2V, motion_positions
from fixtures.smoke import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(dim=256, ffn_dim=384, num_layers=5, text_dim=48, freq_dim=64, audio_dim=32, audio_layers=25,
            audio_inject_layers=AUDIO_INJECT_LAYERS[:2])  # injectors after blocks 0 and 4
B, FRAMES, LAT_H, LAT_W = 2, 3, 16, 8  # 8 x 4 tokens per latent frame
# official rope_precompute positions (frame, height, width) of the frame-pack buckets for a 16 x 8 latent
# (checked by running the official s2v_utils.rope_precompute on the grid sizes motioner.py gives it)
OFFICIAL_MOTION = {-1: ([-1], range(8), range(4)), -3: ([-3], [0, 2, 4, 7], [0, 3]),
                   -19: ([-19, -14, -9, -4], [0, 7], [0])}



def native_s2v(cfg):
    import_comfy()
    import comfy.ops
    from comfy.ldm.wan.model import WanModel_S2V
    return WanModel_S2V(dim=cfg["dim"], ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"],
                        num_heads=cfg["dim"] // 128, text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"],
                        audio_dim=cfg["audio_dim"], audio_inject_layers=list(cfg["audio_inject_layers"]),
                        operations=comfy.ops.disable_weight_init)


def officialise(ref):
    """Patch the reference's two departures from the official code (see the module docstring)."""
    rope_encode, encoder = ref.rope_encode, ref.casual_audio_encoder.forward

    def rope(t, h, w, t_start=0, **kw):
        if t_start not in OFFICIAL_MOTION:
            return rope_encode(t, h, w, t_start=t_start, **kw)
        axes = [torch.tensor(list(p), dtype=torch.float32) for p in OFFICIAL_MOTION[t_start]]
        ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3)
        return ref.rope_embedder(ids).movedim(1, 2)

    def audio(features):
        prefixed = torch.cat([features[..., :1].repeat(1, 1, 1, 73), features], dim=-1)
        return tuple(o[:, 19:] for o in encoder(prefixed))

    ref.rope_encode, ref.casual_audio_encoder.forward = rope, audio
    return ref


def make_pair(patch=True):
    ours = randomize_(WanS2V(**TINY), seed=1).eval()
    with torch.no_grad():  # mixing weights SiLU(w) / sum SiLU(w) must not divide by ~0
        ours.casual_audio_encoder.weights.copy_(torch.linspace(0.2, 1.5, 25).view(1, 25, 1, 1))
    ref = native_s2v(TINY).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, officialise(ref) if patch else ref


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ctx = torch.zeros(B, 512, TINY["text_dim"])
    ctx[:, :7] = r(B, 7, TINY["text_dim"])
    return dict(x=r(B, 16, FRAMES, LAT_H, LAT_W), t=torch.tensor([999.0, 437.0]), context=ctx,
                audio=r(B, 25, TINY["audio_dim"], 4 * FRAMES), ref_latent=r(B, 16, 1, LAT_H, LAT_W),
                motion_latent=r(B, 16, 19, LAT_H, LAT_W), pose_latent=r(B, 16, FRAMES, LAT_H, LAT_W))


def run_native(ref, a):
    pose = torch.zeros_like(a["x"]) if a["pose_latent"] is None else a["pose_latent"]  # ComfyUI's node feeds zeros
    with torch.no_grad():
        return ref(a["x"], a["t"], a["context"], audio_embed=a["audio"], reference_latent=a["ref_latent"],
                   reference_motion=a["motion_latent"], control_video=pose)


def run_ours(ours, a):
    with torch.no_grad():
        return ours(**dict(a, context=a["context"][:, :7]))  # ours pads the text to 512 itself


@pytest.mark.parametrize("motion,pose", [(True, True), (False, False), (True, False)])
def test_forward_matches_native(pair, motion, pose):
    ours, ref = pair
    a = inputs()
    a["motion_latent"] = a["motion_latent"] if motion else None  # None: clip 0, no motion tokens
    a["pose_latent"] = a["pose_latent"] if pose else None
    out = run_ours(ours, a)
    assert out.shape == a["x"].shape and out.abs().max() > 1e-2
    scale_close(out, run_native(ref, a))


def test_short_motion_is_zero_padded(pair):
    """Fewer than 19 motion latents: zero frames fill the oldest slots (official padd_lat), as in ComfyUI."""
    ours, ref = pair
    a = inputs(3)
    a["motion_latent"] = a["motion_latent"][:, :, :5]
    scale_close(run_ours(ours, a), run_native(ref, a))
    padded = torch.cat([torch.zeros(B, 16, 14, LAT_H, LAT_W), a["motion_latent"]], dim=2)
    assert torch.equal(run_ours(ours, a), run_ours(ours, dict(a, motion_latent=padded)))


def test_official_conventions_differ_from_unpatched_native():
    """The two corrections matter: unpatched ComfyUI gives a different velocity (each departure on its own)."""
    ours, raw = make_pair(patch=False)
    a = inputs()
    out = run_ours(ours, a)
    rel = (out - run_native(raw, a)).abs().max() / out.abs().max()
    assert rel > 1e-3
    ours.audio_prefix = 0  # ComfyUI's audio convention: only the motion positions still differ
    rel = (run_ours(ours, a) - run_native(raw, a)).abs().max() / out.abs().max()
    assert rel > 1e-3
    scale_close(run_ours(ours, dict(a, motion_latent=None)), run_native(raw, dict(a, motion_latent=None)))


def test_motion_rope_positions_match_official():
    assert [tuple(map(list, g)) for g in motion_positions(LAT_H, LAT_W)] == [
        tuple(map(list, OFFICIAL_MOTION[k])) for k in (-1, -3, -19)]
    _, (t2, h2, w2), (t4, h4, w4) = motion_positions(104, 60)  # 832 x 480
    assert list(t2) == [-3] and list(t4) == [-19, -14, -9, -4]
    assert list(h2)[-3:] == [46, 48, 51] and list(w2)[-2:] == [26, 29]
    assert list(h4) == [0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51] and list(w4) == [0, 4, 9, 14, 19, 24, 29]


def test_config_from_state_dict_round_trip():
    model = randomize_(WanS2V(**TINY), seed=4)
    sd = model.state_dict()
    cfg = WanS2V.config_from_state_dict(sd)
    assert cfg == dict(TINY, patch_size=(1, 2, 2), in_dim=16, out_dim=16, audio_tokens=4, cond_dim=16)
    loaded = WanS2V.from_state_dict(dict(sd))
    assert loaded.variant_name == "Wan 2.2 S2V-dim 256"
    assert loaded.audio_injector.block_ids == {0: 0, 4: 1}
    a = inputs()
    torch.testing.assert_close(run_ours(loaded, a), run_ours(model, a), rtol=0, atol=0)
    full = WanS2V.config_from_state_dict({k: v for k, v in WanS2V(**dict(TINY, audio_inject_layers=AUDIO_INJECT_LAYERS))
                                          .state_dict().items()})
    assert full["audio_inject_layers"] == AUDIO_INJECT_LAYERS


def test_wrong_files_are_refused():
    s2v = WanS2V(**TINY).state_dict()
    with pytest.raises(ValueError, match="S2V .*WanS2V"):
        WanDiT.from_state_dict(s2v)
    t2v = WanDiT(dim=256, ffn_dim=384, num_layers=2, text_dim=48, freq_dim=64).state_dict()
    with pytest.raises(ValueError, match="not a Wan2.2-S2V checkpoint"):
        WanS2V.from_state_dict(t2v)


def test_input_errors_and_batch_broadcast(pair):
    ours, _ = pair
    a = inputs()
    for change, message in [(dict(audio=None), "audio must be wav2vec2 hidden states"),
                            (dict(audio=a["audio"][:, :12]), "audio must be wav2vec2 hidden states"),
                            (dict(audio=a["audio"][..., :7]), "needs 12"),
                            (dict(ref_latent=None), "reference image"),
                            (dict(ref_latent=a["x"]), "reference image"),
                            (dict(motion_latent=a["motion_latent"][..., :4]), "motion_latent must be"),
                            (dict(pose_latent=a["pose_latent"][:, :, :2]), "pose_latent must match"),
                            (dict(ref_latent=torch.zeros(3, 16, 1, LAT_H, LAT_W)), "ref_latent has batch 3")]:
        with pytest.raises(ValueError, match=message):
            run_ours(ours, dict(a, **change))
    one = {k: a[k][:1] for k in ("ref_latent", "motion_latent", "pose_latent")}
    same = {k: v.expand(B, *v.shape[1:]) for k, v in one.items()}
    torch.testing.assert_close(run_ours(ours, dict(a, **one)), run_ours(ours, dict(a, **same)), rtol=0, atol=0)


def test_latent_sizes_not_multiple_of_8():
    """Motion buckets floor like the official convs (e.g. 480 px -> 60 latent rows): RoPE rows match the tokens."""
    ours = WanS2V(**dict(TINY, num_layers=1, audio_inject_layers=(0,)))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 1, 12, 10, generator=g)
    out = run_ours(ours, dict(x=x, t=torch.tensor([500.0]), context=torch.randn(1, 3, TINY["text_dim"], generator=g),
                              audio=torch.randn(1, 25, TINY["audio_dim"], 4, generator=g), ref_latent=x,
                              motion_latent=torch.randn(1, 16, 19, 12, 10, generator=g), pose_latent=None))
    assert out.shape == x.shape and torch.isfinite(out).all()
