"""The parameter server: BSP is synchronous SGD, no update is lost, SSP keeps its bound,
failures are named and leave nothing behind, checkpoints resume exactly."""

import contextlib
import functools
import glob
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from minidist import data, nn, ps, train
from minidist.errors import ServerError, WorkerError


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = set(glob.glob(f"/dev/shm/md{os.getpid()}_*"))
    yield
    assert set(glob.glob(f"/dev/shm/md{os.getpid()}_*")) == before
    assert mp.active_children() == []


@pytest.mark.parametrize("num_servers", [1, 2])
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_bsp_reproduces_single(digits_reference, workers, num_servers):
    model_fn, X, y, kwargs, reference = digits_reference
    hist = train(model_fn, X, y, strategy="parameter_server", workers=workers,
                 num_servers=num_servers, **kwargs)
    gap = np.max(np.abs(hist.params - reference.params)) / np.max(np.abs(reference.params))
    assert gap < 1e-10
    np.testing.assert_allclose(hist.loss, reference.loss, rtol=1e-10)
    assert hist.staleness.shape == (50 * workers,) and not hist.staleness.any()
    n_bytes = 50 * reference.params.nbytes
    assert hist.ps["bytes_pushed"] == hist.ps["bytes_pulled"] == [n_bytes] * workers
    assert hist.ps["updates"] == [50] * num_servers
    assert hist.ps["applied"] == [50 * workers] * num_servers
    assert len(hist.ps["wait_time"]) == workers and min(hist.ps["wait_time"]) > 0
    for events in hist.events:  # each worker's timeline: pull, forward, backward, push
        busy = [e for e in events if e[0] != "idle"]
        assert [e[0] for e in busy] == ["recv", "forward", "backward", "send"] * 50
        assert [e[3] for e in busy[::4]] == list(range(50))
        assert all(start <= end for _, start, end, _, _ in events)


def integer_pushes(client, pushes, slow_rank=None, pause=0.0):
    """Push integer gradients, pulling before each; returns their sum."""
    total = np.zeros(client.n)
    rng = np.random.default_rng(client.rank)
    for _ in range(pushes):
        client.pull()
        if client.rank == slow_rank:
            time.sleep(pause)
        grad = rng.integers(-3, 4, client.n).astype(np.float64)
        client.push(grad)
        total += grad
    return total


@pytest.mark.parametrize("num_servers", [1, 2])
@pytest.mark.parametrize("consistency,staleness", [("bsp", None), ("asp", None), ("ssp", 1)])
def test_no_update_is_lost(consistency, staleness, num_servers):
    start = np.arange(7.0)
    result = ps.run(integer_pushes, 3, start, lr=1.0, consistency=consistency,
                    staleness=staleness, num_servers=num_servers, args=(30,))
    pushed = sum(result.results)
    np.testing.assert_array_equal(result.params, start - pushed)  # exact: integers, lr = 1
    updates = 30 if consistency == "bsp" else 90  # BSP applies one summed step per clock
    assert result.applied == [90] * num_servers and result.updates == [updates] * num_servers
    assert len(result.staleness) == 90 and result.clocks == [30, 30, 30]


@pytest.mark.parametrize("consistency,staleness", [("asp", None), ("ssp", 3), ("bsp", None)])
def test_no_update_is_lost_under_load(consistency, staleness):
    start = np.zeros(5)
    result = ps.run(integer_pushes, 16, start, lr=1.0, consistency=consistency,
                    staleness=staleness, num_servers=2, args=(200,), timeout=100)
    np.testing.assert_array_equal(result.params, start - sum(result.results))
    assert len(result.staleness) == 16 * 200


def uniform_pushes(client, pushes):
    """Push gradients whose entries are all equal; count the pulls whose θ is not uniform."""
    torn, theta = 0, np.empty(client.n)
    for _ in range(pushes):
        client.push(np.full(client.n, client.rank + 1.0))
        client.pull(out=theta)
        torn += int(np.any(theta != theta[0]))
    return torn


def test_a_pull_never_sees_half_an_update():
    """Workers copy θ out of shared memory while others push: the server must not write it
    meanwhile. θ starts uniform and every gradient is, so any pulled θ is uniform unless an
    update landed in the middle of a copy (large θ, 4 workers, ASP: such overlaps are common)."""
    result = ps.run(uniform_pushes, 4, np.zeros(400_000), lr=1.0, consistency="asp",
                    args=(40,))
    assert result.results == [0, 0, 0, 0]
    np.testing.assert_array_equal(result.params, -40.0 * (1 + 2 + 3 + 4))


