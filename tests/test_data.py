"""Tests for slimlm.data: corpora, tokenizers, token arrays, batches and bits per byte."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from slimlm import data as D
from slimlm.data import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    TokenData,
    bits_per_byte,
    load_texts,
    load_tokenizer,
    perplexity,
    prepare_data,
    train_tokenizer,
)

UNICODE = "héllo wörld 😀\r\n\t\x00 e\u0301 中文  x " + EOS_TOKEN + " ∑∫ \U0010ffff end"
SMALL = 200_000


def _corpus_folder(root: Path, n: int = 40) -> Path:
    """A folder of small, distinct text files (some nested, some ignored)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        words = " ".join(f"word{(i * 7 + j) % 50} token{j % 13}" for j in range(200))
        (sub / f"doc{i:03d}.txt").write_text(f"Document {i}: ü {words}\n", encoding="utf-8")
    (root / "skip.bin").write_bytes(b"\xff\xfe not text")
    (root / ".hidden").mkdir(exist_ok=True)
    (root / ".hidden" / "x.txt").write_text("hidden, must be skipped")
    return root


@pytest.fixture(scope="module")
def small_bpe() -> BPETokenizer:
    texts = load_texts(None, max_bytes=SMALL)
    return BPETokenizer.train(texts, vocab_size=512)


# --------------------------------------------------------------------------- corpora


def test_stdlib_split_deterministic_disjoint_nonempty():
    tr1 = load_texts(None, split="train", max_bytes=SMALL)
    tr2 = load_texts(None, split="train", max_bytes=SMALL)
    va = load_texts(None, split="val", max_bytes=SMALL)
    assert tr1 == tr2
    assert tr1 and va
    assert sum(len(t.encode()) for t in tr1) == SMALL  # cap hit exactly
    assert sum(len(t.encode()) for t in va) <= SMALL
    # Whole files go to one side only (the last may be truncated, so compare prefixes).
    assert not {t[:2000] for t in tr1[:-1]} & {t[:2000] for t in va[:-1]}


def test_split_by_file_partition(tmp_path):
    folder = _corpus_folder(tmp_path / "c")
    tr = load_texts(folder, split="train", val_fraction=0.2)
    va = load_texts(folder, split="val", val_fraction=0.2)
    al = load_texts(folder, split="all")
    assert tr and va
    assert not set(tr) & set(va)
    assert sorted(tr + va) == sorted(al)
    assert len(al) == 40  # .bin and hidden folders skipped
    assert load_texts(folder, split="val", val_fraction=0.2) == va
    # Same relative paths give the same split wherever the folder lives.
    copy = _corpus_folder(tmp_path / "elsewhere")
    assert load_texts(copy, split="val", val_fraction=0.2) == va


def test_split_single_file_and_tiny_jsonl(tmp_path):
    f = tmp_path / "one.txt"
    lines = [f"line {i} ü" for i in range(100)]
    f.write_text("\n".join(lines), encoding="utf-8")
    tr = load_texts(f, split="train")
    va = load_texts(f, split="val")
    assert tr[0] + va[0] == f.read_text(encoding="utf-8")
    assert va[0].startswith("line ") and len(va[0]) < len(tr[0])
    # Too short to split: train keeps it all, val has nothing and says so.
    (tmp_path / "c.txt").write_text("c")
    assert load_texts(tmp_path / "c.txt", split="train") == ["c"]
    with pytest.raises(ValueError, match="no text found for split='val'"):
        load_texts(tmp_path / "c.txt", split="val")
    # Two records: hashing may put both on one side, but each split gets one.
    j = tmp_path / "two.jsonl"
    j.write_text('{"text": "alpha"}\n\n{"text": "beta"}\n', encoding="utf-8")
    assert sorted(load_texts(j, split="train") + load_texts(j, split="val")) == ["alpha", "beta"]


