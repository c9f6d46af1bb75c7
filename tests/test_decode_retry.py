"""A decode that runs out of memory is retried once with smaller tiles (and says so); a second failure propagates."""
import pytest
import torch

from fixtures.smoke import VAE_TINY
from wan_core.tiling import decode_retrying
from wan_core.vae import WanVAE21


class Tight(torch.nn.Module):
    """The tiny VAE, but pretending to run out of memory above `limit` latent pixels per decode call."""

    def __init__(self, limit):
        super().__init__()
        self.vae, self.limit, self.sizes = WanVAE21(**VAE_TINY).eval(), limit, []

    def decode(self, z, progress=None):
        self.sizes.append(tuple(z.shape[-2:]))
        if z.shape[-2] * z.shape[-1] > self.limit:
            raise torch.OutOfMemoryError("pretend out of memory")
        return self.vae.decode(z, progress=progress)


def test_oom_retries_once_with_smaller_tiles():
    torch.manual_seed(0)
    z = torch.randn(1, 16, 1, 40, 40)
    vae, said = Tight(limit=36 * 36), []
    out = decode_retrying(vae, z, tile=(40, 40), overlap=4, on_oom=said.append)
    assert out.shape == (1, 3, 1, 320, 320)
    assert vae.sizes[0] == (40, 40) and set(vae.sizes[1:]) == {(20, 20)} and len(vae.sizes) == 1 + 9
    assert said and "retrying once with 20x20" in said[0]
    with pytest.raises(torch.OutOfMemoryError):
        decode_retrying(Tight(limit=10), z, tile=None, overlap=4, on_oom=said.append)
