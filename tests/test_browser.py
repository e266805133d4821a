"""Every lesson with a widget, in a real browser: JupyterLab in headless Chromium (Playwright).

What nbval cannot see: the widget front end. One JupyterLab per test module serves a throw-away
copy of lessons/ on 127.0.0.1 (a token, a free port). For each lesson that has a widget (found in
the notebooks themselves: an ipywidgets control in the code, or a widget view among the stored
outputs), the test opens the lesson in a workspace of its own, clears the outputs, runs every cell
from the Run menu, checks that no cell raised, then finds the widget by its DOM classes (the code
cell whose output holds a `.widget-slider`), drags the first slider with the mouse and waits for
the widget's figure (the image in its `.widget-output`) to be redrawn. The lesson's kernel is shut
down after each test; the server is stopped by its process id, pass or fail. A screenshot of each
widget (and of the page, on failure) is left in tests/artifacts/.

Needs Debian's `chromium` (installed here with apt-get when missing and running as root) and the
`playwright` Python package (the `dev` extra; its bundled browsers are not used).
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ROOT / "lessons"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--no-first-run",
                 "--disable-dev-shm-usage"]
# the notebook keeps every cell in the DOM, so the test can read all prompts and outputs
LAB_SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
                '{"windowingMode": "none"}',
                "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                '{"fetchNews": "false", "checkForUpdates": false}'}

SERVER_START_S = 60     # JupyterLab answering /api/status
RUN_ALL_S = 180         # every cell of one lesson executed (each runs in about a minute)
REDRAW_S = 90           # the widget's figure redrawn after the slider moved
UI_S = 30               # any single click, load or render
APT_UPDATE_S, APT_INSTALL_S = 120, 300  # only when chromium is missing (`make chromium` first)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(RUN_ALL_S + REDRAW_S + 4 * UI_S + 60)]

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_CODE = re.compile(r"\bipywidgets\b|\binteract(?:ive|ive_output)?\(|_explorer\(")


def _has_widget(path):
    """A code cell of the notebook uses an ipywidgets control, or stored a widget view."""
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        if WIDGET_CODE.search("".join(cell["source"])) or any(
                WIDGET_MIME in output.get("data", {}) for output in cell.get("outputs", [])):
            return True
    return False


WIDGET_LESSONS = [p.name for p in sorted(LESSONS.glob("[0-9][0-9]_*.ipynb")) if _has_widget(p)]


def _ensure_chromium():
    """/usr/bin/chromium, installed with apt-get (Debian, as root) when missing."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("no /usr/bin/chromium, and apt-get as root is not available to install it "
                    "(on Debian: `apt-get install -y chromium`)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=True,
                   timeout=APT_UPDATE_S)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                   env=env, capture_output=True, check=True, timeout=APT_INSTALL_S)
    assert CHROMIUM.exists(), "apt-get installed chromium, but /usr/bin/chromium is missing"
    return CHROMIUM


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process, timeout=20):
    """Stop the server we started, by its pid: SIGTERM (it shuts its kernels down), then SIGKILL
    to the process group it leads (a kernel left behind goes with it)."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=timeout)


class Lab:
    """A running JupyterLab: its base URL, token and log."""

    def __init__(self, base, token, log):
        self.base, self.token, self.log = base, token, log

    def url(self, lesson):
        """The lesson, opened in a workspace of its own (no tab of another lesson restored)."""
        return f"{self.base}/lab/workspaces/{Path(lesson).stem}/tree/{lesson}?token={self.token}"

    def _api(self, path, method="GET"):
        request = urllib.request.Request(f"{self.base}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=UI_S) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shut_down_kernels(self):
        """End every session (and its kernel), so one lesson's kernel does not outlive its test."""
        for session in self._api("sessions"):
            self._api(f"sessions/{session['id']}", method="DELETE")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One JupyterLab for the module, serving a copy of lessons/."""
    tmp_path = tmp_path_factory.mktemp("jupyterlab")
    notebooks = tmp_path / "lessons"
    shutil.copytree(LESSONS, notebooks, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = tmp_path / "user-settings"
    for name, text in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(text)
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path / "jupyterlab.log"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),  # the kernel is this Python:
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={notebooks}", "--allow-root",
               f"--LabApp.user_settings_dir={settings}",
               f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
               "--LabApp.news_url=None", "--LabApp.expose_app_in_browser=True"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=notebooks, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n"
                                f"{log.read_text()}")
                time.sleep(0.25)
        yield Lab(base, token, log)
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = _ensure_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), headless=True,
                                             args=CHROMIUM_ARGS, timeout=UI_S * 1000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, lab):
    """A fresh page; afterwards its context is closed and every kernel of the server shut down."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        context.set_default_timeout(UI_S * 1000)
        yield context.new_page()
    finally:
        context.close()
        lab.shut_down_kernels()


