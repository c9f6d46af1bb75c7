"""Wan VAEs: parity with ComfyUI's native WanVAE (2.1) and vae2_2.WanVAE (2.2) on random weights, constants,
loading, progress, for both families; the shape check for both; the Wan 2.1 loading errors (2.2's: test_vae22.py)."""
import importlib
from collections import namedtuple

import pytest
import torch

from conftest import import_comfy, scale_close
from wan_core.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE21, check_video_shape
from wan_core.vae22 import WAN22_LATENT_MEAN, WAN22_LATENT_STD, WanVAE22

# cls and its tiny widths; ComfyUI's module (same config as its loader) and latent format; latent channels,
# pixels per latent, the latent (h, w) of the batched single-frame test.
Family = namedtuple("Family", "cls tiny comfy_module comfy_format mean std z stride single_hw")
FAMILIES = {
    # widths 8/16/32/32
    "2.1": Family(WanVAE21, dict(dim=8), "comfy.ldm.wan.vae", "Wan21", WAN21_LATENT_MEAN, WAN21_LATENT_STD,
                  16, 8, (1, 1)),
    # encoder 8/8/16/32/32, decoder 48/48/48/24/12 (different, so inference is tested)
    "2.2": Family(WanVAE22, dict(dim=8, dec_dim=12), "comfy.ldm.wan.vae2_2", "Wan22", WAN22_LATENT_MEAN,
                  WAN22_LATENT_STD, 48, 16, (1, 2)),
}
WAN21 = FAMILIES["2.1"]


def random_vae(family, seed=0):
    """Our VAE with random weights, norm gammas randomised around 1 so they matter."""
    torch.manual_seed(seed)
    vae = family.cls(**family.tiny).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return vae


def _comfy_vae(family, sd):
    """ComfyUI's native VAE class for the family (its loader's config) holding the same weights, loaded strictly."""
    import_comfy()
    WanVAE = importlib.import_module(family.comfy_module).WanVAE
    ref = WanVAE(**family.tiny, z_dim=family.z, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True]).eval()
    ref.load_state_dict(sd, strict=True)
    return ref


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def pair(family):
    vae = random_vae(family)
    return vae, _comfy_vae(family, vae.state_dict())


def _norm_stats(family):
    return (torch.tensor(family.mean).view(1, -1, 1, 1, 1),
            torch.tensor(family.std).view(1, -1, 1, 1, 1))


def test_encode_matches_comfy(family, pair):
    vae, ref = pair
    torch.manual_seed(1)
    video = torch.rand(1, 3, 9, 2 * family.stride, 3 * family.stride) * 2 - 1  # 1 + 4 + 4 frames: three chunks
    z = vae.encode(video)
    assert z.shape == (1, family.z, 3, 2, 3)
    with torch.no_grad():
        mu = ref.encode(video)
    mean, std = _norm_stats(family)
    scale_close(z, (mu - mean) / std)
    assert z[:, :, 1:].abs().max() > 0  # later chunks carry signal (the cache is reused)


def test_decode_matches_comfy(family, pair):
    vae, ref = pair
    torch.manual_seed(2)
    z = torch.randn(1, family.z, 3, 2, 3)
    x = vae.decode(z)
    assert x.shape == (1, 3, 9, 2 * family.stride, 3 * family.stride)
    mean, std = _norm_stats(family)
    with torch.no_grad():
        x_ref = ref.decode(z * std + mean).clamp(-1, 1)
    scale_close(x, x_ref)
    inside = (x.abs() < 0.999).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of pixels unclamped: test would not see differences"


def test_batch_and_single_frame(family, pair):
    vae, ref = pair
    torch.manual_seed(3)
    h, w = family.single_hw
    video = torch.rand(2, 3, 1, h * family.stride, w * family.stride) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, family.z, 1, h, w)
    mean, std = _norm_stats(family)
    with torch.no_grad():
        scale_close(z, (ref.encode(video) - mean) / std)
        x = vae.decode(z)
        assert x.shape == video.shape
        scale_close(x, ref.decode(z * std + mean).clamp(-1, 1))


