"""The text corpus, its character tokenizer, the train/validation split and the (N, T) windows."""

import hashlib
import inspect
import os
import string
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidist import data, text


def test_the_corpus_is_the_same_on_every_call_and_in_a_fresh_process():
    corpus = data.load_text()
    assert corpus is data.load_text()  # cached
    assert text.load_text.__wrapped__() == corpus  # rebuilt from scratch: the same string
    digest = hashlib.sha256(corpus.encode()).hexdigest()
    fresh = subprocess.run(  # another hash seed: no set or dict order leaks into the corpus
        [sys.executable, "-c", "import hashlib; from minidist import data; "
         "print(hashlib.sha256(data.load_text().encode()).hexdigest())"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONHASHSEED": "7"})
    assert fresh.stdout.strip() == digest


def test_the_corpus_is_printable_ascii_prose_of_a_few_hundred_kilobytes():
    corpus = data.load_text()
    assert 200_000 <= len(corpus) <= 1_000_000
    assert set(corpus) <= set(string.printable[:95]) | {"\n"}  # no tab, no \r, no unicode
    assert 80 <= len(set(corpus)) <= 96
    assert "\n\n\n" not in corpus and corpus == corpus.strip()
    assert not any(line != line.rstrip() for line in corpus.split("\n"))
    assert " at 0x" not in corpus  # no object address (it would change between runs)
    words = corpus.split()
    assert sum(w.strip(".,;:()").lower() in ("the", "a", "of", "to", "is") for w in words) \
        > 0.05 * len(words)  # English prose, not code


def test_the_corpus_holds_each_modules_docstrings_in_order_and_once():
    corpus = data.load_text()
    first = [inspect.cleandoc(__import__(name, fromlist=["_"]).__doc__).split("\n")[0]
             for name in ("string", "json", "difflib", "uuid")]
    positions = [corpus.index(line) for line in first]
    assert positions == sorted(positions) and positions[0] == 0
    paragraph = inspect.cleandoc(__import__("textwrap").dedent.__doc__).split("\n\n")[0]
    assert corpus.count(paragraph) == 1


def test_stripped_docstrings_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(text, "MODULES", ("string",))  # ~1 KB, as under python -OO: nothing
    with pytest.raises(RuntimeError, match="-OO"):
        text.load_text.__wrapped__()


def test_the_tokenizer_round_trips_the_corpus_exactly():
    corpus = data.load_text()
    tok = data.CharTokenizer(corpus)
    assert tok.vocab == "".join(sorted(set(corpus))) and tok.vocab_size == len(tok.vocab)
    ids = tok.encode(corpus)
    assert ids.dtype == np.int64 and ids.shape == (len(corpus),)
    reference = np.array([tok.vocab.index(c) for c in corpus[:5000]])
    np.testing.assert_array_equal(ids[:5000], reference)
    assert tok.decode(ids) == corpus
    assert tok.decode(ids.tolist()[:100]) == corpus[:100]  # a list of ints too


@given(st.text(min_size=1, max_size=40))
def test_round_trip_on_any_text(sample):  # unicode included: the vocabulary is the text's
    tok = data.CharTokenizer(sample)
    ids = tok.encode(sample)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == sample
    assert [tok.vocab[i] for i in ids] == list(sample)


def test_decode_a_batch_gives_one_string_per_row():
    tok = data.CharTokenizer("abcd")
    assert tok.decode(np.array([[0, 1], [3, 2]], dtype=np.int32)) == ["ab", "dc"]
    assert tok.decode([]) == "" and tok.decode(np.zeros((2, 0), int)) == ["", ""]


def test_tokenizer_errors_name_the_character_and_its_position():
    tok = data.CharTokenizer("hello world")
    with pytest.raises(ValueError, match=r"character 'z' at position 6 .* not in the vocab"):
        tok.encode("hello zorld")
    with pytest.raises(ValueError, match=r"'é' at position 0"):
        tok.encode("é")
    with pytest.raises(ValueError, match=r"ids\[1\] = 99 .* \[0, 8\)"):
        tok.decode([0, 99])
    with pytest.raises(ValueError, match=r"ids\[0, 1\] = -1"):
        tok.decode([[0, -1]])
    with pytest.raises(TypeError, match="integers of shape"):
        tok.decode([0.5])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"hello")
    with pytest.raises(TypeError, match="text must be a str"):
        data.CharTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="at least one character"):
        data.CharTokenizer("")


@given(n=st.integers(2, 120), context=st.integers(1, 20), stride=st.integers(1, 25))
def test_windows_match_a_direct_slice(n, context, stride):
    ids = np.random.default_rng(n).integers(0, 50, size=n)
    if n < context + 1:
        with pytest.raises(ValueError, match="needs context"):
            data.text_windows(ids, context, stride)
        return
    X, Y = data.text_windows(ids, context, stride)
    starts = range(0, n - context, stride)  # every start whose targets fit
    assert X.shape == Y.shape == (len(starts), context) and X.dtype == Y.dtype == np.int64
    for i, s in enumerate(starts):
        np.testing.assert_array_equal(X[i], ids[s:s + context])
        np.testing.assert_array_equal(Y[i], ids[s + 1:s + context + 1])
    np.testing.assert_array_equal(X[:, 1:], Y[:, :-1])  # Y is X shifted by one token


def test_windows_default_to_non_overlapping():
    X, Y = data.text_windows(np.arange(10), 3)
    np.testing.assert_array_equal(X, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    np.testing.assert_array_equal(Y, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    X[0, 0] = 99  # a copy, not a view of the ids
    assert data.text_windows(np.arange(10), 3)[0][0, 0] == 0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"context": 0}, ValueError, "context must be an integer >= 1"),
    ({"context": 2.0}, TypeError, "context must be an integer"),
    ({"context": 3, "stride": 0}, ValueError, "stride must be an integer >= 1"),
    ({"context": 10}, ValueError, "ids holds 10 tokens: one window of context=10 needs"),
    ({"ids": np.ones((2, 5), int), "context": 2}, TypeError, "1-D sequence"),
    ({"ids": [0.5, 1.5, 2.5], "context": 1}, TypeError, "integer token ids")])
def test_window_errors(kwargs, error, match):
    kwargs = {"ids": np.arange(10), **kwargs}
    with pytest.raises(error, match=match):
        data.text_windows(**kwargs)


def test_split_keeps_order_and_no_window_straddles():
    ids = np.arange(1000)
    train, val = data.split_text(ids, val_fraction=0.1)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    assert len(val) == 100
    X_val, Y_val = data.text_windows(val, 8)
    assert X_val.min() >= 900 and data.text_windows(train, 8)[1].max() < 900
    assert len(data.split_text(np.arange(7), 0.1)[1]) == 1  # ⌈0.7⌉


@pytest.mark.parametrize("fraction, error, match", [
    (0.0, ValueError, r"in \(0, 1\)"), (1.0, ValueError, r"in \(0, 1\)"),
    ("0.1", TypeError, r"a number in \(0, 1\)"), (True, TypeError, r"a number in \(0, 1\)"),
    (0.9999, ValueError, "empty split")])
def test_split_errors(fraction, error, match):
    with pytest.raises(error, match=match):
        data.split_text(np.arange(10), fraction)
