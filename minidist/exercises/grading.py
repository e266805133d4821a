"""Grading outside the notebook: `python -m minidist check LESSON [PATH ...] [--json FILE]`.

A submission is a .py file (or a lesson's .ipynb) that defines the exercises' names; a folder
stands for the submissions in it. Each is graded in a child process of its own, in a new
session, ended (SIGTERM, then SIGKILL) after `timeout` seconds, and whatever it started is
killed after it ends, so that one learner's endless loop, crash or stray process cannot stop
the grading of the others; the child writes one JSON line per exercise to a file the parent
reads, so what was graded before a hang is kept.

This contains accidents, not cheating: the submission runs in the grading process, and code
meant to could forge its own results. Read the code of a grade that matters.

Without a path, the lesson's reference solutions are graded: the instructor's check.
"""

import ast
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

from minidist.exercises import catalog

SOLUTIONS = "the reference solutions"
OUTPUT_TAIL = 4096  # bytes of a child's output kept


NOTEBOOK_RUNS = ("the grader runs a notebook's imports, its def and class statements, and the "
                 "cells that define the exercises' names")


def _code(nodes):
    return ast.unparse(ast.Module(body=list(nodes), type_ignores=[]))


def notebook_cells(path, names):
    """[(the exercise names a piece defines, its code)]: what the grader runs of a notebook, in
    this order: each top-level import of its code cells; then, in the notebook's order, each
    top-level def and class of the other cells (the learner's helpers) and each cell that
    defines one of `names` at top level (def, class or `name = …`), without its bare
    expressions (the checker calls, which the grader makes itself). IPython's magic and shell
    lines (`%…`, `!…`) are left out, and so are cells that still are not Python."""
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    imports, pieces = [], []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        python = "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                           for line in lines)
        try:
            tree = ast.parse(python)
        except SyntaxError:
            continue
        imports += [((), _code([node])) for node in tree.body
                    if isinstance(node, (ast.Import, ast.ImportFrom))]
        definitions = [node for node in tree.body
                       if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        defined = {node.name for node in definitions}
        defined |= {target.id for node in tree.body if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
        if defined & set(names):
            pieces.append((sorted(defined & set(names)), _code(
                node for node in tree.body
                if not isinstance(node, (ast.Expr, ast.Import, ast.ImportFrom)))))
        else:
            pieces += [((), _code([node])) for node in definitions]
    return imports + pieces


def load(path, names):
    """The namespace a submission defines (run as a module, not as __main__). A notebook runs
    piece by piece (notebook_cells): where a piece that defines exercise names raises,
    `namespace["__load_errors__"]` says why for each of them, and the rest still loads."""
    path = Path(path)
    module = types.ModuleType(f"submission_{path.stem}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # so that pickling by reference (fork) finds it
    if path.suffix != ".ipynb":
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"),  # noqa: S102
             module.__dict__)
        return vars(module)
    errors = module.__load_errors__ = {}
    for defines, code in notebook_cells(path, names):
        try:
            exec(compile(code, str(path), "exec"), module.__dict__)  # noqa: S102
        except Exception as exc:  # noqa: BLE001 - the learner's cell: report it per name
            for name in defines:
                errors.setdefault(name, f"the cell defining it raised {type(exc).__name__}: "
                                        f"{exc} ({NOTEBOOK_RUNS})")
    return vars(module)


def _child(lesson, path, out):
    """In the child: grade `path` (or the solutions), appending a JSON line per exercise."""
    if lesson in catalog.CUDA_LESSONS:  # before numba is imported: a GPU, else the simulator
        from minidist.kernels import setup_cuda

        setup_cuda()
    exercises = catalog.exercises(lesson)
    with open(out, "a", encoding="utf-8") as results:
        def write(name, passed, message):
            results.write(json.dumps({"exercise": name, "passed": bool(passed),
                                      "message": message}) + "\n")
            results.flush()

        if path == SOLUTIONS:
            namespace, where = catalog.solutions(lesson), SOLUTIONS
        else:
            where = Path(path).name
            try:
                namespace = load(path, [exercise.name for exercise in exercises])
            except BaseException as exc:  # noqa: BLE001 - the learner's file: report it
                for exercise in exercises:
                    write(exercise.name, False, f"{where} did not load: "
                                                f"{type(exc).__name__}: {exc}")
                return
        for exercise in exercises:
            check = catalog.grade_one(exercise, namespace, where)
            write(exercise.name, check.passed, check.message)


def _stop(proc):
    """End what is left of the child's session: SIGTERM while the child runs (minidist's runs
    clean up), then SIGKILL to the whole session (processes a submission started, too); then
    remove any shared memory its runs left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for leftover in glob.glob(f"/dev/shm/md{proc.pid}_*"):
        os.unlink(leftover)


def _tail(stream, keep, size=OUTPUT_TAIL):
    """Read `stream` to its end, keeping only its last `size` bytes in keep[0]."""
    for chunk in iter(lambda: stream.read(65536), b""):
        keep[0] = (keep[0] + chunk)[-size:]


def grade_file(lesson, path, timeout):
    """{"file", "results": [{"exercise", "passed", "message"}], "passed", "total"} for one
    submission (or SOLUTIONS), graded in a child process for at most `timeout` seconds; of
    the child's output only the last OUTPUT_TAIL bytes are kept, for the message of a crash."""
    names = [exercise.name for exercise in catalog.exercises(lesson)]
    with tempfile.TemporaryDirectory(prefix="minidist-grade-") as tmp:
        out = Path(tmp) / "results.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "minidist.exercises.grading",
                                 str(lesson), str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        output = [b""]
        reader = threading.Thread(target=_tail, args=(proc.stdout, output), daemon=True)
        reader.start()
        why = None
        try:
            proc.stdin.write(f"{out}\n".encode())  # not in argv, where `ps` would show it
            proc.stdin.close()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            why = f"not graded: the submission ran past the {timeout:g} s limit"
        except BrokenPipeError:  # the child died before it read where to write
            proc.wait(timeout)
        finally:
            _stop(proc)
            reader.join(10)
        if why is None:
            tail = output[0].decode(errors="replace")[-400:].strip()
            why = (f"not graded: the grading process ended with code {proc.returncode} before "
                   f"this exercise: {tail}" if proc.returncode else "not graded: the grading "
                   "process ended before this exercise (did the submission call sys.exit or "
                   "os._exit?)")
        got = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    graded = {result["exercise"] for result in got}
    got += [{"exercise": name, "passed": False, "message": why}
            for name in names if name not in graded]
    return {"file": str(path), "results": got, "passed": sum(r["passed"] for r in got),
            "total": len(got)}


def submissions(paths):
    """The files to grade: each path, or the .py and .ipynb files in a folder (sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".py", ".ipynb"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def check(lesson, paths=(), json_path=None, timeout=600.0, echo=print):
    """Grade every submission (the reference solutions if there are none); echo each result,
    write the gradebook to json_path if given. Returns the exit code: 0 when everything
    passed, 1 otherwise."""
    number = catalog.lesson_number(lesson)
    if not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    files = submissions(paths) or [SOLUTIONS]
    book = {"lesson": number, "exercises": [e.name for e in catalog.exercises(number)],
            "submissions": []}
    for path in files:
        graded = grade_file(number, path, timeout)
        book["submissions"].append(graded)
        echo(f"{graded['file']}: {graded['passed']}/{graded['total']} passed")
        for result in graded["results"]:
            mark = "✔ passed" if result["passed"] else "✘ not yet"
            echo(f"  {mark} — {result['exercise']}: {result['message']}")
    if json_path:
        Path(json_path).write_text(json.dumps(book, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    return 0 if all(s["passed"] == s["total"] for s in book["submissions"]) else 1


def listing():
    """The exercises of every lesson, a line each: lesson, name, kind, what it builds."""
    lines = []
    for exercise in catalog.exercises():
        lines.append(f"{exercise.lesson:>6}  {exercise.name:<24} {exercise.kind:<8} "
                     f"{exercise.builds}")
    return "\n".join(["lesson  write this                kind     what it builds", *lines])


if __name__ == "__main__":  # the child of grade_file: where to write comes on stdin
    _child(catalog.lesson_number(sys.argv[1]), sys.argv[2], sys.stdin.readline().strip())
