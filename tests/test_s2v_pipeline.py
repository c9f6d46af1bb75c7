"""The long S2V loop: a three-clip run feeds clip N's last 73 decoded frames (VAE-encoded) to clip N+1 as motion
frames, advances the audio window by exactly one clip (80 frames), and returns clips * 80 - 3 frames; the frames the
official mp4 keeps once muxed with its audio (the official writer and muxer run on a real ffmpeg)."""
import os

import numpy as np
import pytest
import torch

from fixtures.smoke import S2V_TINY as SMOKE
from wan_core.s2v import WanS2V
from wan_core.s2v_pipeline import CLIP_FRAMES, MOTION_FRAMES, S2VJob, generate_s2v, output_frames, pose_latents
from fixtures.smoke import VAE_TINY, randomize_
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


@pytest.fixture(scope="module")
def ffmpeg_on_path(tmp_path_factory):
    """A folder holding `ffmpeg` (the binary the imageio-ffmpeg package ships), for the official code's calls."""
    import imageio_ffmpeg
    folder = tmp_path_factory.mktemp("bin")
    os.symlink(imageio_ffmpeg.get_ffmpeg_exe(), folder / "ffmpeg")
    return str(folder)


@pytest.mark.parametrize("rate", [16000, 44100, 48000])
def test_output_frames_match_the_official_mp4(tmp_path, monkeypatch, ffmpeg_on_path, rate):
    """The official writer (save_video, libx264 at 16 fps) and muxer (merge_video_audio: -c:v copy -shortest) on a
    77-frame clip with audio just under, at and just over whole frames, shorter and longer than the video: the mp4
    keeps exactly output_frames(...) frames; whole_clips keeps all 77."""
    import soundfile
    from media import probe
    from official import official
    utils = official("utils.utils")
    monkeypatch.setenv("PATH", ffmpeg_on_path + os.pathsep + os.environ["PATH"])
    video = torch.rand(1, 3, CLIP_FRAMES - 3, 32, 32, generator=torch.Generator().manual_seed(rate)) * 2 - 1
    path = str(tmp_path / "clip.mp4")
    for frames16 in (20.0, 20.02, 19.99, 40.5, 76.999, 77.0, 90.3):
        utils.save_video(video, save_file=path, fps=16, nrow=1, normalize=True, value_range=(-1, 1))
        samples = round(frames16 * rate / 16)
        soundfile.write(str(tmp_path / "speech.wav"), 0.1 * np.sin(np.arange(samples) / 7.0), rate)
        utils.merge_video_audio(path, str(tmp_path / "speech.wav"))
        info = probe(path)
        assert info["audio_rate"] is not None, frames16  # merged
        assert info["frames"] == output_frames(1, samples, rate), (frames16, info)
    assert output_frames(1, samples, rate, whole_clips=True) == CLIP_FRAMES - 3 == 77
    assert output_frames(2, rate * 3, rate) == 48 and output_frames(2, rate * 3, rate, whole_clips=True) == 157