@pytest.mark.parametrize("staleness", [0, 2])
def test_ssp_never_runs_more_than_s_clocks_ahead(staleness):
    result = ps.run(integer_pushes, 3, np.zeros(4), lr=1.0, consistency="ssp",
                    staleness=staleness, num_servers=2, args=(12, 1, 0.01))
    for shard in result.pulls:
        gaps = [clock - slowest for _, clock, slowest, _ in shard]
        assert max(gaps) == staleness  # reached (worker 1 is slow) and never exceeded
        assert len(shard) == 36


def _wait_for(path, deadline):
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def _one_then_many(client, folder):
    """Worker 1 pushes once, pulls, and holds its next gradient while worker 0 (which starts
    after that pull) pushes 12 times."""
    deadline = time.monotonic() + 20
    if client.rank == 1:
        client.pull()
        client.push(np.ones(client.n))
        client.pull()
        open(os.path.join(folder, "pulled"), "w").close()
        _wait_for(os.path.join(folder, "pushed"), deadline)
        client.push(np.ones(client.n))
        return
    _wait_for(os.path.join(folder, "pulled"), deadline)
    client.pull()
    for _ in range(12):
        client.push(np.ones(client.n))
        client.pull()
    open(os.path.join(folder, "pushed"), "w").close()


def test_asp_lets_fast_workers_run_ahead(tmp_path):
    result = ps.run(_one_then_many, 2, np.zeros(4), lr=1.0, consistency="asp",
                    args=(str(tmp_path),))
    assert max(clock - slowest for _, clock, slowest, _ in result.pulls[0]) == 11
    assert result.staleness.max() == 12  # worker 1's second gradient: 12 updates old
    np.testing.assert_array_equal(result.params, np.full(4, -14.0))


def _fail(client, how, at=3):
    for c in range(10):
        client.pull()
        if client.rank == 1 and c == at:
            if how == "raise":
                raise RuntimeError("worker one gives up")
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        client.push(np.ones(client.n))
    return client.clock


@pytest.mark.parametrize("how,match", [("raise", "RuntimeError: worker one gives up"),
                                       ("exit", "exited with code 3"),
                                       ("kill", "killed by signal SIGKILL")])
def test_a_dead_worker_is_named(how, match):
    with pytest.raises(WorkerError, match=match) as info:
        ps.run(_fail, 3, np.zeros(4), args=(how,), num_servers=2, timeout=20)
    assert info.value.rank == 1


def test_elastic_bsp_continues_without_the_dead_worker():
    result = ps.run(_fail, 3, np.zeros(4), lr=1.0, args=("kill",), elastic=True, timeout=20)
    assert result.results[1] is None and result.results[0] == result.results[2] == 10
    assert len(result.events) == 1 and "worker 1" in result.events[0]
    assert "2 remaining workers" in result.events[0]
    # three workers push 1 for 3 steps; then the mean of the survivors' 1s for 7 steps
    np.testing.assert_array_equal(result.params, np.full(4, -(3 * 3 + 7 * 1.0)))


def _kill_server(client):
    for c in range(50):
        client.pull()
        if client.rank == 0 and c == 2:
            os.kill(client.server_pids[1], signal.SIGKILL)
        client.push(np.ones(client.n))


def _confuse_server(client):
    client.conns[0].send(("bogus",))
    client.pull()


def test_a_dead_server_is_named_and_workers_hear_of_it():
    start = time.monotonic()
    with pytest.raises(ServerError, match="shard 1 failed: killed by signal 9") as info:
        ps.run(_kill_server, 2, np.zeros(4), num_servers=2, timeout=30)
    assert time.monotonic() - start < 15
    assert info.value.shard == 1
    assert all("ServerError" in text for text in info.value.worker_errors.values())


def test_a_failing_server_sends_its_traceback():
    with pytest.raises(ServerError, match="unknown message 'bogus' from worker 0"):
        ps.run(_confuse_server, 1, np.zeros(4), timeout=20)


def _crashing_model(model_fn, crash_after):
    """model_fn whose model raises on its `crash_after`-th loss (None: never)."""
    def make():
        model = model_fn()
        calls, inner = [0], model.loss

        def loss(X, y):
            calls[0] += 1
            if calls[0] == crash_after:
                raise RuntimeError("simulated crash")
            return inner(X, y)

        model.loss = loss
        return model
    return make


