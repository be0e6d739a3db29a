"""Corpora, tokenizers, token batches and bits per byte: the data every technique trains on.

The default corpus needs no download: it is the Python standard library sources of the
running interpreter (``sysconfig.get_paths()["stdlib"]``, every ``*.py`` file outside
``site-packages``), split into train and validation *by file* with a hash of each file's
relative path, so the split is the same on every machine and run. Users can pass a text
file, a folder (``*.txt``, ``*.md``, ``*.rst``, ``*.py`` files, recursively, sorted) or a
JSONL file (one JSON object a line, the text under ``jsonl_key``).

Text becomes tokens with a byte-level BPE tokenizer trained with Hugging Face's
``tokenizers`` (GPT-2 style: ByteLevel pre-tokenizer and decoder, so
``decode(encode(s)) == s`` for any unicode string), or with a plain byte tokenizer
(256 bytes + an end-of-text token). Documents are joined with the end-of-text token and
stored as a memory-mapped numpy array (``uint16`` up to 65,536 tokens, else ``uint32``),
so a corpus of any size costs no RAM; training draws random windows from it, evaluation
walks it in order.

Quality is reported in bits per byte (BPB): the model's total loss in bits divided by the
UTF-8 bytes of the text those tokens cover. Unlike loss or perplexity, BPB does not
depend on the tokenizer, so a byte model and a BPE model (or two vocab sizes) compare
directly. The trade-off of a larger BPE vocabulary: fewer tokens per byte (shorter
sequences, cheaper attention) for a bigger embedding table and a slower-to-train softmax.

Example::

    from slimlm.data import prepare_data, bits_per_byte
    data = prepare_data(None, "runs/data", vocab_size=2048, max_bytes=2_000_000)
    x, y = data.train.get_batch(8, 256, generator=torch.Generator().manual_seed(0))
    # (B, T) int64 inputs and next-token targets
    for x, y in data.val.iter_batches(8, 256, max_batches=10):
        ...
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from slimlm._checks import parse_device
from slimlm._io import atomic_write_bytes as _atomic_write_bytes

__all__ = [
    "EOS_TOKEN",
    "BPETokenizer",
    "ByteTokenizer",
    "DataBundle",
    "TokenData",
    "bits_per_byte",
    "load_texts",
    "load_tokenizer",
    "perplexity",
    "prepare_data",
    "stdlib_root",
    "train_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
SPLITS = ("train", "val", "all")
TOKENIZER_KINDS = ("bpe", "byte")
MIN_VOCAB_SIZE = 256 + 1  # every byte plus the end-of-text token
# BPE training on the whole stdlib takes minutes; merges learned from a few MB are as good.
# (Counted in characters, which is bytes for ASCII-heavy code.)
TOKENIZER_SAMPLE_BYTES = 5_000_000
# Val is capped in proportion to train under max_bytes, but never below this, so a small
# demo still has enough validation windows to give a stable number.
MIN_VAL_BYTES = 65_536
_FORMAT_VERSION = 1  # bump when the on-disk layout or the split rule changes
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
_ENCODE_CHUNK_BYTES = 4_000_000  # text tokenized per encode_batch call (bounds RAM)


# --------------------------------------------------------------------------- files




def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _list_text_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` with one of ``suffixes``, sorted by relative POSIX path.

    Hidden folders (``.git``, ``.venv``), ``site-packages`` and ``__pycache__`` are skipped:
    they hold installed or generated code, not the corpus.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(suffixes) and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_utf8(path: Path, *, strict: bool) -> str | None:
    """The file's text; ``None`` for undecodable files unless ``strict`` (then ValueError)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise ValueError(
                f"source file {str(path)!r} is not valid UTF-8 ({e}); expected UTF-8 text"
            ) from None
        return None  # a few stdlib test files are deliberately latin-1 / koi8-r


# --------------------------------------------------------------------------- corpora

# A unit is the thing the train/val split assigns: a file, or a JSONL record.
# (split key, loader returning the text or None to skip it)
_Unit = tuple[str, Callable[[], str | None]]


