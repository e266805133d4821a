"""`python -m minidist tour`: every strategy on one model, one table, and figures.

    --model mlp   the digits MLP MODEL on the bundled 8×8 digits; the metric: test accuracy
    --model gpt   a tiny character GPT (GPT) on the standard library's docstrings
                  (minidist.data.load_text); the metric: the validation loss, in nats per
                  character, on the last 10% of the text, and the next-character accuracy

Every synchronous strategy must end with the parameters of "single" (up to rounding): the
table's "same as single" column checks it.
"""

import functools
import os
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from minidist import data, nn
from minidist.train import train

MODEL = [64, 128, 64, 128, 10]  # the digits MLP (--model mlp): 7 layers, so it splits
SETTINGS = {"batch_size": 64, "lr": 0.1, "optimizer_options": {"momentum": 0.9}}
GPT = {"context": 32, "d_model": 32, "n_heads": 4, "n_layers": 2}  # n_layers + 3 layers
GPT_SETTINGS = {"batch_size": 16, "lr": 0.1, "optimizer_options": {"momentum": 0.9}}
STEPS = {"mlp": 300, "gpt": 200}  # the gpt tour: ~55 s on 2 busy cores, val loss 2.78
# (row label, strategy, options); "workers" in the options: how many of the tour's workers it
# uses, from layout() (a pipeline cannot have more stages than layers, and so on)
TOUR = [("single", "single", {}), ("distributed_gd", "distributed_gd", {}),
        ("data_parallel", "data_parallel", {}),
        ("ps bsp", "parameter_server", {"consistency": "bsp"}),
        ("ps asp", "parameter_server", {"consistency": "asp"}),
        ("ps ssp s=2", "parameter_server", {"consistency": "ssp", "staleness": 2}),
        ("tensor_parallel", "tensor_parallel", {}),
        ("pipeline gpipe", "pipeline", {"schedule": "gpipe"}),
        ("pipeline 1f1b", "pipeline", {"schedule": "1f1b"}),
        ("hybrid", "hybrid", {})]
PROCESS_ONLY = {"parameter_server"}  # servers and workers are always OS processes
SYNCHRONOUS = {"single", "distributed_gd", "data_parallel", "tensor_parallel", "pipeline",
               "hybrid"}  # and the parameter server under BSP: they must match single
# relative parameter gap called "the same": the tests hold 1e-10 after 20-50 steps; over the
# tour's 300 steps with momentum, rounding differences (~1e-16 a step) grow to ~1e-10
TOLERANCE = 1e-8


