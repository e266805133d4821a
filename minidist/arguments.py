"""The checks `minidist.train` makes before any step runs: every argument, the data and the
options of the strategy and the optimizer, each bad one named with what it may be."""

import inspect
from collections.abc import Mapping

import numpy as np

from minidist import data, kernels, memory, nn, optim
from minidist.errors import OutOfMemory
from minidist.launch import BACKENDS
from minidist.parallel.buckets import units
from minidist.precision import HALF, PRECISIONS, SCALE_RANGE, resolve

# the strategies that give every worker its own rows of the batch (model-parallel ranks share
# their replica's rows: hybrid.check_job asks for dp · micro_batches rows)
SHARD_THE_BATCH = ("distributed_gd", "data_parallel", "parameter_server", "zero")


def check_arguments(strategies, job_checks, model_fn, X, y, strategy, workers, backend, steps,
                    batch_size, lr, optimizer, seed, optimizer_options, progress, timeout,
                    strategy_options, precision, loss_scale, max_memory_per_rank=None):
    """A TypeError or ValueError naming train()'s first bad argument (and what it may be),
    before anything runs; returns X and y as arrays, the optimizer options as a dict and the
    precision's name. strategies: train's {name: (worker, defaults, check)}; job_checks:
    {name: check(model_fn, workers, batch_size, options, X.shape)}. Last, OutOfMemory if the
    plan shows that every rank's persistent state would pass max_memory_per_rank
    (`planned_state`)."""
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable (it builds the model), got {model_fn!r}")
    if not isinstance(strategy, str) or strategy not in strategies:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(strategies)}")
    data.check_integer("workers", workers)
    if strategy == "single" and workers != 1:
        raise ValueError(f"strategy='single' runs one process; workers must be 1, got {workers}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    for name, value, minimum in (("steps", steps, 1), ("batch_size", batch_size, 1),
                                 ("seed", seed, 0)):
        data.check_integer(name, value, minimum)
    if batch_size < workers and strategy in SHARD_THE_BATCH:
        raise ValueError(f"batch_size={batch_size} is smaller than workers={workers}: "
                         "every worker needs at least one sample")
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if not _is_number(timeout):
        raise TypeError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if not 0 < timeout < np.inf:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    if max_memory_per_rank is not None:
        data.check_integer("max_memory_per_rank", max_memory_per_rank, minimum=1)
    _check_lr(lr, steps)
    optimizer_options = _check_optimizer(optimizer, optimizer_options, lr)
    _, defaults, check = strategies[strategy]
    unknown = set(strategy_options) - set(defaults)
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ValueError(f"strategy {strategy!r} does not take {sorted(unknown)}; "
                         f"its options: {allowed}")
    _check_types("", defaults, strategy_options)
    if check:
        check(strategy_options)
    model = model_fn()
    _check_device(model, strategy)
    precision = _check_precision(precision, loss_scale, model, strategy, strategy_options)
    X, y = data.check_training_data(X, y)
    check_tokens = getattr(next(iter(getattr(model, "layers", [])), None), "check_tokens", None)
    if check_tokens is not None:  # a language model: every token id in its vocabulary
        check_tokens(X)
    output = _classifier_output(model, X)
    if output is not None:
        data.check_labels(y, output[-1])
        if y.shape[1:] != output[1:-1]:
            raise ValueError(f"y must hold one class label per output of the model: shape "
                             f"(N{''.join(f', {n}' for n in output[1:-1])}) for X of shape "
                             f"{X.shape}, got {y.shape}")
    if batch_size > len(X):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(X)} training rows")
    if strategy in job_checks:
        job_checks[strategy](model_fn, workers, batch_size, strategy_options, X.shape)
    held = planned_state(model, strategy, workers, optimizer, precision,
                         {**defaults, **strategy_options})
    if max_memory_per_rank is not None and held is not None:
        total = sum(held.values())
        if total > max_memory_per_rank:
            raise OutOfMemory.over(None, {**held, "activations": 0, "peak": total},
                                   max_memory_per_rank, "before training (from the plan)")
    return X, y, optimizer_options, precision


def planned_state(model, strategy, workers, optimizer, precision, options):
    """{params, grads, optimizer}: the persistent bytes every rank of `strategy` will hold, as
    its ledger will count them; None where the plan does not tell (strategies other than
    single, data_parallel and zero, models other than a Sequential). Ψ parameters of b bytes,
    S optimizer state arrays:

        single         Ψb + Ψb + SΨb        (memory.model_state_bytes)
        data_parallel  Ψb + 2Ψb + SΨb       (model.grads and the shared all-reduce buffer)
        zero           memory.zero_state_bytes of the stage, over units(model, bucket_bytes)

    fp16/bf16 hold what minidist's emulation holds (model_state_bytes(emulated=True)), and
    data_parallel its 16-bit all-reduce buffer beside, 2Ψ."""
    if strategy not in ("single", "data_parallel", "zero") or not isinstance(model,
                                                                            nn.Sequential):
        return None
    psi, itemsize = model.num_params, model.dtype.itemsize
    if precision in HALF:
        held = memory.model_state_bytes(psi, precision, optimizer, emulated=True)
        if strategy == "data_parallel":
            held["grads"] += 2 * psi  # its 16-bit all-reduce buffer
        return held
    if strategy == "single":
        return memory.model_state_bytes(psi, precision, optimizer)
    if strategy == "data_parallel":
        return memory.zero_state_bytes([psi], 0, workers, itemsize, optimizer)
    sizes = [unit.size for unit in units(model, options["bucket_bytes"])]
    return memory.zero_state_bytes(sizes, options["stage"], workers, itemsize, optimizer)


