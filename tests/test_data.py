"""Tests for minisparse/data.py: corpus loading, tokenizers, the split and the batches.

No test touches the network: tiny-shakespeare is exercised through files written into a
temporary cache directory, with the module's checksum constants and _download patched.
"""

import hashlib
import json
import os
import urllib.error

import numpy as np
import pytest

from minisparse import data
from minisparse.data import (
    BPETokenizer,
    CharTokenizer,
    check_split_lengths,
    get_batch,
    load_text,
    split_ids,
    tokenizer_from_dict,
    train_tokenizer,
)
from minisparse.errors import UsageError


@pytest.fixture(scope="module")
def corpus():
    return load_text("pydoc")


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_tokenizer(corpus[:100_000], kind="bpe", vocab_size=512)


# ----------------------------------------------------------------------------- corpus

def test_pydoc_corpus_is_large_and_deterministic(corpus):
    assert isinstance(corpus, str)
    assert len(corpus) > 400_000
    assert load_text() == corpus  # the default source is pydoc, and two loads agree


def test_text_file_loads(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("héllo wörld\n", encoding="utf-8")
    assert load_text(str(p)) == "héllo wörld\n"


def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.txt")
    with pytest.raises(UsageError, match="does not exist") as e:
        load_text(p)
    assert p in str(e.value)


def test_empty_and_whitespace_files(tmp_path):
    for name, content in (("empty.txt", ""), ("blank.txt", " \n\t\n")):
        p = tmp_path / name
        p.write_text(content, encoding="utf-8")
        with pytest.raises(UsageError, match="empty") as e:
            load_text(str(p))
        assert str(p) in str(e.value)


def test_directory(tmp_path):
    with pytest.raises(UsageError, match="directory") as e:
        load_text(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_non_utf8_file(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="UTF-8") as e:
        load_text(str(p))
    assert str(p) in str(e.value)


# ----------------------------------------------------------------------------- shakespeare, offline

def _pretend_expected(monkeypatch, content: bytes):
    """Make `content` the file the module expects to download."""
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(data, "SHAKESPEARE_SIZE", len(content))


def _no_download(url, dest):
    raise AssertionError("_download must not be called when the cache is valid")


def test_shakespeare_cached_and_valid_is_not_downloaded(tmp_path, monkeypatch):
    content = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (tmp_path / data.SHAKESPEARE_FILE).write_bytes(content)
    _pretend_expected(monkeypatch, content)
    monkeypatch.setattr(data, "_download", _no_download)
    assert load_text("shakespeare", cache_dir=str(tmp_path)) == content.decode()


def test_shakespeare_cache_dir_from_environment(tmp_path, monkeypatch):
    content = b"ROMEO:\nBut soft!\n"
    (tmp_path / data.SHAKESPEARE_FILE).write_bytes(content)
    _pretend_expected(monkeypatch, content)
    monkeypatch.setattr(data, "_download", _no_download)
    monkeypatch.setenv("MINISPARSE_CACHE", str(tmp_path))
    assert load_text("shakespeare") == content.decode()


def test_shakespeare_download_is_checked_and_cached(tmp_path, monkeypatch):
    content = b"JULIET:\nO Romeo, Romeo!\n"
    _pretend_expected(monkeypatch, content)
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        with open(dest, "wb") as f:
            f.write(content)

    monkeypatch.setattr(data, "_download", fake_download)
    assert load_text("shakespeare", cache_dir=str(tmp_path)) == content.decode()
    assert load_text("shakespeare", cache_dir=str(tmp_path)) == content.decode()
    assert calls == [data.SHAKESPEARE_URL]  # the second load came from the cache
    assert os.listdir(tmp_path) == [data.SHAKESPEARE_FILE]  # no temporary file left behind


def test_shakespeare_checksum_mismatch_keeps_no_bad_file(tmp_path, monkeypatch):
    (tmp_path / data.SHAKESPEARE_FILE).write_bytes(b"a corrupted cached copy\n")

    def bad_download(url, dest):
        with open(dest, "wb") as f:
            f.write(b"<html>not shakespeare</html>")

    monkeypatch.setattr(data, "_download", bad_download)
    with pytest.raises(UsageError, match="sha256"):
        load_text("shakespeare", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # neither the bad cache nor the bad download is kept


def test_shakespeare_without_network(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(UsageError, match="no network") as e:
        load_text("shakespeare", cache_dir=str(tmp_path))
    message = str(e.value)
    assert str(tmp_path / data.SHAKESPEARE_FILE) in message and "--data" in message
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- tokenizers

def test_char_round_trip_on_corpus(corpus):
    tok = train_tokenizer(corpus, kind="char")
    assert tok.kind == "char" and isinstance(tok, CharTokenizer)
    assert tok.vocab_size == len(set(corpus))
    ids = tok.encode(corpus)
    assert min(ids) == 0 and max(ids) == tok.vocab_size - 1
    assert tok.decode(ids) == corpus
    assert tok.decode(np.asarray(ids[:100], dtype=np.int32)) == corpus[:100]


def test_char_unknown_character_is_named():
    tok = CharTokenizer.train("hello world")
    with pytest.raises(UsageError, match="training corpus") as e:
        tok.encode("hello ✓")
    assert repr("✓") in str(e.value)


def test_char_to_dict_round_trip(corpus):
    tok = train_tokenizer(corpus[:50_000], kind="char")
    d = json.loads(json.dumps(tok.to_dict()))
    again = tokenizer_from_dict(d)
    assert isinstance(again, CharTokenizer) and again.vocab_size == tok.vocab_size
    assert again.encode(corpus[:50_000]) == tok.encode(corpus[:50_000])


def test_decode_rejects_out_of_range_ids(bpe):
    with pytest.raises(UsageError, match="outside the vocabulary"):
        CharTokenizer.train("abc").decode([0, 3])
    with pytest.raises(UsageError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])


def test_bpe_round_trip(corpus, bpe):
    assert bpe.kind == "bpe" and isinstance(bpe, BPETokenizer)
    assert 257 <= bpe.vocab_size <= 512
    text = corpus[:100_000]
    ids = bpe.encode(text)
    assert len(ids) < len(text) / 1.5  # merges compress the text
    assert bpe.decode(ids) == text
    for unseen in ("héllo ✓ 日本", "  two  spaces\t\ttabs\n\n", "emoji 🙂 and \x00 nul", ""):
        assert bpe.decode(bpe.encode(unseen)) == unseen


def test_bpe_to_dict_round_trip(corpus, bpe):
    d = json.loads(json.dumps(bpe.to_dict()))
    again = tokenizer_from_dict(d)
    assert isinstance(again, BPETokenizer) and again.vocab_size == bpe.vocab_size
    sample = corpus[100_000:130_000] + "héllo ✓ 日本"
    assert again.encode(sample) == bpe.encode(sample)


def test_bpe_smallest_vocab():
    tok = train_tokenizer("abababab abab", kind="bpe", vocab_size=257)
    assert tok.vocab_size == 257
    assert tok.decode(tok.encode("xyz ab")) == "xyz ab"


def test_start_ids_is_a_token_of_every_vocabulary(bpe):
    """An empty prompt starts from the newline where the vocabulary has it, else from token 0:
    never from a character that the corpus lacked."""
    with_newline = CharTokenizer.train("xyz\nzy")
    assert data.start_ids(with_newline) == [with_newline.stoi["\n"]]
    one_line = CharTokenizer.train("abc cab")                  # no newline, no 'T', no 'h'
    assert data.start_ids(one_line) == [0] and one_line.decode([0]) == " "
    assert bpe.decode(data.start_ids(bpe)) == "\n"              # byte-level BPE knows every byte


@pytest.mark.parametrize("bad", [256, 0, -5, 512.0, "512", True, None])
def test_bpe_bad_vocab_size(bad):
    with pytest.raises(UsageError, match="257"):
        train_tokenizer("some text", kind="bpe", vocab_size=bad)


def test_bad_tokenizer_kind():
    with pytest.raises(UsageError, match="'wordpiece'"):
        train_tokenizer("some text", kind="wordpiece")
    with pytest.raises(UsageError, match="'wordpiece'"):
        tokenizer_from_dict({"kind": "wordpiece"})


# ----------------------------------------------------------------------------- split and batches

@pytest.mark.parametrize("n", [1000, 1001, 1005, 1009, 17])
def test_split_is_last_tenth(n):
    ids = list(range(n))
    train, val = split_ids(ids)
    n_val = int(round(0.1 * n))
    assert len(val) == n_val and len(train) == n - n_val
    assert train.dtype == np.int32 and val.dtype == np.int32
    assert np.array_equal(np.concatenate([train, val]), np.arange(n))  # order kept, val at the end


def test_split_other_fraction_and_bad_fraction():
    train, val = split_ids(np.arange(100), val_fraction=0.25)
    assert len(train) == 75 and val[0] == 75
    for bad in (0, 1, -0.1, 1.5, "0.1"):
        with pytest.raises(UsageError, match="val_fraction"):
            split_ids(np.arange(100), val_fraction=bad)


def test_check_split_lengths():
    check_split_lengths(np.arange(9), np.arange(9), block_size=8)  # exactly T + 1 is enough
    with pytest.raises(UsageError) as e:
        check_split_lengths(np.arange(100), np.arange(8), block_size=8)
    message = str(e.value)
    assert "validation" in message and "8 tokens" in message and "--block_size" in message
    with pytest.raises(UsageError, match="training split has 5 tokens"):
        check_split_lengths(np.arange(5), np.arange(100), block_size=16)


def test_get_batch_shapes_and_shift():
    data_ = np.arange(50, dtype=np.int32) * 3
    x, y = get_batch(data_, block_size=8, batch_size=4, rng=np.random.default_rng(0))
    assert x.shape == (4, 8) and y.shape == (4, 8)
    assert x.dtype == np.int64 and y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted left by one
    assert np.array_equal(y - x, np.full((4, 8), 3))  # each y is the token right after its x


def test_get_batch_reaches_both_ends():
    data_ = np.arange(10)
    rng = np.random.default_rng(1)
    starts = {int(get_batch(data_, 4, 1, rng)[0][0, 0]) for _ in range(300)}
    assert starts == set(range(0, 10 - 4))  # every offset in [0, N - T - 1], no more


def test_get_batch_rng_state_restore_replays_batches():
    data_ = np.arange(1000)
    rng = np.random.default_rng(1234)
    get_batch(data_, 16, 8, rng)
    state = rng.bit_generator.state
    first = [get_batch(data_, 16, 8, rng) for _ in range(3)]
    rng2 = np.random.default_rng(999)
    rng2.bit_generator.state = state
    second = [get_batch(data_, 16, 8, rng2) for _ in range(3)]
    for (x1, y1), (x2, y2) in zip(first, second):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_get_batch_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(UsageError, match="block_size"):
        get_batch(np.arange(8), 8, 2, rng)
    with pytest.raises(UsageError, match="batch_size 0"):
        get_batch(np.arange(100), 8, 0, rng)
