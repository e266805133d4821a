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


def render(rows):
    backends = sorted({r["backend"] for r in rows})
    lines = ["# Fault matrix", "",
             "What a run does when something goes wrong: every row is a test in `tests/` that",
             "injects the fault, asserts the outcome (the error type and what its message names),",
             "and checks that no child process and no `/dev/shm` entry is left behind. Regenerate",
             "with `make faults`; times are from the machine that last ran it "
             f"({platform.machine()}, {date.today().isoformat()}).", "",
             f"Backends covered: {', '.join(backends)}.", "",
             "| fault | backend | outcome | time to fail (s) | test |",
             "|---|---|---|---|---|"]
    for r in rows:
        test = r["test"].replace("|", "\\|")
        lines.append(f"| {r['fault']} | {r['backend']} | {r['outcome']} | {r['seconds']:.2f} "
                     f"| `{test}` |")
    return "\n".join(lines) + "\n"


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
