"""The pack in the real ComfyUI frontend: headless Chromium (Debian's package) driven by Playwright against a real
ComfyUI server with the pack. Every workflow in workflows/ is opened the way a user opens a file and must raise no
dialog (missing nodes, missing models, errors) and draw no node as missing; each is saved as a screenshot under
output/screenshots/. The pack's workflows must show in the template browser, each with its thumbnail loaded. The
smoke workflow is then shrunk in its widgets, queued with the Run button, and its mp4 must be written and appear in
the page.

The browser setup (scripts/setup-browser.sh) runs on first use; when it cannot be installed the test fails under CI
and is skipped elsewhere, both with the reason."""
import importlib
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import ROOT
from comfy_host import PACK_LINK, history_error
from media import assert_real_video, probe

SCREENSHOTS = os.path.join(ROOT, "output", "screenshots")
WORKFLOWS = sorted(f for f in os.listdir(os.path.join(ROOT, "workflows")) if f.endswith(".json"))
SMOKE_WORKFLOW = "wan21_t2v_1.3B.json"
SMOKE_WIDGETS = {"width": 160, "height": 96, "length": 5, "steps": 2}
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling out, which this machine's closed network refuses.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READY_JS = "() => window.app?.graph && window.LiteGraph?.registered_node_types?.KSampler"
# PrimeVue dialogs (frontend 1.32, ComfyUI 0.3.75) and the role=dialog ones of frontend 1.49 (ComfyUI 0.33)
DIALOG = ".p-dialog:visible, [role=dialog]:visible"
# what frontend 1.49 raises instead of a dialog for a graph's problems (missing nodes): an overlay with "View details",
# which opens the errors panel naming each missing node
PROBLEMS = f"{DIALOG}, [data-testid=error-overlay]:visible, [data-testid=error-group-missing-node]:visible"
CLOSE_BUTTON = (".p-dialog-close-button, button:has(.pi-times), button[aria-label='Close'], "
                "button[aria-label='Close dialog']")
GRAPH_JS = """() => window.app.graph._nodes.map(n => ({id: n.id, type: n.type, has_errors: !!n.has_errors,
    registered: !!window.LiteGraph.registered_node_types[n.type], box: Array.from(n.getBounding())}))"""
# resolves once the nodes' boxes stayed the same for 0.4 s (image previews grow their node when they arrive)
SETTLE_JS = """async () => {
    const boxes = () => JSON.stringify(window.app.graph._nodes.map(n => Array.from(n.getBounding())));
    for (let last = boxes(), same = 0, i = 0; i < 50 && same < 4; i++) {
        await new Promise(r => setTimeout(r, 100));
        const now = boxes();
        same = now === last ? same + 1 : 0;
        last = now;
    }
}"""
SET_WIDGETS_JS = """(values) => {
    const changed = {};
    for (const node of window.app.graph._nodes) for (const w of node.widgets || []) if (w.name in values) {
        w.value = values[w.name];
        w.callback?.(w.value, window.app.canvas, node);
        (changed[node.id] ??= {})[w.name] = w.value;
    }
    return changed;
}"""


def _sync_playwright():
    """Playwright's sync API with Debian's Chromium present, running scripts/setup-browser.sh when either is missing."""
    def ready():
        try:
            return os.path.exists(CHROMIUM) and importlib.import_module("playwright.sync_api")
        except ImportError:
            return None

    if not ready():
        try:
            done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup-browser.sh")], capture_output=True,
                                  text=True, timeout=900)
            why = f"it exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            why = repr(e)
        importlib.invalidate_caches()
        if not ready():
            msg = (f"the browser test needs Debian's chromium at {CHROMIUM} and Playwright in this Python; "
                   f"still missing after scripts/setup-browser.sh ({why})")
            pytest.fail(msg) if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip(msg)
    return ready().sync_playwright


def _only_loopback(route):
    """Let the page reach the ComfyUI server only: the frontend's calls to outside hosts are refused at once."""
    host = urllib.parse.urlsplit(route.request.url).hostname
    route.continue_() if host in ("127.0.0.1", "localhost") else route.abort()


def _close_dialogs(page):
    overlay = page.get_by_test_id("error-overlay-dismiss")
    if overlay.count() and overlay.first.is_visible():
        overlay.first.click(timeout=5000)
    for _ in range(5):
        dialogs = page.locator(DIALOG)
        if not dialogs.count():
            return
        dialogs.first.locator(CLOSE_BUTTON).first.click(timeout=5000)
        page.wait_for_timeout(300)
    raise AssertionError(f"dialog would not close: {page.locator(DIALOG).first.inner_text()[:300]}")


