"""Wan 2.2 VAE only: the parameter-free shortcuts and a narrowing up stage vs ComfyUI's vae2_2 blocks, loading
errors, bad inputs (parity, constants, loading, progress and the shape check for both families: test_vae.py)."""
import pytest
import torch

from conftest import import_comfy, scale_close
from test_vae import FAMILIES, random_vae
from wan_core.vae import WanVAE21
from wan_core.vae22 import WanVAE22

WAN22 = FAMILIES["2.2"]


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


def test_from_state_dict_errors():
    with pytest.raises(ValueError, match="not a Wan VAE: missing key 'encoder.conv1.weight'"):
        WanVAE22.from_state_dict({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="16 latent channels: this is the Wan 2.1 VAE"):
        WanVAE22.from_state_dict(WanVAE21(dim=4).state_dict())
    sd = random_vae(WAN22).state_dict()
    with pytest.raises(ValueError, match="not a Wan 2.2 VAE: missing key 'decoder.head.2.bias'"):
        WanVAE22.from_state_dict({k: v for k, v in sd.items() if k != "decoder.head.2.bias"})
    with pytest.raises(ValueError, match="not a Wan 2.2 VAE: unexpected key 'extra'"):
        WanVAE22.from_state_dict(dict(sd, extra=torch.zeros(1)))
    bad = dict(sd, **{"decoder.conv1.weight": torch.zeros(40, 48, 3, 3, 3)})
    with pytest.raises(ValueError, match=r"'decoder.conv1.weight' has shape \(40, 48, 3, 3, 3\), expected \(48, "):
        WanVAE22.from_state_dict(bad)
    with pytest.raises(ValueError, match="not a Wan 2.2 VAE: 32 latent channels"):
        WanVAE22.from_state_dict(dict(sd, **{"conv2.weight": torch.zeros(32, 32, 1, 1, 1)}))


def test_encode_decode_reject_bad_inputs():
    vae = random_vae(WAN22)
    with pytest.raises(ValueError, match="height 8 is not a multiple of 16; use 16"):
        vae.encode(torch.zeros(1, 3, 5, 8, 16))
    with pytest.raises(ValueError, match=r"expected latent \[B,48,t,h,w\], got shape \(1, 16, 2, 2, 2\)"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))