def _resolve_source(source: str | os.PathLike | None) -> tuple[str, Path]:
    """(kind, path) with kind in {"stdlib", "folder", "jsonl", "text"}; ValueError if missing."""
    if source is None:
        root = stdlib_root()
        if not root.is_dir():
            raise ValueError(f"source=None: the stdlib folder {str(root)!r} does not exist")
        return "stdlib", root
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source={source!r}: expected None (stdlib), a path to a text file, folder or "
            f"JSONL file, got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"source={str(source)!r} does not exist; expected a text file, a folder or a "
            f".jsonl file (or None for the stdlib corpus)"
        )
    if path.is_dir():
        return "folder", path.resolve()
    if path.suffix.lower() == ".jsonl":
        return "jsonl", path.resolve()
    return "text", path.resolve()


def _source_files(kind: str, path: Path) -> list[Path]:
    if kind == "stdlib":
        return _list_text_files(path, (".py",))
    if kind == "folder":
        return _list_text_files(path, TEXT_SUFFIXES)
    return [path]


def _units(kind: str, path: Path, jsonl_key: str) -> list[_Unit]:
    """The source's split units in their natural order (sorted paths, or JSONL line order)."""
    if kind in ("stdlib", "folder"):
        files = _source_files(kind, path)
        if not files:
            what = "*.py" if kind == "stdlib" else "/".join("*" + s for s in TEXT_SUFFIXES)
            raise ValueError(f"source={str(path)!r}: no text found (no {what} files)")
        strict = kind == "folder"
        return [
            (f.relative_to(path).as_posix(), lambda f=f: _read_utf8(f, strict=strict))
            for f in files
        ]
    if kind == "text":
        text = _read_utf8(path, strict=True)
        return [(path.name, lambda: text)]
    # JSONL: one record a line; the content is the split key so duplicates share a split.
    units: list[_Unit] = []
    raw = _read_utf8(path, strict=True) or ""
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"source={str(path)!r} line {lineno}: invalid JSON ({e})") from None
        if not isinstance(record, dict) or jsonl_key not in record:
            raise ValueError(
                f"jsonl_key={jsonl_key!r} not found in source={str(path)!r} line {lineno}; "
                f"expected every line to be a JSON object with a {jsonl_key!r} field"
            )
        text = record[jsonl_key]
        if not isinstance(text, str):
            raise ValueError(
                f"jsonl_key={jsonl_key!r} in source={str(path)!r} line {lineno} holds a "
                f"{type(text).__name__}, expected a string"
            )
        units.append((text, lambda text=text: text))
    return units


def _hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) from ``key`` (stable across runs and machines)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _split_units(units: list[_Unit], split: str, val_fraction: float) -> list[_Unit]:
    """Assign each unit to train or val by the hash of its key; both sides non-empty."""
    if split == "all":
        return units
    if len(units) == 1:
        # One document: cut it at a line boundary, the last ``val_fraction`` for val.
        key, load = units[0]
        text = load() or ""
        cut = _cut_point(text, val_fraction)
        part = text[:cut] if split == "train" else text[cut:]
        return [(key, lambda part=part: part)]
    h = [_hash_fraction(k) for k, _ in units]
    is_val = [x < val_fraction for x in h]
    # Tiny sources may hash everything to one side; move the nearest unit across.
    if not any(is_val):
        is_val[min(range(len(h)), key=h.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(h)), key=h.__getitem__)] = False
    want_val = split == "val"
    return [u for u, v in zip(units, is_val) if v == want_val]


def _cut_point(text: str, val_fraction: float) -> int:
    """Where a single document splits into train/val: the line start nearest the target."""
    target = int(len(text) * (1.0 - val_fraction))
    target = min(max(target, 1), max(len(text) - 1, 1))
    nl = text.rfind("\n", 0, target)
    # Only move to a line boundary when that keeps train the bulk of the text.
    return nl + 1 if nl >= 0 and nl + 1 >= target // 2 and nl + 1 < len(text) else target