@pytest.fixture(scope="module")
def browser(server):
    """(page, page_errors): the ComfyUI frontend of the test server, loaded and with its start-up dialogs closed."""
    sync_playwright = _sync_playwright()
    os.makedirs(SCREENSHOTS, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page, errors = chromium.new_page(viewport={"width": 1600, "height": 900}), []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route("**/*", _only_loopback)
            page.goto(server.url)
            page.wait_for_function(READY_JS, timeout=90_000)
            try:  # a first-time user gets the template browser; wait for it, then close it
                page.wait_for_selector(DIALOG, timeout=3000)
            except Exception:
                pass
            _close_dialogs(page)
            yield page, errors
        finally:
            chromium.close()


def _open(page, path):
    """Open a workflow file as the user's Open / drop does and let it settle (image previews fetched and drawn);
    returns (nodes as drawn, texts of the dialogs and error overlays the frontend raised)."""
    _close_dialogs(page)
    with open(path, encoding="utf-8") as f:
        count = len(json.load(f)["nodes"])
    page.evaluate("() => window.app.graph.clear()")
    page.set_input_files("#comfy-file-input", path)
    page.wait_for_function("n => window.app.graph._nodes.length === n", arg=count, timeout=15_000)
    _fit_view(page)  # every node on screen: the frontend sizes a node to its image preview when it draws it
    page.wait_for_load_state("networkidle")
    page.evaluate(SETTLE_JS)
    return page.evaluate(GRAPH_JS), page.locator(PROBLEMS).all_inner_texts()


def _fit_view(page):
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")


def _screenshot(page, name):
    _fit_view(page)
    page.wait_for_timeout(300)
    path = os.path.join(SCREENSHOTS, name)
    page.screenshot(path=path)
    print(f"screenshot: {path}")
    return path


_DRAWN = {}  # workflow name -> (nodes, dialogs, page errors) as the frontend drew it; each opened once


def _drawn(browser, name):
    if name not in _DRAWN:
        page, errors = browser
        seen = len(errors)
        nodes, dialogs = _open(page, os.path.join(ROOT, "workflows", name))
        _screenshot(page, name.replace(".json", ".png"))
        _DRAWN[name] = nodes, dialogs, errors[seen:]
    return _DRAWN[name]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_without_missing_nodes(browser, name):
    nodes, dialogs, errors = _drawn(browser, name)
    missing = [f"{n['id']}:{n['type']}" for n in nodes if not n["registered"] or n["has_errors"]]
    assert not missing, f"{name}: nodes drawn as missing: {missing}"
    assert not dialogs, f"{name}: the frontend raised dialogs: {[d[:300] for d in dialogs]}"
    assert not errors, f"{name}: uncaught errors in the page: {errors}"


def _overlaps(nodes):
    """'a / b (W x H px)' for each pair of nodes whose drawn boxes (title included, grown to fit widgets) intersect."""
    found = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            w, h = min(ax + aw, bx + bw) - max(ax, bx), min(ay + ah, by + bh) - max(ay, by)
            if w > 0 and h > 0:
                found.append(f"{a['id']}:{a['type']} / {b['id']}:{b['type']} ({w:.0f} x {h:.0f} px)")
    return found


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_nodes_do_not_overlap(browser, name):
    """A node grown to fit its widgets must not hide another (or be hidden under it)."""
    overlapping = _overlaps(_drawn(browser, name)[0])
    assert not overlapping, f"{name}: nodes drawn on top of each other (move them apart): {overlapping}"


def test_missing_node_is_detected(browser, tmp_path):
    """Control: the checks above see a missing node in this frontend version (dialog and red node)."""
    page, _ = browser
    with open(os.path.join(ROOT, "workflows", SMOKE_WORKFLOW), encoding="utf-8") as f:
        workflow = json.load(f)
    victim = next(n for n in workflow["nodes"] if n["type"].startswith("WanLean"))
    victim["type"] = "WanLeanNoSuchNode"
    path = tmp_path / "missing_node_control.json"
    path.write_text(json.dumps(workflow), encoding="utf-8")
    nodes, dialogs = _open(page, str(path))
    # node ids are numbers in frontend 1.32, strings in 1.49
    assert [str(n["id"]) for n in nodes if not n["registered"] and n["has_errors"]] == [str(victim["id"])]
    details = page.get_by_test_id("error-overlay-see-errors")
    if details.count():  # frontend 1.49: the overlay's details name the node
        details.first.click(timeout=5000)
        page.locator(PROBLEMS, has_text="WanLeanNoSuchNode").first.wait_for(timeout=10_000)
        dialogs = page.locator(PROBLEMS).all_inner_texts()
    assert any("missing" in d.lower() and "WanLeanNoSuchNode" in d for d in dialogs), dialogs
    _close_dialogs(page)


# the card's first <img> once it has loaded: LazyImage swaps in the frontend's default-template.png when the
# thumbnail fails, so that one is reported as the fallback
THUMB_JS = """card => {
    const img = card.querySelector('img');
    if (!img || !img.complete || !img.naturalWidth) return null;
    const fallback = [...card.querySelectorAll('img')].some(i => i.src.includes('default-template'));
    return {width: img.naturalWidth, height: img.naturalHeight, fallback};
}"""


def test_template_browser_shows_pack_workflows_with_thumbnails(browser):
    """The pack's section of the template browser lists every workflow, each card with its own thumbnail loaded
    (fetched from /api/workflow_templates/<pack>/<name>.jpg, 256 x 256, not the frontend's fallback picture)."""
    page, _ = browser
    _close_dialogs(page)
    fetched = {}

    def record(response):
        fetched[urllib.parse.unquote(urllib.parse.urlsplit(response.url).path)] = response.status

    page.on("response", record)
    try:
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        dialog = page.locator(DIALOG)
        dialog.get_by_text(PACK_LINK, exact=True).first.click()
        page.wait_for_timeout(500)
        text = dialog.first.inner_text()
        shown = {}
        for stem in (w[:-5] for w in WORKFLOWS):
            selector = f"[data-testid='template-workflow-{stem}']"
            card = page.locator(selector)
            if card.count():
                card.first.scroll_into_view_if_needed()  # thumbnails load when their card comes into view
                page.wait_for_function(f"s => ({THUMB_JS})(document.querySelector(s))", arg=selector, timeout=10_000)
                shown[stem] = card.first.evaluate(THUMB_JS)
        page.locator("[data-testid^='template-workflow-']").first.scroll_into_view_if_needed()  # back to the top
        page.screenshot(path=os.path.join(SCREENSHOTS, "template_browser.png"))
    finally:
        page.remove_listener("response", record)
        _close_dialogs(page)
    absent = [w[:-5] for w in WORKFLOWS if w[:-5] not in text or w[:-5] not in shown]
    assert not absent, f"template browser section {PACK_LINK} lacks: {absent}"
    bad = {k: v for k, v in shown.items() if v != {"width": 256, "height": 256, "fallback": False}}
    assert not bad, f"cards without their own thumbnail: {bad}"
    statuses = {w: fetched.get(f"/api/workflow_templates/{PACK_LINK}/{w[:-5]}.jpg") for w in WORKFLOWS}
    assert set(statuses.values()) == {200}, f"thumbnail requests (HTTP status): {statuses}"


def _history(server):
    with urllib.request.urlopen(server.url + "/history", timeout=30) as resp:
        return json.load(resp)


def _wait_new_prompt(server, before, timeout):
    """The /history entry of the first prompt not in `before`, once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [e for pid, e in _history(server).items() if pid not in before]
        if new and (new[0].get("status") or {}).get("completed") is not None:
            return new[0]
        time.sleep(0.5)
    raise AssertionError(f"no finished prompt within {timeout} s after clicking Run\n{server.log_tail()}")


def test_queue_smoke_workflow_from_ui(browser, server):
    page, _ = browser
    _, dialogs = _open(page, os.path.join(ROOT, "workflows", SMOKE_WORKFLOW))
    assert not dialogs, dialogs
    changed = page.evaluate(SET_WIDGETS_JS, SMOKE_WIDGETS)  # {node id: {widget: value as the widget took it}}
    assert set().union(*changed.values()) == set(SMOKE_WIDGETS), changed
    assert all(v == {k: SMOKE_WIDGETS[k] for k in v} for v in changed.values()), changed
    before = set(_history(server))
    page.get_by_test_id("queue-button").click()
    entry = _wait_new_prompt(server, before, timeout=300)
    err = history_error(entry)
    assert err is None, f"{err}\n{getattr(err, 'traceback', '')}"
    queued = entry["prompt"][2]  # what the frontend sent: the widget values set above
    for node_id, values in changed.items():
        assert {k: queued[node_id]["inputs"][k] for k in values} == values, queued[node_id]
    videos = [f for f in server.output_files(entry) if f.endswith(".mp4")]
    assert len(videos) == 1, server.output_files(entry)
    info = probe(videos[0])
    want = SMOKE_WIDGETS["length"], SMOKE_WIDGETS["width"], SMOKE_WIDGETS["height"]
    assert (info["frames"], info["width"], info["height"]) == want, info
    assert_real_video(videos[0])
    shown = f"video[src*='{urllib.parse.quote(os.path.basename(videos[0]))}']"
    page.wait_for_selector(shown, state="attached", timeout=20_000)  # the output appears in the Save Video node
    _screenshot(page, SMOKE_WORKFLOW.replace(".json", "-queued.png"))
