"""Atomic checkpoints of the server state, one file per shard and version.

Shard j at version v writes `shard<j>-v<v>.npz`: its parameters, its optimizer state and every
worker's clock. The file is written under a temporary name, flushed to disk, then renamed:
a rename is atomic, so a reader sees the whole file or none of it, even if the server dies
mid-write. A checkpoint of the run is the largest v for which EVERY shard has its file; each
shard keeps its two newest files, so that version always exists while a newer one is written.
"""

import glob
import os
import re

import numpy as np

KEEP = 2


def path(directory, shard, version):
    return os.path.join(directory, f"shard{shard}-v{version}.npz")


def versions(directory, shard):
    """The versions shard `shard` has complete files for, ascending."""
    found = []
    for name in glob.glob(os.path.join(directory, f"shard{shard}-v*.npz")):
        match = re.fullmatch(rf"shard{shard}-v(\d+)\.npz", os.path.basename(name))
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def save(directory, shard, version, params, optimizer_state, clocks):
    """Write shard `shard`'s state at `version` atomically (write, fsync, rename)."""
    os.makedirs(directory, exist_ok=True)
    final = path(directory, shard, version)
    temporary = final + ".tmp"
    arrays = {f"opt_{k}": np.asarray(v) for k, v in optimizer_state.items()}
    with open(temporary, "wb") as f:
        np.savez(f, params=params, version=np.int64(version), clocks=np.asarray(clocks), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, final)
    for old in versions(directory, shard)[:-KEEP]:
        os.unlink(path(directory, shard, old))


def latest(directory, num_servers):
    """The newest version every shard has written, or None."""
    common = set(versions(directory, 0))
    for shard in range(1, num_servers):
        common &= set(versions(directory, shard))
    return max(common) if common else None


def load(directory, shard, version):
    """(params, optimizer_state, clocks) of shard `shard` at `version`."""
    with np.load(path(directory, shard, version)) as f:
        state = {k[4:]: f[k] for k in f.files if k.startswith("opt_")}
        state["t"] = int(state["t"])
        return f["params"].copy(), state, f["clocks"].copy()