def _check_split_args(split: str, val_fraction: float, max_bytes: int | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r}: expected a number in (0, 1)")
    if max_bytes is not None and (
        not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0
    ):
        raise ValueError(f"max_bytes={max_bytes!r}: expected a positive int or None")


def load_texts(
    source: str | os.PathLike | None = None,
    *,
    split: str = "train",
    val_fraction: float = 0.05,
    jsonl_key: str = "text",
    max_bytes: int | None = None,
) -> list[str]:
    """Documents of a corpus split, in a deterministic order.

    ``source``: ``None`` (the stdlib sources), a text file, a folder or a ``.jsonl`` file.
    ``split``: ``"train"``, ``"val"`` or ``"all"``. Files (JSONL records) go to val when a
    hash of their relative path (their text) falls below ``val_fraction``; a single
    document is cut at a line boundary instead. ``max_bytes`` keeps the prefix of the
    split, in sorted order, up to that many UTF-8 bytes (the last document is truncated).

    Example::

        val = load_texts(None, split="val", max_bytes=200_000)
    """
    _check_split_args(split, val_fraction, max_bytes)
    if not isinstance(jsonl_key, str):
        raise TypeError(f"jsonl_key={jsonl_key!r}: expected a str")
    kind, path = _resolve_source(source)
    units = _split_units(_units(kind, path, jsonl_key), split, float(val_fraction))
    texts: list[str] = []
    total = 0
    for _, load in units:
        text = load()
        if not text:
            continue
        if max_bytes is not None:
            data = text.encode("utf-8")
            if total + len(data) > max_bytes:
                # errors="ignore" drops a multi-byte character cut in half at the cap.
                text = data[: max_bytes - total].decode("utf-8", errors="ignore")
                if text:
                    texts.append(text)
                break
            total += len(data)
        texts.append(text)
    if not texts:
        shown = "None (stdlib)" if source is None else repr(str(source))
        raise ValueError(f"source={shown}: no text found for split={split!r}")
    return texts


# --------------------------------------------------------------------------- tokenizers


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size={vocab_size!r}: expected an int")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size}: too small, expected at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + the end-of-text token)"
        )
    if vocab_size > 2 ** 32:  # ids are stored as uint32 at most
        raise ValueError(f"vocab_size={vocab_size}: too large, expected at most 2**32")


