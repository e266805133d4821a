"""train() under faults and bad input: every bad argument, bad datum, diverged run and damaged
or mismatched checkpoint ends in a ValueError or TypeError that names it, before (or instead
of) a wrong number, on every strategy it applies to; process runs leave nothing behind."""

import functools
import os
import time

import numpy as np
import pytest

from minidist import data, nn, optim, run, train
from minidist.parallel.shard import ModelShard, gather_params

X, Y = data.make_classification(200, 8, 4, seed=0)
MODEL = functools.partial(nn.mlp, [8, 16, 12, 16, 4], seed=1)
# strategy -> what it needs to run on the thread backend (parameter_server: processes)
STRATEGIES = {
    "single": {},
    "distributed_gd": {"workers": 2, "backend": "thread"},
    "data_parallel": {"workers": 2, "backend": "thread"},
    "tensor_parallel": {"workers": 2, "backend": "thread"},
    "pipeline": {"workers": 2, "backend": "thread", "micro_batches": 2},
    "hybrid": {"workers": 4, "backend": "thread", "dp": 2, "tp": 2},
    "zero": {"workers": 2, "backend": "thread", "stage": 3},
    "parameter_server": {"workers": 2, "backend": "process"},
}
MODEL_PARALLEL = ["tensor_parallel", "pipeline", "hybrid"]


def _fails(error, match, *args, **kwargs):
    """train(*args, **kwargs) raises `error` matching `match`; returns the seconds it took."""
    start = time.monotonic()
    with pytest.raises(error, match=match):
        train(*args, **kwargs)
    return time.monotonic() - start


def _row_first_used_at(step, steps=10, batch_size=32):
    """A row that data.step_batches(200, 32, ...) first puts in the batch of `step`."""
    batches = list(data.step_batches(len(X), batch_size, steps, seed=0))
    seen = set(np.concatenate(batches[:step]))
    return int(next(r for r in batches[step] if r not in seen))


# --- item 4: the data, checked before any step ---------------------------------------------

def _regression():
    return nn.Sequential([nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)], nn.MSELoss(), seed=1)


def _with(array, where, value):
    """A copy of `array` with array[where] = value."""
    out = np.array(array, dtype=np.result_type(array, type(value)))
    out[where] = value
    return out


ROW = _row_first_used_at(5)  # a NaN here would give a NaN loss only at step 5
BAD_DATA = {  # fault -> (model_fn, X, y, error, match)
    "NaN in X": (MODEL, _with(X, (ROW, 3), np.nan), Y, ValueError,
                 rf"X must be finite: X\[{ROW}, 3\] \(row {ROW}, column 3\) is nan"),
    "inf in X": (MODEL, _with(X, (11, 0), np.inf), Y, ValueError,
                 r"X\[11, 0\] \(row 11, column 0\) is inf"),
    "label outside the classes": (MODEL, X, _with(Y, ROW, 9), ValueError,
                                  rf"y\[{ROW}\] = 9 \(row {ROW}\) is not a class label: the "
                                  r"model has 4 classes, so y must lie in \[0, 4\)"),
    "negative label": (MODEL, X, _with(Y, 3, -1), ValueError,
                       r"y\[3\] = -1 \(row 3\) is not a class label"),
    "float labels for a classifier": (MODEL, X, Y.astype(float), TypeError,
                                      r"y must hold integer class labels in "
                                      r"\[0, 4\) for this classifier, got float64"),
    "NaN target of a regression": (_regression, X, _with(X[:, 0], ROW, np.nan), ValueError,
                                   rf"y must be finite: y\[{ROW}\] \(row {ROW}\) is nan"),
    "ragged list for X": (MODEL, [[0.0] * 8] * 199 + [[0.0] * 7], Y, ValueError,
                          "X must be an array .or nested lists of equal lengths"),
    "strings for X": (MODEL, X.astype(str), Y, TypeError, "X must hold numbers"),
}


