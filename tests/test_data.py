"""Tests of the data pipeline (goom_ssm.data): loading, tokenizing, packing, streaming."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")

from goom_ssm import data  # noqa: E402

TEXT = Path(__file__).parent / "data" / "english.txt"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


def paragraphs():
    """The documents of the fixture as the "text" loader gives them with sample_by="paragraph"."""
    return [p for p in TEXT.read_text().split("\n\n") if p]


def word_tokenize(texts):
    """A picklable stand-in tokenizer: one id per word (hash mod 1000)."""
    return [[sum(map(ord, w)) % 1000 for w in t.split()] for t in texts]


def stream_of(docs, tokenize, eos):
    return [i for doc in tokenize(docs) for i in list(doc) + [eos]]


def blocks_of(dataset):
    return [b["input_ids"].tolist() for b in dataset]


def test_load_text_paragraphs(cache_dir):
    docs = data.load_text_dataset(TEXT, cache_dir=cache_dir)
    assert docs["text"] == paragraphs()
    assert len(docs) == 13


@pytest.mark.parametrize("block_size", [7, 64, 1000])
def test_packing_is_the_concatenated_stream(cache_dir, block_size):
    docs = data.load_text_dataset(TEXT, cache_dir=cache_dir)
    tok = data.ByteTokenizer()
    tokenized = data.tokenize_dataset(docs, tok, num_proc=2)  # two shards: blocks span Arrow chunks
    blocks = data.PackedBlocks(tokenized, block_size)
    stream = stream_of(paragraphs(), tok, tok.eos_token_id)
    n = len(stream) // block_size
    assert len(blocks) == n and blocks.num_tokens == len(stream)
    flat = [i for b in blocks_of(blocks) for i in b]
    assert flat == stream[: n * block_size]
    item = blocks[n - 1]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (block_size,)
    assert torch.equal(item["labels"], item["input_ids"])
    assert torch.equal(blocks[-1]["input_ids"], item["input_ids"])
    with pytest.raises(IndexError):
        blocks[n]
    # EOS after every document, nowhere else (bytes never reach 256)
    assert stream.count(256) == 13 and stream[-1] == 256


def test_multiprocess_tokenization_equals_single_process(cache_dir):
    from goom_ssm.conversion.tokenizer import gpt2_tiktoken_encoding

    docs = data.load_text_dataset(TEXT, cache_dir=cache_dir)
    one = data.tokenize_dataset(docs, "gpt2", num_proc=1)
    two = data.tokenize_dataset(docs, "gpt2", num_proc=2)
    assert one["input_ids"] == two["input_ids"]
    enc = gpt2_tiktoken_encoding()
    assert one["input_ids"] == [enc.encode_ordinary(p) + [50256] for p in paragraphs()]
    assert two.cache_files, "the tokenized dataset should be cached by datasets"
    # a plain callable, through CallableTokenizer, in two processes
    three = data.tokenize_dataset(docs, word_tokenize, num_proc=2, eos_token_id=1000)
    assert three["input_ids"] == [ids + [1000] for ids in word_tokenize(paragraphs())]


def test_streaming_yields_the_same_blocks(cache_dir):
    train, _ = data.build_datasets(TEXT, "gpt2", 32, cache_dir=cache_dir, num_proc=2)
    streamed, _ = data.build_datasets(TEXT, "gpt2", 32, streaming=True)
    assert isinstance(train, data.PackedBlocks) and isinstance(streamed, data.PackedStream)
    assert blocks_of(streamed) == blocks_of(train)
    assert len(train) > 30


def test_held_out_documents_are_the_last_ones(cache_dir):
    docs = data.load_text_dataset(TEXT, cache_dir=cache_dir)
    head, tail = data.split_documents(docs, 0.2)
    assert head["text"] == paragraphs()[:10] and tail["text"] == paragraphs()[10:]
    train, val = data.build_datasets(TEXT, "bytes", 16, validation_fraction=0.2, cache_dir=cache_dir)
    tok = data.ByteTokenizer()
    expected = stream_of(paragraphs()[10:], tok, 256)
    assert [i for b in blocks_of(val) for i in b] == expected[: len(expected) // 16 * 16]
    assert len(train) == len(stream_of(paragraphs()[:10], tok, 256)) // 16
    # A stream whose length datasets does not know (whether it knows a local file's depends on
    # its cache of earlier loads) cannot give its last documents.
    stream = datasets.IterableDataset.from_generator(lambda: iter({"text": p} for p in paragraphs()))
    with pytest.raises(ValueError, match="unknown"):
        data.split_documents(stream, 0.2)


def test_json_lines_with_another_column(tmp_path, cache_dir):
    rows = [{"body": p, "id": i} for i, p in enumerate(paragraphs())]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = data.load_text_dataset(path, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="no column 'text'"):
        data.tokenize_dataset(docs, "bytes")
    tokenized = data.tokenize_dataset(docs, "bytes", text_column="body")
    assert tokenized.column_names == ["input_ids"]
    assert tokenized["input_ids"][3] == list(paragraphs()[3].encode()) + [256]


def test_resolve_tokenizer():
    assert data.resolve_tokenizer("gpt2").eos_token_id == 50256
    assert data.resolve_tokenizer("bytes")(["é"]) == [[195, 169]]
    with pytest.raises(ValueError, match="eos_token_id"):
        data.resolve_tokenizer(word_tokenize)
    hf_like = data.resolve_tokenizer(lambda texts: {"input_ids": [[1, 2] for _ in texts]}, eos_token_id=0)
    assert hf_like(["a", "b"]) == [[1, 2], [1, 2]]


def test_packed_stream_from_plain_rows():
    rows = [{"input_ids": list(range(k * 10, k * 10 + 5))} for k in range(5)]  # 25 tokens
    blocks = blocks_of(data.PackedStream(rows, 4))
    flat = [i for r in rows for i in r["input_ids"]]
    assert blocks == [flat[i:i + 4] for i in range(0, 24, 4)]
    assert np.array(blocks).shape == (6, 4)


def test_blocks_can_keep_documents_apart(cache_dir):
    """With the EOS id, each block's position_ids restart at 0 after every EOS (and at the
    block's start), and each document start after the first token has label -100."""
    docs = data.load_text_dataset(TEXT, cache_dir=cache_dir)
    tok = data.ByteTokenizer()
    tokenized = data.tokenize_dataset(docs, tok, num_proc=1)
    apart, together = data.PackedBlocks(tokenized, 500, tok.eos_token_id), data.PackedBlocks(tokenized, 500)
    assert "position_ids" not in together[0]
    starts_seen = 0
    for block, plain in zip(apart, together):
        ids, positions, labels = block["input_ids"], block["position_ids"], block["labels"]
        assert torch.equal(ids, plain["input_ids"])
        for t in range(len(ids)):
            start = t == 0 or ids[t - 1] == tok.eos_token_id
            assert positions[t] == (0 if start else positions[t - 1] + 1)
            assert labels[t] == (-100 if start and t > 0 else ids[t])
            starts_seen += start and t > 0
    assert starts_seen >= 10
    streamed = data.PackedStream(tokenized.to_iterable_dataset(), 500, tok.eos_token_id)
    for a, b in zip(streamed, apart):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "position_ids"))


@pytest.mark.parametrize("streaming", [False, True])
def test_documents_are_kept_apart_by_default_where_they_are_shorter_than_a_block(cache_dir, streaming):
    kwargs = dict(cache_dir=cache_dir) if not streaming else dict(streaming=True)
    # The fixture's paragraphs are 338 bytes long (the median).
    for block_size, apart in ((1000, True), (64, False)):
        train, _ = data.build_datasets(TEXT, "bytes", block_size, num_proc=1, **kwargs)
        assert (train.eos_token_id is not None) == apart
    for choice in (True, False):
        train, validation = data.build_datasets(TEXT, "bytes", 64, num_proc=1, pack_documents=choice,
                                                validation_source=TEXT, **kwargs)
        assert (train.eos_token_id is not None) == choice and (validation.eos_token_id is not None) == choice
