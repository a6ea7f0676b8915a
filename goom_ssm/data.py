"""Training data for GOOM-SSM language models: text -> token ids -> fixed-length blocks.

Pipeline (:func:`build_datasets` runs all of it)::

    load_text_dataset      local .txt/.json/.jsonl/.csv/.parquet files, or any dataset name
                           that ``datasets.load_dataset`` accepts; one row = one document
    split_documents        optional held-out split: the LAST fraction of the documents
    tokenize_dataset       ``Dataset.map(batched=True, num_proc=N)`` (cached by ``datasets``);
                           every document becomes its token ids followed by the EOS id
    PackedBlocks /         the concatenated token stream cut into blocks of ``block_size``
    PackedStream           tokens (the last partial block is dropped); random access for
                           ordinary datasets, an iterator for ``streaming=True``

Each block is one training sequence: ``{"input_ids": LongTensor[block_size],
"labels": LongTensor[block_size]}`` with ``labels == input_ids`` (the model shifts the
labels inside: position ``t`` predicts ``labels[t + 1]``). A DataLoader stacks them into
``[batch, block_size]``. Packed with document boundaries (``pack_documents``, the default
where documents are shorter than a block: :func:`documents_are_short`), a block also holds
``position_ids`` that restart at 0 at each document's first token (the model then restarts
every layer's state there, as if each document were alone), and those tokens' labels are
-100 (nothing before them in the block is theirs to predict from), as transformers'
``DataCollatorWithFlattening`` does. Blocks never overlap and cover the stream exactly:
block ``i`` is ``stream[i * block_size:(i + 1) * block_size]``, where ``stream`` is the
concatenation of ``ids(doc_0) + [eos] + ids(doc_1) + [eos] + ...``. Streaming and
non-streaming give the same blocks in the same order (without shuffling).

Tokenizers (:func:`resolve_tokenizer`): ``"gpt2"`` (tiktoken, built offline by
:mod:`goom_ssm.conversion.tokenizer`; EOS 50256), ``"bytes"`` (UTF-8 bytes, EOS 256,
vocabulary 257; for tiny experiments and tests), a path or name of a Hugging Face
tokenizer, a ``tiktoken.Encoding``, or any callable ``tokenize(list[str]) ->
list[list[int]]`` (wrapped with :class:`CallableTokenizer` to give its EOS id).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .constants import ENDOFTEXT_ID, GPT2_VOCAB_SIZE
from .extras import require

LOCAL_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                 ".csv": "csv", ".parquet": "parquet"}


# --------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """A picklable batch tokenizer: ``tokenizer(texts) -> list of id lists`` (no EOS added),
    with ``eos_token_id``, ``vocab_size`` (or ``None`` if unknown) and a ``name``."""

    name: str = "tokenizer"
    eos_token_id: int
    vocab_size: Optional[int] = None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def save_pretrained(self, out_dir: os.PathLike) -> None:
        """Write tokenizer files next to a saved model, where there is a format for them."""


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE via tiktoken (offline files of :mod:`goom_ssm.conversion.tokenizer`).
    ``<|endoftext|>`` inside a text is encoded as plain text, never as the EOS id."""

    name, eos_token_id, vocab_size = "gpt2", ENDOFTEXT_ID, GPT2_VOCAB_SIZE

    def __call__(self, texts):
        from .conversion.tokenizer import gpt2_tiktoken_encoding  # built once per process

        return gpt2_tiktoken_encoding().encode_ordinary_batch(list(texts))

    def save_pretrained(self, out_dir):
        from .conversion.tokenizer import save_gpt2_tokenizer

        save_gpt2_tokenizer(out_dir)


class TiktokenTokenizer(Tokenizer):
    """Any ``tiktoken.Encoding``; EOS is its ``eot_token`` unless given."""

    def __init__(self, encoding, eos_token_id: Optional[int] = None):
        self.encoding, self.name = encoding, f"tiktoken:{encoding.name}"
        self.eos_token_id = encoding.eot_token if eos_token_id is None else eos_token_id
        self.vocab_size = encoding.n_vocab

    def __call__(self, texts):
        return self.encoding.encode_ordinary_batch(list(texts))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, EOS 256 (vocabulary 257)."""

    name, eos_token_id, vocab_size = "bytes", 256, 257

    def __call__(self, texts):
        return [list(text.encode("utf-8")) for text in texts]


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer (no special tokens added; EOS from the tokenizer)."""

    def __init__(self, tokenizer, eos_token_id: Optional[int] = None):
        self.tokenizer, self.name = tokenizer, f"hf:{tokenizer.name_or_path}"
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if self.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token_id; pass eos_token_id")
        self.vocab_size = len(tokenizer)

    def __call__(self, texts):
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def save_pretrained(self, out_dir):
        self.tokenizer.save_pretrained(os.fspath(out_dir))


