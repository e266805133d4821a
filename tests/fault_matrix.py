"""Render docs/faults.md from the rows the fault tests recorded (tests/artifacts/faults.json).

    make faults   # = pytest -m fault tests, then this script

Each row: a fault injected into a run, the backend, the outcome the test asserted (the error and
what its message names), and the seconds from the start of the run until it failed, measured on
the machine that ran the tests (2 shared cores for the committed page).
"""

import json
import platform
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "artifacts" / "faults.json"
PAGE = ROOT / "docs" / "faults.md"


ORDER = ("thread", "process", "mpi", "any")  # "any": refused before a rank starts


def render(rows):
    """One table per test function: a row per (fault, outcome), a column per backend it ran on
    holding the seconds until the run failed (the slowest of its recorded runs), "—" where the
    fault was not run on that backend."""
    backends = sorted({r["backend"] for r in rows}, key=lambda b: (b not in ORDER, ORDER.index(b)
                                                                  if b in ORDER else 0, b))
    sections = {}
    for r in rows:
        test = r["test"].split("[")[0]
        cells = sections.setdefault(test, {}).setdefault((r["fault"], r["outcome"]), {})
        cells[r["backend"]] = max(cells.get(r["backend"], 0.0), r["seconds"])
    lines = ["# Fault matrix", "",
             "What a run does when something goes wrong. Every row is a test in `tests/` that",
             "injects the fault, asserts the outcome (the error type and what its message names)",
             "and checks that no child process and no `/dev/shm` entry is left behind. A cell",
             "holds the seconds from the start of the run until it failed; `any` means the call",
             "was refused before any rank started. Regenerate with `make faults`; the times are",
             f"from the machine that last ran it ({platform.machine()}, "
             f"{date.today().isoformat()}, 2 shared cores), so read them as orders of magnitude.",
             "", f"{len(rows)} runs of {sum(len(v) for v in sections.values())} faults "
             f"in {len(sections)} tests.", ""]
    for test, faults in sections.items():
        path, _, name = test.partition("::")
        used = [b for b in backends if any(b in cells for cells in faults.values())]
        lines += [f"## {name.removeprefix('test_').replace('_', ' ')}", "", f"`{test}`", "",
                  "| fault | outcome | " + " | ".join(used) + " |",
                  "|---|---|" + "---|" * len(used)]
        for (fault, outcome), cells in faults.items():
            times = [f"{cells[b]:.2f}" if b in cells else "—" for b in used]
            lines.append(f"| {_cell(fault)} | {_cell(outcome)} | " + " | ".join(times) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(text):
    return text.replace("|", "\\|").replace("\n", " ")


def main():
    if not SOURCE.exists():
        sys.exit(f"{SOURCE} is missing: run `pytest -m fault tests` first")
    rows = json.loads(SOURCE.read_text())
    if not rows:
        sys.exit(f"{SOURCE} holds no rows: no fault test recorded anything")
    PAGE.write_text(render(rows))
    print(f"wrote {PAGE.relative_to(ROOT)}: {len(rows)} rows")


if __name__ == "__main__":
    main()
