"""Data: the corpus, the tokenizer, the train/validation split and the random batches.

Corpus (load_text):
    "pydoc"        the default, needs no network: Python's reference documentation, shipped
                   with every CPython as pydoc_data.topics.topics (a dict topic -> text,
                   about 465 KB); the texts are joined in sorted-topic order with "\\n\\n",
                   so every machine gets the same string.
    "shakespeare"  tiny-shakespeare (1,115,394 bytes), downloaded once into the cache
                   directory (MINISPARSE_CACHE, else ~/.cache/minisparse) and checked
                   against its sha256.
    anything else  a path to a UTF-8 text file.

Tokenizers (train_tokenizer, tokenizer_from_dict); each has .kind, .vocab_size (V),
.encode(text) -> list[int], .decode(ids) -> str and .to_dict() -> a JSON-ready dict:
    CharTokenizer  one token per character; the vocabulary is the sorted set of the
                   corpus's characters, so a prompt may only use characters seen there.
    BPETokenizer   byte-level BPE (HuggingFace `tokenizers`): 256 byte tokens plus learned
                   merges, so any text at all round-trips, decode(encode(s)) == s.

A sample with no prompt starts from start_ids(tok): the newline's token where the tokenizer
has one (a text's next line, a start every corpus with more than one line knows), else token
0, which every vocabulary has (for a char tokenizer, the corpus's smallest character).

Split (split_ids), fixed, not random: with N tokens and val_fraction f,
    n_val = int(round(f * N))       val   = ids[N - n_val:]   the last n_val tokens
    n_train = N - n_val             train = ids[:N - n_val]

Batches (get_batch): B offsets i_b drawn uniformly from [0, N - T - 1] by the given
numpy.random.Generator, then
    x[b] = data[i_b : i_b + T]            x: (B, T) int64
    y[b] = data[i_b + 1 : i_b + T + 1]    y: (B, T) int64, the next token after each x
Only the generator decides the batch, so restoring rng.bit_generator.state replays the
batch stream exactly.
"""

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request

import numpy as np

from .errors import UsageError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_FILE = "tinyshakespeare.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_SIZE = 1_115_394  # bytes
DOWNLOAD_TIMEOUT_S = 20

_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
_SOURCES_HINT = "give --data a path to a UTF-8 text file, 'pydoc' or 'shakespeare'"


# ----------------------------------------------------------------------------- corpus

def load_text(source: str = "pydoc", cache_dir: str | None = None) -> str:
    """Return the corpus named by `source` ("pydoc", "shakespeare" or a file path) as one str."""
    if not isinstance(source, str) or source == "":
        raise UsageError(f"corpus source {source!r} is not a non-empty string: {_SOURCES_HINT}.")
    if source == "pydoc":
        return _load_pydoc()
    if source == "shakespeare":
        return _load_shakespeare(cache_dir)
    return _load_file(source)


def _load_pydoc() -> str:
    from pydoc_data.topics import topics  # part of the standard library

    return "\n\n".join(topics[key] for key in sorted(topics))


