"""Render the benchmark results (benchmarks/results/*.json) as Markdown tables.

Every benchmark writes its own JSON shape, so the renderer is generic: a file becomes a section
headed by the command that made it (its "command" field, else the `make bench-…` target whose
recipe runs benchmarks/<name>.py), its scalar settings become a two-column table, and every list
of records becomes a table with one column per scalar field. A record that itself holds lists of
records (a benchmark configuration with its rows) becomes a subsection. Numbers are printed to
four significant digits; nothing is computed or copied by hand.

    python benchmarks/report.py            # prints the page the docs site shows
"""

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MAKEFILE = HERE.parent / "Makefile"
TITLE_KEYS = ("title", "name", "peer", "label")


def _scalar(value):
    return value is None or isinstance(value, (str, int, float, bool))


def _records(value):
    return isinstance(value, list) and value and all(isinstance(v, dict) for v in value)


def _cell(value):
    """A table cell: floats to 4 significant digits, lists of scalars joined, pipes escaped."""
    if isinstance(value, bool) or value is None:
        text = "" if value is None else str(value)
    elif isinstance(value, (int, str)):
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list) and all(_scalar(v) for v in value):
        text = ", ".join(_cell(v) for v in value)
    else:
        text = json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(obj, prefix=""):
    """{key: scalar-ish} of a dict, nested dicts joined with dots; lists of records left out."""
    flat = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif not _records(value):
            flat[name] = value
    return flat


def _table(records):
    rows = [_flatten(r) for r in records]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def _settings(flat):
    if not flat:
        return []
    lines = ["| setting | value |", "|---|---|"]
    return lines + [f"| {key} | {_cell(value)} |" for key, value in flat.items()]


def _body(obj, level):
    """The settings table of `obj`, then a table (or subsections) per list of records."""
    lines = _settings(_flatten(obj))
    for key, value in obj.items():
        if not _records(value):
            continue
        lines += ["", f"{'#' * level} {key}", ""]
        if any(any(_records(v) for v in record.values()) for record in value):
            for i, record in enumerate(value):
                title = next((record[k] for k in TITLE_KEYS if record.get(k) is not None), i + 1)
                lines += [f"{'#' * (level + 1)} {title}", ""] + _body(record, level + 2) + [""]
        else:
            lines += _table(value)
    return lines


def make_target(name, makefile=MAKEFILE):
    """The Makefile target whose recipe runs benchmarks/<name>.py, or None."""
    target = None
    for line in makefile.read_text().splitlines() if makefile.exists() else []:
        if match := re.match(r"^([\w-]+):", line):
            target = match.group(1)
        elif f"benchmarks/{name}.py" in line and target:
            return target
    return None


def render_result(name, result, makefile=MAKEFILE):
    """One benchmark's section: heading, the command that made it, its settings and tables."""
    target = make_target(name, makefile)
    command = str(result.get("command") or "").strip()
    made_by = f"`{command}`" if command else "a run that did not record its command"
    lines = [f"## {name}", "", f"Made by {made_by}"
             + (f" (`make {target}` runs it again)" if target else "")
             + (f", {result['when']}" if _scalar(result.get("when")) and result.get("when")
                else "") + ".", ""]
    body = {k: v for k, v in result.items() if k not in ("command", "when")}
    return "\n".join(lines + _body(body, 3)) + "\n"


def render(results=RESULTS, makefile=MAKEFILE, image_prefix="benchmarks/"):
    """The whole page: one section per results/*.json, its figure (<name>.png) when there is one."""
    sections = ["# Benchmarks", "",
                "The latest results in `benchmarks/results/`, rendered when the site is built. "
                "Speed is measured on the machine named in each table, with its peers side by "
                "side in the same run; `make bench` runs every benchmark again.", ""]
    files = sorted(Path(results).glob("*.json"))
    if not files:
        sections.append("No results yet: run `make bench`.")
    for path in files:
        sections.append(render_result(path.stem, json.loads(path.read_text()), makefile))
        if path.with_suffix(".png").exists():
            sections += [f"![{path.stem}]({image_prefix}{path.stem}.png)", ""]
    return "\n".join(sections)


if __name__ == "__main__":
    sys.stdout.write(render())
