"""Every lesson's exercises, in order: what the learner writes, what it builds, which checker
judges it, and where its reference solution is.

Each lesson's checker module (`minidist.exercises.<module>`) declares its `EXERCISES`; the
reference solutions live in `minidist.exercises.solutions.<module>` (each exercise names its
own), and `grade(lesson, solutions(lesson))` is the instructor's check that they pass.
"""

import importlib

from minidist.exercises._common import Check

MODULES = {0: "welcome", 1: "gradient_descent", 2: "gpu_kernels", 3: "collectives",
           4: "distributed_gd", 5: "data_parallel", 6: "parameter_server", 7: "model_parallel",
           8: "compression", 9: "planning", 10: "transformers", 11: "sharding",
           12: "parallel_transformers", 13: "long_context"}
CUDA_LESSONS = {2}  # their checkers launch CUDA kernels: the grader sets up a GPU or the simulator


def lesson_number(lesson):
    """The lesson's number from 3, "3", "03", "03_collectives" or "collectives"."""
    text = str(lesson).strip()
    head = text.split("_", 1)[0]
    if head.isdigit() and int(head) in MODULES:
        return int(head)
    for number, module in MODULES.items():
        if text == module:
            return number
    raise ValueError(f"lesson must be a lesson's number 0–{max(MODULES)} or one of "
                     f"{', '.join(MODULES.values())}; got {lesson!r}")


def exercises(lesson=None):
    """The exercises of one lesson (any form lesson_number takes), or of every lesson."""
    numbers = MODULES if lesson is None else [lesson_number(lesson)]
    found = []
    for number in numbers:
        module = importlib.import_module(f"minidist.exercises.{MODULES[number]}")
        found += list(module.EXERCISES)
    return found


def solutions(lesson):
    """{the learner's name: the reference solution} for the lesson's exercises."""
    module = importlib.import_module(
        f"minidist.exercises.solutions.{MODULES[lesson_number(lesson)]}")
    return {exercise.name: getattr(module, exercise.solution) for exercise in exercises(lesson)}


def grade_one(exercise, namespace, where="the submission"):
    """The checker's Check for namespace[exercise.name] (a dict or a module); a missing name or
    a checker that raised is a failed Check, never an exception."""
    if not isinstance(namespace, dict):
        namespace = vars(namespace)
    answer = namespace.get(exercise.name)
    if answer is None:
        why = namespace.get("__load_errors__", {}).get(exercise.name)
        return Check(exercise.name, False, f"{where}: {why}" if why else
                     f"{where} defines no {exercise.name} (the exercise's name, as in the "
                     f"lesson's cell)")
    try:
        return exercise.checker(answer)
    except SystemExit as exc:  # the learner's code, outside the checker's own guards
        return Check(exercise.name, False, f"{where}: your code called sys.exit({exc.code!r})")
    except Exception as exc:  # noqa: BLE001 - a checker must report, never raise
        return Check(exercise.name, False, f"the checker raised {type(exc).__name__}: {exc}")


def grade(lesson, namespace, where="the submission"):
    """[Check] for every exercise of the lesson, in order."""
    return [grade_one(exercise, namespace, where) for exercise in exercises(lesson)]