def test_jsonl_custom_key_and_max_bytes(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps({"body": f"record {i} ✓"}) + "\n" for i in range(50)))
    al = load_texts(j, split="all", jsonl_key="body")
    assert al == [f"record {i} ✓" for i in range(50)]
    capped = load_texts(j, split="all", jsonl_key="body", max_bytes=30)
    assert sum(len(t.encode()) for t in capped) <= 30
    assert "".join(capped).encode() == "".join(al).encode()[:30].decode("utf-8", "ignore").encode()


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == UNICODE
    assert tok.decode([104, 105, 256]) == "hi" + EOS_TOKEN
    assert tok.encode_batch(["a", "é"]) == [[97], [0xC3, 0xA9]]
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["type"] == "byte"
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_train_round_trip_save_load(tmp_path, small_bpe):
    tok = small_bpe
    assert tok.vocab_size == 512
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    # Literal EOS_TOKEN in text is plain text, not the document separator.
    assert tok.eos_id not in tok.encode(UNICODE)
    code = "def f(x):\n    return x + 1\n"
    assert len(tok.encode(code)) < len(code.encode())  # merges were learned
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer) and loaded == tok
    assert loaded.eos_id == tok.eos_id
    texts = [UNICODE, code, ""]
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)
    assert loaded.decode(loaded.encode(UNICODE)) == UNICODE


def test_train_tokenizer_kinds():
    assert isinstance(train_tokenizer(["abc"], 300, kind="byte"), ByteTokenizer)
    tok = train_tokenizer(["abc abc abd"] * 5, 300)
    assert isinstance(tok, BPETokenizer)
    # A tiny corpus stops short of the requested size; vocab_size says the real count.
    assert 257 <= tok.vocab_size <= 300
    with pytest.raises(ValueError, match="kind='wordpiece'"):
        train_tokenizer(["abc"], 300, kind="wordpiece")


# --------------------------------------------------------------------------- token arrays


@pytest.fixture
def byte_data(tmp_path) -> TokenData:
    texts = ["abcdefghij" * 30, "ü" * 50, "xyz"]
    return TokenData.build(texts, ByteTokenizer(), tmp_path / "t.bin", progress=False)


def test_token_data_build_open(tmp_path, byte_data):
    texts = ["abcdefghij" * 30, "ü" * 50, "xyz"]
    expected = []
    for t in texts:
        expected += list(t.encode()) + [256]
    assert byte_data.tokens.dtype == np.uint16
    assert isinstance(byte_data.tokens, np.memmap)
    assert byte_data.tokens.tolist() == expected
    assert byte_data.num_bytes == sum(len(t.encode()) for t in texts) == 403
    assert len(byte_data) == 406
    assert byte_data.bytes_per_token() == pytest.approx(403 / 406)
    meta = json.loads((tmp_path / "t.bin.json").read_text())
    assert meta["num_tokens"] == 406 and meta["num_bytes"] == 403 and meta["dtype"] == "uint16"
    again = TokenData.open(tmp_path / "t.bin")
    assert again.tokens.tolist() == expected and again.num_bytes == 403
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp left


def test_get_batch_shapes_shift_reproducible(byte_data):
    g = torch.Generator().manual_seed(0)
    x, y = byte_data.get_batch(4, 16, generator=g)
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    toks = torch.from_numpy(byte_data.tokens.astype(np.int64))
    for row_x, row_y in zip(x, y):
        # Each row is a real window of the array, and y continues x by one token.
        starts = [s for s in range(len(toks) - 16) if torch.equal(toks[s : s + 16], row_x)]
        assert any(torch.equal(toks[s + 1 : s + 17], row_y) for s in starts)
    x2, y2 = byte_data.get_batch(4, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x2)
    torch.testing.assert_close(y, y2)
    x3, _ = byte_data.get_batch(4, 16, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)
    # The largest window fits exactly.
    x4, y4 = byte_data.get_batch(2, len(byte_data) - 1)
    assert torch.equal(x4[0], torch.from_numpy(byte_data.tokens[:-1].astype(np.int64)))
    assert torch.equal(y4[0], torch.from_numpy(byte_data.tokens[1:].astype(np.int64)))


