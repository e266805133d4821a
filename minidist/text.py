"""A character-level text corpus that ships offline, its tokenizer, and (N, T) training windows.

    load_text()                    the docstrings of a fixed list of standard-library modules
    CharTokenizer(text)            character <-> integer id, over the sorted distinct characters
    split_text(ids, val_fraction)  the first (1 - f) of the ids to train on, the last f to validate
    text_windows(ids, context)     X[i] = ids[s_i : s_i + T], Y[i] = ids[s_i + 1 : s_i + T + 1]

`minidist.data` re-exports all four.
"""

import functools
import importlib
import inspect
import re

import numpy as np

from minidist import data

# modules with plenty of English prose and nothing platform-specific in their public names
MODULES = ("string", "textwrap", "json", "collections", "functools", "itertools", "pathlib",
           "argparse", "logging", "unittest", "random", "statistics", "datetime", "difflib",
           "heapq", "contextlib", "decimal", "typing", "re", "calendar", "threading",
           "tarfile", "urllib.parse", "configparser", "doctest", "codecs", "io", "base64", "uuid")
_MEMBERS = (classmethod, staticmethod, property)
_MIN_CHARS = 100_000  # the corpus is ~300 KB; much less means the docstrings were stripped


@functools.lru_cache(maxsize=1)
def load_text():
    """A ~300 KB English corpus built from text Python itself installs: no file, no network.

    It joins the docstrings of the modules in MODULES, in that order: each module's own, then
    for every public function and class defined there (`__all__`, else the names without a
    leading underscore, sorted) its docstring and those of its public methods and properties.
    Each docstring is dedented (tabs become spaces), stripped of trailing spaces and of every
    character outside printable ASCII, runs of blank lines become one, and a docstring already
    seen is skipped; docstrings are separated by one blank line. The vocabulary is at most 96
    characters (newline and the 95 printable ones). The same string on every call and every run
    of the same Python: it changes only with the Python version. Cached after the first call.
    """
    seen, parts = set(), []
    for name in MODULES:
        for doc in _docstrings(importlib.import_module(name)):
            doc = _normalise(doc)
            if doc and doc not in seen:
                seen.add(doc)
                parts.append(doc)
    text = "\n\n".join(parts)
    if len(text) < _MIN_CHARS:
        raise RuntimeError(f"the standard library's docstrings give only {len(text)} "
                           "characters: is Python running with -OO (docstrings stripped)?")
    return text


def _docstrings(module):
    """The module's docstring, then those of its public functions, classes and their members."""
    yield module.__doc__
    names = getattr(module, "__all__", None) or [n for n in vars(module) if n[0] != "_"]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        home = getattr(obj, "__module__", None) or ""
        defined_here = home == module.__name__ or home.startswith(module.__name__ + ".")
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not defined_here:
            continue  # constants, and names imported from other modules
        yield obj.__doc__
        if inspect.isclass(obj):
            for member, value in sorted(vars(obj).items()):
                if member[0] != "_" and (inspect.isroutine(value) or isinstance(value, _MEMBERS)):
                    yield getattr(value, "__doc__", None)


def _normalise(doc):
    if not isinstance(doc, str):
        return ""
    lines = [line.rstrip() for line in inspect.cleandoc(doc).split("\n")]  # cleandoc: tabs too
    text = "".join(c for c in "\n".join(lines) if c == "\n" or " " <= c <= "~")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class CharTokenizer:
    """Characters <-> integer ids: id i is `vocab[i]`, vocab the sorted distinct characters of
    the text it was built from. `encode` then `decode` gives back the same string exactly."""

    def __init__(self, text):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {_describe(text)}")
        if not text:
            raise ValueError("text must hold at least one character, got ''")
        self.vocab = "".join(sorted(set(text)))
        self.vocab_size = len(self.vocab)
        points = _code_points(self.vocab)
        self._ids = np.full(int(points[-1]) + 1, -1, dtype=np.int64)  # code point -> id or -1
        self._ids[points] = np.arange(self.vocab_size)
        self._points = points  # id -> code point

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text):
        """The id of every character of `text`: int64 of shape (len(text),)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {_describe(text)}")
        points = _code_points(text)
        known = points < len(self._ids)
        ids = np.where(known, self._ids[np.where(known, points, 0)], -1)
        unknown = np.flatnonzero(ids < 0)
        if len(unknown):
            at = int(unknown[0])
            raise ValueError(f"character {text[at]!r} at position {at} of text is not in the "
                             f"vocabulary ({self.vocab_size} characters: {self.vocab!r})")
        return ids

    def decode(self, ids):
        """The text of `ids` (any integers in [0, vocab_size)): a str for shape (T,), a list of
        N strings for shape (N, T), one per row (a batch of generated sequences)."""
        array = np.asarray(ids)
        if array.size == 0 and array.ndim in (1, 2):
            array = array.astype(np.int64)  # [] is float64 to numpy
        if array.dtype.kind not in "iu" or array.ndim not in (1, 2):
            raise TypeError(f"ids must be integers of shape (T,) or (N, T), got {array.dtype} "
                            f"of shape {array.shape}")
        bad = np.argwhere((array < 0) | (array >= self.vocab_size))
        if len(bad):
            where = tuple(int(i) for i in bad[0])
            raise ValueError(f"ids[{', '.join(map(str, where))}] = {array[where]} is not a "
                             f"character id: they lie in [0, {self.vocab_size})")
        rows = [self._points[row].astype("<u4").tobytes().decode("utf-32-le")
                for row in np.atleast_2d(array)]
        return rows[0] if array.ndim == 1 else rows


def split_text(ids, val_fraction=0.1):
    """(train, validation): the first n - ⌈f·n⌉ ids and the last ⌈f·n⌉, in order.

    Split the id sequence BEFORE cutting windows, so that no window straddles the two.
    """
    ids = _as_ids(ids)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise TypeError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    n_val = int(np.ceil(val_fraction * len(ids)))
    if not 0 < n_val < len(ids):
        raise ValueError(f"val_fraction={val_fraction} of {len(ids)} ids leaves an empty split")
    return ids[:-n_val], ids[-n_val:]


def text_windows(ids, context, stride=None):
    """(X, Y), int64 of shape (N, context): X[i] = ids[s_i : s_i + context] and Y[i] =
    ids[s_i + 1 : s_i + context + 1], the next token at every position, with s_i = i·stride.

    stride defaults to context (windows that do not overlap); N = ⌊(n - context - 1) / stride⌋
    + 1 for n ids: every window whose targets fit.
    """
    ids = _as_ids(ids)
    data.check_integer("context", context)
    stride = context if stride is None else stride
    data.check_integer("stride", stride)
    if len(ids) < context + 1:
        raise ValueError(f"ids holds {len(ids)} tokens: one window of context={context} needs "
                         f"context + 1 = {context + 1} (its targets are shifted by one)")
    windows = np.lib.stride_tricks.sliding_window_view(ids, context + 1)[::stride]
    return windows[:, :-1].copy(), windows[:, 1:].copy()


def _as_ids(ids):
    array = np.asarray(ids)
    if array.ndim != 1 or (array.dtype.kind not in "iu" and array.size):
        raise TypeError(f"ids must be a 1-D sequence of integer token ids, got {array.dtype} of "
                        f"shape {array.shape}")
    return array.astype(np.int64, copy=False)


def _code_points(text):
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


def _describe(value):
    return f"{type(value).__name__} {value!r}"[:80]