def test_resume_from_a_checkpoint_reaches_the_same_parameters(tmp_path):
    X, y = data.load_digits()
    model_fn = functools.partial(nn.mlp, [64, 16, 10], seed=0)
    kwargs = {"strategy": "parameter_server", "workers": 2, "num_servers": 2, "steps": 30,
              "batch_size": 32, "lr": 0.1, "optimizer": "adam"}
    whole = train(model_fn, X, y, **kwargs)
    with pytest.raises(WorkerError, match="simulated crash"):
        train(_crashing_model(model_fn, 25), X, y, checkpoint_dir=str(tmp_path),
              checkpoint_every=10, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["shard0-v10.npz", "shard0-v20.npz",
                                            "shard1-v10.npz", "shard1-v20.npz"]
    resumed = train(model_fn, X, y, checkpoint_dir=str(tmp_path), resume=True, **kwargs)
    np.testing.assert_array_equal(resumed.params, whole.params)
    np.testing.assert_array_equal(resumed.loss[20:], whole.loss[20:])
    assert np.isnan(resumed.loss[:20]).all() and resumed.ps["start_step"] == 20


@pytest.mark.parametrize("options,match", [
    ({"consistency": "bulk"}, "unknown consistency 'bulk'"),
    ({"consistency": "ssp"}, "needs staleness=s"),
    ({"consistency": "bsp", "staleness": 2}, "only applies to consistency='ssp'"),
    ({"num_servers": 10**6}, "num_servers must be an integer in"),
    ({"slow_workers": {5: 3.0}}, "rank 5 is not in"),
    ({"slow_workers": {0: 0.5}}, "slowdown must be >= 1"),
    ({"resume": True}, "need checkpoint_dir"),
    ({"backend": "thread"}, "backend must be 'process'"),
])
def test_bad_options_are_named(options, match):
    X, y = data.make_classification(60, 5, 3, seed=0)
    with pytest.raises(ValueError, match=match):
        train(functools.partial(nn.mlp, [5, 4, 3], seed=1), X, y, strategy="parameter_server",
              workers=2, steps=2, batch_size=8, **options)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ps.run(integer_pushes, 1, np.zeros(3), checkpoint_dir=str(tmp_path), resume=True,
               args=(1,))


def test_a_straggler_slows_only_itself_under_asp():
    X, y = data.make_classification(200, 5, 3, seed=0)
    hist = train(functools.partial(nn.mlp, [5, 8, 3], seed=1), X, y,
                 strategy="parameter_server", workers=2, steps=20, batch_size=16,
                 consistency="asp", slow_workers={1: 20.0})
    fast, slow = (np.median(log[:, 3] - log[:, 2]) for log in hist.ps["log"])
    assert slow > 5 * fast  # from pull to push: 20 times the work, less the noise
    assert np.isfinite(hist.loss).all() and len(hist.staleness) == 40


@pytest.mark.parametrize("start_method", ["spawn"])
def test_every_start_method_runs_a_notebook_style_function(start_method):
    def pushes(client):  # a local function: shipped by value
        for _ in range(5):
            client.pull()
            client.push(np.full(client.n, 2.0))
    result = ps.run(pushes, 2, np.zeros(3), lr=0.5, consistency="asp", num_servers=2,
                    start_method=start_method, timeout=60)
    np.testing.assert_array_equal(result.params, np.full(3, -10.0))


def test_the_lesson_experiment_reports_each_consistency_model():
    import matplotlib

    matplotlib.use("Agg")
    from minidist.ps import explorer

    result = explorer.consistency_experiment(workers=2, staleness=1, slowdown=2.0, steps=10,
                                             batch_size=32, sizes=(64, 8, 10))
    bsp, asp, ssp = result.runs
    assert [r.label for r in result.runs] == ["BSP", "ASP", "SSP (s=1)"]
    assert all(len(r.staleness) == 20 and r.loss.shape == (10,) for r in result.runs)
    assert bsp.max_gap == 0 and not bsp.staleness.any() and ssp.max_gap <= 1
    assert np.all(np.diff(asp.times) >= 0) and len(asp.smoothed) == 20
    assert len(explorer.plot_consistency(result).axes) == 3
    explorer.plot_architecture(3, 2)


def test_traffic_per_step_matches_the_formula():
    from minidist.ps.explorer import traffic_per_step

    assert traffic_per_step(100, 4, 1) == {"server": 800, "ps_busiest": 800, "ring": 300}
    assert traffic_per_step(100, 4, 4)["ps_busiest"] == 200  # a worker's 2n


def _hangs(client):
    for c in range(5):
        client.pull()
        if client.rank == 1 and c == 2:
            time.sleep(60)
        client.push(np.ones(client.n))


def test_a_hung_worker_ends_the_run_with_a_timeout_naming_it():
    from minidist.errors import CommTimeout

    start = time.monotonic()
    with pytest.raises(CommTimeout, match="did not finish within 3") as info:
        ps.run(_hangs, 2, np.zeros(3), timeout=3.0)
    assert time.monotonic() - start < 12
    assert info.value.pending[1] == "clock 2: computing"
    assert info.value.pending[0] == "clock 2: pushing"  # BSP: waiting for worker 1's gradient


def _socket_inodes(pid):
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _network_sockets(client):
    tcp = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"):
        if os.path.exists(table):
            with open(table) as f:
                tcp |= {line.split()[9] for line in f.readlines()[1:]}
    mine = set().union(*(_socket_inodes(pid) for pid in [os.getpid(), *client.server_pids]))
    client.pull()
    client.push(np.zeros(client.n))
    return sorted(mine & tcp)


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_no_network_socket_is_opened():
    result = ps.run(_network_sockets, 2, np.zeros(3), num_servers=2)
    assert result.results == [[], []]  # servers and workers talk over pipes only


def _kill_server_after_last_push(client):
    for _ in range(3):
        client.pull()
        client.push(np.ones(client.n))
    os.kill(client.server_pids[0], signal.SIGKILL)


def test_a_server_that_dies_at_the_very_end_is_still_named():
    with pytest.raises(ServerError, match="shard 0 failed"):
        ps.run(_kill_server_after_last_push, 1, np.zeros(3), timeout=20)


ORPHAN_RUN = r"""
import sys, time
import numpy as np
from minidist import ps

def fn(client, flag):
    client.pull()
    if client.rank == 1:
        open(flag, "w").close()
        time.sleep(600)                      # stuck in its own code: only a signal ends it
    client.push(np.ones(client.n))           # worker 0 waits for worker 1 (BSP)

ps.run(fn, 2, np.zeros(3), num_servers=2, timeout=600, args=(sys.argv[1],))
"""


def test_killing_the_caller_leaves_no_segment_behind(tmp_path):
    import subprocess
    import sys

    flag = tmp_path / "ready"
    caller = subprocess.Popen([sys.executable, "-c", ORPHAN_RUN, str(flag)])
    deadline = time.monotonic() + 60
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(caller.pid)],
                                                   capture_output=True, text=True).stdout.split()]
    assert flag.exists() and len(children) == 4  # 2 servers, 2 workers
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 10
    while glob.glob(f"/dev/shm/md{caller.pid}_*") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert glob.glob(f"/dev/shm/md{caller.pid}_*") == []  # the servers unlinked them
    for pid in children:  # worker 1 sleeps in user code; the others left on their own
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), \
                open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] != "Z":
                os.kill(pid, signal.SIGKILL)


