"""A new user's first command, `bash scripts/run.sh`, on a machine without espeak-ng (only the tests install it): the
default T2V workflow needs no speech and must write its mp4; an S2V workflow stops with one line naming the fix;
a workflow whose model files are missing says which file goes in which folder. Runs the real script (its set-up is
idempotent, so on a set-up checkout it only checks the stamps) on the host under test ($WANLEAN_HOST)."""
import os
import shutil
import subprocess

import pytest

from comfy_host import HOST_DIR, host_python, host_version
from conftest import ROOT
from example_inputs import WRITERS
from media import assert_real_video, probe


@pytest.fixture(scope="module")
def path_without_espeak(tmp_path_factory):
    """A PATH whose folders hold links to every command of the real PATH but espeak-ng (and its -ng-less alias)."""
    assert shutil.which("espeak-ng"), "the negative control needs espeak-ng on the real PATH"
    hidden = tmp_path_factory.mktemp("bin")
    for folder in os.environ["PATH"].split(os.pathsep):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name not in ("espeak-ng", "espeak") and not (hidden / name).exists():
                (hidden / name).symlink_to(os.path.join(folder, name))
    path = str(hidden)
    assert shutil.which("espeak-ng", path=path) is None and shutil.which("bash", path=path)
    return path


def run_sh(args, path, tmp, timeout=900):
    """scripts/run.sh with PATH `path`, writing into tmp/out with a fresh input folder tmp/input."""
    env = dict(os.environ, PATH=path)
    return subprocess.run(["bash", "scripts/run.sh", *args, "--out", str(tmp / "out"), "--input", str(tmp / "input")],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_default_workflow_runs_without_espeak(path_without_espeak, tmp_path):
    done = run_sh([], path_without_espeak, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    videos = [line for line in done.stdout.splitlines() if line.endswith(".mp4")]
    assert len(videos) == 1 and os.path.isfile(videos[0]), done.stdout
    assert probe(videos[0])["frames"] == 17
    assert_real_video(videos[0])
    assert not set(os.listdir(tmp_path / "input")) & set(WRITERS)  # it names no example input (0.33 adds 3d/ there)


def test_s2v_workflow_without_espeak_says_the_fix_in_one_line(path_without_espeak, tmp_path):
    done = run_sh(["workflows/wan22_s2v.json"], path_without_espeak, tmp_path)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "espeak-ng" in errors[0] and "setup-audio.sh" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_missing_model_files_are_named_with_their_folders(tmp_path):
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    done = run_sh(["workflows/wan21_i2v_480p.json", "--models", str(models)], os.environ["PATH"], tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for name, folder in (("wan2.1_i2v_480p_14B_fp16.safetensors", "diffusion_models"),
                         ("wan_2.1_vae.safetensors", "vae"), ("umt5_xxl_fp16.safetensors", "text_encoders"),
                         ("clip_vision_h.safetensors", "clip_vision")):
        assert f"{name} -> {models / folder}{os.sep}" in done.stderr, done.stderr[-3000:]


def test_run_sh_on_the_users_own_comfyui(tmp_path):
    """`scripts/run.sh --comfyui PATH` runs on that ComfyUI folder with $PYTHON (here a copy of the host under test,
    as a user's own install): the pack is linked into its custom_nodes and the video written; nothing is set up."""
    host = tmp_path / "ComfyUI"
    shutil.copytree(HOST_DIR, host, ignore=shutil.ignore_patterns("custom_nodes", "__pycache__", "output", "temp"),
                    symlinks=True)
    env = dict(os.environ, PYTHON=host_python())
    done = subprocess.run(["bash", "scripts/run.sh", "--comfyui", str(host), "--out", str(tmp_path / "out"),
                           "--input", str(tmp_path / "input")], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ComfyUI {host_version(str(host))} at {host}" in done.stderr
    assert os.path.realpath(host / "custom_nodes" / "ComfyUI-WanLean") == os.path.realpath(ROOT)
    videos = [line for line in done.stdout.splitlines() if line.endswith(".mp4")]
    assert len(videos) == 1 and videos[0].startswith(str(tmp_path / "out")), done.stdout
    assert_real_video(videos[0])