def layout(strategy, workers, model="mlp"):
    """(workers used, extra options) for `strategy` on at most `workers` ranks of the model."""
    # t must divide every hidden width (the gpt: its heads, d_ff = 4·d_model and, for sequence
    # parallelism, the context)
    widths = (GPT["n_heads"], 4 * GPT["d_model"], GPT["context"]) if model == "gpt" else MODEL[1:-1]
    split = {"sequence_parallel": True} if model == "gpt" else {}
    if strategy == "single":
        return 1, {}
    if strategy == "tensor_parallel":
        return max(t for t in range(1, workers + 1) if all(w % t == 0 for w in widths)), split
    if strategy == "pipeline":  # at most one stage per layer (a whole block for the gpt)
        layers = GPT["n_layers"] + 3 if model == "gpt" else len(MODEL) - 1
        return min(workers, layers), {"micro_batches": 4}
    if strategy == "hybrid":  # data parallel over tensor-parallel pairs
        tp = 2 if workers >= 4 and workers % 2 == 0 else 1
        return workers, {"dp": workers // tp, "tp": tp, **(split if tp > 1 else {})}
    return workers, {}


@functools.cache
def problem(model="mlp", seed=0):
    """(model_fn, X_train, y_train, X_test, y_test, settings) of the tour's `model`."""
    if model == "mlp":
        X, y = data.load_digits()
        X_train, X_test, y_train, y_test = data.train_test_split(X, y, 0.25, seed=seed)
        return (functools.partial(nn.mlp, MODEL, seed=seed), X_train, y_train, X_test, y_test,
                SETTINGS)
    if model == "gpt":
        corpus = data.load_text()
        tokenizer = data.CharTokenizer(corpus)
        train_ids, val_ids = data.split_text(tokenizer.encode(corpus), val_fraction=0.1)
        X_train, y_train = data.text_windows(train_ids, GPT["context"])
        X_val, y_val = data.text_windows(val_ids, GPT["context"])
        return (functools.partial(nn.gpt, tokenizer.vocab_size, seed=seed, **GPT), X_train,
                y_train, X_val, y_val, GPT_SETTINGS)
    raise ValueError(f"unknown model {model!r}; allowed: mlp, gpt")


def evaluate(model, X, y, chunk=128):
    """(mean loss, accuracy) of `model` over every label of y (one per row, or one per
    position of a window), `chunk` rows at a time: the activations of a thousand windows at
    once overflow the caches (5-10x slower here). Each chunk's mean loss is weighted by its
    number of labels, so the result is the mean over all of them."""
    loss = correct = 0.0
    for start in range(0, len(X), chunk):
        logits = model.forward(X[start:start + chunk])
        labels = y[start:start + chunk]
        loss += model.criterion.forward(logits, labels) * labels.size
        correct += np.sum(model.criterion.predict(logits) == labels)
    return float(loss / y.size), float(correct / y.size)


def train_one(strategy="data_parallel", workers=4, backend="process", steps=None, seed=0,
              label=None, model="mlp", **options):
    """Train the tour's `model` with one strategy; return its History and its table row."""
    model_fn, X_train, y_train, X_test, y_test, settings = problem(model, seed)
    workers, extra = layout(strategy, workers, model)
    if strategy in PROCESS_ONLY:
        backend = "process"
    steps = STEPS[model] if steps is None else steps
    start = time.perf_counter()
    with threadpool_limits(1):  # one BLAS thread per rank, as the process backend does
        hist = train(model_fn, X_train, y_train, strategy=strategy, workers=workers,
                     backend=backend, steps=steps, seed=seed, progress=True,
                     **settings, **extra, **options)
        seconds = time.perf_counter() - start
        loss, accuracy = evaluate(hist.model(), X_test, y_test)
    row = {"strategy": label or strategy, "workers": hist.workers, "backend": hist.backend,
           "final loss": float(hist.loss[-20:].mean())}
    if model == "gpt":
        row["val loss"], row["val acc"] = loss, accuracy
    else:
        row["test acc"] = accuracy
    return hist, {**row, "seconds": seconds,
                  "step ms (compute/comm)": f"{1e3 * np.median(hist.compute_time):.2f}/"
                                            f"{1e3 * np.median(hist.comm_time):.2f}",
                  "MB sent/worker": np.mean(hist.bytes_sent) / 1e6}


def tour(workers=4, backend="process", steps=None, seed=0, outdir="minidist-tour", model="mlp"):
    """Every strategy on the digits MLP (model="mlp") or a tiny GPT ("gpt"): one table, and
    the figures saved as PNG. steps: STEPS[model] unless given.

    Inside an mpiexec job (`mpiexec -n 4 python -m minidist tour --backend mpi`) every rank
    runs the MPI strategies together; rank 0 alone runs "single" and the parameter server (OS
    processes) while the others wait, and rank 0 prints the table. Returns the rows (None on
    the other ranks of an MPI job).
    """
    import tqdm.auto  # noqa: F401 - imported before the clocks start (it is slow to import)

    model_fn, X_train, _, X_test, _, settings = problem(model, seed)
    steps = STEPS[model] if steps is None else steps
    job = _mpi_job() if backend == "mpi" else None
    if job and job[1] != workers:
        raise ValueError(f"--workers {workers} inside an mpiexec job of {job[1]} ranks: "
                         f"pass --workers {job[1]}")
    root = job is None or job[0] == 0
    say = print if root else (lambda *args: None)
    if model == "gpt":
        vocab = model_fn.args[0]
        say(f"the tour: a tiny GPT (vocab {vocab}, context {GPT['context']}, d_model "
            f"{GPT['d_model']}, {GPT['n_heads']} heads, {GPT['n_layers']} blocks: "
            f"{model_fn().num_params} parameters)\non {len(X_train)} windows of the standard "
            f"library's docstrings, {steps} steps of {settings['batch_size']} windows, SGD "
            f"with momentum; {workers} workers on the {backend} backend\nval loss: the "
            f"cross-entropy in nats per character on the last 10% of the text ({len(X_test)} "
            f"windows; a uniform guess scores ln {vocab} = {np.log(vocab):.2f}); val acc: the "
            "next-character accuracy there; tensor parallelism splits the heads, the MLP and the "
            "vocabulary, with sequence parallelism\n")
    else:
        say(f"the tour: the digits MLP {MODEL}, {steps} steps of {settings['batch_size']} "
            f"samples, SGD with momentum; {workers} workers on the {backend} backend\n")
    histories, rows, kept = {}, [], []
    for label, strategy, options in TOUR:
        every_rank = job is not None and strategy not in PROCESS_ONLY and strategy != "single"
        fits = layout(strategy, workers, model)[0]
        if every_rank and fits != workers:
            say(f"skipped {label}: this model splits over {fits} ranks, the MPI job has "
                f"{workers}")
            continue
        if root or every_rank:
            hist, row = train_one(strategy, workers, backend, steps, seed, label, model,
                                  **options)
            histories[label], rows, kept = hist, rows + [row], kept + [(label, strategy, options)]
        if job and not every_rank:
            _wait_for_rank_0(label)
    if not root:
        return None
    reference = histories["single"].params
    scale = np.max(np.abs(reference))
    for (label, strategy, options), row in zip(kept, rows, strict=True):
        gap = np.max(np.abs(histories[label].params - reference)) / scale
        if strategy in SYNCHRONOUS or options.get("consistency") == "bsp":
            row["same as single"] = f"yes ({gap:.0e})" if gap <= TOLERANCE else f"NO ({gap:.0e})"
        else:  # asynchronous: a different algorithm, expected to differ
            row["same as single"] = f"differs ({gap:.0e}): async"
    print_table(rows)
    saved = save_figures(histories, rows, Path(outdir))
    print(f"\nfigures saved in {Path(outdir).resolve()}/: {', '.join(p.name for p in saved)}")
    return rows


def _mpi_job():
    """(rank, size) of this process when mpiexec started it, else None."""
    from minidist.comm.mpi import MPIEXEC_ENV

    if not any(name in os.environ for name in MPIEXEC_ENV):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size


def _wait_for_rank_0(label, timeout=600.0):
    """Every rank of the MPI job waits here (napping, not spinning) until rank 0 is done."""
    from mpi4py import MPI

    request, deadline = MPI.COMM_WORLD.Ibarrier(), time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {MPI.COMM_WORLD.rank} waited {timeout} s for rank 0 "
                               f"to finish {label!r}")
        time.sleep(1e-3)


