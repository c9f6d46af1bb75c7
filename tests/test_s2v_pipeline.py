"""The long S2V loop: a three-clip run feeds clip N's last 73 decoded frames (VAE-encoded) to clip N+1 as motion
frames, advances the audio window by exactly one clip (80 frames), and returns clips * 80 - 3 frames."""
import torch

from wan_core.s2v import SMOKE, WanS2V
from wan_core.s2v_pipeline import CLIP_FRAMES, MOTION_FRAMES, S2VJob, generate_s2v, pose_latents
from wan_core.smoke import VAE_TINY, randomize_
from wan_core.vae import WanVAE21

W = H = 64  # the 4x motion bucket compresses 8x8 latent pixels


def test_three_clips_chain_motion_and_audio():
    torch.manual_seed(0)
    model = randomize_(WanS2V(**dict(SMOKE, text_dim=8)), seed=1).eval()
    vae = WanVAE21(**VAE_TINY).eval()
    clips = 3
    g = torch.Generator().manual_seed(2)
    audio = torch.randn(1, SMOKE["audio_layers"], SMOKE["audio_dim"], clips * CLIP_FRAMES, generator=g)
    with torch.no_grad():
        ref = vae.encode(torch.rand(1, 3, 1, H, W, generator=g) * 2 - 1)
        pose = pose_latents(vae, torch.rand(1, 3, 200, H, W, generator=g) * 2 - 1, W, H, clips)
    calls, motions = [], []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append((kw["audio"][:1].clone(), kw["motion_latent"],
                                                                   kw["pose_latent"])), with_kwargs=True)
    job = S2VJob(torch.randn(4, 8), torch.randn(5, 8), audio, ref, pose)
    frames = generate_s2v(lambda: model, vae, job, clips=clips, seed=0, steps=2, cfg=4.5, shift=3.0, sampler="unipc",
                          width=W, height=H, on_clip=lambda c, n, m: motions.append(m))
    assert frames.shape == (1, 3, clips * CLIP_FRAMES - 3, H, W)
    assert motions[0] is None and all(c[1] is None for c in calls[:2])
    for clip in (1, 2):
        done = frames[:, :, : clip * CLIP_FRAMES - 3]  # everything the earlier clips produced
        with torch.no_grad():
            expect = vae.encode(done[:, :, -MOTION_FRAMES:])
        assert torch.allclose(motions[clip], expect, atol=1e-5), clip
        for window, motion, pose_in in calls[2 * clip: 2 * clip + 2]:  # 2 steps per clip
            assert torch.equal(window, audio[..., clip * CLIP_FRAMES:(clip + 1) * CLIP_FRAMES])
            assert motion is motions[clip] and pose_in is pose[clip]
    assert pose[0].shape == (1, 16, 20, H // 8, W // 8)


def test_cfg1_skips_the_negative_pass():
    """cfg 1 (distilled LoRAs): one batch-1 DiT call per step, prompt and real audio only; cfg 4.5: batch 2."""
    torch.manual_seed(0)
    model = randomize_(WanS2V(**dict(SMOKE, text_dim=8)), seed=1).eval()
    vae = WanVAE21(**VAE_TINY).eval()
    g = torch.Generator().manual_seed(2)
    audio = torch.randn(1, SMOKE["audio_layers"], SMOKE["audio_dim"], CLIP_FRAMES, generator=g)
    with torch.no_grad():
        ref = vae.encode(torch.rand(1, 3, 1, H, W, generator=g) * 2 - 1)
    batches = []
    model.register_forward_pre_hook(lambda m, a, kw: batches.append((a[0].shape[0], kw["audio"].abs().sum().item())),
                                    with_kwargs=True)
    job = S2VJob(torch.randn(4, 8), torch.randn(5, 8), audio, ref)
    for cfg in (1.0, 4.5):
        frames = generate_s2v(lambda: model, vae, job, clips=1, seed=0, steps=4, cfg=cfg, shift=5.0,
                              sampler="euler-distilled", width=W, height=H)
        assert torch.isfinite(frames).all() and frames.std() > 0
    assert [b for b, _ in batches] == [1] * 4 + [2] * 4
    assert all(total > 0 for _, total in batches[:4])
