"""Grading outside the notebook: `python -m minidist exercises` and `check LESSON [PATH ...]`
grade .py files, notebooks and folders of them in child processes, keep what was graded when a
submission hangs or crashes, exit non-zero on any fail and write a gradebook."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minidist.exercises import catalog, grading
from minidist.exercises._common import Exercise

GOOD = """
from minidist.exercises.solutions.long_context import expert_dispatch as my_dispatch
from minidist.exercises.solutions.long_context import softmax_combine as my_combine
"""
WRONG = """
import numpy as np

def my_combine(m1, l1, o1, m2, l2, o2):  # the sums added as they are: no rescaling
    return np.maximum(m1, m2), l1 + l2, o1 + o2
"""  # and no my_dispatch at all


def minidist(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minidist", *args], capture_output=True,
                          text=True, timeout=timeout)


def write(folder, name, text):
    (folder / name).write_text(textwrap.dedent(text))
    return folder / name


def test_the_reference_solutions_pass_with_exit_code_0():
    done = minidist("check", "13")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the reference solutions: 2/2 passed" in done.stdout
    assert done.stdout.count("✔ passed") == 2


def test_a_folder_is_graded_into_a_gradebook_with_exit_code_1(tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    write(folder, "alice.py", GOOD)
    write(folder, "bob.py", WRONG)
    write(folder, "carol.py", "raise RuntimeError('half-written')\n")
    write(folder, "notes.txt", "not a submission")
    book_path = tmp_path / "book.json"
    done = minidist("check", "13_long_context", str(folder), "--json", str(book_path))
    assert done.returncode == 1, done.stdout + done.stderr
    book = json.loads(book_path.read_text())
    assert book["lesson"] == 13 and book["exercises"] == ["my_combine", "my_dispatch"]
    graded = {sub["file"].rsplit("/", 1)[-1]: sub for sub in book["submissions"]}
    assert sorted(graded) == ["alice.py", "bob.py", "carol.py"]
    assert (graded["alice.py"]["passed"], graded["bob.py"]["passed"]) == (2, 0)
    bob = {r["exercise"]: r["message"] for r in graded["bob.py"]["results"]}
    assert "your l is" in bob["my_combine"] and "should be" in bob["my_combine"]  # the checker
    assert "bob.py defines no my_dispatch" in bob["my_dispatch"]
    carol = graded["carol.py"]["results"]
    assert all("did not load: RuntimeError: half-written" in r["message"] for r in carol)
    assert "bob.py: 0/2 passed" in done.stdout and "✘ not yet — my_dispatch" in done.stdout


def test_a_submission_that_hangs_is_stopped_and_what_was_graded_is_kept(tmp_path):
    hang = write(tmp_path, "hang.py", GOOD + textwrap.dedent("""
        def my_dispatch(x_rows, expert_of_row, experts_per_rank, world_size):
            while True:  # the learner's endless loop
                pass
    """))
    start = time.monotonic()
    book = grading.grade_file(13, hang, timeout=20)
    assert time.monotonic() - start < 60
    results = {r["exercise"]: r for r in book["results"]}
    assert results["my_combine"]["passed"]
    assert results["my_dispatch"] == {"exercise": "my_dispatch", "passed": False, "message":
                                      "not graded: the submission ran past the 20 s limit"}


def test_a_notebook_is_graded_by_the_cells_that_define_the_names(tmp_path):
    def cell(source):
        return {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                "source": textwrap.dedent(source)}

    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        cell("%matplotlib inline\nimport numpy as np\nfrom minidist import exercises\n"),
        cell("!pip list\n"),  # a shell line: left out
        cell("""
            def my_combine(m1, l1, o1, m2, l2, o2):
                m = np.maximum(m1, m2)
                finite = np.where(np.isneginf(m), 0.0, m)
                a1, a2 = np.exp(m1 - finite), np.exp(m2 - finite)
                return m, a1 * l1 + a2 * l2, a1[..., None] * o1 + a2[..., None] * o2


            exercises.check_softmax_combine(my_combine)  # a bare expression: not run
            undefined_name
        """),
        cell("raise SystemExit('a cell that defines nothing graded never runs')\n"),
        cell("""
            SIZE = LATER_VARIABLE  # raises: the names of this cell are reported, not lost
            def my_dispatch(x_rows, expert_of_row, experts_per_rank, world_size):
                return [x_rows]
        """),
    ]}
    path = tmp_path / "13_mine.ipynb"
    path.write_text(json.dumps(nb))
    results = {r["exercise"]: r for r in grading.grade_file(13, path, timeout=120)["results"]}
    assert results["my_combine"]["passed"], results
    assert not results["my_dispatch"]["passed"]
    assert ("the cell defining it raised NameError: name 'LATER_VARIABLE' is not defined"
            in results["my_dispatch"]["message"])


def test_bad_arguments_are_usage_errors_naming_what_is_allowed(tmp_path):
    done = minidist("check", "99")
    assert done.returncode == 2 and "lesson must be a lesson's number 0–13" in done.stderr
    done = minidist("check", "13", str(tmp_path / "missing.py"))
    assert done.returncode == 2 and "no such file or folder" in done.stderr
    done = minidist("check", "13", "--timeout", "0")
    assert done.returncode == 2 and "--timeout must be > 0" in done.stderr


@pytest.mark.parametrize("form", [13, "13", "013", "13_long_context", "long_context"])
def test_a_lesson_is_named_by_number_or_name(form):
    assert catalog.lesson_number(form) == 13


def test_a_checker_that_raises_is_a_failed_check_not_an_exception():
    exercise = catalog.exercises(13)[0]
    broken = Exercise(13, exercise.name, lambda fn: 1 / 0, exercise.solution, "x")
    check = catalog.grade_one(broken, {exercise.name: print})
    assert not check and "the checker raised ZeroDivisionError" in check.message


def test_what_a_submission_starts_is_stopped_and_its_output_is_cut_to_a_tail(tmp_path):
    pid_file = tmp_path / "stray.pid"
    stray = write(tmp_path, "stray.py", GOOD + textwrap.dedent(f"""
        import os, subprocess, sys
        stray = subprocess.Popen(["sleep", "300"])  # left behind on purpose
        open({str(pid_file)!r}, "w").write(str(stray.pid))
        sys.stdout.write("x" * 5_000_000 + "the end of the output")
        sys.stdout.flush()
        os._exit(3)
    """))
    book = grading.grade_file(13, stray, timeout=60)
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(
        ")")[1].split()[0] in "ZX", "the submission's process survived grading"
    message = book["results"][0]["message"]
    assert message.startswith("not graded: the grading process ended with code 3 before")
    assert message.endswith("the end of the output") and len(message) < 600


def test_sys_exit_is_reported_and_the_other_exercises_are_still_graded(tmp_path):
    exits = write(tmp_path, "exits.py", GOOD + textwrap.dedent("""
        import sys
        def my_combine(m1, l1, o1, m2, l2, o2):
            sys.exit(0)
    """))
    results = {r["exercise"]: r for r in grading.grade_file(13, exits, timeout=120)["results"]}
    assert "your code called sys.exit(0)" in results["my_combine"]["message"]
    assert results["my_dispatch"]["passed"]
    quits = write(tmp_path, "quits.py", "import sys\nsys.exit(0)\n")
    results = grading.grade_file(13, quits, timeout=120)["results"]
    assert all("quits.py did not load: SystemExit" in r["message"] for r in results)


def test_a_gradebook_folder_that_does_not_exist_is_a_usage_error_before_grading(tmp_path):
    done = minidist("check", "13", "--json", str(tmp_path / "missing" / "book.json"))
    assert done.returncode == 2 and "--json: no folder" in done.stderr
    assert "passed" not in done.stdout
