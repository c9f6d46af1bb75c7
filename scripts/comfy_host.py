"""Drive a real headless ComfyUI server (the host tree selected by $WANLEAN_HOST, see select_host) from Python (stdlib, and aiohttp for /ws).

    with ComfyServer(models_dir=".smoke/models", output_dir="output") as srv:
        entry = srv.run(api_prompt)          # queue + wait; raises ExecutionError / Interrupted
        print(srv.output_files(entry))
        entry, messages = srv.run_listening(api_prompt)   # the same, with what /ws sent meanwhile

The pack is made loadable by a symlink custom_nodes/ComfyUI-WanLean -> pack_dir; a ComfyUI-style models folder is
made visible through a generated extra_model_paths yaml. The server runs in its own process group and is always
stopped (SIGTERM, then SIGKILL) on exit, on error and at interpreter exit.
"""
import asyncio
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The ComfyUI hosts scripts/setup.sh installs, oldest first: version -> (host tree, its venv), both under the repo.
# 0.3.75 comes from the registry (always there); 0.33.0 from ../shared/hosts when that folder exists.
HOSTS = {"0.3.75": (".host/ComfyUI", ".venv"), "0.33.0": (".host/ComfyUI-0.33.0", ".venv-0.33.0")}


def installed_hosts():
    """The versions of HOSTS whose tree and venv are both in place, oldest first."""
    return [v for v, (tree, venv) in HOSTS.items()
            if os.path.isfile(os.path.join(REPO_ROOT, tree, "main.py"))
            and os.path.isfile(os.path.join(REPO_ROOT, venv, "bin", "python"))]


def select_host(name=None):
    """(ComfyUI folder, python) of the host named by `name` or $WANLEAN_HOST: a version of HOSTS, or the path of a
    ComfyUI folder (then $WANLEAN_HOST_PYTHON or this interpreter runs it). Unset: the host whose venv runs this
    interpreter, else the newest installed host."""
    own = [v for v, (_, venv) in HOSTS.items() if os.path.realpath(sys.prefix) == os.path.realpath(
        os.path.join(REPO_ROOT, venv))]
    name = name or os.environ.get("WANLEAN_HOST") or (own or installed_hosts() or ["0.3.75"])[-1]
    if name in HOSTS:
        tree, venv = HOSTS[name]
        return os.path.join(REPO_ROOT, tree), os.path.join(REPO_ROOT, venv, "bin", "python")
    return os.path.abspath(os.path.expanduser(name)), os.environ.get("WANLEAN_HOST_PYTHON") or sys.executable


HOST_DIR, HOST_PYTHON = select_host()
PACK_LINK = "ComfyUI-WanLean"
# Model folder names always mapped (besides every subfolder found in models_dir).
MODEL_FOLDERS = ("diffusion_models", "unet", "checkpoints", "vae", "text_encoders", "clip", "clip_vision", "loras",
                 "audio_encoders", "upscale_models", "model_patches")


class HostError(RuntimeError):
    """Base class of everything this module raises about the server."""


class ServerError(HostError):
    """The server did not start, died, or answered an HTTP request with an error."""


class ExecutionError(HostError):
    """A prompt failed; carries the server's exception text and the failing node."""

    def __init__(self, message, node_id=None, node_type=None, exception_type=None, traceback=None):
        super().__init__(message)
        self.node_id, self.node_type = node_id, node_type
        self.exception_type, self.traceback = exception_type, traceback


class PromptRejected(ExecutionError):
    """/prompt refused the graph at validation; `node_errors` is the server's dict."""

    def __init__(self, message, node_errors=None):
        super().__init__(message)
        self.node_errors = node_errors or {}


class Interrupted(HostError):
    """The prompt was interrupted (/interrupt) before it finished."""


def free_port():
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_python():
    """The selected host's python when present (the server needs its packages), else the running one."""
    return HOST_PYTHON if os.path.isfile(HOST_PYTHON) else sys.executable


def host_version(host_dir=HOST_DIR):
    """The ComfyUI version a host tree declares (comfyui_version.py), e.g. '0.33.0'."""
    with open(os.path.join(host_dir, "comfyui_version.py"), encoding="utf-8") as f:
        return re.search(r"__version__\s*=\s*[\"']([^\"']+)", f.read()).group(1)