class CallableTokenizer(Tokenizer):
    """Wrap ``tokenize(list[str]) -> list[list[int]]`` (or a callable returning a mapping with
    ``"input_ids"``). The callable must be picklable for ``num_proc > 1``."""

    def __init__(self, tokenize: Callable, eos_token_id: int, vocab_size: Optional[int] = None, name: str = "callable"):
        self.tokenize, self.eos_token_id, self.vocab_size, self.name = tokenize, eos_token_id, vocab_size, name

    def __call__(self, texts):
        ids = self.tokenize(list(texts))
        return ids["input_ids"] if isinstance(ids, Mapping) else ids


def resolve_tokenizer(spec: Union[str, Tokenizer, Callable], eos_token_id: Optional[int] = None) -> Tokenizer:
    """Turn ``"gpt2"``, ``"bytes"``, a Hugging Face tokenizer path/name or object, a
    ``tiktoken.Encoding`` or a ``tokenize(list[str])`` callable into a :class:`Tokenizer`.
    ``eos_token_id`` is required for a plain callable and overrides the others' EOS."""
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, str):
        if spec.lower() == "gpt2":
            return GPT2Tokenizer()
        if spec.lower() == "bytes":
            return ByteTokenizer()
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(spec), eos_token_id)
    try:
        import tiktoken

        if isinstance(spec, tiktoken.Encoding):
            return TiktokenTokenizer(spec, eos_token_id)
    except ImportError:  # pragma: no cover
        pass
    from transformers import PreTrainedTokenizerBase

    if isinstance(spec, PreTrainedTokenizerBase):
        return HFTokenizer(spec, eos_token_id)
    if callable(spec):
        if eos_token_id is None:
            raise ValueError("a tokenize(list[str]) callable needs an eos_token_id")
        return CallableTokenizer(spec, eos_token_id)
    raise TypeError(f"cannot use {type(spec).__name__} as a tokenizer")


# --------------------------------------------------------------------------- loading


def load_text_dataset(source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], *, split: str = "train",
                      name: Optional[str] = None, streaming: bool = False, sample_by: str = "paragraph",
                      cache_dir: Optional[str] = None, **load_kwargs):
    """Load documents, one per row (a ``"text"`` column or another one, see :func:`tokenize_dataset`).

    Args:
        source: local file(s) or folder(s) (``.txt``/``.md`` as plain text; ``.json``/``.jsonl``,
            ``.csv``, ``.parquet``; a folder means all such files in it, sorted), or the name of
            a dataset for ``datasets.load_dataset`` (with config ``name``).
        split: the split to load (local files always form ``"train"``).
        streaming: return a ``datasets.IterableDataset`` read lazily (for corpora too large to
            tokenize and cache up front).
        sample_by: for plain text files, one document per ``"line"``, ``"paragraph"`` (text
            between blank lines) or ``"document"`` (whole file).
        cache_dir: cache folder of ``datasets`` (default: ``~/.cache/huggingface/datasets``).

    Returns a ``datasets.Dataset`` or ``IterableDataset``.
    """
    datasets = require("datasets", "data", "reading training data")

    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    paths = [Path(s) for s in sources]
    if not all(p.exists() for p in paths):
        if len(sources) != 1:
            missing = [str(p) for p in paths if not p.exists()]
            raise FileNotFoundError(f"data files not found: {missing}")
        return datasets.load_dataset(str(sources[0]), name, split=split, streaming=streaming,
                                     cache_dir=cache_dir, **load_kwargs)
    files = []
    for p in paths:
        files += sorted(f for f in p.rglob("*") if f.suffix.lower() in LOCAL_FORMATS) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no data files ({', '.join(sorted(LOCAL_FORMATS))}) in {sources}")
    formats = {LOCAL_FORMATS.get(f.suffix.lower()) for f in files}
    if None in formats or len(formats) != 1:
        names = [str(f) for f in files]
        raise ValueError(f"data files must all have one format of {sorted(LOCAL_FORMATS)}, got {names}")
    builder = formats.pop()
    if builder == "text":
        load_kwargs.setdefault("sample_by", sample_by)
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming,
                                 cache_dir=cache_dir, **load_kwargs)


