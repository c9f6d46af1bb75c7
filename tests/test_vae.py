"""Wan 2.1 VAE: parity with ComfyUI's native WanVAE on random weights, constants, loading errors, progress."""
import pytest
import torch

from conftest import import_comfy, scale_close
from wan_core.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE21, check_video_shape

DIM = 8  # tiny base width: widths 8/16/32/32


def _random_vae(seed=0, dim=DIM):
    """Our VAE with random weights, norm gammas randomised around 1 so they matter."""
    torch.manual_seed(seed)
    vae = WanVAE21(dim=dim).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return vae


def _comfy_vae(sd, dim=DIM):
    """ComfyUI's native WanVAE (Wan 2.1 config) holding the same weights, loaded strictly."""
    import_comfy()
    from comfy.ldm.wan.vae import WanVAE
    ref = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True]).eval()
    ref.load_state_dict(sd, strict=True)
    return ref


@pytest.fixture(scope="module")
def pair():
    vae = _random_vae()
    return vae, _comfy_vae(vae.state_dict())


def _norm_stats():
    return (torch.tensor(WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1),
            torch.tensor(WAN21_LATENT_STD).view(1, -1, 1, 1, 1))


def test_encode_matches_comfy(pair):
    vae, ref = pair
    torch.manual_seed(1)
    video = torch.rand(1, 3, 9, 16, 24) * 2 - 1  # 1 + 4 + 4 frames: three chunks, cache reused
    z = vae.encode(video)
    assert z.shape == (1, 16, 3, 2, 3)
    with torch.no_grad():
        mu = ref.encode(video)
    mean, std = _norm_stats()
    scale_close(z, (mu - mean) / std)
    assert z[:, :, 1:].abs().max() > 0  # later chunks carry signal


def test_decode_matches_comfy(pair):
    vae, ref = pair
    torch.manual_seed(2)
    z = torch.randn(1, 16, 3, 2, 3)
    x = vae.decode(z)
    assert x.shape == (1, 3, 9, 16, 24)
    mean, std = _norm_stats()
    with torch.no_grad():
        x_ref = ref.decode(z * std + mean).clamp(-1, 1)
    scale_close(x, x_ref)
    inside = (x.abs() < 0.999).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of pixels unclamped: test would not see differences"


def test_batch_and_single_frame(pair):
    vae, ref = pair
    torch.manual_seed(3)
    video = torch.rand(2, 3, 1, 8, 8) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 16, 1, 1, 1)
    mean, std = _norm_stats()
    with torch.no_grad():
        scale_close(z, (ref.encode(video) - mean) / std)
    assert vae.decode(z).shape == (2, 3, 1, 8, 8)


def test_constants_match_comfy():
    import_comfy()
    from comfy.latent_formats import Wan21
    fmt = Wan21()
    assert torch.equal(torch.tensor(WAN21_LATENT_MEAN), fmt.latents_mean.flatten())
    assert torch.equal(torch.tensor(WAN21_LATENT_STD), fmt.latents_std.flatten())


def test_from_state_dict_roundtrip_and_manual_cast():
    """Loads official keys (dim inferred); ComfyUI's casting ops run bf16-stored weights on fp32 input."""
    vae = _random_vae(seed=4)
    sd = vae.state_dict()
    loaded = WanVAE21.from_state_dict(sd)
    video = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    assert torch.equal(loaded.encode(video), vae.encode(video))

    comfy = import_comfy()
    import comfy.ops  # noqa: F401
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    cast = WanVAE21.from_state_dict(bf16, ops=comfy.ops.manual_cast)
    z = cast.encode(video)
    assert z.dtype == torch.float32
    scale_close(z, vae.encode(video), rel=5e-2)
    assert cast.decode(z).dtype == torch.float32


def test_from_state_dict_errors():
    with pytest.raises(ValueError, match="not a Wan 2.1 VAE: missing key 'encoder.conv1.weight'"):
        WanVAE21.from_state_dict({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)})
    sd = _random_vae().state_dict()
    wan22 = dict(sd, **{"conv2.weight": torch.zeros(48, 48, 1, 1, 1), "conv1.weight": torch.zeros(96, 96, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"looks like a Wan 2.2 VAE \(48 latent channels\)"):
        WanVAE21.from_state_dict(wan22)
    with pytest.raises(ValueError, match="missing key 'decoder.head.2.bias'"):
        WanVAE21.from_state_dict({k: v for k, v in sd.items() if k != "decoder.head.2.bias"})
    with pytest.raises(ValueError, match="unexpected key 'extra'"):
        WanVAE21.from_state_dict(dict(sd, extra=torch.zeros(1)))


@pytest.mark.parametrize("shape, message", [
    ((10, 16, 16), "length 10 is not 1+4k; use 9 or 13"),
    ((0, 16, 16), "length 0 is not 1+4k; use 1"),
    ((2, 16, 16), "length 2 is not 1+4k; use 1 or 5"),
    ((9, 100, 16), "height 100 is not a multiple of 8; use 96 or 104"),
    ((9, 16, 4), "width 4 is not a multiple of 8; use 8"),
])
def test_bad_shapes(shape, message):
    with pytest.raises(ValueError) as err:
        check_video_shape(*shape)
    assert message in str(err.value)


def test_encode_rejects_bad_frame_count():
    with pytest.raises(ValueError, match=r"length 6 is not 1\+4k; use 5 or 9"):
        _random_vae().encode(torch.zeros(1, 3, 6, 8, 8))


def test_progress_per_chunk_and_interrupt():
    vae = _random_vae(seed=5)
    video = torch.rand(1, 3, 9, 8, 8) * 2 - 1
    calls = []
    z = vae.encode(video, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    vae.decode(z, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]

    def interrupt(done, total):
        if done == 2:
            raise InterruptedError("stop")

    with pytest.raises(InterruptedError):
        vae.encode(video, progress=interrupt)
    with pytest.raises(InterruptedError):
        vae.decode(z, progress=interrupt)
    # nothing left over from the interrupted calls: results equal a fresh run
    assert torch.equal(vae.encode(video), z)
    assert torch.equal(vae.decode(z), _decode_fresh(vae, z))


def _decode_fresh(vae, z):
    fresh = WanVAE21(dim=DIM)
    fresh.load_state_dict(vae.state_dict())
    return fresh.decode(z)
