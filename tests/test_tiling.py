"""Tiled VAE decode: blending math, equality with the untiled decode away from seams, the tile chooser.

Stated tolerance (smoke-size Wan 2.1 VAE, random weights, pixels in [-1, 1]): with the middle block's
per-frame attention (which sees the whole tile, so no tile is exact anywhere) max |tiled - untiled|
<= 0.25 and mean <= 0.03; with that attention taken out, tiles equal the untiled decode to 1e-5 at
>= 64 px (8 latents) from every interior tile edge, i.e. the blending adds no error of its own.
"""
import pytest
import torch

from test_vae import FAMILIES, random_vae
from wan_core import tiling
from wan_core.tiling import _starts, auto_tile, decode, decode_bytes, tiled_decode
from wan_core.vae import AttentionBlock


class LocalVAE:
    """A decoder with no receptive field: each latent pixel -> s x s pixels, frames 1 + 4(t-1); optionally
    `band` pixels along the border of whatever it decodes get +1 (like the zero-padding effect at tile edges)."""

    def __init__(self, s=8, band=0):
        self.s, self.band, self.calls = s, band, []

    def decode(self, z, progress=None):
        self.calls.append(tuple(z.shape))
        x = torch.tanh(z[:, :3] + z[:, 3:6] * z[:, 6:9])
        x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        x = x.repeat_interleave(self.s, -1).repeat_interleave(self.s, -2)
        if self.band:
            b, inner = self.band, torch.zeros_like(x)
            inner[..., b:-b, b:-b] = 1
            x = x + (1 - inner)
        for i in range(z.shape[2]):
            if progress is not None:
                progress(i + 1, z.shape[2])
        return x


def latent(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size, tile, overlap",
                         [(60, 32, 4), (48, 24, 4), (37, 16, 3), (16, 16, 4), (10, 32, 8), (61, 20, 0)])
def test_starts_cover_with_overlap(size, tile, overlap):
    starts = _starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == max(size - tile, 0)
    for a, b in zip(starts, starts[1:]):
        assert a < b and a + tile - b >= overlap  # consecutive tiles share at least `overlap`


@pytest.mark.parametrize("s, shape, tile, overlap", [
    (8, (1, 16, 3, 13, 22), (6, 8), 2), (16, (2, 48, 2, 9, 7), 4, 1), (8, (1, 16, 1, 5, 40), (5, 12), 3),
    (8, (1, 16, 1, 4, 30), (4, 16), 4)])  # starts 0, 7, 14: three tiles share latents 14-15
def test_blending_is_exact_for_a_local_decoder(s, shape, tile, overlap):
    """No receptive field, no error: any tiling reproduces the untiled decode (pixel scale read from the tiles;
    weights normalised where more than two tiles overlap)."""
    vae, z = LocalVAE(s), latent(shape)
    out = tiled_decode(vae, z, tile, overlap)
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    assert len(vae.calls) > 1 and all(c[-2] <= th and c[-1] <= tw for c in vae.calls)  # bounded tiles
    assert (out - vae.decode(z)).abs().max() < 1e-6


def test_ramps_hide_tile_border_artifacts():
    """Each tile's 4-px border artifact gets weight <= 4/16 in a 2-latent (16 px) overlap; exact elsewhere."""
    vae, z = LocalVAE(8, band=4), latent((1, 16, 2, 6, 30), seed=1)
    out, ref = tiled_decode(vae, z, (6, 16), 2), vae.decode(z)
    err = (out - ref).abs().amax(dim=(0, 1, 2, 3))  # per pixel column
    assert _starts(30, 16, 2) == [0, 14]  # one seam: overlap at latents 14..15 = pixels 112..127
    assert err.max() <= 4 / 16 + 1e-6
    assert err[:108].max() < 1e-6 and err[132:].max() < 1e-6
    assert err[112:128].max() > 0.1  # the artifacts are there, only damped (equal weights would leave 1/2)


