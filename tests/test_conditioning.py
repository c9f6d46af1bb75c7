"""Conditioning reaches the model: for I2V/FLF2V the 20 image channels handed to the DiT are the mask (built here
by hand, official formula) and the VAE encoding of [image, zeros..., (last)]; for TI2V-5B the first latent frame of
the sampler's output is the encoded input image. Smoke-size VAEs, tiny DiTs."""
import pytest
import torch

from wan_core.conditioning import fit, image_latents, to_pixels
from wan_core.dit import WanDiT
from wan_core.pipeline import Cond, Expert, generate
from fixtures.smoke import VAE22_TINY, VAE_TINY, randomize_
from wan_core.vae import WanVAE21
from wan_core.vae22 import WanVAE22

W, H, T = 64, 48, 9


def images(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 40, 70, 3, generator=g) for _ in range(2)]  # other aspect: exercises fit()


def official_mask(length, h, w, last):
    """The official I2V/FLF2V mask, written out: ones on known frames, frame 0 repeated 4x, folded by 4."""
    msk = torch.ones(1, length, h, w)
    msk[:, 1:-1 if last else None] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // 4, 4, h, w).transpose(1, 2)


@pytest.mark.parametrize("last", [False, True])
def test_i2v_flf2v_channels_reach_the_dit(last):
    torch.manual_seed(0)
    vae = WanVAE21(**VAE_TINY).eval()
    start, end = (to_pixels(i, "image") for i in images(1))
    y, first = image_latents(vae, start, end if last else None, W, H, T)
    assert first is None
    video = torch.zeros(1, 3, T, H, W)
    video[:, :, 0] = fit(start, W, H)
    if last:
        video[:, :, -1] = fit(end, W, H)
    with torch.no_grad():
        expect = torch.cat([official_mask(T, H // 8, W // 8, last), vae.encode(video)], dim=1)
    seen = {}
    dit = randomize_(WanDiT(dim=128, ffn_dim=64, num_layers=1, text_dim=8, freq_dim=32, in_dim=36), seed=2).eval()
    dit.register_forward_pre_hook(lambda m, a, kw: seen.update(y=seen.get("y", kw["y"])), with_kwargs=True)
    text = torch.randn(3, 8)
    generate([Expert(lambda: dit, cfg=5.0)], Cond(text, y=y), Cond(text, y=y), seed=0, steps=2, shift=5.0,
             sampler="unipc", width=W, height=H, length=T)
    assert seen["y"].shape == (2, 20, 3, H // 8, W // 8)
    assert torch.equal(seen["y"][0], expect[0]) and torch.equal(seen["y"][1], expect[0])


def test_ti2v_output_starts_with_the_encoded_image():
    torch.manual_seed(0)
    vae = WanVAE22(**VAE22_TINY).eval()
    start = to_pixels(images(3)[0], "image")
    y, first = image_latents(vae, start, None, W, 64, T)
    with torch.no_grad():
        expect = vae.encode(fit(start, W, 64)[:, :, None])
    assert y is None and torch.equal(first, expect)
    dit = randomize_(WanDiT(dim=128, ffn_dim=64, num_layers=1, text_dim=8, freq_dim=32, in_dim=48, out_dim=48), seed=4)
    out = generate([Expert(lambda: dit.eval(), cfg=5.0)], Cond(torch.randn(3, 8), first_frame=first),
                   Cond(torch.randn(3, 8), first_frame=first), seed=0, steps=3, shift=5.0, sampler="unipc",
                   width=W, height=64, length=T, channels=48)
    assert torch.equal(out[:, :, :1], expect)
    assert not torch.equal(out[:, :, 1:2], expect)


def test_image_inputs_are_checked():
    with pytest.raises(ValueError, match="start_image holds 2 images"):
        to_pixels(torch.rand(2, 8, 8, 3), "start_image")
    assert to_pixels(torch.rand(1, 8, 8, 4), "x").shape == (1, 3, 8, 8)  # alpha dropped
    assert to_pixels(torch.rand(1, 8, 8, 1), "x").shape == (1, 3, 8, 8)  # grey expanded
    with pytest.raises(ValueError, match="TI2V-5B takes a start image only"):
        image_latents(WanVAE22(**VAE22_TINY), torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 32, 32, 5)


def test_official_end_frame_crops_as_the_official_flf2v_code():
    """A last frame of another size: torchvision's center_crop to [round(w_l r), round(h_l r)] (r = max of the
    first/last size ratios, PIL width-height order, read as height-width), zero-padded where larger; then the
    same bicubic resize as the first frame."""
    import torchvision.transforms.functional as TF
    from wan_core.conditioning import centre_crop, official_end_frame, official_i2v_pixels
    end = torch.rand(1, 3, 30, 50, generator=torch.Generator().manual_seed(1)) * 2 - 1
    r = max(64 / 50, 40 / 30)
    ref = TF.center_crop(end, [round(50 * r), round(30 * r)])
    assert torch.equal(official_end_frame(end, (40, 64)), ref)
    assert official_end_frame(end, (30, 50)) is end
    start = torch.rand(1, 3, 40, 64) * 2 - 1
    s, e = official_i2v_pixels(start, end, 64 * 40)
    assert s.shape == e.shape == (1, 3, 32, 64)
    for h, w in ((5, 7), (12, 3), (30, 50)):
        assert torch.equal(centre_crop(end, h, w), TF.center_crop(end, [h, w]))
