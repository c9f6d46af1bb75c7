"""Wan 2.2 VAE: parity with ComfyUI's native vae2_2.WanVAE on random weights, constants, loading errors, progress."""
import pytest
import torch

from conftest import import_comfy, scale_close
from wan_core.vae import WanVAE21
from wan_core.vae22 import WAN22_LATENT_MEAN, WAN22_LATENT_STD, WanVAE22, check_video_shape22

DIM, DEC_DIM = 8, 12  # tiny widths: encoder 8/8/16/32/32, decoder 48/48/48/24/12 (different, so inference is tested)


def _random_vae(seed=0):
    """Our VAE with random weights, norm gammas randomised around 1 so they matter."""
    torch.manual_seed(seed)
    vae = WanVAE22(dim=DIM, dec_dim=DEC_DIM).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return vae


def _comfy_vae(sd):
    """ComfyUI's native Wan 2.2 VAE (its loader's config) holding the same weights, loaded strictly."""
    import_comfy()
    from comfy.ldm.wan.vae2_2 import WanVAE
    ref = WanVAE(dim=DIM, dec_dim=DEC_DIM, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True]).eval()
    ref.load_state_dict(sd, strict=True)
    return ref


@pytest.fixture(scope="module")
def pair():
    vae = _random_vae()
    return vae, _comfy_vae(vae.state_dict())


def _norm_stats():
    return (torch.tensor(WAN22_LATENT_MEAN).view(1, -1, 1, 1, 1),
            torch.tensor(WAN22_LATENT_STD).view(1, -1, 1, 1, 1))


def test_encode_matches_comfy(pair):
    vae, ref = pair
    torch.manual_seed(1)
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1  # 1 + 4 + 4 frames: three chunks, cache reused
    z = vae.encode(video)
    assert z.shape == (1, 48, 3, 2, 3)
    with torch.no_grad():
        mu = ref.encode(video)
    mean, std = _norm_stats()
    scale_close(z, (mu - mean) / std)
    assert z[:, :, 1:].abs().max() > 0  # later chunks carry signal


def test_decode_matches_comfy(pair):
    vae, ref = pair
    torch.manual_seed(2)
    z = torch.randn(1, 48, 3, 2, 3)
    x = vae.decode(z)
    assert x.shape == (1, 3, 9, 32, 48)
    mean, std = _norm_stats()
    with torch.no_grad():
        x_ref = ref.decode(z * std + mean).clamp(-1, 1)
    scale_close(x, x_ref)
    inside = (x.abs() < 0.999).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of pixels unclamped: test would not see differences"


def test_batch_and_single_frame(pair):
    vae, ref = pair
    torch.manual_seed(3)
    video = torch.rand(2, 3, 1, 16, 32) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 48, 1, 1, 2)
    mean, std = _norm_stats()
    with torch.no_grad():
        scale_close(z, (ref.encode(video) - mean) / std)
        scale_close(vae.decode(z), ref.decode(z * std + mean).clamp(-1, 1))


@pytest.mark.parametrize("wide, narrow, ft, fs, t",
                         [(8, 16, 2, 2, 1), (8, 16, 2, 2, 4), (12, 6, 1, 2, 3), (4, 4, 2, 1, 2)])
def test_shortcuts_match_comfy(wide, narrow, ft, fs, t):
    """The parameter-free shortcuts alone, also in layouts the official widths never reach (in the 2.2
    decoder every temporal stage keeps its width, so its duplicated frames are identical copies)."""
    import_comfy()
    from comfy.ldm.wan.vae2_2 import AvgDown3D, DupUp3D
    from wan_core.vae22 import _avg_down, _dup_up
    torch.manual_seed(6)
    x = torch.randn(2, wide, t, 4, 6)
    assert torch.equal(_avg_down(x, narrow, ft, fs), AvgDown3D(wide, narrow, ft, fs)(x))
    y = torch.randn(2, narrow, t, 4, 6)
    assert torch.equal(_dup_up(y, wide, ft, fs), DupUp3D(narrow, wide, ft, fs)(y))
    assert torch.equal(_dup_up(y, wide, ft, fs)[:, :, ft - 1:], DupUp3D(narrow, wide, ft, fs)(y, first_chunk=True))