def split_documents(dataset, validation_fraction: float):
    """Hold out the LAST ``ceil(validation_fraction * n_documents)`` documents.

    Returns ``(train, validation)``. For a streaming dataset the number of documents must be
    known from the dataset's metadata (``dataset.info.splits``); otherwise give a separate
    validation source instead.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    datasets = require("datasets", "data", "reading training data")

    if isinstance(dataset, datasets.IterableDataset):
        splits = dataset.info.splits or {}
        split = dataset.split if dataset.split in splits else None
        if split is None or not splits[split].num_examples:
            raise ValueError("the number of documents of a streaming dataset is unknown, so its last documents "
                             "cannot be held out; give a separate validation source")
        n = splits[split].num_examples
    else:
        n = len(dataset)
    n_val = math.ceil(validation_fraction * n)
    if not 0 < n_val < n:
        raise ValueError(f"cannot hold out {validation_fraction:.2%} of {n} documents")
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(n - n_val), dataset.skip(n - n_val)
    return dataset.select(range(n - n_val)), dataset.select(range(n - n_val, n))


# --------------------------------------------------------------------------- tokenizing


@dataclass
class _TokenizeBatch:
    """The picklable function ``Dataset.map`` runs: texts -> ids + [eos] (int32 column)."""

    tokenizer: Tokenizer
    text_column: str

    def __call__(self, batch):
        ids = self.tokenizer(batch[self.text_column])
        eos = self.tokenizer.eos_token_id
        return {"input_ids": [list(doc) + [eos] for doc in ids]}


def tokenize_dataset(dataset, tokenizer, *, text_column: str = "text", num_proc: Optional[int] = None,
                     batch_size: int = 1000, eos_token_id: Optional[int] = None):
    """Tokenize every document and append the EOS id.

    Returns a dataset with one column ``input_ids`` (int32 lists; document ``i`` ->
    ``ids(doc_i) + [eos]``). Ordinary datasets are tokenized with ``num_proc`` processes
    and the result is cached by ``datasets`` (a second call with the same inputs reads the
    cache); streaming datasets are tokenized lazily in the iterating process.
    """
    datasets = require("datasets", "data", "reading training data")

    tok = resolve_tokenizer(tokenizer, eos_token_id)
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"the data has no column {text_column!r} (columns: {columns}); pass text_column")
    function = _TokenizeBatch(tok, text_column)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(function, batched=True, batch_size=batch_size, remove_columns=columns)
    num_proc = None if not num_proc or num_proc <= 1 or len(dataset) < 2 else min(num_proc, len(dataset))
    sequence = getattr(datasets, "List", None) or datasets.Sequence  # datasets < 4 has only Sequence
    features = datasets.Features({"input_ids": sequence(datasets.Value("int32"))})
    return dataset.map(function, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=columns,
                       features=features, desc=f"tokenizing ({tok.name})")


# --------------------------------------------------------------------------- packing


def _block(tokens: np.ndarray, eos_token_id: Optional[int] = None) -> dict:
    """One training sequence of ``tokens``; with ``eos_token_id``, documents apart: ``position_ids``
    counting from 0 at the block's start and after every EOS, and label -100 at each such start."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    block = {"input_ids": ids, "labels": ids.clone()}
    if eos_token_id is not None:
        starts = torch.zeros_like(ids, dtype=torch.bool)
        starts[0] = True
        starts[1:] = ids[:-1] == eos_token_id
        index = torch.arange(len(ids))
        last_start = torch.cummax(torch.where(starts, index, 0), dim=0).values
        block["position_ids"] = index - last_start
        block["labels"][1:][starts[1:]] = -100
    return block


class PackedBlocks(torch.utils.data.Dataset):
    """Random access to the blocks of a tokenized (non-streaming) dataset, without copying it.

    The ``input_ids`` column is read as the flat int arrays of its (memory-mapped) Arrow
    chunks; block ``i`` is ``stream[i * block_size:(i + 1) * block_size]``, which may span
    documents and chunks. ``len(self) == n_tokens // block_size`` (the tail is dropped).
    Item: ``{"input_ids": LongTensor[block_size], "labels": LongTensor[block_size]}``, and
    with ``eos_token_id`` (documents apart) ``position_ids`` (see the module docstring).
    """

    def __init__(self, tokenized, block_size: int, eos_token_id: Optional[int] = None):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        self.eos_token_id = eos_token_id
        if getattr(tokenized, "_indices", None) is not None:
            tokenized = tokenized.flatten_indices()
        column = tokenized.data.column("input_ids")
        self.pieces = [c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks if len(c)]
        self.starts = np.cumsum([0] + [len(p) for p in self.pieces])
        self.block_size = block_size
        self.num_tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return self.num_tokens // self.block_size

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"block {index} out of range ({len(self)} blocks)")
        start = (index % len(self)) * self.block_size
        end = start + self.block_size
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < end:
            offset = start - self.starts[k]
            part = self.pieces[k][offset:offset + end - start]
            parts.append(part)
            start += len(part)
            k += 1
        return _block(parts[0] if len(parts) == 1 else np.concatenate(parts), self.eos_token_id)


