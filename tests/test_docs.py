"""The docs site's generated pages: the benchmark tables (benchmarks/report.py) and the lists of
lessons and API modules (docs/hooks/site.py). `make docs` builds the whole site, strictly."""

import json

import pytest
from helpers import ROOT, load_file

report = load_file("benchmarks/report.py", "benchmark_report")

MAKEFILE = """bench-toy: $(VENV)/.bench  ## a toy
\t$(BIN)/python benchmarks/toy.py

bench: bench-toy
"""


@pytest.fixture
def makefile(tmp_path):
    path = tmp_path / "Makefile"
    path.write_text(MAKEFILE)
    return path


def test_a_result_becomes_its_command_settings_and_a_table(makefile):
    result = {"command": "python benchmarks/toy.py --quick ", "when": "2026-01-02 03:04:05",
              "machine": {"cpus": 2}, "ranks": 2,
              "results": [{"peer": "minidist", "bytes": 4096, "median_s": 1.23456e-05},
                          {"peer": "MPICH | native", "bytes": 65536, "median_s": 0.5,
                           "extra": [1, 2.5]}]}
    text = report.render_result("toy", result, makefile)
    assert text.splitlines()[:3] == [
        "## toy", "",
        "Made by `python benchmarks/toy.py --quick` (`make bench-toy` runs it again), "
        "2026-01-02 03:04:05."]
    assert "| machine.cpus | 2 |" in text and "| ranks | 2 |" in text
    assert "| peer | bytes | median_s | extra |" in text
    assert "| minidist | 4096 | 1.235e-05 |  |" in text
    assert "| MPICH \\| native | 65536 | 0.5 | 1, 2.5 |" in text


def test_a_result_without_its_command_names_the_make_target(makefile):
    text = report.render_result("toy", {"rows": [{"a": 1}]}, makefile)
    assert "Made by a run that did not record its command (`make bench-toy` runs it again)." in text
    assert report.make_target("missing", makefile) is None


def test_records_holding_records_become_subsections(makefile):
    result = {"configs": [{"title": "small", "batch": 64, "rows": [{"peer": "a", "s": 1.0}]},
                          {"name": "large", "batch": 1024, "rows": [{"peer": "b", "s": 2.0}]}]}
    lines = report.render_result("toy", result, makefile).splitlines()
    for title, batch, row in (("small", 64, "| a | 1 |"), ("large", 1024, "| b | 2 |")):
        at = lines.index(f"#### {title}")
        assert f"| batch | {batch} |" in lines[at:] and row in lines[at:]
        assert lines.index("##### rows", at) > at


def test_the_page_has_a_section_and_figure_per_results_file(tmp_path, makefile):
    (tmp_path / "toy.json").write_text(json.dumps({"command": "python benchmarks/toy.py",
                                                   "rows": [{"x": 1}]}))
    (tmp_path / "toy.png").write_bytes(b"png")
    (tmp_path / "other.json").write_text(json.dumps({"rows": [{"y": 2}]}))
    page = report.render(tmp_path, makefile)
    assert page.index("## other") < page.index("## toy")
    assert "![toy](benchmarks/toy.png)" in page and "![other]" not in page
    assert "No results yet" in report.render(tmp_path / "empty", makefile)


def test_every_committed_result_renders():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        text = report.render_result(path.stem, json.loads(path.read_text()))
        assert text.startswith(f"## {path.stem}\n") and "Made by " in text


def test_the_site_lists_every_lesson_and_public_module():
    pytest.importorskip("mkdocs")
    site = load_file("docs/hooks/site.py", "docs_site_hooks")
    modules = site._modules()
    assert {"minidist", "minidist.train", "minidist.comm", "minidist.comm.collectives"} \
        <= set(modules)
    assert not [m for m in modules if m.endswith(("cli", "__main__")) or "._" in m]
    lessons = site._lessons()
    assert [p.name for p in lessons] == sorted(p.name for p in (ROOT / "lessons").glob("*.ipynb"))
    assert site._lesson_title(ROOT / "lessons" / "05_data_parallelism.ipynb").startswith(
        "Lesson 5")
    nav = site.on_config({"nav": [{"Home": "index.md"}, {"Troubleshooting": "t.md"}]})["nav"]
    assert [next(iter(item)) for item in nav] == ["Home", "Lessons", "API reference",
                                                  "Benchmarks", "Troubleshooting"]
    api = dict(next(iter(i.items())) for i in nav[2]["API reference"])
    assert api["minidist.train"] == "api/minidist.train.md"
    assert {"minidist.comm": "api/minidist.comm.md"} in api["minidist.comm"]