def test_narrowing_temporal_up_block_matches_comfy():
    """A temporal up stage that narrows (16 -> 8; not in the official widths), chunk by chunk through the
    frame cache, so the first chunk's dropped duplicate frame is visible."""
    import_comfy()
    from comfy.ldm.wan.vae2_2 import Up_ResidualBlock, count_conv3d
    from wan_core.vae import _FrameCache
    from wan_core.vae22 import UpBlock
    torch.manual_seed(7)
    ours = UpBlock(16, 8, 1, True, True, torch.nn)
    ref = Up_ResidualBlock(16, 8, 0.0, 1, temperal_upsample=True, up_flag=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    cache, feats = _FrameCache(), [None] * count_conv3d(ref)
    with torch.no_grad():
        for i, x in enumerate(torch.randn(1, 16, 3, 4, 4).split(1, dim=2)):
            cache.next_chunk()
            y = ours(x, cache)
            scale_close(y, ref(x, feats, [0], first_chunk=i == 0))
            assert y.shape[2] == (1 if i == 0 else 2)


def test_constants_match_comfy():
    import_comfy()
    from comfy.latent_formats import Wan22
    fmt = Wan22()
    assert len(WAN22_LATENT_MEAN) == len(WAN22_LATENT_STD) == WanVAE22.z_dim == 48
    assert torch.equal(torch.tensor(WAN22_LATENT_MEAN), fmt.latents_mean.flatten())
    assert torch.equal(torch.tensor(WAN22_LATENT_STD), fmt.latents_std.flatten())


def test_from_state_dict_roundtrip_and_manual_cast():
    """Loads official keys (dim and dec_dim inferred); ComfyUI's casting ops run bf16-stored weights on fp32 input."""
    vae = _random_vae(seed=4)
    sd = vae.state_dict()
    loaded = WanVAE22.from_state_dict(sd)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(video), vae.encode(video))

    comfy = import_comfy()
    import comfy.ops  # noqa: F401
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    cast = WanVAE22.from_state_dict(bf16, ops=comfy.ops.manual_cast)
    z = cast.encode(video)
    assert z.dtype == torch.float32
    scale_close(z, vae.encode(video), rel=5e-2)
    assert cast.decode(z).dtype == torch.float32


def test_from_state_dict_errors():
    with pytest.raises(ValueError, match="not a Wan VAE: missing key 'encoder.conv1.weight'"):
        WanVAE22.from_state_dict({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="16 latent channels: this is the Wan 2.1 VAE"):
        WanVAE22.from_state_dict(WanVAE21(dim=4).state_dict())
    sd = _random_vae().state_dict()
    with pytest.raises(ValueError, match="not a Wan 2.2 VAE: missing key 'decoder.head.2.bias'"):
        WanVAE22.from_state_dict({k: v for k, v in sd.items() if k != "decoder.head.2.bias"})
    with pytest.raises(ValueError, match="not a Wan 2.2 VAE: unexpected key 'extra'"):
        WanVAE22.from_state_dict(dict(sd, extra=torch.zeros(1)))
    bad = dict(sd, **{"decoder.conv1.weight": torch.zeros(40, 48, 3, 3, 3)})
    with pytest.raises(ValueError, match=r"'decoder.conv1.weight' has shape \(40, 48, 3, 3, 3\), expected \(48, "):
        WanVAE22.from_state_dict(bad)
    with pytest.raises(ValueError, match="not a Wan 2.2 VAE: 32 latent channels"):
        WanVAE22.from_state_dict(dict(sd, **{"conv2.weight": torch.zeros(32, 32, 1, 1, 1)}))


@pytest.mark.parametrize("shape, message", [
    ((10, 32, 32), "length 10 is not 1+4k; use 9 or 13"),
    ((9, 24, 32), "height 24 is not a multiple of 16; use 16 or 32"),
    ((9, 32, 8), "width 8 is not a multiple of 16; use 16"),
    ((2, 40, 32), "length 2 is not 1+4k; use 1 or 5; height 40 is not a multiple of 16; use 32 or 48"),
])
def test_bad_shapes(shape, message):
    with pytest.raises(ValueError) as err:
        check_video_shape22(*shape)
    assert message in str(err.value)


def test_encode_decode_reject_bad_inputs():
    vae = _random_vae()
    with pytest.raises(ValueError, match="height 8 is not a multiple of 16; use 16"):
        vae.encode(torch.zeros(1, 3, 5, 8, 16))
    with pytest.raises(ValueError, match=r"expected latent \[B,48,t,h,w\], got shape \(1, 16, 2, 2, 2\)"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))


def test_progress_per_chunk_and_interrupt():
    vae = _random_vae(seed=5)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
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
    # nothing left over from the interrupted calls: results equal the earlier runs
    assert torch.equal(vae.encode(video), z)
    assert torch.equal(vae.decode(z), x)