@pytest.mark.fault
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("fault", list(BAD_DATA))
def test_bad_data_is_named_by_row_before_training(strategy, fault, fault_matrix,
                                                  leaves_nothing_behind):
    model_fn, X_bad, y_bad, error, match = BAD_DATA[fault]
    seconds = _fails(error, match, model_fn, X_bad, y_bad, strategy=strategy, steps=10,
                     batch_size=32, timeout=60, **STRATEGIES[strategy])
    assert seconds < 10  # checked up front: no rank starts
    fault_matrix.record(f"train(strategy={strategy!r}): {fault}", "any",
                        f"{error.__name__} naming the row (and column) before step 0", seconds)


def test_lists_for_X_and_y_are_converted():
    as_lists = train(MODEL, X.tolist(), Y.tolist(), steps=3, batch_size=32)
    np.testing.assert_array_equal(as_lists.params, train(MODEL, X, Y, steps=3,
                                                         batch_size=32).params)


# --- item 4: divergence, named by its step on every strategy --------------------------------

@pytest.fixture(scope="module")
def diverging_step():
    """The step at which single-process SGD with lr=1e6 on 1000·X first gives a NaN loss."""
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(ValueError) as info:
        train(MODEL, 1e3 * X, Y, steps=50, batch_size=32, lr=1e6)
    return int(str(info.value).split("at step ")[1].split()[0])


@pytest.mark.fault
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("strategy, backend", [(s, "thread") for s in STRATEGIES
                                               if s != "parameter_server"]
                         + [(s, "process") for s in MODEL_PARALLEL + ["parameter_server"]])
def test_divergence_names_its_step_on_every_strategy(strategy, backend, diverging_step,
                                                     fault_matrix, leaves_nothing_behind):
    options = {**STRATEGIES[strategy], **({"backend": backend} if strategy != "single" else {})}
    with np.errstate(over="ignore", invalid="ignore"):
        seconds = _fails(ValueError, rf"the loss became nan at step {diverging_step} "
                         r"\(lr=1000000.0\); training diverged: try a smaller learning rate",
                         MODEL, 1e3 * X, Y, strategy=strategy, steps=50, batch_size=32,
                         lr=1e6, timeout=120, **options)
    assert seconds < 120
    fault_matrix.record(f"train(strategy={strategy!r}, lr=1e6) diverges", backend,
                        f"ValueError: the loss became nan at step {diverging_step}, "
                        "training diverged", seconds)


@pytest.mark.fault
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_parameters_blown_up_by_the_last_step_are_reported(strategy, fault_matrix,
                                                           leaves_nothing_behind):
    """Step 0's loss is finite; its update, with lr=1e308, overflows the parameters."""
    with np.errstate(over="ignore", invalid="ignore"):
        seconds = _fails(ValueError, r"the parameters became non-finite in the last step "
                         r"\(0, lr=1e\+308\); training diverged", MODEL, 1e3 * X, Y,
                         strategy=strategy, steps=1, batch_size=32, lr=1e308, timeout=120,
                         **STRATEGIES[strategy])
    fault_matrix.record(f"train(strategy={strategy!r}, steps=1, lr=1e308): the only update "
                        "overflows the parameters", STRATEGIES[strategy].get("backend", "any"),
                        "ValueError: the parameters became non-finite in the last step",
                        seconds)


def _gather_with_a_nan(comm):
    model = MODEL()
    model.params[5] = np.nan  # in layer 0's weight, which tensor parallelism splits
    shard = ModelShard(model, tp_comm=comm)
    return gather_params(comm, shard)


def test_gathering_keeps_a_nan_parameter_apart_from_no_owner():
    full = run(_gather_with_a_nan, 2, backend="thread", timeout=30)[0]
    expected = MODEL().params.copy()
    expected[5] = np.nan
    np.testing.assert_array_equal(full, expected)


# --- item 8: every argument of train() ------------------------------------------------------