def _load_file(path: str) -> str:
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise UsageError(f"corpus file {path!r} does not exist: {_SOURCES_HINT}.")
    if os.path.isdir(full):
        raise UsageError(f"corpus path {path!r} is a directory, not a file: {_SOURCES_HINT}.")
    try:
        with open(full, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(
            f"corpus file {path!r} cannot be read ({e.strerror}): {_SOURCES_HINT}."
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"corpus file {path!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset"
            f" {e.start}): convert it to UTF-8 or {_SOURCES_HINT}."
        ) from None
    if text.strip() == "":
        raise UsageError(f"corpus file {path!r} is empty or only whitespace: {_SOURCES_HINT}.")
    return text


def _default_cache_dir() -> str:
    return os.environ.get("MINISPARSE_CACHE") or os.path.join("~", ".cache", "minisparse")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_valid_shakespeare(path: str) -> bool:
    return os.path.getsize(path) == SHAKESPEARE_SIZE and _sha256(path) == SHAKESPEARE_SHA256


def _download(url: str, dest: str) -> None:
    """Write the bytes at `url` into the file `dest`; network failures raise urllib/OS errors."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as f:
        while chunk := response.read(1 << 16):
            f.write(chunk)


def _load_shakespeare(cache_dir: str | None) -> str:
    cache_dir = os.path.expanduser(cache_dir if cache_dir is not None else _default_cache_dir())
    path = os.path.join(cache_dir, SHAKESPEARE_FILE)

    if os.path.isfile(path):
        if _is_valid_shakespeare(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
        os.remove(path)  # a partial or corrupted copy: fetch it again below

    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(
            f"cannot create the cache directory {cache_dir!r} ({e.strerror}):"
            " set MINISPARSE_CACHE to a writable directory or give --data a path to a UTF-8"
            " text file."
        ) from None

    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tinyshakespeare.", suffix=".part")
    os.close(fd)
    try:
        try:
            _download(SHAKESPEARE_URL, tmp)
        except _NETWORK_ERRORS as e:
            reason = getattr(e, "reason", None) or e
            raise UsageError(
                f"cannot download tiny-shakespeare from {SHAKESPEARE_URL} ({reason}), so there is"
                f" probably no network: download that file by hand to {path!r}, or give --data"
                " 'pydoc' or a path to a UTF-8 text file."
            ) from None
        if not _is_valid_shakespeare(tmp):
            raise UsageError(
                f"the downloaded tiny-shakespeare has {os.path.getsize(tmp)} bytes and sha256"
                f" {_sha256(tmp)}, not {SHAKESPEARE_SIZE} bytes and {SHAKESPEARE_SHA256}, so it was"
                f" discarded: download it by hand to {path!r}, or give --data 'pydoc' or a path to"
                " a UTF-8 text file."
            )
        os.replace(tmp, path)  # atomic: the cache never holds a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with open(path, encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------- tokenizers

def _check_ids(ids, vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(
            f"token id {bad[0]} is outside the vocabulary: ids must lie in [0, {vocab_size - 1}]"
            " for this tokenizer (was the checkpoint made with another tokenizer?)."
        )
    return ids


class CharTokenizer:
    """One token per character; token id = position of the character in the sorted vocabulary."""

    kind = "char"

    def __init__(self, chars: list[str], specials: list[str] = ()):
        if len(chars) == 0 or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise UsageError("a char tokenizer needs a non-empty list of single characters.")
        if len(set(chars)) != len(chars):
            raise UsageError("a char tokenizer's characters must be distinct.")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # whole strings with one id each after the characters (a chat template's turn markers, sft.py)
        self.specials = list(specials)
        self.stoi.update({t: len(self.chars) + i for i, t in enumerate(self.specials)})
        self._split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")") if self.specials else None

    def with_specials(self, tokens: list[str]) -> "CharTokenizer":
        """This tokenizer with `tokens` added, each one id, after the existing ones."""
        return CharTokenizer(self.chars, self.specials + list(tokens))

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if len(text) == 0:
            raise UsageError("cannot train a char tokenizer on empty text: give a longer corpus.")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.specials)

    def encode(self, text: str) -> list[int]:
        if self._split is not None:                # specials first, then the text between them by character
            return [i for part in self._split.split(text) if part
                    for i in ([self.stoi[part]] if part in self.specials else self.encode_chars(part))]
        return self.encode_chars(text)

    def encode_chars(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = list(dict.fromkeys(c for c in text if c not in self.stoi))  # first-seen order
            shown = ", ".join(repr(c) for c in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise UsageError(
                f"the text contains characters not in the char vocabulary ({shown}{more}):"
                " the prompt may only use characters seen in the training corpus."
            ) from None

    def decode(self, ids) -> str:
        vocab = self.chars + self.specials
        return "".join(vocab[i] for i in _check_ids(ids, self.vocab_size))

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "chars": list(self.chars)}
        if self.specials:
            d["specials"] = list(self.specials)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        return cls(list(d["chars"]), list(d.get("specials", [])))


class BPETokenizer:
    """Byte-level BPE: 256 byte tokens plus learned merges; wraps a HuggingFace Tokenizer."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok  # tokenizers.Tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        is_int = isinstance(vocab_size, (int, np.integer)) and not isinstance(vocab_size, bool)
        if not is_int or vocab_size < 257:
            raise UsageError(
                f"BPE vocab_size {vocab_size!r} is too small or not an integer: it must be an int"
                " >= 257 (the 256 byte tokens plus at least one merge)."
            )
        if len(text) == 0:
            raise UsageError("cannot train a BPE tokenizer on empty text: give a longer corpus.")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([text], trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        # may be below the requested size when a small corpus runs out of pairs to merge
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def with_specials(self, tokens: list[str]) -> "BPETokenizer":
        """A copy with `tokens` added as special tokens, each one id, never split (sft.py's markers)."""
        from tokenizers import AddedToken, Tokenizer

        tok = Tokenizer.from_str(self.tok.to_str())
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return BPETokenizer(tok)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer_json": self.tok.to_str()}

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(d["tokenizer_json"]))


_TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer}


