"""Install as a user would: a fresh ComfyUI folder, the pack's tracked files copied into custom_nodes (no symlink,
no tests/ or scripts/ needed), `pip install -r requirements.txt`, start: every node is there, no import error."""
import os
import shutil
import subprocess
import sys

from comfy_host import HOST_DIR, ComfyServer
from conftest import ROOT
from test_workflows import PACK_NODES


def test_fresh_comfyui_folder_with_the_pack_copied_in(tmp_path):
    host = tmp_path / "ComfyUI"
    shutil.copytree(HOST_DIR, host, ignore=shutil.ignore_patterns("custom_nodes", "__pycache__", "output", "temp"),
                    symlinks=True)
    pack = host / "custom_nodes" / "wan-lean"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.split("/")[0] in ("tests", "scripts", "bench", ".ci"):
            continue
        (pack / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), pack / name)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(pack / "requirements.txt")],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    with ComfyServer(output_dir=str(tmp_path / "out"), pack_dir=None, host_dir=str(host)) as srv:
        assert PACK_NODES <= set(srv.object_info()), srv.log_tail()
        assert not srv.import_errors(), srv.import_errors()
        assert "wan-lean" in srv.log_text()
