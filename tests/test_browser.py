"""Lesson 5 in a real browser: JupyterLab in headless Chromium, driven by Playwright.

What nbval cannot see: the widget front end. This test starts its own JupyterLab on 127.0.0.1
(a token, a free port, a throw-away copy of lessons/), runs every cell from the Run menu, checks
that no cell raised and that the data-parallel explorer rendered, drags the `workers` slider and
waits for the figure to be redrawn. The server is stopped by its process id, pass or fail, and a
screenshot is left in tests/artifacts/.

Needs Debian's `chromium` (installed here with apt-get when missing and running as root) and the
`playwright` Python package (the `dev` extra; its bundled browsers are not used).
"""

import os
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
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
LESSON = "05_data_parallelism.ipynb"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--no-first-run",
                 "--disable-dev-shm-usage"]
# the notebook keeps every cell in the DOM, so the test can read all prompts and outputs
LAB_SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
                '{"windowingMode": "none"}',
                "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                '{"fetchNews": "false", "checkForUpdates": false}'}

SERVER_START_S = 60     # JupyterLab answering /api/status
RUN_ALL_S = 150         # every cell of lesson 5 executed
REDRAW_S = 60           # the explorer's figure redrawn after the slider moved
UI_S = 30               # any single click, load or render
APT_UPDATE_S, APT_INSTALL_S = 120, 300  # only when chromium is missing (`make chromium` first)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


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


@pytest.fixture
def jupyterlab(tmp_path):
    """(url of the lesson, the server's log): a JupyterLab serving a copy of lessons/."""
    notebooks = tmp_path / "lessons"
    shutil.copytree(ROOT / "lessons", notebooks,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
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
        yield f"{base}/lab/tree/{LESSON}?token={token}", log
    finally:
        _stop(process)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    executable = _ensure_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), headless=True,
                                             args=CHROMIUM_ARGS, timeout=UI_S * 1000)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(UI_S * 1000)
            yield context.new_page()
        finally:
            browser.close()


EXPLORER_CELL = "widgets.data_parallel_explorer()"

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
FIGURE_JS = """([cell, old]) => {
    const img = cell.querySelector('.widget-output img');
    return img && img.complete && img.src !== old ? img.src : null;
}"""


def _menu(page, menu, item):
    page.locator(".lm-MenuBar-item", has_text=menu).first.click()
    page.locator(".lm-Menu-item").filter(
        has=page.get_by_text(item, exact=True)).first.click()


def _drag_slider(page, slider, value, low, high):
    """Drag the noUiSlider handle of `slider` (range low…high) to `value` with the mouse."""
    handle = slider.locator(".noUi-handle").bounding_box()
    track = slider.locator(".noUi-target").bounding_box()
    x = track["x"] + track["width"] * (value - low) / (high - low)
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(x, handle["y"] + handle["height"] / 2, steps=12)
    page.mouse.up()


def _run_lesson_and_move_slider(page, url):
    page.goto(url, timeout=UI_S * 1000)
    page.wait_for_function(KERNEL_IDLE_JS, timeout=UI_S * 1000, polling=250)
    _menu(page, "Edit", "Clear Outputs of All Cells")
    page.wait_for_function(f"() => ({CELLS_JS})().every(cell => cell.count === null)",
                           timeout=UI_S * 1000)
    _menu(page, "Run", "Run All Cells")
    page.wait_for_function(RUN_ALL_DONE_JS, timeout=RUN_ALL_S * 1000, polling=500)

    cells = page.evaluate(CELLS_JS)
    failed = [c for c in cells if c["errors"]]
    assert not failed, f"cells raised: {failed}"
    assert [c["count"] for c in cells] == list(range(1, len(cells) + 1)), cells
    assert page.get_by_text("Error displaying widget").count() == 0

    explorer = page.locator(".jp-CodeCell", has_text=EXPLORER_CELL)
    workers = explorer.locator(".widget-hslider", has=page.get_by_text("workers", exact=True))
    workers.locator(".noUi-handle").wait_for(state="visible", timeout=UI_S * 1000)
    assert workers.locator(".widget-readout").inner_text() == "4"
    cell = explorer.element_handle()
    before = page.wait_for_function(FIGURE_JS, arg=[cell, ""], timeout=UI_S * 1000).json_value()

    explorer.scroll_into_view_if_needed()
    _drag_slider(page, workers, 2, low=1, high=8)
    assert workers.locator(".widget-readout").inner_text() == "2"
    after = page.wait_for_function(FIGURE_JS, arg=[cell, before], timeout=REDRAW_S * 1000,
                                   polling=250).json_value()
    assert after != before
    assert page.get_by_text("Error displaying widget").count() == 0
    stderr = "[data-mime-type='application/vnd.jupyter.stderr']"
    tracebacks = explorer.locator(f".widget-output {stderr}")
    assert tracebacks.count() == 0, tracebacks.all_inner_texts()
    assert not any(c["errors"] for c in page.evaluate(CELLS_JS))
    explorer.screenshot(path=ARTIFACTS / "lesson05_explorer.png", timeout=UI_S * 1000)


def test_lesson_05_runs_in_jupyterlab_and_the_explorer_redraws(page, jupyterlab):
    url, log = jupyterlab
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        _run_lesson_and_move_slider(page, url)
    except BaseException:
        page.screenshot(path=ARTIFACTS / "lesson05_failure.png", full_page=True)
        print(log.read_text()[-5000:])
        raise