def start_ids(tok) -> list[int]:
    """The ids a sample starts from when the prompt is empty: encode("\\n") if that is one token
    of the vocabulary, else [0]. Any model can continue it, whatever characters its corpus had."""
    try:
        ids = tok.encode("\n")
    except UsageError:                      # a char vocabulary without a newline
        ids = []
    return ids if len(ids) == 1 else [0]


def train_tokenizer(text: str, kind: str = "char", vocab_size: int = 512):
    """Train a tokenizer of `kind` ("char" or "bpe") on `text`; vocab_size is used by "bpe" only."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise UsageError(f"tokenizer kind {kind!r} is unknown: use 'char' or 'bpe'.")


def tokenizer_from_dict(d: dict):
    """Rebuild the tokenizer that .to_dict() described (as saved in a checkpoint)."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in _TOKENIZERS:
        raise UsageError(f"saved tokenizer kind {kind!r} is unknown: it must be 'char' or 'bpe'.")
    return _TOKENIZERS[kind].from_dict(d)


# ----------------------------------------------------------------------------- split and batches

def split_ids(ids, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split token ids into (train, val): val is the last int(round(val_fraction * N)) tokens."""
    is_number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not is_number or not 0 < val_fraction < 1:
        raise UsageError(
            f"val_fraction {val_fraction!r} is not allowed: it must be a number in (0, 1)."
        )
    data = np.asarray(ids, dtype=np.int32)  # (N,)
    if data.ndim != 1:
        raise UsageError(f"token ids have shape {data.shape}: they must be a 1-D sequence of ints.")
    n_val = int(round(val_fraction * len(data)))
    n_train = len(data) - n_val
    return data[:n_train], data[n_train:]  # (N - n_val,), (n_val,)


def check_split_lengths(train, val, block_size: int) -> None:
    """Raise UsageError unless each split holds block_size + 1 tokens, one (x, y) window."""
    for name, split in (("training", train), ("validation", val)):
        if len(split) < block_size + 1:
            raise UsageError(
                f"the {name} split has {len(split)} tokens, fewer than block_size + 1 ="
                f" {block_size + 1} (block_size {block_size}): use a longer corpus or a smaller"
                " --block_size."
            )


def get_batch(data, block_size: int, batch_size: int, rng: np.random.Generator):
    """Draw batch_size random windows: x (B, T) and the next tokens y (B, T), both int64."""
    for name, value in (("block_size", block_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UsageError(f"{name} {value!r} is not allowed: it must be a positive integer.")
    data = np.asarray(data)  # (N,)
    if data.ndim != 1:
        raise UsageError(f"batch data has shape {data.shape}: it must be a 1-D array of token ids.")
    if len(data) < block_size + 1:
        raise UsageError(
            f"the data has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}:"
            " use a longer corpus or a smaller --block_size."
        )
    starts = rng.integers(0, len(data) - block_size, size=batch_size)  # (B,) in [0, N - T - 1]
    offsets = starts[:, None] + np.arange(block_size)[None, :]  # (B, T)
    x = data[offsets].astype(np.int64)  # (B, T)
    y = data[offsets + 1].astype(np.int64)  # (B, T)
    return x, y