BAD_ARGUMENTS = [  # (strategy, the argument(s), error, match)
    ("single", {"steps": "5"}, TypeError, r"steps must be an integer >= 1, got '5' \(str\)"),
    ("single", {"steps": 5.0}, TypeError, r"steps must be an integer >= 1, got 5.0"),
    ("single", {"steps": True}, TypeError, r"steps must be an integer >= 1, got True \(bool\)"),
    ("single", {"batch_size": 32.5}, TypeError, "batch_size must be an integer >= 1, got 32.5"),
    ("single", {"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
    ("data_parallel", {"workers": True}, TypeError, "workers must be an integer >= 1, got True"),
    ("data_parallel", {"workers": 2.0}, TypeError, "workers must be an integer >= 1, got 2.0"),
    ("single", {"lr": -0.1}, ValueError, r"lr must be a finite number > 0, got -0.1"),
    ("single", {"lr": 0.0}, ValueError, r"lr must be a finite number > 0, got 0.0"),
    ("single", {"lr": float("nan")}, ValueError, r"lr must be a finite number > 0, got nan"),
    ("single", {"lr": "0.1"}, TypeError, r"lr must be a number > 0 or a schedule"),
    ("single", {"lr": True}, TypeError, r"lr must be a number > 0 or a schedule"),
    ("single", {"lr": lambda t: 0.1 - 0.05 * t}, ValueError,
     r"the lr schedule gives -0.0500.* at step 3; every rate must be a finite number >= 0"),
    ("single", {"optimizer": ["sgd"]}, ValueError, r"unknown optimizer \['sgd'\]; allowed: sgd"),
    ("single", {"optimizer_options": [("momentum", 0.9)]}, TypeError,
     "optimizer_options must be a dict"),
    ("single", {"optimizer_options": {"momentom": 0.9}}, ValueError,
     r"optimizer_options: optimizer 'sgd' does not take \['momentom'\]; its options: "
     "momentum, weight_decay"),
    ("single", {"optimizer_options": {"momentum": "0.9"}}, TypeError,
     r"optimizer_options: momentum must be a number \(its default is 0.0\), got '0.9'"),
    ("single", {"optimizer": "adam", "optimizer_options": {"betas": (0.9, 2.0)}}, ValueError,
     r"optimizer_options=.*for optimizer 'adam': Adam betas must lie in \[0, 1\)"),
    ("single", {"seed": -1}, ValueError, "seed must be an integer >= 0, got -1"),
    ("single", {"seed": 1.5}, TypeError, "seed must be an integer >= 0, got 1.5"),
    ("single", {"progress": "yes"}, TypeError, "progress must be True or False"),
    ("single", {"backend": "gpu"}, ValueError, "unknown backend 'gpu'; allowed: thread, process"),
    ("data_parallel", {"timeout": "60"}, TypeError, "timeout must be a number of seconds > 0"),
    ("data_parallel", {"timeout": float("inf")}, ValueError,
     "timeout must be a finite number of seconds > 0"),
    ("single", {"strategy": ["single"]}, ValueError, r"unknown strategy \['single'\]; allowed"),
    ("single", {"model_fn": "mlp"}, TypeError, "model_fn must be callable"),
    ("data_parallel", {"bucket_bytes": 1.5}, TypeError,
     r"bucket_bytes must be an integer \(its default is 1048576\), got 1.5"),
    ("data_parallel", {"accumulate": True}, TypeError, "accumulate must be an integer"),
    ("data_parallel", {"compress_ratio": "0.1", "compression": "topk"}, TypeError,
     r"compress_ratio must be a number \(its default is 0.01\)"),
    ("data_parallel", {"local_steps": True}, TypeError, "local_steps must be an integer"),
    ("data_parallel", {"compression": "topk", "error_feedback": "yes"}, ValueError,
     "error_feedback must be True, False or None"),
    ("pipeline", {"micro_batches": True}, TypeError, "micro_batches must be an integer"),
    ("pipeline", {"cuts": [1.7]}, TypeError, r"cuts must be None or a list of layer indices"),
    ("pipeline", {"schedule": 1}, TypeError, r"schedule must be a string \(its default is "),
    ("tensor_parallel", {"algorithm": None}, TypeError, "algorithm must be a string"),
    ("hybrid", {"tp": 2.0}, TypeError, "tp must be an integer"),
    ("parameter_server", {"num_servers": True}, TypeError, "num_servers must be an integer"),
    ("parameter_server", {"checkpoint_every": "5", "checkpoint_dir": "/tmp"}, TypeError,
     "checkpoint_every must be an integer"),
    ("parameter_server", {"checkpoint_every": -1, "checkpoint_dir": "/tmp"}, ValueError,
     "checkpoint_every must be an integer >= 0, got -1"),
    ("parameter_server", {"checkpoint_dir": 5, "checkpoint_every": 1}, TypeError,
     r"checkpoint_dir must be a directory path \(str or os.PathLike\) or None, got 5"),
    ("parameter_server", {"resume": "yes", "checkpoint_dir": "/tmp"}, TypeError,
     "resume must be True or False"),
    ("parameter_server", {"elastic": 1}, TypeError, "elastic must be True or False"),
    ("parameter_server", {"slow_workers": [1]}, TypeError, "slow_workers must be a dict"),
]


@pytest.mark.fault
@pytest.mark.parametrize("strategy, arguments, error, match", BAD_ARGUMENTS,
                         ids=[f"{s}-{'-'.join(a)}-{i}" for i, (s, a, _, _) in
                              enumerate(BAD_ARGUMENTS)])
def test_each_bad_argument_is_named(strategy, arguments, error, match, fault_matrix,
                                    leaves_nothing_behind):
    kwargs = {"steps": 5, "batch_size": 32, "timeout": 60, **STRATEGIES[strategy],
              "strategy": strategy, **arguments}
    model_fn = kwargs.pop("model_fn", MODEL)
    seconds = _fails(error, match, model_fn, X, Y, **kwargs)
    assert seconds < 10  # before any rank starts
    shown = ", ".join(f"{k}={v!r}" if not callable(v) else f"{k}=<a schedule>"
                      for k, v in arguments.items())
    fault_matrix.record(f"train(strategy={strategy!r}, {shown})", "any",
                        f"{error.__name__} naming the argument and what it may be", seconds)


def test_numpy_integers_are_integers():
    hist = train(MODEL, X, Y, strategy="hybrid", workers=np.int64(4), backend="thread",
                 steps=np.int32(2), batch_size=np.int64(32), seed=np.uint8(0), dp=np.int64(2),
                 tp=np.int64(2), micro_batches=np.int64(2), lr=np.float32(0.1))
    reference = train(MODEL, X, Y, steps=2, batch_size=32, lr=np.float32(0.1))
    np.testing.assert_allclose(hist.params, reference.params, rtol=1e-10)
    assert train(MODEL, X, Y, steps=2, lr=optim.linear_warmup(0.1, 2)).loss.shape == (2,)
    ssp = train(MODEL, X, Y, strategy="parameter_server", workers=2, backend="process", steps=2,
                consistency="ssp", staleness=np.int64(1), batch_size=32, timeout=60)
    assert ssp.loss.shape == (2,)


# --- item 3: resume, on the parameter server (the strategy that checkpoints) ---------------

PS = {"strategy": "parameter_server", "workers": 2, "batch_size": 32, "lr": 0.1,
      "optimizer": "adam", "timeout": 60}


@pytest.fixture(scope="module")
def forty_steps(tmp_path_factory):
    """A 40-step BSP run on 2 servers that checkpointed every 10 steps: its History and the
    folder (versions 30 and 40 are kept)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    hist = train(MODEL, X, Y, steps=40, num_servers=2, checkpoint_dir=str(folder),
                 checkpoint_every=10, **PS)
    assert sorted(os.listdir(folder)) == ["shard0-v30.npz", "shard0-v40.npz",
                                          "shard1-v30.npz", "shard1-v40.npz"]
    return hist, folder


def _copy(folder, tmp_path):
    for name in os.listdir(folder):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    return tmp_path


@pytest.mark.fault
def test_resuming_past_steps_is_refused(forty_steps, tmp_path, fault_matrix,
                                        leaves_nothing_behind):
    folder = _copy(forty_steps[1], tmp_path)
    seconds = _fails(ValueError, r"resume=True: the checkpoint in .* is at step 40, past "
                     r"steps=20; ask for steps >= 40", MODEL, X, Y, steps=20, num_servers=2,
                     checkpoint_dir=str(folder), resume=True, **PS)
    assert seconds < 30
    fault_matrix.record("train(strategy='parameter_server', steps=20, resume=True) on a "
                        "40-step checkpoint", "process",
                        "ValueError naming step 40 and steps=20, before any process starts",
                        seconds)


@pytest.mark.fault
def test_resuming_with_other_workers_is_refused(forty_steps, tmp_path, fault_matrix,
                                                leaves_nothing_behind):
    folder = _copy(forty_steps[1], tmp_path)
    seconds = _fails(ValueError, r"written by 2 workers, this run has workers=3", MODEL, X, Y,
                     steps=40, num_servers=2, checkpoint_dir=str(folder), resume=True,
                     **{**PS, "workers": 3})
    fault_matrix.record("train(strategy='parameter_server', resume=True) with 3 workers on a "
                        "2-worker checkpoint", "process",
                        "ValueError naming both worker counts", seconds)


DAMAGE = {  # how a file is damaged -> its new bytes, from the old
    "truncated": lambda b: b[:len(b) // 2],
    "empty": lambda b: b"",
    "one byte flipped": lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF])
    + b[len(b) // 2 + 1:],
}


@pytest.mark.fault
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(
        forty_steps, tmp_path, damage, fault_matrix, leaves_nothing_behind):
    whole, source = forty_steps
    folder = _copy(source, tmp_path)
    bad = folder / "shard1-v40.npz"  # one shard of the newest version
    bad.write_bytes(DAMAGE[damage](bad.read_bytes()))
    start = time.monotonic()
    with pytest.warns(UserWarning, match=rf"damaged checkpoint {bad}: .*; resuming from "
                      "version 30, the newest intact checkpoint"):
        resumed = train(MODEL, X, Y, steps=40, num_servers=2, checkpoint_dir=str(folder),
                        resume=True, **PS)
    seconds = time.monotonic() - start
    assert resumed.ps["start_step"] == 30
    np.testing.assert_array_equal(resumed.params, whole.params)  # steps 30..39 again
    np.testing.assert_array_equal(resumed.loss[30:], whole.loss[30:])
    fault_matrix.record(f"resume=True, newest checkpoint file {damage}", "process",
                        "UserWarning naming the file and version 30; resumes bit-identically",
                        seconds)


@pytest.mark.fault
def test_no_intact_checkpoint_names_every_damaged_file(forty_steps, tmp_path, fault_matrix,
                                                       leaves_nothing_behind):
    folder = _copy(forty_steps[1], tmp_path)
    for name in ("shard0-v40.npz", "shard1-v30.npz"):
        (folder / name).write_bytes(b"not a checkpoint")
    seconds = _fails(ValueError, r"no intact checkpoint in .*shard0-v40.npz: cannot be read.*"
                     r"shard1-v30.npz: cannot be read", MODEL, X, Y, steps=40, num_servers=2,
                     checkpoint_dir=str(folder), resume=True, **PS)
    fault_matrix.record("resume=True, a damaged file in every checkpoint version", "process",
                        "ValueError naming each damaged file", seconds)


def test_an_asynchronous_resume_reports_the_steps_it_ran(tmp_path):
    """ASP checkpoints count updates (W per step): the resumed run starts from the workers'
    clocks, step 20, not from version 40."""
    options = {**PS, "consistency": "asp", "checkpoint_dir": str(tmp_path)}
    train(MODEL, X, Y, steps=20, checkpoint_every=10, **options)
    assert sorted(os.listdir(tmp_path)) == ["shard0-v30.npz", "shard0-v40.npz"]
    resumed = train(MODEL, X, Y, steps=30, resume=True, **options)
    assert resumed.ps["start_step"] == 20
    assert np.isnan(resumed.loss[:20]).all() and np.isfinite(resumed.loss[20:]).all()
