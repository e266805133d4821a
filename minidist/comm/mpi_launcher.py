"""run(fn, world_size, backend="mpi") from a plain process: start `mpiexec -n N python -m
minidist.comm.mpi_launcher WORKDIR`, with fn shipped by value (cloudpickle) in WORKDIR; each rank
writes its pid when it starts, then its result, or its failure, to files there. Waits at most
`timeout` (+ start-up), then kills the whole process group; always removes WORKDIR and MPICH's
shared memory.

A rank that dies without a word (os._exit, a signal) is named: MPICH's mpiexec runs with
-disable-auto-cleanup, so the other ranks live on (waiting) until this process sees which pid
went first; then it kills them, and mpiexec prints each rank's exit status. After a death by a
signal MPICH kills the other ranks itself, at once: seen dead together, none is named.
"""

import contextlib
import importlib.util
import os
import pickle
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import cloudpickle
from threadpoolctl import threadpool_limits

from minidist.comm import mpi
from minidist.errors import CommTimeout, WorkerError, remote_failure

STARTUP_S, GRACE_S = 30.0, 2.0  # the launcher's allowance for mpiexec to start every rank, and
# for ranks that time out to report before it kills them (they wait 1 s for each other)
LAUNCHER_NOISE = re.compile(  # what MPICH's mpiexec prints when a job ends badly
    r"(?m)^(\[mpiexec@.*|Abort\(\d+\) on node.*|={9}.*|=   .*|YOUR APPLICATION TERMINATED.*|"
    r"This typically refers.*|Please see the FAQ.*|(?=\n={9}))\n")
PIP_HINT = "the MPI backend needs mpi4py and mpiexec: pip install 'minidist[mpi]'"


def _mpiexec_command(world_size, workdir):
    """mpiexec (next to this Python first, else on PATH) with the flags its kind needs."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
        raise RuntimeError(f"{PIP_HINT} (mpiexec: {mpiexec or 'not found'}, mpi4py: "
                           f"{'found' if importlib.util.find_spec('mpi4py') else 'not found'})")
    kind = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    hydra = "HYDRA" in kind.stdout  # MPICH's launcher; the dead rank is named, see above
    flags = ["-print-all-exitcodes", "-disable-auto-cleanup"] if hydra else []
    flags += ["--oversubscribe"] if "Open MPI" in kind.stdout + kind.stderr else []
    return [mpiexec, *flags, "-n", str(world_size), sys.executable, "-m",
            "minidist.comm.mpi_launcher", str(workdir)]


def run_with_mpiexec(fn, world_size, args, kwargs, timeout, debug):
    """From a plain process: start mpiexec, wait at most timeout (+ start-up), read the files."""
    workdir = Path(tempfile.mkdtemp(prefix="minidist-mpi-"))
    try:
        command = _mpiexec_command(world_size, workdir)
        job = cloudpickle.dumps((fn, args, kwargs, timeout, debug))
        (workdir / "job").write_bytes(pickle.dumps({"path": sys.path, "job": job}))
        env = dict(os.environ, PYTHONUNBUFFERED="1", MPIR_CVAR_SUPPRESS_ABORT_MESSAGE="1")
        if world_size > mpi.cores():  # more ranks than cores: MPICH's waits nap, not spin
            env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
        with open(workdir / "out", "wb") as out, open(workdir / "err", "wb") as err:
            proc = subprocess.Popen(command, stdout=out, stderr=err, env=env,
                                    start_new_session=True)
            try:
                expired, dead = _wait(proc, workdir, world_size, timeout)
            finally:  # whatever happened, leave no process behind
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out, err = ((workdir / name).read_text(errors="replace") for name in ("out", "err"))
        sys.stdout.write(re.sub(LAUNCHER_NOISE, "", out))  # ranks' prints; mpiexec's go in errors
        sys.stderr.write(re.sub(LAUNCHER_NOISE, "", err))
        return _collect(workdir, world_size, timeout, expired, dead, out + err,
                        proc.returncode)
    finally:
        for f in workdir.glob("started-[0-9]*"):  # MPICH's shared memory outlives a killed job
            for path in f.read_text().split()[1:]:
                Path(path).unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(proc, workdir, world_size, timeout):
    """Wait for mpiexec: at most STARTUP_S for every rank to start, then timeout + GRACE_S
    (ranks that time out report first). A rank whose process is gone with neither result nor
    failure died: then kill the others, and give mpiexec GRACE_S to end. Returns (time ran
    out, the ranks seen dead first). Deaths wake this loop at once (pidfd): MPICH kills the
    other ranks soon after a rank dies of a signal, and the first seen dead should be the one
    that died first (seen together, none is named)."""
    start, started, pids, dead, watched = time.monotonic(), None, {}, [], {}
    deaths = select.poll() if hasattr(os, "pidfd_open") else None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            for r in range(world_size):
                if r not in pids and (workdir / f"started-{r}").exists():
                    pids[r] = int((workdir / f"started-{r}").read_text().split()[0])
                    if deaths is not None:
                        with contextlib.suppress(ProcessLookupError):  # (gone already)
                            watched[r] = os.pidfd_open(pids[r])
                            deaths.register(watched[r], select.POLLIN)
            if started is None and len(pids) == world_size:
                started = now
            gone = [r for r, pid in pids.items() if not _alive(pid)]
            missing = [r for r in gone if not (workdir / f"result-{r}").exists()]
            if missing and not dead and not any(workdir.glob("failure-*")):  # (a rank that
                dead, ended = missing, now  # fails writes why, then ends the job: those follow)
                for pid in (pid for r, pid in pids.items() if r not in dead):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)  # then mpiexec prints each one's status
            for r in [r for r in gone if r in watched]:
                deaths.unregister(watched[r])
                os.close(watched.pop(r))
            if dead and now > ended + GRACE_S:
                return False, dead
            if now > (started + timeout + GRACE_S if started else start + STARTUP_S + timeout):
                return True, dead
            if deaths is not None:
                deaths.poll(20)
            else:
                time.sleep(0.02)
        return False, dead
    finally:
        for fd in watched.values():
            os.close(fd)


def _alive(pid):
    """Whether process pid runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in "ZX"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _collect(workdir, world_size, timeout, expired, dead, launcher_output, returncode):
    """Each rank's result; or the error that the ranks' files, the deaths seen and mpiexec's exit
    tell of: a rank that raised, else one that died, else a timeout, else a crash."""
    def read(name, r, load):
        return load((workdir / f"{name}-{r}").read_bytes())
    results = {r: read("result", r, cloudpickle.loads) for r in range(world_size)
               if (workdir / f"result-{r}").exists()}
    failures = sorted((read("failure", r, pickle.loads) for r in range(world_size)
                       if (workdir / f"failure-{r}").exists()), key=lambda f: f["time"])
    for f in failures:
        if f["exc_type"] != "CommTimeout":
            raise remote_failure(f["rank"], f["exc_type"], f["message"], f["traceback"])
    if dead:
        raise _crash_error(launcher_output, returncode, dead)
    stuck = {f["rank"]: f["status"] for f in failures}
    pending = {r: stuck.get(r, "no result") for r in range(world_size) if r not in results}
    if failures:  # say first where a rank still in fn was stuck
        raise CommTimeout(min(failures, key=lambda f: f["rank"] in results)["message"], pending)
    if expired:
        raise CommTimeout(f"{len(pending)} of {world_size} ranks did not finish within "
                          f"{timeout} s", pending)
    if returncode != 0 or pending:
        raise _crash_error(launcher_output, returncode)
    return [results[r] for r in range(world_size)]