def _asp_steps(client, steps):
    while client.clock < steps:
        client.pull()
        client.push(np.ones(client.n))
    return client.clock


def test_an_asynchronous_run_resumes_on_sharded_servers(tmp_path):
    folder = str(tmp_path)
    first = ps.run(_asp_steps, 3, np.zeros(6), lr=1.0, consistency="asp", num_servers=2,
                   checkpoint_dir=folder, checkpoint_every=4, args=(10,))
    assert first.params.tolist() == [-30.0] * 6
    resumed = ps.run(_asp_steps, 3, np.zeros(6), lr=1.0, consistency="asp", num_servers=2,
                     checkpoint_dir=folder, resume=True, args=(15,))
    assert resumed.start_clock == 28 and resumed.results == [15, 15, 15]
    # every shard restarts from its 28 updates; each worker re-pushes from its smallest clock
    assert all(p <= -45.0 for p in resumed.params)


@pytest.mark.parametrize("consistency", ["asp", "bsp"])
def test_a_checkpoint_records_the_clocks_of_the_pushes_it_holds(monkeypatch, consistency):
    """Pushes that arrive while a worker reads θ_j wait; when they are applied one by one, each
    checkpoint's clocks must count only the pushes already in its θ_j (counting the waiting ones
    too made a resumed run skip them: lost gradients)."""
    from types import SimpleNamespace

    from minidist.ps import server as shard_server

    class Pipe:
        def send(self, message):
            pass

    saved = []  # (version, params, clocks) of every checkpoint, as written
    monkeypatch.setattr(shard_server.checkpoint, "save", lambda directory, shard, version,
                        params, state, clocks: saved.append((version, params.copy(),
                                                             clocks.copy())))
    memory = SimpleNamespace(params=np.zeros(3), push=np.ones((2, 3)))
    config = {"optimizer": "sgd", "lr": 1.0, "optimizer_options": {}, "resume_version": None,
              "consistency": consistency, "staleness": 0, "checkpoint_dir": "unused",
              "checkpoint_every": 1}
    server = shard_server.ShardServer(0, np.zeros(3), [Pipe(), Pipe()], memory, config)
    server.handle(0, ("pull", 0))  # worker 0 now reads θ_j: nothing is written meanwhile
    server.handle(0, ("push", 0, 0.5))
    server.handle(1, ("push", 0, 0.5))
    if consistency == "asp":
        server.handle(1, ("push", 1, 0.5))
    assert server.version == 0  # every push waits for worker 0's release
    server.handle(0, ("release",))
    assert [v for v, _, _ in saved] == list(range(1, server.version + 1)) and saved
    for version, params, clocks in saved:
        pushes = version if consistency == "asp" else 2 * version  # BSP: one step, both pushes
        assert clocks.sum() == pushes, (version, clocks)
        np.testing.assert_array_equal(params, np.full(3, -pushes))
