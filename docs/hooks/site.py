"""mkdocs hooks: the pages made when the site is built, so none of them can go stale.

- Lessons: every lessons/NN_*.ipynb, rendered by mkdocs-jupyter with its stored outputs (the
  notebooks are not re-run; `make lessons` does that).
- API reference: one page per public module of minidist, generated from its docstrings by
  mkdocstrings (`::: minidist.module`).
- Benchmarks: benchmarks/results/*.json rendered by benchmarks/report.py, with their figures.
- MathJax 3, served from the site itself (assets/mathjax/), so that the math is typeset offline
  too: its files come from the `django-static-mathjax` wheel on PyPI (the `docs` extra; MathJax's
  own build, packaged as plain files, with no dependency: Django is not needed to use them).
"""

import importlib.resources
import importlib.util
import json
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
LESSONS = ROOT / "lessons"
PACKAGE = ROOT / "minidist"
RESULTS = ROOT / "benchmarks" / "results"


def _lessons():
    return sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))


def _lesson_title(path):
    """The first Markdown heading of the notebook, else its file name."""
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem


def _modules():
    """Dotted names of minidist's public modules: no `_private`, no `__main__`, no CLI."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or parts[-1] in ("cli",):
            continue
        names.append(".".join(parts))
    return names


def _api_nav(names):
    """Top-level modules as pages; each subpackage as a section holding itself and its modules."""
    nav, sections = [], {}
    for name in names:
        package = ".".join(name.split(".")[:2])
        if package != name or any(n.startswith(name + ".") for n in names):
            if package not in sections:
                sections[package] = []
                nav.append({package: sections[package]})
            sections[package].append({name: f"api/{name}.md"})
        else:
            nav.append({name: f"api/{name}.md"})
    return nav


MATHJAX_ENTRY = "tex-mml-chtml.js"  # mkdocs.yml loads assets/mathjax/tex-mml-chtml.js


def _mathjax_files():
    """(path in the site, file on disk) for MathJax's entry point and every component it may load
    on demand (its TeX extensions, CHTML fonts, menu, accessibility and speech modules)."""
    try:
        es5 = Path(str(importlib.resources.files("mathjax"))) / "static" / "mathjax" / "es5"
    except ModuleNotFoundError:
        es5 = None
    if es5 is None or not (es5 / MATHJAX_ENTRY).is_file():
        raise RuntimeError("MathJax is missing: the docs site serves it from the "
                           "django-static-mathjax package; install the docs extra "
                           "(pip install -e '.[docs]', or `make docs`)")
    files = [es5 / MATHJAX_ENTRY]
    files += sorted(f for d in es5.iterdir() if d.is_dir() for f in d.rglob("*") if f.is_file())
    return [(f"assets/mathjax/{f.relative_to(es5).as_posix()}", f) for f in files]


def _report():
    spec = importlib.util.spec_from_file_location("benchmark_report",
                                                  ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_config(config):
    """Append the generated sections to the hand-written navigation."""
    lessons = [{_lesson_title(p): f"lessons/{p.name}"} for p in _lessons()]
    api = _api_nav(_modules())
    nav = list(config["nav"] or [])
    at = next((i for i, item in enumerate(nav) if "Troubleshooting" in item), len(nav))
    nav[at:at] = [{"Lessons": lessons}, {"API reference": api},
                  {"Benchmarks": "benchmarks.md"}]
    config["nav"] = nav
    return config


@event_priority(100)  # before mkdocs-jupyter looks for notebooks among the files
def on_files(files, config):
    site, urls = config["site_dir"], config["use_directory_urls"]
    for path in _lessons():
        files.append(File(f"lessons/{path.name}", src_dir=str(ROOT), dest_dir=site,
                          use_directory_urls=urls))
    for name in _modules():
        files.append(File.generated(config, f"api/{name}.md", content=f"::: {name}\n"))
    files.append(File.generated(config, "benchmarks.md", content=_report().render(RESULTS)))
    for figure in sorted(RESULTS.glob("*.png")):
        if figure.with_suffix(".json").exists():
            files.append(File.generated(config, f"benchmarks/{figure.name}",
                                        abs_src_path=str(figure)))
    for dest, source in _mathjax_files():
        files.append(File.generated(config, dest, abs_src_path=str(source)))
    return files