def print_table(rows):
    columns = list(rows[0])
    formats = {"final loss": "{:.4f}", "test acc": "{:.1%}", "val loss": "{:.4f}",
               "val acc": "{:.1%}", "seconds": "{:.2f}", "MB sent/worker": "{:.2f}"}
    cells = [[formats.get(c, "{}").format(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for line in cells:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))


def save_figures(histories, rows, outdir):
    """loss_curves.png, timelines.png (steps 10-11 of every strategy that records events) and
    bytes_per_strategy.png in outdir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = min(10, *(len(h.loss) for h in histories.values()))  # each point: the mean loss
    for name, hist in histories.items():  # of 10 consecutive batches, so the curves read
        smooth = np.convolve(hist.loss, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(hist.loss)), smooth,
                label=f"{name} ({hist.workers} worker{'s' if hist.workers > 1 else ''})")
    ax.set(yscale="log", xlabel="step", ylabel=f"training loss (mean of {window} batches)",
           title="loss curves: the synchronous strategies overlap exactly")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(outdir / "loss_curves.png", dpi=100, bbox_inches="tight")
    traced = {name: h for name, h in histories.items() if any(h.events)}
    fig, axes = plt.subplots(len(traced), 1, squeeze=False,
                             figsize=(10, sum(0.8 + 0.4 * h.workers for h in traced.values())))
    for ax, (name, hist) in zip(axes[:, 0], traced.items(), strict=True):
        steps = [t for t in (10, 11) if t < len(hist.loss)] or None
        hist.timeline(ax=ax, steps=steps)
        ax.set_title(f"{name} ({hist.workers} workers): steps {steps or 'all'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(outdir / "timelines.png", dpi=90, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([r["strategy"] for r in rows], [r["MB sent/worker"] for r in rows])
    ax.set(ylabel="MB sent per worker (mean)", title="communication per strategy")
    ax.tick_params(axis="x", labelrotation=30)
    fig.savefig(outdir / "bytes_per_strategy.png", dpi=100, bbox_inches="tight")
    plt.close("all")
    return [outdir / name for name in ("loss_curves.png", "timelines.png",
                                       "bytes_per_strategy.png")]
