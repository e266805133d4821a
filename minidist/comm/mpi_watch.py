"""A watcher beside each rank of a job that the user started with `mpiexec` (run() under mpiexec).

A rank that dies inside run() without raising (os._exit, a signal) cannot say so, and MPICH's
mpiexec then SIGKILLs every other rank at once: nobody in the job is left to tell which rank went,
nor to remove the job's shared memory, which a killed job leaves in /dev/shm. This process is.
The rank starts it (standard library only, it never touches MPI) and writes "run" to its stdin
when run() starts and "done" when it ends. At end of file the rank is gone; if it was inside
run(), the watcher
- says on stderr how the rank ended, if the rank ended by itself: an exit code, or a signal other
  than SIGKILL (the kernel still shows the exit status of a process that is exiting, field 52 of
  /proc/PID/stat; its parent soon reaps it, and a SIGKILL may be MPI's own, so it says nothing
  then rather than name the wrong rank);
- removes the job's MPICH shared-memory files.

usage: python -I -S mpi_watch.py RANK PID [SHM_FILE...]
"""

import os
import signal
import sys


def exit_status(pid):
    """The wait status of process pid while it exits, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()  # fields 3, 4, ... of proc(5)
    except OSError:
        return None
    return int(fields[52 - 3]) if len(fields) > 52 - 3 else None


def main(rank, pid, shm_files):
    last = b""
    while chunk := os.read(0, 256):  # blocks until the rank writes, or is gone
        last = (last + chunk).rstrip(b"\n").rpartition(b"\n")[2]
    status = exit_status(pid)  # first: the rank's parent reaps it any moment now
    if last != b"run":
        return
    if status is not None and status & 0x7F != signal.SIGKILL:
        signum, code = status & 0x7F, status >> 8
        how = f"was killed by {signal.Signals(signum).name}" if signum else \
            f"exited with code {code}"
        sys.stderr.write(f"minidist: rank {rank} {how} inside run(), without raising; MPI then "
                         f"ended the job\n")
    for path in shm_files:
        try:
            os.unlink(path)
        except OSError:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