class ByteTokenizer:
    """Each UTF-8 byte is a token (0..255); the end-of-text token is 256.

    No training, no unknown tokens, and ~3.5x more tokens than a BPE tokenizer on code.

    Example::

        tok = ByteTokenizer()
        assert tok.decode(tok.encode("héllo")) == "héllo"
    """

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = MIN_VOCAB_SIZE
        self.eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def _encode_np(self, texts: Sequence[str]) -> list[np.ndarray]:
        # Avoids a Python int per byte when tokenizing a whole corpus.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the end-of-text token becomes ``EOS_TOKEN``, bad UTF-8 U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                out += EOS_TOKEN.encode()
            elif 0 <= i < 256:
                out.append(i)
            else:
                raise ValueError(f"ids: token {i} out of range, expected 0..{self.eos_id}")
        return out.decode("utf-8", errors="replace")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/tokenizer.json`` (a small ``{"type": "byte"}`` marker)."""
        path = Path(folder) / "tokenizer.json"
        _atomic_write_json(
            path, {"type": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        )
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) over Hugging Face ``tokenizers``.

    The ByteLevel pre-tokenizer maps every byte to a symbol first, so any unicode string
    round-trips exactly. ``EOS_TOKEN`` in user text is encoded as plain text, never as
    the end-of-text token, so documents cannot fake a boundary.

    Example::

        tok = BPETokenizer.train(load_texts(max_bytes=1_000_000), vocab_size=1024)
        tok.save("runs/tok")
    """

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer: has no {EOS_TOKEN!r} token; expected one for eos")
        # Not stored in tokenizer.json, so set on every construction.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size()
        self.eos_id: int = eos

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, *, show_progress: bool = False
    ) -> BPETokenizer:
        """Learn merges from ``texts`` until the vocabulary has ``vocab_size`` tokens.

        A small corpus may stop short of ``vocab_size`` (no pair left to merge); the
        result's ``vocab_size`` is the real count.
        """
        _check_vocab_size(vocab_size)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            # All 256 byte symbols, so text the sample never showed still encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def _encode_np(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/tokenizer.json`` (the standard Hugging Face format)."""
        path = Path(folder) / "tokenizer.json"
        _atomic_write_bytes(path, self._tok.to_str().encode())
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self._tok.to_str() == other._tok.to_str()

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(folder: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """Read ``folder/tokenizer.json`` written by ``save`` (or any byte-level HF tokenizer
    with an ``EOS_TOKEN`` token)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"folder={str(folder)!r}: no tokenizer.json in it")
    try:
        raw = path.read_text(encoding="utf-8")
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if obj.get("type") == "byte":
            return ByteTokenizer()
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(raw))
    except Exception as e:  # a damaged or foreign file: say which one
        raise ValueError(f"{str(path)!r}: not a tokenizer slimlm can read ({e})") from e


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, kind: str = "bpe"
) -> ByteTokenizer | BPETokenizer:
    """A tokenizer of ``kind`` (``"bpe"`` or ``"byte"``) for ``texts``.

    ``"byte"`` needs no training and always has 257 tokens; ``vocab_size`` is then only
    checked to be at least 257.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {TOKENIZER_KINDS}")
    if isinstance(texts, (str, bytes)):  # iterating it would train on single characters
        raise ValueError(f"texts={texts[:40]!r}...: expected an iterable of strings (e.g. "
                         "[text]), not one string")
    _check_vocab_size(vocab_size)
    if kind == "byte":
        return ByteTokenizer()
    return BPETokenizer.train(texts, vocab_size)


# --------------------------------------------------------------------------- token arrays


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _chunks(texts: Sequence[str], max_bytes: int) -> Iterator[list[str]]:
    """Consecutive groups of texts of about ``max_bytes`` characters each."""
    group: list[str] = []
    size = 0
    for t in texts:
        group.append(t)
        size += len(t)
        if size >= max_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


class TokenData:
    """A memory-mapped token array plus the UTF-8 byte count of the text it covers.

    On disk: ``path`` (the raw array) and ``path + ".json"`` (``num_tokens``,
    ``num_bytes``, ``dtype``, ``num_docs``). Every document is followed by the
    end-of-text token, which covers 0 bytes.

    Example::

        data = TokenData.build(texts, tokenizer, "runs/data/train.bin")
        x, y = data.get_batch(4, 128, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, tokens: np.ndarray, num_bytes: int, path: Path | None = None) -> None:
        self.tokens = tokens
        self.num_bytes = int(num_bytes)
        self.path = path

    @functools.cached_property
    def max_id(self) -> int:
        """The largest token id in the file (-1 when empty): one pass, then remembered."""
        return int(self.tokens.max()) if len(self.tokens) else -1

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return (
            f"TokenData({len(self)} tokens, {self.num_bytes} bytes, "
            f"dtype={self.tokens.dtype}, path={str(self.path)!r})"
        )

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        tokenizer: ByteTokenizer | BPETokenizer,
        path: str | os.PathLike,
        *,
        progress: bool | None = None,
    ) -> TokenData:
        """Tokenize ``texts`` (each followed by eos) into ``path``; return it opened.

        Both files are written to temp names and renamed, metadata last, so a crash never
        leaves a half-written array that ``open`` would accept. ``progress``: show a tqdm
        bar (``None``: only on a terminal).
        """
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of documents, got a single str")
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("texts: no text found (empty sequence or only empty strings)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dtype = _dtype_for(tokenizer.vocab_size)
        num_tokens = num_bytes = 0
        eos = np.array([tokenizer.eos_id], dtype=dtype)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            bar = tqdm(
                total=len(texts),
                desc=f"tokenizing {path.name}",
                unit="doc",
                disable=None if progress is None else not progress,  # None: only on a TTY
            )
            with os.fdopen(fd, "wb") as f, bar:
                for group in _chunks(texts, _ENCODE_CHUNK_BYTES):
                    for text, ids in zip(group, tokenizer._encode_np(group)):
                        f.write(ids.astype(dtype, copy=False).tobytes())
                        f.write(eos.tobytes())
                        num_tokens += len(ids) + 1
                        num_bytes += len(text.encode("utf-8"))
                    bar.update(len(group))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {
            "num_tokens": num_tokens,
            "num_bytes": num_bytes,
            "num_docs": len(texts),
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        }
        _atomic_write_json(_meta_path(path), meta)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenData:
        """Memory-map a token file written by ``build``."""
        path = Path(path)
        meta_path = _meta_path(path)
        if not path.is_file() or not meta_path.is_file():
            raise ValueError(
                f"path={str(path)!r}: expected a token file and its {meta_path.name} "
                f"written by TokenData.build"
            )
        try:
            meta = json.loads(meta_path.read_text())
            dtype = np.dtype(meta["dtype"])
            expected = int(meta["num_tokens"]) * dtype.itemsize
            int(meta["num_bytes"])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{str(meta_path)!r}: damaged token metadata ({e!r}); rebuild it "
                             "with TokenData.build") from e
        if path.stat().st_size != expected:
            raise ValueError(
                f"path={str(path)!r}: {path.stat().st_size} bytes on disk, expected "
                f"{expected} ({meta['num_tokens']} {dtype.name} tokens); rebuild it"
            )
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(meta["num_tokens"],))
        return cls(tokens, meta["num_bytes"], path)

    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token (eos tokens included in the count)."""
        return self.num_bytes / max(len(self), 1)

    def _check_window(self, batch_size: int, seq_len: int) -> None:
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r}: expected a positive int")
        if seq_len + 1 > len(self):
            raise ValueError(
                f"seq_len={seq_len}: exceeds the available tokens ({len(self)} in "
                f"{self.path or 'this TokenData'}); expected seq_len <= {len(self) - 1}"
            )

    def _window_tensors(
        self, starts: np.ndarray, seq_len: int, device: str | torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
        # Fancy indexing reads only these windows from the memmap.
        buf = torch.from_numpy(self.tokens[idx].astype(np.int64))  # (B, T+1)
        device = torch.device(device)
        if device.type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            buf = buf.to(device)
        return buf[:, :-1], buf[:, 1:]  # (B, T) each

    def get_batch(
        self,
        batch_size: int,
        seq_len: int,
        *,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: ``x`` (B, T) int64 and ``y = x`` shifted left by one token.

        Starts come from ``torch.randint(generator=...)``, so a seeded generator makes the
        batch sequence reproducible.
        """
        self._check_window(batch_size, seq_len)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator={generator!r}: expected a torch.Generator or None")
        parse_device(device, types=("cpu", "cuda", "meta"))
        gen_device = generator.device if generator is not None else "cpu"
        starts = torch.randint(
            0, len(self) - seq_len, (batch_size,), generator=generator, device=gen_device
        )
        return self._window_tensors(starts.cpu().numpy().astype(np.int64), seq_len, device)

    def iter_batches(
        self,
        batch_size: int,
        seq_len: int,
        *,
        max_batches: int | None = None,
        device: str | torch.device = "cpu",
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows from the start, for evaluation.

        Window ``i`` is ``tokens[i*T : i*T+T+1]``, so every token after the first is a
        target exactly once; the tail shorter than ``T`` is dropped, and the last batch
        may hold fewer than ``batch_size`` windows. Arguments are checked on the call,
        not on the first ``next``.
        """
        self._check_window(batch_size, seq_len)
        if max_batches is not None and (isinstance(max_batches, bool)
                                        or not isinstance(max_batches, int) or max_batches <= 0):
            raise ValueError(f"max_batches={max_batches!r}: expected a positive int or None")
        parse_device(device, types=("cpu", "cuda", "meta"))
        n_windows = (len(self) - 1) // seq_len
        n_batches = math.ceil(n_windows / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for b in range(n_batches):
                w = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows), dtype=np.int64)
                yield self._window_tensors(w * seq_len, seq_len, device)

        return batches()


# --------------------------------------------------------------------------- metrics


def bits_per_byte(mean_loss_nats: float, num_tokens: int, num_bytes: int) -> float:
    """Bits per UTF-8 byte: ``mean_loss_nats * num_tokens / (ln 2 * num_bytes)``.

    Exact when ``num_bytes`` is the byte count of the text the ``num_tokens`` evaluated
    tokens cover (e.g. a whole ``TokenData``: ``len(data)``, ``data.num_bytes``). When only
    some validation windows are evaluated, pass
    ``num_bytes = num_tokens * val.bytes_per_token()``: an approximation that assumes the
    evaluated windows have the split's average bytes per token.

    Example::

        bits_per_byte(2.0, 1000, 3500)  # 2 nats/token at 3.5 bytes/token -> 0.824
    """
    def number(v: Any) -> float:  # any number, NumPy and 0-d tensors included
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    n_tok, n_bytes = number(num_tokens), number(num_bytes)
    if not n_tok >= 0:
        raise ValueError(f"num_tokens={num_tokens!r}: expected a number >= 0")
    if not n_bytes > 0:
        raise ValueError(f"num_bytes={num_bytes!r}: expected a number > 0")
    return float(mean_loss_nats) * num_tokens / (math.log(2) * num_bytes)


def perplexity(mean_loss_nats: float) -> float:
    """``exp(mean loss)``, the effective branching factor per token (``inf`` on overflow)."""
    try:
        return math.exp(mean_loss_nats)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------- pipeline


@dataclass
class DataBundle:
    """What ``prepare_data`` returns: train/val tokens, their tokenizer and the folder.

    ``reused`` is True when the folder's cached data was opened instead of rebuilt.
    """

    train: TokenData
    val: TokenData
    tokenizer: ByteTokenizer | BPETokenizer
    folder: Path
    reused: bool = False


def _source_fingerprint(kind: str, path: Path) -> str:
    """A hash of the source's file names, sizes and modification times (cheap: no reads)."""
    h = hashlib.sha256()
    h.update(f"{kind}\0{path}\0".encode())
    if kind == "stdlib":
        h.update(sys.version.encode())
    for f in _source_files(kind, path):
        st = f.stat()
        rel = f.relative_to(path).as_posix() if kind in ("stdlib", "folder") else f.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _default_folder(settings: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    base = os.environ.get("SLIMLM_CACHE") or Path.home() / ".cache" / "slimlm"
    return Path(base) / "data" / key


def _sample(texts: Sequence[str], max_chars: int) -> list[str]:
    """Up to ``max_chars`` of text drawn across the whole list (deterministic), so the
    tokenizer sees every part of the corpus, not only the alphabetically first files."""
    if sum(len(t) for t in texts) <= max_chars:
        return list(texts)
    order = sorted(range(len(texts)), key=lambda i: _hash_fraction(f"sample:{i}"))
    out: list[str] = []
    size = 0
    for i in order:
        out.append(texts[i][: max_chars - size])
        size += len(out[-1])
        if size >= max_chars:
            break
    return out


def prepare_data(
    source: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
    *,
    vocab_size: int = 2048,
    tokenizer: str = "bpe",
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    jsonl_key: str = "text",
    tokenizer_folder: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> DataBundle:
    """Corpus -> tokenizer -> ``folder/train.bin``, ``folder/val.bin``, ``tokenizer.json``.

    The tokenizer is trained on up to ``TOKENIZER_SAMPLE_BYTES`` of the train split, or
    loaded from ``tokenizer_folder`` (then ``vocab_size`` and ``tokenizer`` are ignored).
    ``max_bytes`` caps the train split; val is capped at the same proportion
    (``val_fraction / (1 - val_fraction)`` of it) but at least ``MIN_VAL_BYTES``.
    ``folder=None`` uses ``$SLIMLM_CACHE/data/<key>`` (default ``~/.cache/slimlm``).

    The folder's ``manifest.json`` records the settings and a fingerprint of the source
    (file names, sizes, mtimes); when they match, the data is opened, not rebuilt.

    Example::

        data = prepare_data("corpus/", "runs/data", vocab_size=4096)
        print(len(data.train), data.val.bytes_per_token())
    """
    # All argument checks before any work.
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer={tokenizer!r}: expected one of {TOKENIZER_KINDS}")
    _check_vocab_size(vocab_size)
    _check_split_args("train", val_fraction, max_bytes)
    if not isinstance(jsonl_key, str):
        raise TypeError(f"jsonl_key={jsonl_key!r}: expected a str")
    kind, path = _resolve_source(source)
    tok_fp = None
    if tokenizer_folder is not None:
        tok_file = Path(tokenizer_folder) / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"tokenizer_folder={str(tokenizer_folder)!r}: no tokenizer.json in it")
        tok_fp = hashlib.sha256(tok_file.read_bytes()).hexdigest()

    val_max = None
    if max_bytes is not None:
        val_max = min(
            max_bytes, max(math.ceil(max_bytes * val_fraction / (1 - val_fraction)), MIN_VAL_BYTES)
        )
    settings = {
        "format": _FORMAT_VERSION,
        "source": "stdlib" if kind == "stdlib" else str(path),
        "source_fingerprint": _source_fingerprint(kind, path),
        "tokenizer": tokenizer if tok_fp is None else "loaded",
        "vocab_size": vocab_size if tok_fp is None else None,
        "tokenizer_fingerprint": tok_fp,
        "tokenizer_sample_bytes": TOKENIZER_SAMPLE_BYTES,
        "val_fraction": float(val_fraction),
        "max_bytes": max_bytes,
        "val_max_bytes": val_max,
        "jsonl_key": jsonl_key if kind == "jsonl" else None,
    }
    folder = Path(folder) if folder is not None else _default_folder(settings)
    manifest_path = folder / "manifest.json"
    train_path, val_path = folder / "train.bin", folder / "val.bin"

    if manifest_path.is_file():
        try:
            cached = json.loads(manifest_path.read_text()).get("settings")
        except (OSError, json.JSONDecodeError):
            cached = None
        if cached == settings:
            try:
                return DataBundle(
                    TokenData.open(train_path),
                    TokenData.open(val_path),
                    load_tokenizer(folder),
                    folder,
                    reused=True,
                )
            except (ValueError, OSError, KeyError, json.JSONDecodeError):
                pass  # damaged cache: rebuild below
    # The manifest goes first and comes back last: a half-built folder is never reused.
    manifest_path.unlink(missing_ok=True)

    kw = dict(val_fraction=val_fraction, jsonl_key=jsonl_key)
    train_texts = load_texts(source, split="train", max_bytes=max_bytes, **kw)
    val_texts = load_texts(source, split="val", max_bytes=val_max, **kw)
    if tokenizer_folder is not None:
        tok = load_tokenizer(tokenizer_folder)
    else:
        sample = _sample(train_texts, TOKENIZER_SAMPLE_BYTES)
        if tokenizer == "bpe":
            show = sys.stderr.isatty() if progress is None else progress
            tok = BPETokenizer.train(sample, vocab_size, show_progress=show)
        else:
            tok = train_tokenizer(sample, vocab_size, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(folder)
    train = TokenData.build(train_texts, tok, train_path, progress=progress)
    val = TokenData.build(val_texts, tok, val_path, progress=progress)
    _atomic_write_json(
        manifest_path,
        {
            "settings": settings,
            "train": {"num_tokens": len(train), "num_bytes": train.num_bytes},
            "val": {"num_tokens": len(val), "num_bytes": val.num_bytes},
            "vocab_size": tok.vocab_size,
        },
    )
    return DataBundle(train, val, tok, folder)