def test_iter_batches_deterministic_non_overlapping(byte_data):
    T, B = 16, 3
    batches = list(byte_data.iter_batches(B, T))
    again = list(byte_data.iter_batches(B, T))
    assert len(batches) == len(again)
    for (x, y), (x2, y2) in zip(batches, again):
        torch.testing.assert_close(x, x2)
        torch.testing.assert_close(y, y2)
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    n_windows = (len(byte_data) - 1) // T
    assert xs.shape == (n_windows, T)
    assert all(x.shape[0] == B for x, _ in batches[:-1])
    toks = torch.from_numpy(byte_data.tokens.astype(np.int64))
    # Windows tile the array from the start: each target token appears exactly once.
    torch.testing.assert_close(xs.reshape(-1), toks[: n_windows * T])
    torch.testing.assert_close(ys.reshape(-1), toks[1 : n_windows * T + 1])
    assert len(list(byte_data.iter_batches(B, T, max_batches=2))) == 2


def test_uint32_for_large_vocab(tmp_path):
    class Big(ByteTokenizer):
        def __init__(self):
            super().__init__()
            self.vocab_size, self.eos_id = 70_000, 69_999

    data = TokenData.build(["ab"], Big(), tmp_path / "big.bin", progress=False)
    assert data.tokens.dtype == np.uint32
    assert data.tokens.tolist() == [97, 98, 69_999]


# --------------------------------------------------------------------------- pipeline


def test_prepare_data_folder_and_cache(tmp_path, monkeypatch):
    src = _corpus_folder(tmp_path / "src")
    out = tmp_path / "out"
    b = prepare_data(src, out, vocab_size=300, val_fraction=0.2, progress=False)
    assert not b.reused
    for name in ("train.bin", "val.bin", "tokenizer.json", "manifest.json"):
        assert (out / name).is_file()
    assert b.folder == out and isinstance(b.tokenizer, BPETokenizer)
    train_texts = load_texts(src, split="train", val_fraction=0.2)
    assert b.train.num_bytes == sum(len(t.encode()) for t in train_texts)
    assert len(b.train) > 0 and len(b.val) > 0
    # Decoding the stored tokens gives back the documents, joined by eos.
    eos = b.tokenizer.eos_id
    toks = b.train.tokens.tolist()
    docs, cur = [], []
    for t in toks:
        if t == eos:
            docs.append(b.tokenizer.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert docs == train_texts
    assert int(b.train.tokens.max()) < b.tokenizer.vocab_size

    mtime = (out / "train.bin").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("rebuilt instead of reusing the cache")

    monkeypatch.setattr(D.TokenData, "build", boom)
    b2 = prepare_data(src, out, vocab_size=300, val_fraction=0.2, progress=False)
    assert b2.reused
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(b2.train.tokens, b.train.tokens) and b2.tokenizer == b.tokenizer
    monkeypatch.undo()

    # Different settings or a changed source rebuild.
    b3 = prepare_data(src, out, vocab_size=280, val_fraction=0.2, progress=False)
    assert not b3.reused and b3.tokenizer.vocab_size <= 280
    (src / "doc001.txt").write_text("changed text\n")
    b4 = prepare_data(src, out, vocab_size=280, val_fraction=0.2, progress=False)
    assert not b4.reused


def test_prepare_data_jsonl_byte_and_loaded_tokenizer(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps({"t": f"record number {i} ✓ " * 5}) + "\n" for i in range(60)))
    b = prepare_data(j, tmp_path / "o1", tokenizer="byte", jsonl_key="t", progress=False)
    assert isinstance(b.tokenizer, ByteTokenizer)
    n_train = len(load_texts(j, jsonl_key="t"))
    assert len(b.train) == b.train.num_bytes + n_train  # one token per byte + eos per doc
    b2 = prepare_data(
        j, tmp_path / "o2", tokenizer_folder=tmp_path / "o1", jsonl_key="t", progress=False
    )
    assert isinstance(b2.tokenizer, ByteTokenizer)
    assert np.array_equal(b2.val.tokens, b.val.tokens)


