"""The docs site typesets its math offline: MathJax is served from the built site itself.

The test builds the site (mkdocs, into a temporary folder), serves it on 127.0.0.1 and opens a
lesson page and a Markdown page in headless Chromium with every request to any other host
aborted, as on a machine or in a classroom without internet. It then checks that MathJax ran
from the site (its script and fonts were fetched from 127.0.0.1), that the formulas became
`mjx-container` elements with no TeX error, and that no raw `$…$` of the notebook is left in the
text. A screenshot of the lesson page is left in tests/artifacts/.

The strict build (`make docs`) is the gate for warnings; this one builds without --strict so that
it fails only when the math does not render. Needs Debian's `chromium` and `playwright`, like
tests/test_browser.py (whose helpers it uses).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_browser import CHROMIUM_ARGS, UI_S, _ensure_chromium

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LESSON = "01_gradient_descent"  # a lesson with a lot of inline and display math
MARKDOWN_PAGE = "concepts"      # a hand-written page: pymdownx.arithmatex's \(…\) and \[…\]
BUILD_S = 300                   # mkdocs build, the notebooks' conversion cache cold
TYPESET_S = 60                  # MathJax typeset the whole page

pytestmark = pytest.mark.timeout(BUILD_S + 200)

# inline math of a Markdown cell: $…$ on one line, not $$…$$ and not an escaped \$
INLINE_MATH = re.compile(r"(?<![\\$])\$([^$\n]+?)\$(?!\$)")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The base URL of the freshly built site, served from 127.0.0.1 until the module ends."""
    pytest.importorskip("mkdocs")
    site_dir = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site_dir)], cwd=ROOT, capture_output=True, text=True,
        timeout=BUILD_S, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, f"mkdocs build failed:\n{build.stdout}\n{build.stderr}"
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 partial(_QuietHandler, directory=str(site_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(_ensure_chromium()),
                                             headless=True, args=CHROMIUM_ARGS,
                                             timeout=UI_S * 1000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def offline_page(browser):
    """(page, requests): a fresh Chromium page for which every host but 127.0.0.1 is
    unreachable; requests["local"] and requests["blocked"] list the URLs it asked for. (With a
    route set, Playwright bypasses the HTTP cache: every request is seen.)"""
    requests = {"local": [], "blocked": []}

    def route(route):
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1":
            requests["local"].append(url)
            route.continue_()
        else:
            requests["blocked"].append(url)
            route.abort("internetdisconnected")

    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        context.set_default_timeout(UI_S * 1000)
        context.route("**/*", route)
        yield context.new_page(), requests
    finally:
        context.close()


MATHJAX_READY_JS = """() => !!(window.MathJax && MathJax.startup && MathJax.startup.promise
                              && document.querySelector('mjx-container'))"""


def _open_and_typeset(page, url):
    """Open url, wait until MathJax has typeset the page; the formulas and TeX errors found."""
    page.goto(url, wait_until="load", timeout=UI_S * 1000)
    page.wait_for_function(MATHJAX_READY_JS, timeout=TYPESET_S * 1000, polling=250)
    page.evaluate("async () => { await MathJax.startup.promise; await MathJax.typesetPromise(); }")
    return {"math": page.locator("mjx-container").count(),
            "errors": page.locator("mjx-merror").all_inner_texts()}


def _served_mathjax(requests):
    local = [urlsplit(u).path for u in requests["local"]]
    assert any(p.endswith("/assets/mathjax/tex-mml-chtml.js") for p in local), local
    assert any("/assets/mathjax/output/chtml/fonts/" in p for p in local), \
        f"MathJax fetched no font from the site: {local}"
    assert not [u for u in requests["blocked"] if "mathjax" in u.lower()], requests["blocked"]


def test_the_hook_copies_mathjax_and_what_it_loads_on_demand():
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("docs_site_hooks", ROOT / "docs/hooks/site.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    files = dict(hooks._mathjax_files())
    assert "assets/mathjax/tex-mml-chtml.js" in files
    for folder in ("output/chtml/fonts/woff-v2/", "input/tex/extensions/", "ui/"):
        assert any(d.startswith(f"assets/mathjax/{folder}") for d in files), folder
    assert all(path.is_file() for path in files.values())


def test_the_site_links_no_math_renderer_from_another_host():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    scripts = [s if isinstance(s, str) else s["path"] for s in config["extra_javascript"]]
    assert "assets/mathjax/tex-mml-chtml.js" in scripts
    assert not [s for s in scripts if "://" in s or s.startswith("//")], scripts


@pytest.mark.browser
def test_a_lesson_page_typesets_its_math_offline(site, offline_page):
    page, requests = offline_page
    notebook = json.loads((ROOT / "lessons" / f"{LESSON}.ipynb").read_text())
    markdown = "\n".join("".join(c["source"]) for c in notebook["cells"]
                         if c["cell_type"] == "markdown")
    raw = {f"${m}$" for m in INLINE_MATH.findall(markdown)}
    assert raw, f"lesson {LESSON} has no inline math to check"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        typeset = _open_and_typeset(page, f"{site}/lessons/{LESSON}/")
        assert typeset["math"] >= len(raw) // 2, typeset  # one container per formula, or so
        assert not typeset["errors"], f"TeX errors on the page: {typeset['errors']}"
        text = "\n".join(page.locator(".jp-MarkdownCell").all_inner_texts())
        left = sorted(r for r in raw if r in text)
        assert not left, f"raw math left in the text: {left[:10]}"
        assert "$$" not in text, re.findall(r".{0,40}\$\$.{0,40}", text)[:5]
        _served_mathjax(requests)
        page.locator(".jp-MarkdownCell mjx-container[display='true']").first \
            .scroll_into_view_if_needed()
    finally:
        page.screenshot(path=ARTIFACTS / f"docs_{LESSON}_math.png")


@pytest.mark.browser
def test_a_markdown_page_typesets_its_math_offline(site, offline_page):
    page, requests = offline_page
    typeset = _open_and_typeset(page, f"{site}/{MARKDOWN_PAGE}/")
    assert typeset["math"] > 0 and not typeset["errors"], typeset
    assert not re.search(r"\\\(|\\\[", page.locator("article").inner_text())
    _served_mathjax(requests)