def test_constants_match_comfy(family):
    import_comfy()
    import comfy.latent_formats
    fmt = getattr(comfy.latent_formats, family.comfy_format)()
    assert len(family.mean) == len(family.std) == family.cls.z_dim == family.z
    assert torch.equal(torch.tensor(family.mean), fmt.latents_mean.flatten())
    assert torch.equal(torch.tensor(family.std), fmt.latents_std.flatten())


def test_from_state_dict_roundtrip_and_manual_cast(family):
    """Loads official keys (widths inferred); ComfyUI's casting ops run bf16-stored weights on fp32 input."""
    vae = random_vae(family, seed=4)
    sd = vae.state_dict()
    loaded = family.cls.from_state_dict(sd)
    video = torch.rand(1, 3, 5, family.stride, family.stride) * 2 - 1
    assert torch.equal(loaded.encode(video), vae.encode(video))

    comfy = import_comfy()
    import comfy.ops  # noqa: F401
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    cast = family.cls.from_state_dict(bf16, ops=comfy.ops.manual_cast)
    z = cast.encode(video)
    assert z.dtype == torch.float32
    scale_close(z, vae.encode(video), rel=5e-2)
    assert cast.decode(z).dtype == torch.float32


def test_progress_per_chunk_and_interrupt(family):
    vae = random_vae(family, seed=5)
    video = torch.rand(1, 3, 9, family.stride, family.stride) * 2 - 1
    calls = []
    z = vae.encode(video, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    x = vae.decode(z, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]

    def interrupt(done, total):
        if done == 2:
            raise InterruptedError("stop")

    with pytest.raises(InterruptedError):
        vae.encode(video, progress=interrupt)
    with pytest.raises(InterruptedError):
        vae.decode(z, progress=interrupt)
    # nothing left over from the interrupted calls: results equal the earlier runs and a fresh model's
    assert torch.equal(vae.encode(video), z)
    assert torch.equal(vae.decode(z), x)
    fresh = family.cls(**family.tiny)
    fresh.load_state_dict(vae.state_dict())
    assert torch.equal(fresh.decode(z), x)


# ----------------------------------------------------------------------------- Wan 2.1 only (and the shape check)

def test_from_state_dict_errors():
    with pytest.raises(ValueError, match="not a Wan 2.1 VAE: missing key 'encoder.conv1.weight'"):
        WanVAE21.from_state_dict({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)})
    sd = random_vae(WAN21).state_dict()
    wan22 = dict(sd, **{"conv2.weight": torch.zeros(48, 48, 1, 1, 1), "conv1.weight": torch.zeros(96, 96, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"looks like a Wan 2.2 VAE \(48 latent channels\)"):
        WanVAE21.from_state_dict(wan22)
    with pytest.raises(ValueError, match="missing key 'decoder.head.2.bias'"):
        WanVAE21.from_state_dict({k: v for k, v in sd.items() if k != "decoder.head.2.bias"})
    with pytest.raises(ValueError, match="unexpected key 'extra'"):
        WanVAE21.from_state_dict(dict(sd, extra=torch.zeros(1)))


@pytest.mark.parametrize("multiple, shape, message", [
    (8, (10, 16, 16), "length 10 is not 1+4k; use 9 or 13"),
    (8, (0, 16, 16), "length 0 is not 1+4k; use 1"),
    (8, (2, 16, 16), "length 2 is not 1+4k; use 1 or 5"),
    (8, (9, 100, 16), "height 100 is not a multiple of 8; use 96 or 104"),
    (8, (9, 16, 4), "width 4 is not a multiple of 8; use 8"),
    (16, (10, 32, 32), "length 10 is not 1+4k; use 9 or 13"),  # Wan 2.2
    (16, (9, 24, 32), "height 24 is not a multiple of 16; use 16 or 32"),
    (16, (9, 32, 8), "width 8 is not a multiple of 16; use 16"),
    (16, (2, 40, 32), "length 2 is not 1+4k; use 1 or 5; height 40 is not a multiple of 16; use 32 or 48"),
])
def test_bad_shapes(multiple, shape, message):
    with pytest.raises(ValueError) as err:
        check_video_shape(*shape, multiple=multiple)
    assert message in str(err.value)


def test_encode_rejects_bad_frame_count():
    with pytest.raises(ValueError, match=r"length 6 is not 1\+4k; use 5 or 9"):
        random_vae(WAN21).encode(torch.zeros(1, 3, 6, 8, 8))