def test_prepare_data_stdlib_small(tmp_path):
    b = prepare_data(None, tmp_path / "std", vocab_size=400, max_bytes=SMALL, progress=False)
    assert b.train.num_bytes == SMALL
    assert D.MIN_VAL_BYTES - 8 <= b.val.num_bytes <= D.MIN_VAL_BYTES
    assert 1.5 < b.val.bytes_per_token() < 5  # BPE compresses code
    x, y = b.train.get_batch(2, 32, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 32)


# --------------------------------------------------------------------------- metrics


def test_bits_per_byte_and_perplexity():
    assert bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 1000, 3500) == pytest.approx(2000 / (math.log(2) * 3500))
    # A byte tokenizer's loss per token in bits is its bits per byte.
    assert bits_per_byte(1.3, 257, 257) == pytest.approx(1.3 / math.log(2))
    # Uniform over 256 bytes is 8 bits per byte.
    assert bits_per_byte(math.log(256), 5, 5) == pytest.approx(8.0)
    assert bits_per_byte(0.0, 0, 1) == 0.0
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50)) == pytest.approx(50.0)
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="num_bytes=0"):
        bits_per_byte(1.0, 10, 0)
    with pytest.raises(ValueError, match="num_tokens=-1"):
        bits_per_byte(1.0, -1, 10)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path, byte_data):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=r"source=.*nope.*does not exist"):
        load_texts(missing)
    with pytest.raises(ValueError, match=r"source=.*nope.*does not exist"):
        prepare_data(missing, tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"source=.*empty.*no text found"):
        load_texts(empty)
    (empty / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=r"no text found"):
        load_texts(empty, split="all")
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "ok"}\n{"body": "no key"}\n')
    with pytest.raises(ValueError, match=r"jsonl_key='text'.*line 2"):
        load_texts(j)
    j.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2: invalid JSON"):
        load_texts(j)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt.*not valid UTF-8"):
        load_texts(latin, split="all")
    with pytest.raises(ValueError, match="split='test'"):
        load_texts(None, split="test")
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        load_texts(None, val_fraction=1.5)
    with pytest.raises(ValueError, match="max_bytes=0"):
        load_texts(None, max_bytes=0)
    with pytest.raises(ValueError, match="vocab_size=256"):
        BPETokenizer.train(["abc"], 256)
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["abc"], 100)
    out = tmp_path / "o3"
    with pytest.raises(ValueError, match="vocab_size=200"):
        prepare_data(None, out, vocab_size=200)
    with pytest.raises(ValueError, match="tokenizer='sentencepiece'"):
        prepare_data(None, out, tokenizer="sentencepiece")
    assert not out.exists()  # checks run before any work
    with pytest.raises(ValueError, match=r"seq_len=406.*available tokens \(406"):
        byte_data.get_batch(2, 406)
    with pytest.raises(ValueError, match=r"seq_len=1000"):
        byte_data.iter_batches(2, 1000)  # checked on the call, before iterating
    with pytest.raises(ValueError, match="max_batches=0"):
        byte_data.iter_batches(2, 8, max_batches=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        byte_data.get_batch(0, 8)
    with pytest.raises(ValueError, match="no text found"):
        TokenData.build(["", ""], ByteTokenizer(), tmp_path / "e.bin")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="ids: token 300"):
        ByteTokenizer().decode([300])
    # A truncated token file is refused, not misread.
    with open(byte_data.path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="rebuild it"):
        TokenData.open(byte_data.path)


def test_no_temp_files_left_by_prepare(tmp_path):
    src = _corpus_folder(tmp_path / "src", n=6)
    prepare_data(src, tmp_path / "out", tokenizer="byte", progress=False)
    leftovers = [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]
    assert leftovers == []
