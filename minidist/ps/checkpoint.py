"""Atomic checkpoints of the server state, one file per shard and version.

Shard j at version v writes `shard<j>-v<v>.npz`: its parameters, its optimizer state and every
worker's clock. The file is written under a temporary name, flushed to disk, then renamed:
a rename is atomic, so a reader sees the whole file or none of it, even if the server dies
mid-write. A checkpoint of the run is the largest v for which EVERY shard has an intact file;
each shard keeps its two newest files, so that version always exists while a newer one is
written, and a file damaged later (a full disk, a copy cut short) falls back to the one before.
"""

import glob
import os
import re
import warnings
import zipfile

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


def latest(directory, num_servers, warn=True):
    """The newest version every shard has an intact file for; None if there are no files.

    A damaged file is skipped with a warning that names it and the version used instead
    (warn=False: quietly); a ValueError names the files when no version is intact."""
    common = set(versions(directory, 0))
    for shard in range(1, num_servers):
        common &= set(versions(directory, shard))
    damaged = []
    for version in sorted(common, reverse=True):
        before = len(damaged)
        for shard in range(num_servers):
            try:
                _read(directory, shard, version)
            except ValueError as error:
                damaged.append(str(error))
        if len(damaged) == before:
            if damaged and warn:
                warnings.warn(f"{'; '.join(damaged)}; resuming from version {version}, the "
                              "newest intact checkpoint", stacklevel=2)
            return version
    if damaged:
        raise ValueError(f"no intact checkpoint in {directory!r}: {'; '.join(damaged)}")
    return None


def clocks(directory, num_servers, version):
    """Each worker's clock in that checkpoint: the steps it had pushed, the least over shards
    (the clock a resumed worker starts from)."""
    return np.min([_read(directory, j, version)["clocks"] for j in range(num_servers)], axis=0)


def load(directory, shard, version):
    """(params, optimizer_state, clocks) of shard `shard` at `version`."""
    arrays = _read(directory, shard, version)
    state = {k[4:]: v for k, v in arrays.items() if k.startswith("opt_")}
    state["t"] = int(state["t"])
    return arrays["params"], state, arrays["clocks"]


def _read(directory, shard, version):
    """Every array of that file (reading them all checks the zip's CRCs); a ValueError that
    names the file if it is damaged."""
    name = path(directory, shard, version)
    try:
        with np.load(name) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"damaged checkpoint {name}: cannot be read ({type(error).__name__}: "
                         f"{error})") from None
    missing = {"params", "version", "clocks", "opt_t"} - set(arrays)
    if missing:
        raise ValueError(f"damaged checkpoint {name}: lacks {sorted(missing)}")
    if arrays["version"] != version:
        raise ValueError(f"damaged checkpoint {name}: holds version {int(arrays['version'])}")
    return arrays
