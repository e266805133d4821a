"""Lessons 5 and 6's checkers pass the reference solutions, explain typical mistakes, and put
the learner's piece inside the real run: the bucket schedule of a data-parallel run on thread
ranks, the SSP rule of parameter-server processes (the hooks are restored after)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minidist import exercises
from minidist.exercises import data_parallel as dp_checkers
from minidist.exercises import parameter_server as ps_checkers
from minidist.exercises.solutions import data_parallel as dp_solutions
from minidist.exercises.solutions import parameter_server as ps_solutions
from minidist.parallel import buckets, data_parallel
from minidist.ps import consistency

# ----- lesson 5: shard weights (formula) ----------------------------------------------------


def test_shard_weights_checker_passes_the_solution_which_matches_shard_bounds():
    assert exercises.check_shard_weights(dp_solutions.shard_weights)
    from minidist.data import shard_bounds

    for batch, p in ((10, 4), (7, 3), (64, 1)):
        sizes = [hi - lo for lo, hi in (shard_bounds(batch, k, p) for k in range(p))]
        assert np.allclose(dp_solutions.shard_weights(batch, p), np.array(sizes) / batch)


@pytest.mark.parametrize("answer, words", [
    (lambda b, p: [1 / p] * p, "with |B| = 10 rows on p = 4 ranks (shards of [3, 3, 2, 2] rows), "
                               "every rank got 1/p"),
    (lambda b, p: [(b // p) / b] * p, "the weights sum to 0.8, not 1"),
    (lambda b, p: [w * b for w in dp_solutions.shard_weights(b, p)], "shard sizes"),
    (lambda b, p: dp_solutions.shard_weights(b, p)[::-1], "wrong ranks"),
    (lambda b, p: [1.0], "one weight per rank"),
    (lambda b, p: 1 / 0, "raised ZeroDivisionError"),
])
def test_shard_weights_checker_explains_mistakes(answer, words):
    result = exercises.check_shard_weights(answer)
    assert not result and words in result.message and "✘" in repr(result), result


# ----- lesson 5: the bucket schedule, driving data_parallel ---------------------------------


def test_bucket_slices_checker_passes_the_solution_which_is_the_librarys_schedule():
    check = exercises.check_bucket_slices(dp_solutions.bucket_slices)
    assert check and "p = 2, 3, 4 ranks" in check.message, check
    for n, itemsize, limit in ((83, 8, 160), (100, 8, 32), (7, 4, 8), (1, 8, 8)):
        assert dp_solutions.bucket_slices(n, itemsize, limit) == buckets.buckets(n, itemsize,
                                                                                 limit)
    pairs = lambda n, s, b: [(x.start, x.stop) for x in dp_solutions.bucket_slices(n, s, b)]  # noqa: E731
    assert exercises.check_bucket_slices(pairs)  # (start, stop) pairs are fine too
    assert data_parallel.buckets is buckets.buckets


def elements(n, itemsize, bucket_bytes):
    """bucket_bytes taken for a number of elements."""
    return [slice(s, min(s + bucket_bytes, n)) for s in range(0, n, bucket_bytes)]


def drop_last(n, itemsize, bucket_bytes):
    """Only the full buckets: integer division forgets the tail."""
    per = bucket_bytes // itemsize
    return [slice(k * per, (k + 1) * per) for k in range(n // per)]


def tail_lost_in_the_run(n, itemsize, bucket_bytes):
    """Right on the checker's own cases, but the run's 83 elements lose their last bucket."""
    cut = dp_solutions.bucket_slices(n, itemsize, bucket_bytes)
    return cut[:-1] if n == 83 else cut


@pytest.mark.parametrize("answer, words", [
    (elements, "with n = 100 elements of 8 bytes and buckets of at most 32 bytes, bucket 0:32 "
               "holds 256 bytes. bucket_bytes counts bytes, not elements"),
    (drop_last, "with n = 9610 elements of 8 bytes and buckets of at most 4096 bytes, element "
                "9216 is in no bucket (the last, partial bucket is missing)"),
    (lambda n, s, b: [slice(i, i + 1) for i in range(n)], "100 buckets where 25 suffice"),
    (lambda n, s, b: dp_solutions.bucket_slices(n, s, b)[::-1], "in order"),
    (lambda n, s, b: [slice(0, n, 2)] + None, "raised TypeError"),
    (lambda n, s, b: [slice(k, None) for k in range(0, n, b // s)],  # open-ended buckets
     "bucket 0 is slice(0, None, None): each bucket must be a slice(start, stop) or (start, "
     "stop) with integer ends"),
    (lambda n, s, b: None, "your function returned None, not a list of buckets"),
    (tail_lost_in_the_run, "driving a data-parallel run on p = 2 ranks (n = 83 float64, buckets "
                           "of 160 bytes): with n = 83 elements of 8 bytes and buckets of at "
                           "most 160 bytes, element 80 is in no bucket (the last, partial bucket "
                           "is missing); the run's loss differs from single at step 1"),
])
def test_bucket_slices_checker_explains_mistakes_and_restores_the_schedule(answer, words):
    result = exercises.check_bucket_slices(answer)
    assert not result and words in result.message, result
    assert data_parallel.buckets is buckets.buckets


def test_bucket_schedule_drives_the_run_and_comm_stats_count_its_buckets():
    from minidist import cost, data, nn, train

    X, y = data.make_classification(48, 6, 3, seed=0)
    model_fn = lambda: nn.mlp([6, 8, 3], seed=1)  # noqa: E731
    record = []
    halves = lambda n, s, b: [slice(0, n // 2), (n // 2, n)]  # noqa: E731 - 2 uneven buckets
    with dp_checkers.bucket_schedule(halves, record):
        hist = train(model_fn, X, y, strategy="data_parallel", workers=3, backend="thread",
                     steps=2, batch_size=12, lr=0.1, algorithm="ring", timeout=30)
    assert record == [[slice(0, 41), slice(41, 83)]] * 3  # one call per rank
    for rank, stats in enumerate(hist.stats):
        assert stats["all_reduce"]["calls"] == 2 * 2
        assert stats["all_reduce"]["bytes_sent"] == 2 * sum(
            cost.bytes_per_rank("all_reduce", "ring", m, 8, 3)[rank][0] for m in (41, 42))
    assert data_parallel.buckets is buckets.buckets


def test_bucket_schedule_is_restored_after_an_error():
    with pytest.raises(ZeroDivisionError), dp_checkers.bucket_schedule(lambda n, s, b: 1 / 0):
        data_parallel.buckets(10, 8, 16)
    assert data_parallel.buckets is buckets.buckets


@pytest.mark.parametrize("kwargs, words", [
    ({"cases": ()}, "cases must be a non-empty list"),
    ({"cases": ((10, 8),)}, "cases must be a non-empty list"),
    ({"cases": ((10, 8, 4),)}, "bucket_bytes >= itemsize"),
    ({"world_sizes": (1,)}, "world_sizes must be"),
    ({"timeout": 0}, "timeout must be"),
])
def test_bucket_slices_checker_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        exercises.check_bucket_slices(dp_solutions.bucket_slices, **kwargs)


# ----- lesson 6: the SSP rule, driving the parameter server ---------------------------------


def test_ssp_rule_checker_passes_the_solution_which_is_the_servers_rule():
    check = exercises.check_ssp_rule(ps_solutions.may_pull)
    assert check and "exactly s clocks ahead" in check.message, check
    for clock, slowest, s in ((0, 0, 0), (3, 1, 2), (4, 1, 2), (7, 7, 0)):
        assert ps_solutions.may_pull(clock, slowest, s) == consistency.may_serve_pull(
            "ssp", clock, 0, slowest, s)
    assert consistency.ssp_may_pull.__module__ == "minidist.ps.consistency"


@pytest.mark.parametrize("answer, words", [
    (lambda c, m, s: c - m < s or c == m,  # "<" for "≤"
     "with worker 1 held at clock 0: worker 0 was kept waiting at clock 1 while the slowest was "
     "at 0, staleness 1: 1 clock ahead may pull (the bound is ≤ s, not < s)"),
    (lambda c, m, s: c - m <= s + 1,  # one clock too many
     "with worker 1 held at clock 0: worker 0 pulled at clock 1 while the slowest was at 0, "
     "staleness 0: a worker may run at most s = 0 clocks ahead"),
    (lambda c, m, s: c - m < s,  # "<" everywhere: even the slowest may never pull
     "a worker at clock 0 with the slowest at 0 and staleness 0 must wait: it IS the slowest, 0 "
     "clocks ahead (the bound is ≤ s, not < s)"),
    (lambda c, m, s: c <= s,  # forgets the slowest worker
     "a worker at clock 1 with the slowest at 1 and staleness 0 must wait: it IS the slowest"),
    (lambda c, m, s: None, "return True or False, got None"),
    (lambda c, m, s: 1 / 0, "raised ZeroDivisionError"),
])
def test_ssp_rule_checker_explains_mistakes_and_restores_the_rule(answer, words):
    result = exercises.check_ssp_rule(answer)
    assert not result and words in result.message and "✘" in repr(result), result
    assert consistency.ssp_may_pull.__module__ == "minidist.ps.consistency"


def test_a_rule_wrong_only_where_no_run_went_is_still_named():
    result = exercises.check_ssp_rule(lambda c, m, s: c - m <= s if m < 5 else True, bounds=(1,))
    assert not result and "a worker at clock 12 with the slowest at 10 and staleness 1 must " \
                          "wait" in result.message, result


def test_ssp_rule_reaches_the_server_processes_and_is_restored_after_an_error():
    from minidist import ps
    from minidist.errors import ServerError

    def steps(client):
        for _ in range(3):
            client.pull()
            client.push(np.zeros(client.n))

    with pytest.raises(ServerError, match="ZeroDivisionError"), \
            ps_checkers.ssp_rule(lambda c, m, s: 1 / 0):  # raised inside the server process
        ps.run(steps, 2, np.zeros(2), consistency="ssp", staleness=1, timeout=30)
    assert consistency.ssp_may_pull.__module__ == "minidist.ps.consistency"
    result = ps.run(steps, 2, np.zeros(2), consistency="ssp", staleness=1, timeout=30)
    assert all(clock - low <= 1 for _, clock, low, _ in result.pulls[0])  # the library's again


SUBMISSION = textwrap.dedent('''
    import sys, types
    if __name__ == "__main__":  # not at top level: a spawned child must not rebuild the module
        module = types.ModuleType("submission_nowhere")  # as the grader loads a student's file
        sys.modules[module.__name__] = module
        exec("def may_pull(clock, slowest_clock, staleness):\\n"
             "    return clock - slowest_clock <= staleness\\n"
             "def strict(clock, slowest_clock, staleness):\\n"
             "    return clock - slowest_clock < staleness or clock == slowest_clock\\n",
             module.__dict__)
        from minidist.exercises import check_ssp_rule
        print(check_ssp_rule(module.may_pull, bounds=(1,), start_method="spawn"))
        print(check_ssp_rule(module.strict, bounds=(1,), start_method="forkserver"))
''')


def test_the_rule_reaches_spawned_servers_from_a_module_they_cannot_import(tmp_path):
    script = tmp_path / "grade.py"
    script.write_text(SUBMISSION)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr
    assert lines[0].startswith("✔ passed"), lines
    assert "worker 0 was kept waiting at clock 1 while the slowest was at 0" in lines[1], lines


@pytest.mark.parametrize("kwargs, words", [
    ({"bounds": ()}, "bounds must be"),
    ({"bounds": (-1,)}, "bounds must be"),
    ({"bounds": (1.5,)}, "bounds must be"),
    ({"timeout": -1}, "timeout must be"),
])
def test_ssp_rule_checker_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        exercises.check_ssp_rule(ps_solutions.may_pull, **kwargs)


# ----- lesson 6: traffic through the busiest server (formula) -------------------------------


def test_server_traffic_checker_passes_the_solution_and_explains_mistakes():
    assert exercises.check_server_traffic(ps_solutions.server_bytes)
    cases = {
        "one direction only": lambda n, i, w, k: w * -(-n // k) * i,
        "divide the parameters": lambda n, i, w, k: 2 * w * n * i,
        "multiply the elements by itemsize": lambda n, i, w, k: 2 * w * -(-n // k),
        "not ⌊n/k⌋": lambda n, i, w, k: 2 * w * (n // k) * i,
        "multiply by W": lambda n, i, w, k: 2 * -(-n // k) * i,
        "expected": lambda n, i, w, k: 0,
        "raised KeyError": lambda n, i, w, k: {}[n],
        "returned None, which is not what the exercise asks for (TypeError: return a number "
        "of bytes)": lambda n, i, w, k: None,
        "returned '64000', which": lambda n, i, w, k: str(2 * w * -(-n // k) * i),
    }
    for hint, fn in cases.items():
        result = exercises.check_server_traffic(fn)
        assert not result and hint in result.message, (hint, result)


# ----- the catalog --------------------------------------------------------------------------


def test_the_catalog_lists_both_lessons_and_their_solutions_pass():
    from minidist.exercises import catalog

    for lesson, names in ((5, ["my_shard_weights", "my_bucket_slices"]),
                          (6, ["may_pull", "server_bytes"])):
        assert [e.name for e in catalog.exercises(lesson)] == names
        assert [e.kind for e in catalog.exercises(lesson)].count("formula") == 1
        assert all(catalog.grade(lesson, catalog.solutions(lesson)))
