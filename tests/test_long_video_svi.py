"""Wan Long Video's continuations besides the pixel path (wan_core/long_video.py): latent carry, SVI 2.0 Pro, SVI 2.0
(Wan 2.2 and Wan 2.1 layouts), SVI 1.0 shot / film, each clip's conditioning compared bit for bit with a
transcription of SVI's own construction (tests/official_svi.py) on identical inputs; per-clip seeds; the joins;
colour anchoring (wan_core/colour.py) on frames with a known synthetic drift."""
import pytest
import torch

import official_svi as ref
from fixtures.smoke import CLIP_TINY, VAE_TINY, randomize_
from test_long_video import RecordingVAE
from wan_core.colour import colour_stats, match_colour
from wan_core.dit import WanDiT
from wan_core.long_video import LongJob, PIXEL, continuation_rule, cross_fade, generate_long, join_clip, join_of
from wan_core.pipeline import Expert, initial_noise
from wan_core.vae import WanVAE21

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors run faster on one thread

W = H = 32


class DriftingVAE(RecordingVAE):
    """Decodes clip k with a colour drift that compounds per clip: luma gain and offset, saturation gain."""

    def __init__(self, vae, drift):
        super().__init__(vae)
        self.drift, self.clips = drift, 0

    def decode(self, z):
        out = drift(self.vae.decode(z)[0], self.drift, self.clips)[None]
        self.clips += 1
        self.decoded.append((z.clone(), out.clone()))
        return out


def drift(frames, amount, k):
    """frames [3, ...] with luma x (1 + a)^k + a k / 2 and chroma x (1 + a)^k (a known drift, no hue change)."""
    m = ref_matrix()
    ycc = torch.einsum("ij,j...->i...", m, frames.double())
    ycc[0] = ycc[0] * (1 + amount) ** k + amount * k / 2
    ycc[1:] *= (1 + amount) ** k
    return torch.einsum("ij,j...->i...", torch.linalg.inv(m), ycc).float()


def ref_matrix():
    """BT.601 full-range RGB -> YCbCr, written out here independently of wan_core.colour."""
    return torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                        dtype=torch.float64)


def run_mode(mode, wan21=False, clips=3, clip=13, overlap=5, seed=0, colour=False, vae_drift=None, join="auto"):
    """generate_long on a tiny I2V DiT (wan21: with CLIP, as Wan 2.1 I2V; else as Wan 2.2 I2V-A14B) and the smoke
    VAE; returns (frames [3, T, H, W], conds, recording VAE, job, the model's inputs, CLIP encoder calls)."""
    g = torch.Generator().manual_seed(7)
    dims = dict(in_dim=36, clip_dim=CLIP_TINY["dim"]) if wan21 else dict(in_dim=36)
    model = randomize_(WanDiT(dim=128, ffn_dim=64, num_layers=1, text_dim=8, freq_dim=32, **dims), seed=1).eval()
    base = randomize_(WanVAE21(**VAE_TINY), seed=2).eval()
    vae = RecordingVAE(base) if vae_drift is None else DriftingVAE(base, vae_drift)
    proj = torch.randn(3, CLIP_TINY["dim"], generator=g)
    clip_calls = []

    def encode_clip(pixels):  # a stand-in CLIP encoder: any fixed function of the pixels
        clip_calls.append(pixels.clone())
        return (pixels.mean((2, 3)) @ proj)[:, None].expand(1, 257, -1).contiguous()
    start = torch.rand(1, 3, H, W, generator=g) * 2 - 1
    job = LongJob("image", [torch.randn(3, 8, generator=g) for _ in range(clips)], torch.randn(4, 8, generator=g),
                  start=start, clip=encode_clip(start) if wan21 else None, encode_clip=encode_clip if wan21 else None)
    clip_calls.clear()
    inputs, conds = [], []
    model.register_forward_pre_hook(lambda m, args: inputs.append(args[0][:1].clone()))
    rule = continuation_rule(mode, "image", wan21, overlap)
    chunks = list(generate_long([Expert(lambda: model, cfg=2.0)], vae, job, clips=clips, clip_length=clip,
                                overlap=overlap, seed=seed, steps=2, shift=5.0, sampler="unipc", width=W, height=H,
                                on_clip=lambda k, n, c: conds.append(c), rule=rule, colour_anchor=colour, join=join))
    return torch.cat(chunks, dim=1), conds, vae, job, inputs, clip_calls