class PackedStream(torch.utils.data.IterableDataset):
    """The same blocks as :class:`PackedBlocks`, read lazily from a tokenized streaming
    dataset (a ``datasets.IterableDataset`` with an ``input_ids`` column, or any iterable of
    ``{"input_ids": [...]}`` rows). ``set_epoch`` is passed on (it reseeds ``shuffle``)."""

    def __init__(self, tokenized, block_size: int, eos_token_id: Optional[int] = None):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        self.tokenized, self.block_size, self.eos_token_id = tokenized, block_size, eos_token_id

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.tokenized, "set_epoch"):
            self.tokenized.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        buffer = np.empty(0, dtype=np.int64)
        for row in self.tokenized:
            buffer = np.concatenate([buffer, np.asarray(row["input_ids"], dtype=np.int64)])
            n = len(buffer) // self.block_size
            for i in range(n):
                yield _block(buffer[i * self.block_size:(i + 1) * self.block_size], self.eos_token_id)
            buffer = buffer[n * self.block_size:]


def pack(tokenized, block_size: int, eos_token_id: Optional[int] = None):
    """:class:`PackedStream` for an iterable dataset, :class:`PackedBlocks` otherwise (documents
    apart with ``eos_token_id``)."""
    datasets = require("datasets", "data", "reading training data")

    if isinstance(tokenized, datasets.IterableDataset):
        return PackedStream(tokenized, block_size, eos_token_id)
    return PackedBlocks(tokenized, block_size, eos_token_id)


DOCUMENTS_SAMPLED = 1000  # documents of a streaming source that documents_are_short reads


def documents_are_short(tokenized, block_size: int) -> bool:
    """Whether the median tokenized document (EOS included) is shorter than ``block_size``: the
    case where packing documents apart (``pack_documents``) is the default. A streaming
    dataset is judged by its first :data:`DOCUMENTS_SAMPLED` documents."""
    datasets = require("datasets", "data", "reading training data")

    if isinstance(tokenized, datasets.IterableDataset):
        lengths = [len(row["input_ids"]) for row in tokenized.take(DOCUMENTS_SAMPLED)]
    else:
        import pyarrow.compute as pc

        column = tokenized.flatten_indices() if getattr(tokenized, "_indices", None) is not None else tokenized
        lengths = pc.list_value_length(column.data.column("input_ids")).to_numpy(zero_copy_only=False)
    return len(lengths) > 0 and float(np.median(lengths)) < block_size


def build_datasets(source, tokenizer, block_size: int, *, streaming: bool = False, validation_fraction: float = 0.0,
                   validation_source=None, text_column: str = "text", num_proc: Optional[int] = None,
                   shuffle_buffer: int = 0, seed: int = 0, eos_token_id: Optional[int] = None,
                   pack_documents: Optional[bool] = None, **load_kwargs):
    """Load, split, tokenize and pack: returns ``(train_blocks, validation_blocks or None)``.

    ``pack_documents``: blocks hold ``position_ids`` that keep documents apart (see the module
    docstring); None (default) does so where :func:`documents_are_short`. The blocks'
    ``eos_token_id`` says which was chosen (None: documents not apart).

    ``validation_fraction`` holds out the last documents of ``source`` (see
    :func:`split_documents`); ``validation_source`` is a separate source instead.
    ``shuffle_buffer > 0`` shuffles the documents of a streaming source with a buffer of that
    many documents (seeded; reseeded each epoch). Other keywords go to :func:`load_text_dataset`.
    """
    tok = resolve_tokenizer(tokenizer, eos_token_id)
    docs = load_text_dataset(source, streaming=streaming, **load_kwargs)
    val_docs = None
    if validation_source is not None:
        val_docs = load_text_dataset(validation_source, streaming=streaming, **load_kwargs)
    elif validation_fraction:
        docs, val_docs = split_documents(docs, validation_fraction)
    if streaming and shuffle_buffer:
        docs = docs.shuffle(seed=seed, buffer_size=shuffle_buffer)

    train = tokenize_dataset(docs, tok, text_column=text_column, num_proc=num_proc)
    if pack_documents is None:
        pack_documents = documents_are_short(train, block_size)
    eos = tok.eos_token_id if pack_documents else None
    validation = None
    if val_docs is not None:
        validation = pack(tokenize_dataset(val_docs, tok, text_column=text_column, num_proc=num_proc), block_size, eos)
    return pack(train, block_size, eos), validation