def link_pack(pack_dir, host_dir=HOST_DIR, name=PACK_LINK):
    """Point custom_nodes/<name> at pack_dir (atomic replace; a no-op when already right)."""
    link = os.path.join(host_dir, "custom_nodes", name)
    target = os.path.abspath(pack_dir)
    if os.path.islink(link) and os.readlink(link) == target:
        return link
    if os.path.exists(link) and not os.path.islink(link):
        raise HostError(f"{link} exists and is not a symlink; remove it")
    tmp = f"{link}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    return link


def write_model_paths_yaml(models_dir, path):
    """Write an extra_model_paths yaml mapping ComfyUI folder names to subfolders of models_dir."""
    base = os.path.abspath(models_dir)
    found = [d for d in sorted(os.listdir(base)) if os.path.isdir(os.path.join(base, d))] if os.path.isdir(base) else []
    names = list(MODEL_FOLDERS) + [d for d in found if d not in MODEL_FOLDERS]
    lines = ["wanlean_models:", f"    base_path: {json.dumps(base)}"]
    lines += [f"    {n}: {json.dumps(n)}" for n in names]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def parse_import_errors(log, host_dir=HOST_DIR):
    """Custom-node import failures in a ComfyUI log: ["<path>: <error>", ...] (built-in comfy_extras excluded)."""
    failed = re.findall(r"^\s*[\d.]+ seconds \(IMPORT FAILED\): (.+?)\s*$", log, re.M)
    reasons = {}
    for path, err in re.findall(r"^Cannot import (.+?) module for custom nodes: (.*)$", log, re.M):
        reasons[path] = err
    for path in re.findall(r"^Skip (.+?) module for custom nodes due to", log, re.M):
        reasons.setdefault(path, "no NODE_CLASS_MAPPINGS or comfy_entrypoint")
    builtin = (os.path.join(host_dir, "comfy_extras"), os.path.join(host_dir, "comfy_api_nodes"))
    paths = failed + [p for p in reasons if p not in failed and not p.startswith(builtin)]
    return [f"{p}: {reasons.get(p, 'import failed')}" for p in paths]


def parse_tracebacks(log, host_dir=HOST_DIR):
    """Traceback blocks in a ComfyUI log, except built-in comfy_extras / api nodes failing on optional deps."""
    lines, blocks, i = log.splitlines(), [], 0
    builtin = tuple(f'File "{os.path.join(host_dir, d)}{os.sep}' for d in ("comfy_extras", "comfy_api_nodes"))
    while i < len(lines):
        if not lines[i].startswith("Traceback (most recent call last):"):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].startswith(" "):
            j += 1
        block = "\n".join(lines[i:j + 1])  # frames + the exception line
        if not ("in load_custom_node" in block and any(b in block for b in builtin)):
            blocks.append(block)
        i = j + 1
    return blocks