def dsyn_encode(vae):
    """The VAE in DiffSynth's calling convention: a list of videos [3, T, H, W] -> [B, z, t, h, w]."""
    return lambda videos: torch.cat([vae.vae.encode(v[None]) for v in videos])


def first_inputs(inputs, clips, steps=2):
    """The model's first input of each clip (2 steps per clip, cond and uncond in one batch): the initial noise."""
    return [inputs[steps * k][:, :16] for k in range(clips)]


def noise_shape(clip):
    return (1, 16, 1 + (clip - 1) // 4, H // 8, W // 8)


def test_svi_pro_conditioning_equals_the_reference():
    """Every clip's y equals SVI 2.0 Pro's construction on the same anchor and sampled latents, bit for bit: the
    anchor encoded once, the motion slot the previous clip's last sampled latent frame exactly (no VAE round trip:
    one encode in the whole run), zeros in the normalised latent space, the mask on frame 0 only; clip k seeded
    k x 42; the join keeps clip 0 whole and drops 5 frames of every later clip."""
    video, conds, vae, job, inputs, _ = run_mode("svi 2.0 pro")
    assert len(vae.encoded) == 1 and len(vae.decoded) == 3  # the anchor, once; each clip decoded once
    sampled = [z for z, _ in vae.decoded]
    for k in range(3):
        prev = None if k == 0 else sampled[k - 1][0]
        expect = ref.svi_pro_y(dsyn_encode(vae), job.start[0], prev, 13, H, W)
        assert torch.equal(conds[k].y, expect), k
        if k:
            assert torch.equal(conds[k].y[:, 4:, 1], sampled[k - 1][:, :, -1])  # the carried latent, bit for bit
            assert conds[k].y[:, 4:, 2:].eq(0).all()
    for k, x in enumerate(first_inputs(inputs, 3)):
        assert torch.equal(x, initial_noise(noise_shape(13), ref.seed(k))), k
    assert torch.equal(video, ref.join("pro", [d[0] for _, d in vae.decoded], 5))
    assert video.shape[1] == 13 + 2 * 8


def test_latent_carry_is_the_default_for_image_models():
    """'auto' on an image model is latent carry: (overlap - 1) / 4 sampled latent frames carried (2 here), seeds
    seed + k; without the carry the motion slots would hold the VAE encoding of decoded frames or zeros."""
    video, conds, vae, job, inputs, _ = run_mode("auto", clip=21, overlap=9, seed=5)
    assert len(vae.encoded) == 1
    sampled = [z for z, _ in vae.decoded]
    for k in (1, 2):
        assert torch.equal(conds[k].y[:, 4:, 1:3], sampled[k - 1][:, :, -2:])
        assert conds[k].y[:, :4, 1:].eq(0).all() and conds[k].y[:, :4, 0].eq(1).all()
    assert conds[0].y[:, 4:, 1:].eq(0).all() and torch.equal(conds[0].y[:, 4:, :1], vae.encoded[0][1])
    for k, x in enumerate(first_inputs(inputs, 3)):
        assert torch.equal(x, initial_noise(noise_shape(21), 5 + k)), k
    assert torch.equal(video, ref.join("pro", [d[0] for _, d in vae.decoded], 9))


def test_svi2_wan22_conditioning_equals_the_reference():
    """SVI 2.0 on Wan 2.2: VAE([last decoded frame as an 8-bit image, anchor x 12]), frame-0 mask; clip 0 on the
    start image; later clips drop their first frame."""
    video, conds, vae, job, inputs, _ = run_mode("svi 2.0", overlap=1)
    decoded = [d[0] for _, d in vae.decoded]
    for k in range(3):
        image = job.start[0] if k == 0 else ref.as_8bit_image(decoded[k - 1][:, -1])
        assert torch.equal(conds[k].y, ref.svi2_wan22_y(dsyn_encode(vae), image, job.start[0], 13, H, W)), k
    assert len(vae.encoded) == 3
    for k, x in enumerate(first_inputs(inputs, 3)):
        assert torch.equal(x, initial_noise(noise_shape(13), ref.seed(k))), k
    assert torch.equal(video, ref.join("svi2", decoded, 1))


@pytest.mark.parametrize("mode,overlap,pad", [("svi 1.0 shot", 1, -1), ("svi 1.0 film", 5, 0), ("svi 2.0", 5, -1)])
def test_svi_wan21_conditioning_equals_the_reference(mode, overlap, pad):
    """SVI on Wan 2.1 I2V (test_svi.py): the last `overlap` frames as 8-bit images, then the anchor repeated (shot,
    svi 2.0: ref_pad_num -1) or zeros (film: 0); frame-0 mask; CLIP tokens of the clip's first frame; every clip
    but the last gives up its last `overlap` frames to the next."""
    video, conds, vae, job, inputs, clip_calls = run_mode(mode, wan21=True, overlap=overlap)
    decoded = [d[0] for _, d in vae.decoded]
    assert torch.equal(conds[0].clip, job.clip)  # clip 0: the start image's encoding, given
    for k in range(1, 3):
        frames = [ref.as_8bit_image(decoded[k - 1][:, i]) for i in range(13 - overlap, 13)]
        tokens, y = ref.svi_wan21_conditioning(dsyn_encode(vae), job.encode_clip, frames, job.start[0], 13, H, W, pad)
        assert torch.equal(conds[k].y, y) and torch.equal(conds[k].clip, tokens), k
    first_tokens, first_y = ref.svi_wan21_conditioning(dsyn_encode(vae), job.encode_clip, [job.start[0]],
                                                       job.start[0], 13, H, W, pad)
    assert torch.equal(conds[0].y, first_y) and torch.equal(conds[0].clip, first_tokens)
    assert torch.equal(video, ref.join("wan21", decoded, overlap))
    assert video.shape[1] == 13 + 2 * (13 - overlap)


def test_join_choices():
    """join: auto is the mode's reference; cut on the pixel path keeps each clip's first rendering of the overlap;
    cross-fade on latent carry drops the start image's frame at each clip's head and blends the 4 re-created frames
    with the previous clip's last 4 -- the same frame count every way."""
    svi = continuation_rule("svi 2.0 pro", "image", False, 5)
    assert [join_of(PIXEL, c) for c in ("auto", "cut", "cross-fade")] == ["blend", "drop head", "blend"]
    assert [join_of(svi, c) for c in ("auto", "cut", "cross-fade")] == ["drop head", "drop head", "blend"]
    with pytest.raises(ValueError, match="join must be one of"):
        join_of(svi, "splice")
    clips = [torch.full((3, 13, 2, 2), float(k)) + torch.arange(13.0).view(1, 13, 1, 1) / 100 for k in range(3)]

    def joined(join, skip):
        out, tail = [], None
        for k, c in enumerate(clips):
            chunks, tail = join_clip(join, c, k, k == 2, tail, 5, skip)
            out += chunks
        return torch.cat(out, dim=1)
    fade = joined("blend", 1)
    expect = torch.cat([clips[0][:, :9], cross_fade(clips[0][:, 9:], clips[1][:, 1:5]), clips[1][:, 5:9],
                        cross_fade(clips[1][:, 9:], clips[2][:, 1:5]), clips[2][:, 5:]], dim=1)
    assert torch.equal(fade, expect) and fade.shape[1] == joined("drop head", 0).shape[1] == 13 + 2 * 8
    assert torch.equal(joined("drop head", 0), torch.cat([clips[0], clips[1][:, 5:], clips[2][:, 5:]], dim=1))
    video, _, vae, *_ = run_mode("latent carry", join="cross-fade")
    decoded = [d[0] for _, d in vae.decoded]
    assert torch.equal(video, torch.cat([decoded[0][:, :9], cross_fade(decoded[0][:, 9:], decoded[1][:, 1:5]),
                                         decoded[1][:, 5:9], cross_fade(decoded[1][:, 9:], decoded[2][:, 1:5]),
                                         decoded[2][:, 5:]], dim=1))


def test_continuation_refusals():
    """Each mode is refused, naming the fix, on a model or overlap it does not fit."""
    cases = [
        (("latent carry", "t2v", False, 5), "for the image-to-video models.*use 'pixel'"),
        (("svi 2.0 pro", "ti2v", False, 5), "for the image-to-video models"),
        (("latent carry", "image", False, 1), "set overlap to 5 or more"),
        (("svi 2.0 pro", "image", True, 5), "'svi 2.0 pro' is for Wan 2.2 I2V-A14B"),
        (("svi 1.0 shot", "image", False, 1), "is for Wan 2.1 I2V-14B"),
        (("svi 2.0", "image", False, 5), "set overlap to 1"),
        (("bogus", "image", False, 5), "continuation must be one of"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            continuation_rule(*args)
    assert continuation_rule("auto", "t2v", False, 5) == continuation_rule("pixel", "image", True, 5) == PIXEL
    assert continuation_rule("auto", "image", True, 5, end=True) == PIXEL  # FLF2V's end image: the pixel path
    assert continuation_rule("auto", "image", True, 5).carry == "latents"
    with pytest.raises(ValueError, match="connect clip_vision"):
        job = LongJob("image", [torch.zeros(3, 8)], torch.zeros(3, 8), start=torch.zeros(1, 3, H, W))
        shot = continuation_rule("svi 1.0 shot", "image", True, 1)
        next(generate_long([], None, job, clips=1, clip_length=13, overlap=1, seed=0, steps=1, shift=1.0,
                           sampler="euler", width=W, height=H, rule=shot))


# ---------------------------------------------------------------------------------------------- colour anchoring

def synthetic_clips(clips=4, amount=0.08, seed=3):
    """Clips of smooth random colour frames [3, 5, 16, 16] -- clip k is clip 0 moved k x 3 pixels sideways (other
    frames, the same colour statistics) -- and the same clips with a drift compounding per clip."""
    g = torch.Generator().manual_seed(seed)
    first = torch.nn.functional.interpolate(torch.rand(5, 3, 4, 4, generator=g) * 1.2 - 0.6, size=(16, 16),
                                            mode="bilinear").permute(1, 0, 2, 3)
    base = [torch.roll(first, 3 * k, dims=-1) for k in range(clips)]
    return base, [drift(c, amount, k) for k, c in enumerate(base)]


def hue(frames):
    ycc = torch.einsum("ij,j...->i...", ref_matrix(), frames.double())
    return torch.atan2(ycc[2], ycc[1]), ycc[1:].pow(2).sum(0).sqrt()


def test_colour_anchor_removes_a_known_drift():
    """A drift of luma gain/offset and saturation (8% per clip, compounding) is undone: each clip back on its
    undrifted frames within 1e-5 (max abs) while drifted it is 0.03 k+ off (mean abs), clip 0's statistics exactly;
    every pixel keeps its hue; a clip with clip 0's statistics comes out unchanged (1e-6)."""
    base, drifted = synthetic_clips()
    reference = colour_stats(drifted[0])
    for k in range(1, 4):
        fixed = match_colour(drifted[k], reference)
        assert torch.allclose(torch.tensor(colour_stats(fixed)), torch.tensor(reference), atol=1e-5)
        err, before = (fixed - base[k]).abs().max().item(), (drifted[k] - base[k]).abs().mean().item()
        assert err < 1e-5 and before > 0.03 * k, (k, err, before)
        (h0, c0), (h1, _) = hue(drifted[k]), hue(fixed)
        turn = torch.remainder(h1 - h0 + torch.pi, 2 * torch.pi) - torch.pi
        assert turn[c0 > 1e-3].abs().max() < 1e-5
    same = drifted[0].flip(-1)  # other pixels, the same statistics
    assert (match_colour(same, reference) - same).abs().max() < 1e-6


def test_colour_anchor_in_a_long_video():
    """Through generate_long with a VAE that drifts each decoded clip: with colour_anchor the frames each clip adds
    to the video have clip 0's statistics; without, they follow the drift; clip 0 itself is untouched either way."""
    on, _, vae_on, *_ = run_mode("svi 2.0 pro", vae_drift=0.15, colour=True)
    off, _, vae_off, *_ = run_mode("svi 2.0 pro", vae_drift=0.15, colour=False)
    step = 13 - 5
    spans = [(0, 13)] + [(13 + (k - 1) * step, 13 + k * step) for k in (1, 2)]
    ref0 = colour_stats(vae_on.decoded[0][1][0])
    for k, (a, b) in enumerate(spans):  # measured on the frames the join keeps (SVI Pro drops each later head)
        decoded = vae_on.decoded[k][1][0]
        clip_on = match_colour(decoded, ref0, colour_stats(decoded[:, 5:])) if k else decoded
        assert torch.allclose(on[:, a:b], clip_on[:, 5 if k else 0:], atol=1e-6)
        assert torch.allclose(torch.tensor(colour_stats(on[:, a:b])), torch.tensor(ref0), atol=1e-5)
    assert torch.equal(on[:, :13], off[:, :13])
    luma = lambda x: colour_stats(x)[0]  # noqa: E731
    assert abs(luma(off[:, spans[2][0]:]) - luma(off[:, :13])) > 0.1
    assert abs(luma(on[:, spans[2][0]:]) - luma(on[:, :13])) < abs(luma(off[:, spans[2][0]:]) - luma(off[:, :13])) / 3