# the strategies that train a device="cuda" model on its GPU (communication staged through host
# buffers, minidist.comm.staging); the others' layers and messages are numpy arrays
DEVICE_STRATEGIES = ("single", "data_parallel", "parameter_server")


def _check_device(model, strategy):
    if getattr(model, "device", "numpy") == "cuda" and strategy not in DEVICE_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} runs on the host: its split layers and "
                         f"messages are numpy arrays, so a device='cuda' model cannot run it; "
                         f"on the GPU use strategy {', '.join(map(repr, DEVICE_STRATEGIES))}, "
                         f"or build the model with device='numpy' for {strategy!r}")


def _check_precision(precision, loss_scale, model, strategy, options):
    """The precision's name (None: the model's own), if the model and the strategy can run it;
    loss_scale in SCALE_RANGE."""
    names = ", ".join(PRECISIONS)
    if precision is not None and (not isinstance(precision, str) or precision not in PRECISIONS):
        raise ValueError(f"unknown precision {precision!r}; allowed: {names}, or None (the "
                         "model's own dtype)")
    if not _is_number(loss_scale):
        raise TypeError(f"loss_scale must be a number > 0, got {loss_scale!r}")
    low, high = SCALE_RANGE
    if not low <= loss_scale <= high:
        raise ValueError(f"loss_scale must lie in [2**-24, 2**127] (an fp32 number whose "
                         f"inverse is one too), got {loss_scale!r}")
    dtype = np.dtype(getattr(model, "dtype", np.float64))
    if precision is None:
        return resolve(None, dtype)
    needs = np.dtype(np.float64 if precision == "fp64" else np.float32)
    if dtype != needs:
        why = " (fp16/bf16 keep fp32 master weights)" if precision in HALF else ""
        raise ValueError(f"precision={precision!r} needs a {needs} model{why}; model_fn builds "
                         f"a {dtype} one: build the model with dtype=np.{needs}")
    if precision not in HALF:
        return precision
    if strategy not in ("single", "data_parallel"):
        raise ValueError(f"precision={precision!r} runs with strategy 'single' or "
                         f"'data_parallel' only, not {strategy!r}")
    if not isinstance(model, nn.Sequential) or model.device != "numpy":
        raise ValueError(f"precision={precision!r} needs a minidist.nn.Sequential model on "
                         f"the numpy device, got {type(model).__name__} on "
                         f"{getattr(model, 'device', 'unknown')!r}")
    if strategy == "data_parallel":
        if options.get("compression") is not None or options.get("local_steps", 1) > 1:
            raise ValueError(f"precision={precision!r} with data_parallel does not combine with "
                             "compression or local_steps > 1 (they run at full precision)")
    return precision


def _is_number(value):
    """A real number; a bool is not one here."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _check_lr(lr, steps):
    """lr: a finite number > 0, or a schedule whose every rate of the run is finite and >= 0."""
    if callable(lr):
        for t in range(steps):
            rate = lr(t)
            if not _is_number(rate) or not 0 <= rate < np.inf:
                raise ValueError(f"the lr schedule gives {rate!r} at step {t}; every rate must "
                                 "be a finite number >= 0")
    elif not _is_number(lr):
        raise TypeError(f"lr must be a number > 0 or a schedule (a function of the step "
                        f"t = 0, 1, ...), got {lr!r}")
    elif not 0 < lr < np.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


def _check_optimizer(optimizer, options, lr):
    """The optimizer's name and its options: only the settings its constructor takes, each of
    its default's kind, and values it accepts. Returns the options as a new dict."""
    if not isinstance(optimizer, str) or optimizer not in optim.OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; allowed: "
                         f"{', '.join(optim.OPTIMIZERS)}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"optimizer_options must be a dict of the optimizer's settings or None, "
                        f"got {options!r}")
    options = dict(options or {})
    settings = {name: p.default for name, p in
                inspect.signature(optim.OPTIMIZERS[optimizer]).parameters.items()
                if name not in ("params", "lr", "ops")}
    unknown = sorted(set(options) - set(settings))
    if unknown:
        raise ValueError(f"optimizer_options: optimizer {optimizer!r} does not take {unknown}; "
                         f"its options: {', '.join(settings)}")
    _check_types("optimizer_options: ", settings, options)
    try:
        optim.make(optimizer, np.zeros(1), lr, **options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"optimizer_options={options} for optimizer {optimizer!r}: "
                          f"{error}") from None
    return options


def _check_types(prefix, defaults, values):
    """Each option must be of its default's kind: True/False, an integer, a number or a string
    (numpy scalars are fine, a bool is not a number; a default of None or a tuple: any)."""
    for name, value in values.items():
        default = defaults[name]
        if isinstance(default, bool):
            ok, kind = isinstance(value, (bool, np.bool_)), "True or False"
        elif isinstance(default, int):
            ok, kind = data.is_integer(value), "an integer"
        elif isinstance(default, float):
            ok, kind = _is_number(value), "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
            if name == "algorithm":  # or your own all-reduce (minidist.comm.custom)
                ok, kind = ok or callable(value), "a string or a function fn(comm, array)"
        else:
            continue
        if not ok:
            raise TypeError(f"{prefix}{name} must be {kind} (its default is {default!r}), "
                            f"got {value!r}")


def _classifier_output(model, X):
    """The shape of a softmax classifier's output for one row, (1, k) or (1, T, k) for a
    language model; None for other models (any targets)."""
    if not isinstance(getattr(model, "criterion", None), nn.SoftmaxCrossEntropy):
        return None
    return kernels.to_host(model.forward(X[:1])).shape