@pytest.fixture(scope="module")
def smoke():
    vae = random_vae(FAMILIES["2.1"])
    z = latent((1, 16, 2, 2, 52), seed=2)  # 5 frames, 16 x 416 px; two tiles of 30 latents, overlap 8
    return vae, z, vae.decode(z)


def test_single_tile_is_the_untiled_decode(smoke):
    vae, z, ref = smoke
    assert torch.equal(tiled_decode(vae, z, (8, 64), 4), ref)


def _interior_edge_distance(width, tile, overlap, s=8):
    starts = _starts(width, tile, overlap)
    edges = [a * s for a in starts[1:]] + [(a + tile) * s for a in starts[:-1]]
    cols = torch.arange(width * s)
    return torch.stack([(cols - e).abs() for e in edges]).amin(0)


def test_smoke_vae_exact_away_from_seams_without_attention(smoke, monkeypatch):
    vae, z, _ = smoke
    monkeypatch.setattr(AttentionBlock, "forward", lambda self, x, cache=None: x)
    ref = vae.decode(z)
    out = tiled_decode(vae, z, (8, 30), 8)
    err = (out - ref).abs().amax(dim=(0, 1, 2, 3))
    far = _interior_edge_distance(52, 30, 8) >= 64
    assert far.sum() > 100
    assert err[far].max() <= 1e-5 * ref.abs().max()
    assert err[~far].max() > 1e-3  # the tiles really were decoded apart (the test can see seams)


def test_smoke_vae_within_stated_tolerance(smoke):
    vae, z, ref = smoke
    progress = []
    out = tiled_decode(vae, z, (8, 30), 8, progress=lambda d, n: progress.append((d, n)))
    assert out.shape == ref.shape and out.abs().max() <= 1.0
    err = (out - ref).abs()
    assert err.max() <= 0.25 and err.mean() <= 0.03, (err.max().item(), err.mean().item())
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 2 tiles x 2 latent frames


def test_auto_tile_fits_the_budget():
    shape = (1, 16, 21, 60, 104)  # 832x480x81
    untiled = decode_bytes(60, 104, 21)
    assert auto_tile(shape, untiled) is None
    last = (60, 104)
    for free in (untiled * 0.9, untiled * 0.6, untiled * 0.45):
        tile = auto_tile(shape, free)
        assert tile is not None and tile[0] <= last[0] and tile[1] <= last[1]
        assert decode_bytes(60, 104, 21, tile) <= free
        last = tile
    assert auto_tile(shape, 1) == (24, 24)  # nothing fits: the smallest tile (2 * overlap + 8)
    assert auto_tile((2, 16, 21, 60, 104), untiled) is not None  # a batch of two needs twice the memory
    assert auto_tile(shape, untiled / 2, dtype=torch.bfloat16) is None


def test_decode_dispatch_and_errors(monkeypatch):
    vae, z = LocalVAE(), latent((1, 16, 2, 40, 40), seed=3)
    assert torch.equal(decode(vae, z, tile=None), vae.decode(z))
    vae.calls.clear()
    decode(vae, z, "auto", free_bytes=10 ** 12)
    assert vae.calls == [tuple(z.shape)]
    vae.calls.clear()
    monkeypatch.setattr(tiling, "free_memory", lambda device: decode_bytes(40, 40, 2) // 2)
    out = decode(vae, z, "auto")
    assert len(vae.calls) > 1 and (out - vae.decode(z)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="tile must be 'auto', None or a size in latents"):
        decode(vae, z, "big")
    with pytest.raises(ValueError, match=r"overlap 8 needs tiles wider than twice it, got tile \(16, 16\); "
                                         r"use overlap <= 7"):
        tiled_decode(vae, z, 16, 8)
    with pytest.raises(ValueError, match=r"expected a latent \[B,C,t,h,w\]"):
        tiled_decode(vae, z[0], 16, 4)
    assert tiling.free_memory("cpu") > 0


def test_interrupt_propagates():
    def stop(done, total):
        if done == 3:
            raise InterruptedError("stop")
    with pytest.raises(InterruptedError):
        tiled_decode(LocalVAE(), latent((1, 16, 2, 8, 24)), (8, 10), 2, progress=stop)