# Every code cell of the open notebook: its execution count and the names of the errors it raised.
CELLS_JS = """() => {
    const notebook = window.jupyterapp.shell.currentWidget.content;
    return notebook.widgets.filter(cell => cell.model.type === 'code').map(cell => ({
        count: cell.model.executionCount,
        errors: cell.model.outputs.toJSON().filter(o => o.output_type === 'error')
                    .map(o => `${o.ename}: ${o.evalue}`),
        source: cell.model.sharedModel.getSource().slice(0, 80)}));
}"""
KERNEL_IDLE_JS = """() => {
    const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = widget && widget.sessionContext && widget.sessionContext.session
                   && widget.sessionContext.session.kernel;
    return !!kernel && kernel.status === 'idle' && !!widget.content;
}"""
# done: every cell ran, or one raised (run-all stops there); either way the kernel is idle
RUN_ALL_DONE_JS = f"""() => {{
    const cells = ({CELLS_JS})();
    return ({KERNEL_IDLE_JS})() && (cells.every(cell => cell.count !== null)
                                   || cells.some(cell => cell.errors.length > 0));
}}"""
# the src of the widget's figure, once it is loaded and differs from `old`
FIGURE_JS = """([cell, old]) => {
    const img = cell.querySelector('.widget-output img');
    return img && img.complete && img.src !== old ? img.src : null;
}"""
STDERR = "[data-mime-type='application/vnd.jupyter.stderr']"


def _menu(page, menu, item):
    page.locator(".lm-MenuBar-item", has_text=menu).first.click()
    page.locator(".lm-Menu-item").filter(
        has=page.get_by_text(item, exact=True)).first.click()


def _drag_slider(page, slider):
    """Drag the noUiSlider handle of `slider` with the mouse by 35 % of the track: to the left
    (smaller values, cheaper re-runs) unless that would leave the track, else to the right. Any
    slider with three or more stops changes its value."""
    handle = slider.locator(".noUi-handle").bounding_box()
    track = slider.locator(".noUi-target").bounding_box()
    x0, y = handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2
    at = (x0 - track["x"]) / track["width"]
    to = at - 0.35 if at >= 0.35 else at + 0.35
    page.mouse.move(x0, y)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * to, y, steps=12)
    page.mouse.up()


def _run_all(page, url):
    """Open the notebook, clear its outputs, run every cell; its code cells (CELLS_JS)."""
    page.goto(url, timeout=UI_S * 1000)
    page.wait_for_function(KERNEL_IDLE_JS, timeout=UI_S * 1000, polling=250)
    _menu(page, "Edit", "Clear Outputs of All Cells")
    page.wait_for_function(f"() => ({CELLS_JS})().every(cell => cell.count === null)",
                           timeout=UI_S * 1000)
    _menu(page, "Run", "Run All Cells")
    page.wait_for_function(RUN_ALL_DONE_JS, timeout=RUN_ALL_S * 1000, polling=500)
    return page.evaluate(CELLS_JS)


def _check_widget_redraws(page, lesson):
    widget = page.locator(".jp-CodeCell").filter(has=page.locator(".widget-slider")).first
    widget.wait_for(state="visible", timeout=UI_S * 1000)
    slider = widget.locator(".widget-slider").first
    slider.locator(".noUi-handle").wait_for(state="visible", timeout=UI_S * 1000)
    label = slider.locator(".widget-label")
    name = label.first.inner_text() if label.count() else "(no description)"
    readout = slider.locator(".widget-readout")
    value = readout.inner_text()
    cell = widget.element_handle()
    before = page.wait_for_function(FIGURE_JS, arg=[cell, ""], timeout=UI_S * 1000).json_value()

    slider.scroll_into_view_if_needed()
    _drag_slider(page, slider)
    moved = readout.inner_text()
    assert moved != value, f"dragging the slider {name!r} left it at {value}"
    after = page.wait_for_function(FIGURE_JS, arg=[cell, before], timeout=REDRAW_S * 1000,
                                   polling=250).json_value()
    assert after != before
    page.wait_for_function(KERNEL_IDLE_JS, timeout=REDRAW_S * 1000, polling=250)
    assert page.get_by_text("Error displaying widget").count() == 0
    tracebacks = widget.locator(f".widget-output {STDERR}")
    assert tracebacks.count() == 0, tracebacks.all_inner_texts()
    assert not any(c["errors"] for c in page.evaluate(CELLS_JS))
    widget.screenshot(path=ARTIFACTS / f"lesson{lesson[:2]}_widget.png",
                      timeout=UI_S * 1000)
    return name, value, moved


@pytest.mark.parametrize("lesson", WIDGET_LESSONS)
def test_the_lesson_runs_in_jupyterlab_and_its_widget_redraws(page, lab, lesson):
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        cells = _run_all(page, lab.url(lesson))
        failed = [c for c in cells if c["errors"]]
        assert not failed, f"cells raised: {failed}"
        assert [c["count"] for c in cells] == list(range(1, len(cells) + 1)), cells
        assert page.get_by_text("Error displaying widget").count() == 0
        name, value, moved = _check_widget_redraws(page, lesson)
        print(f"{lesson}: {len(cells)} code cells ran; slider {name!r} {value} -> {moved}, "
              "figure redrawn")
    except BaseException:
        page.screenshot(path=ARTIFACTS / f"lesson{lesson[:2]}_failure.png", full_page=True)
        print(lab.log.read_text()[-5000:])
        raise


def test_the_lessons_with_widgets_are_found():
    """The discovery above sees the widgets the course is known to have."""
    assert {"01", "03", "05", "06", "07"} <= {name[:2] for name in WIDGET_LESSONS}, WIDGET_LESSONS