def format_node_errors(body):
    """One readable text from a rejected /prompt answer ({"error": ..., "node_errors": ...})."""
    err = body.get("error") or {}
    lines = [f"{err.get('message', 'prompt rejected')}: {err.get('details', '')}".rstrip(": ")]
    for node_id, info in (body.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details', '')}")
    return "\n".join(lines)


def history_error(entry):
    """The exception a finished /history entry stands for, or None when it succeeded."""
    status = entry.get("status") or {}
    if status.get("status_str", "success") == "success":
        return None
    for event, data in status.get("messages", []):
        if event == "execution_interrupted":
            return Interrupted(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
        if event == "execution_error":
            msg = (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                   f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}")
            return ExecutionError(msg, data.get("node_id"), data.get("node_type"), data.get("exception_type"),
                                  "".join(data.get("traceback") or []))
    return ExecutionError(f"prompt failed with status {status.get('status_str')!r} and no error message")


class ComfyServer:
    """A ComfyUI server subprocess on 127.0.0.1 (CPU mode); use as a context manager or call start()/stop()."""

    def __init__(self, models_dir=None, output_dir=None, port=None, extra_args=(), pack_dir=REPO_ROOT, log_path=None,
                 input_dir=None, host_dir=HOST_DIR, python=None):
        self.python = python or host_python()  # the interpreter with the host's requirements
        self.host_dir = host_dir  # a ComfyUI folder; pack_dir None: the pack is already in its custom_nodes
        self.models_dir = models_dir
        self.input_dir = input_dir
        self.output_dir = os.path.abspath(output_dir or os.path.join(REPO_ROOT, "output"))
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.pack_dir = pack_dir
        self._log_arg = os.path.abspath(log_path) if log_path else None
        self.log_path = None  # set by start(): log_path, or server.log in the scratch dir
        self.scratch = None  # per-run folder: yaml, ComfyUI temp dir, default log; removed by stop()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.proc = None
        self._final_log = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def command(self):
        """The server's command line."""
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", self.output_dir, "--temp-directory", self.scratch]
        if self.models_dir is not None:
            yaml_path = write_model_paths_yaml(self.models_dir, os.path.join(self.scratch, "extra_model_paths.yaml"))
            cmd += ["--extra-model-paths-config", yaml_path]
        if self.input_dir is not None:
            cmd += ["--input-directory", os.path.abspath(self.input_dir)]
        return cmd + self.extra_args

    def start(self, timeout=180):
        """Launch the server and wait until /object_info answers; returns self."""
        if self.proc is not None:
            return self
        if not os.path.isfile(os.path.join(self.host_dir, "main.py")):
            raise ServerError(f"ComfyUI host tree missing at {self.host_dir}: run `bash scripts/setup.sh`")
        if self.pack_dir is not None:
            link_pack(self.pack_dir, self.host_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix="comfy-host-")
        self.log_path = self._log_arg or os.path.join(self.scratch, "server.log")
        self._final_log = None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.host_dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self._request("/object_info", timeout=30)
                return
            except (OSError, ServerError):
                time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer within {timeout} s\n{self.log_tail()}")

    def _check_alive(self):
        if self.proc is None:
            raise ServerError("server not started")
        if self.proc.poll() is not None:
            raise ServerError(f"ComfyUI exited with code {self.proc.returncode}\n{self.log_tail()}")

    def stop(self, grace=5.0):
        """Terminate the server's process group: SIGTERM, then SIGKILL after `grace` seconds."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            _signal_group(proc.pid, signal.SIGKILL)  # whatever of its group is left
            proc.wait()
        atexit.unregister(self.stop)
        if self.scratch and os.path.isdir(self.scratch):
            self._final_log = self.log_text()  # the log may live in scratch: keep its text readable
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _request(self, path, payload=None, timeout=60):
        """GET (payload None) or POST JSON; returns the decoded JSON body (None when empty)."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            raise ServerError(f"HTTP {e.code} on {path}: {body[:2000]!r}") if parsed is None else _HTTPJSONError(parsed)
        return json.loads(body) if body.strip() else None

    def object_info(self):
        """All node definitions, as /object_info serves them."""
        return self._request("/object_info")

    def queue(self, api_prompt):
        """POST an API-format prompt; returns its prompt_id. Raises PromptRejected with node_errors text."""
        try:
            body = self._request("/prompt", {"prompt": api_prompt, "client_id": self.client_id})
        except _HTTPJSONError as e:
            raise PromptRejected(format_node_errors(e.body), e.body.get("node_errors")) from None
        return body["prompt_id"]

    def wait(self, prompt_id, timeout=600):
        """Poll /history until the prompt finishes; returns its entry or raises ExecutionError/Interrupted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            entry = (self._request(f"/history/{prompt_id}") or {}).get(prompt_id)
            if entry is not None:
                err = history_error(entry)
                if err is not None:
                    raise err
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, api_prompt, timeout=600):
        """queue() + wait()."""
        return self.wait(self.queue(api_prompt), timeout)

    def running(self):
        """Prompt ids executing right now (from /queue)."""
        return [item[1] for item in self._request("/queue")["queue_running"]]

    def interrupt(self):
        """Interrupt the running prompt."""
        self._request("/interrupt", {})

    def websocket(self, features=None, timeout=60):
        """A WebSocket on /ws for this object's client id (the prompts it queues report there). `features`: feature
        flags sent first, as the frontend does (e.g. {"supports_preview_metadata": True}); waits for the answer."""
        ws = WebSocket("127.0.0.1", self.port, f"/ws?clientId={self.client_id}", timeout)
        try:
            if features is not None:
                ws.send_text(json.dumps({"type": "feature_flags", "data": features}))
                while not (isinstance(msg := ws.recv(), str) and json.loads(msg).get("type") == "feature_flags"):
                    pass
        except BaseException:
            ws.close()
            raise
        return ws

    def run_listening(self, api_prompt, timeout=600, features=None):
        """run() while listening on /ws: (history entry, messages in arrival order until the prompt ended: a dict
        per JSON event ({"type", "data"}), bytes per binary one (previews: 4-byte event type first))."""
        deadline, messages = time.monotonic() + timeout, []
        with self.websocket(features, timeout) as ws:
            prompt_id = self.queue(api_prompt)
            while time.monotonic() < deadline:
                msg = ws.recv()  # a silent server: TimeoutError after `timeout`; a dead one: ConnectionError
                messages.append(json.loads(msg) if isinstance(msg, str) else msg)
                event = messages[-1] if isinstance(msg, str) else {}
                if event.get("type") in END_EVENTS and event["data"].get("prompt_id") == prompt_id:
                    return self.wait(prompt_id, max(1.0, deadline - time.monotonic())), messages
        raise TimeoutError(f"prompt did not finish within {timeout} s\n{self.log_tail()}")

    def free(self, unload_models=True, free_memory=True):
        """Ask the server to unload models / free memory (takes effect between prompts)."""
        self._request("/free", {"unload_models": unload_models, "free_memory": free_memory})

    # -- results and logs ------------------------------------------------------------------------------------
    def output_files(self, history_entry):
        """Absolute paths of the files a history entry's outputs list (any item with a filename)."""
        roots = {"output": self.output_dir, "temp": os.path.join(self.scratch or "", "temp"),
                 "input": os.path.join(self.host_dir, "input")}
        paths = []
        for node_out in history_entry.get("outputs", {}).values():
            for items in node_out.values():
                for it in items if isinstance(items, list) else []:
                    if isinstance(it, dict) and "filename" in it:
                        root = roots.get(it.get("type", "output"), self.output_dir)
                        paths.append(os.path.join(root, it.get("subfolder", ""), it["filename"]))
        return paths

    def log_text(self):
        """The server's stdout+stderr so far."""
        if self._final_log is not None and not os.path.exists(self.log_path):
            return self._final_log
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, n=60):
        """The last n lines of the log."""
        return "\n".join(self.log_text().splitlines()[-n:])

    def tracebacks(self):
        """Traceback blocks in the log, ignoring built-in nodes that lack optional packages (kornia, spandrel)."""
        return parse_tracebacks(self.log_text(), self.host_dir)

    def import_errors(self):
        """Custom-node import failures found in the log ("<path>: <error>")."""
        return parse_import_errors(self.log_text(), self.host_dir)


END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class WebSocket:
    """A client of ComfyUI's /ws: aiohttp's (a ComfyUI requirement, so there wherever the host runs), driven
    synchronously on a private event loop. recv() returns str (text) or bytes (binary) and raises ConnectionError
    once the server closes, TimeoutError after `timeout` s of silence; aiohttp answers pings."""

    def __init__(self, host, port, path, timeout=60):
        self.timeout, self._loop = timeout, asyncio.new_event_loop()
        try:
            self._session, self._ws = self._loop.run_until_complete(self._open(f"http://{host}:{port}{path}"))
        except Exception as e:
            self._loop.close()
            raise ServerError(f"websocket upgrade refused on {path}: {e}") from None

    async def _open(self, url):
        import aiohttp
        session = aiohttp.ClientSession()
        try:
            return session, await session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=self.timeout))
        except BaseException:
            await session.close()
            raise

    def recv(self):
        import aiohttp
        msg = self._loop.run_until_complete(self._ws.receive(timeout=self.timeout))
        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return msg.data
        raise ConnectionError(f"the server closed the websocket ({msg.type.name})")

    def send_text(self, text):
        self._loop.run_until_complete(self._ws.send_str(text))

    def close(self):
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._close())
            self._loop.close()

    async def _close(self):
        await self._ws.close()
        await self._session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _HTTPJSONError(ServerError):
    """An HTTP error whose body is JSON (internal: /prompt rejections)."""

    def __init__(self, body):
        super().__init__(str(body)[:2000])
        self.body = body


def _signal_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":  # for the shell scripts: `hosts` (installed, newest first), `python [VERSION]`
    if sys.argv[1:2] == ["hosts"]:
        print(" ".join(reversed(installed_hosts())))
    elif sys.argv[1:2] == ["python"]:
        print(select_host(sys.argv[2] if len(sys.argv) > 2 else os.environ.get("WANLEAN_HOST")
                          or installed_hosts()[-1])[1])
    else:
        sys.exit("usage: comfy_host.py hosts | python [VERSION]")
