"""The coursework as a whole: every lesson has an exercise that builds and at most one formula,
every exercise has a reference solution, the lessons' pages hold stubs and not answers, and
docs/teaching.md lists exactly the catalog."""

import json
import re
from pathlib import Path

import pytest

from minidist.exercises import catalog, grading

ROOT = Path(__file__).resolve().parent.parent
LESSONS = {int(path.name[:2]): path
           for path in sorted((ROOT / "lessons").glob("[0-9][0-9]_*.ipynb"))}


def table_row(exercise):
    return f"| {exercise.lesson} | `{exercise.name}` | {exercise.kind} | {exercise.builds} |"


def test_every_lesson_has_a_module_of_exercises():
    assert sorted(LESSONS) == sorted(catalog.MODULES)


@pytest.mark.parametrize("lesson", sorted(catalog.MODULES))
def test_each_lesson_builds_something_and_has_at_most_one_formula(lesson):
    kinds = [exercise.kind for exercise in catalog.exercises(lesson)]
    assert kinds.count("build") >= 1, kinds
    assert kinds.count("formula") <= 1, kinds
    names = [exercise.name for exercise in catalog.exercises(lesson)]
    assert len(set(names)) == len(names)
    assert not [e.builds for e in catalog.exercises(lesson) if "|" in e.builds]  # a table cell
    assert all(callable(answer) for answer in catalog.solutions(lesson).values())


@pytest.mark.parametrize("lesson", sorted(catalog.MODULES))
def test_the_page_holds_stubs_not_answers(lesson):
    """Graded as a learner's notebook, the committed lesson fails every exercise: its cells
    define each name as a stub; no section of worked solutions follows."""
    text = LESSONS[lesson].read_text(encoding="utf-8")
    cells = json.loads(text)["cells"]
    headings = [line for cell in cells if cell["cell_type"] == "markdown"
                for line in "".join(cell["source"]).splitlines() if line.startswith("#")]
    assert not [h for h in headings if re.search(r"(?i)solution", h)], headings
    exercises = catalog.exercises(lesson)
    namespace = grading.load(LESSONS[lesson], [exercise.name for exercise in exercises])
    for exercise in exercises:
        assert exercise.name in namespace, f"lesson {lesson} defines no {exercise.name}"
        check = catalog.grade_one(exercise, namespace, LESSONS[lesson].name)
        assert not check, f"the page of lesson {lesson} answers {exercise.name}: {check}"


def test_docs_teaching_lists_the_catalog():
    text = (ROOT / "docs" / "teaching.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \| `", line)]
    assert rows == [table_row(exercise) for exercise in catalog.exercises()]


def test_the_listing_names_every_exercise():
    listing = grading.listing()
    for exercise in catalog.exercises():
        assert f"{exercise.name:<24} {exercise.kind}" in listing