def _crash_error(text, returncode, dead=()):
    """WorkerError for ranks that died without a word. Candidates: `dead`, the ranks this
    process saw die first (together), else all. Named: the one that mpiexec's exit statuses
    single out (MPICH prints each rank's wait status): one that exited by itself, else one
    killed by a signal other than SIGKILL (how MPI ends the other ranks), else the only one
    killed; rank None, with the candidates, when none stands out."""
    found = re.search(r"Exit codes: \[[^\]]*\] ([\d,]+)", text)
    statuses = dict(enumerate(int(s) for s in found.group(1).split(","))) if found else {}
    candidates = list(dead) or list(statuses)
    exited = [r for r in candidates if statuses.get(r, 0) and not statuses[r] & 0x7F]
    killed = [r for r in candidates if statuses.get(r, 0) & 0x7F]
    culprits = (exited or [r for r in killed if statuses[r] & 0x7F != signal.SIGKILL] or killed
                or candidates)
    rank = culprits[0] if exited or len(culprits) == 1 else None
    status = statuses.get(culprits[0], 0) if culprits else 0
    named = re.search(r"\(signal (\d+)\)", text)  # MPICH's words for the first death
    signum = status & 0x7F or (int(named.group(1)) if named and not found else 0)
    sig = signal.Signals(signum).name if signum else None
    code = None if sig else (status >> 8 if found or dead else returncode)
    how = f"killed by {sig}" if sig else f"exited with code {code}"
    if dead and not found:
        how, code = "died (mpiexec did not say how)", None
    which = f" (one of ranks {culprits})" if rank is None and culprits else ""
    where = " while running fn, without raising" if dead else \
        f"; mpiexec exited with code {returncode}"
    return WorkerError(rank, f"{how}{which}{where}", exitcode=code, signal=sig)


def _write(path, data):
    """Write a file whole or not at all."""
    Path(f"{path}.tmp").write_bytes(data)
    os.replace(f"{path}.tmp", path)


def worker(workdir):
    """One rank under mpiexec: run fn, write its result or its failure; on a failure abort the
    job at once."""
    workdir, world = Path(workdir), mpi._load_mpi().COMM_WORLD
    rank, comm = world.rank, None
    started = [str(os.getpid()), *mpi.mpich_shm_files()]
    _write(workdir / f"started-{rank}", "\n".join(started).encode())
    try:
        job = pickle.loads((workdir / "job").read_bytes())
        sys.path.extend(p for p in job["path"] if p not in sys.path)  # the caller's modules
        fn, args, kwargs, timeout, debug = cloudpickle.loads(job["job"])
        comm = mpi.MPICommunicator(world, timeout, debug)
        with threadpool_limits(limits=1):
            result = fn(comm, *args, **kwargs)
            comm._end_async()  # fn may return with async ops pending: they count too
            _write(workdir / f"result-{rank}", cloudpickle.dumps(result))
        comm.finish()
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the caller
        if comm is not None:
            comm._end_async(wait=False)  # first: then only this thread calls MPI
        _write(workdir / f"failure-{rank}", pickle.dumps({
            "rank": rank, "exc_type": type(exc).__name__, "message": str(exc),
            "traceback": traceback.format_exc(), "time": time.time(),
            "status": comm.status if comm else "starting"}))
        if isinstance(exc, CommTimeout):
            time.sleep(1.0)  # the other stuck ranks time out too: let them say where they are
        mpi.abort(world)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: mpiexec -n N python -m minidist.comm.mpi_launcher WORKDIR (run() does)")
    worker(sys.argv[1])
