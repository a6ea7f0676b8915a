"""The shipped model folder (and every folder training writes) loads offline with the Auto
classes and ``pipeline``: its tokenizer files give GPT-2's ids, and the pipeline generates
what ``model.generate`` does. The folder is float32 (``from_config`` of its config works in
any dtype), and its card states the run of its step log."""

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants

import goom_ssm  # noqa: F401  (registers model_type "goom_ssm" with the Auto classes)
from goom_ssm.cli import DEFAULT_MODEL_DIR
from goom_ssm.conversion.tokenizer import (
    ENDOFTEXT,
    ENDOFTEXT_ID,
    GPT2_VOCAB_SIZE,
    gpt2_bpe_file_paths,
    gpt2_hf_tokenizer,
    save_gpt2_tokenizer,
)

TEMPEST = Path(goom_ssm.__file__).parent / "corpus_data" / "the_tempest.txt"
PROMPT = "KING HENRY.\nMy lords,"
ENGLISH = (
    "The quick brown fox didn't jump over the lazy dog; it sat down instead, and we'll never know why. "
    "In 1859, Charles Darwin published \"On the Origin of Species\" -- 502 pages long.\n\n"
    "  Indented lines,\ttabs, and trailing spaces   \n"
)
# The URLs tiktoken's "gpt2" encoding reads (tiktoken_ext/openai_public.py); tiktoken caches
# each file under the sha1 digest of its URL.
TIKTOKEN_GPT2_URLS = {
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}


def sample_texts() -> list[str]:
    """An English paragraph, the opening of The Tempest and the whole play."""
    tempest = TEMPEST.read_text(encoding="utf-8")
    return [ENGLISH, tempest[:2000], tempest]


@pytest.fixture
def offline(monkeypatch):
    """No Hub access: HF_HUB_OFFLINE set (in the environment and in huggingface_hub, which
    reads it at import) and every socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory):
    """``tiktoken.get_encoding("gpt2")`` itself, its downloads served from a cache folder
    holding the packaged copies of the two files."""
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    encoder_json, vocab_bpe = gpt2_bpe_file_paths()
    for path in (encoder_json, vocab_bpe):
        shutil.copyfile(path, cache / hashlib.sha1(TIKTOKEN_GPT2_URLS[path.name].encode()).hexdigest())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def generator():
    """``pipeline("text-generation")`` on the shipped folder (model and tokenizer from it)."""
    from transformers import pipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        return pipeline("text-generation", model=str(DEFAULT_MODEL_DIR))


def test_folder_holds_the_packages_tokenizer_files(tmp_path):
    """The files save_gpt2_tokenizer writes (tokenizer.json, tokenizer_config.json), no
    duplicate vocab.json/merges.txt; the model has GPT-2's vocabulary."""
    written = {Path(p).name for p in save_gpt2_tokenizer(tmp_path)}
    assert written == {"tokenizer.json", "tokenizer_config.json"}
    assert all((DEFAULT_MODEL_DIR / name).is_file() for name in written)
    assert not (DEFAULT_MODEL_DIR / "vocab.json").exists() and not (DEFAULT_MODEL_DIR / "merges.txt").exists()
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["vocab_size"] == GPT2_VOCAB_SIZE


def test_folder_is_float32():
    """Weights and config are float32, so ``from_pretrained`` and ``from_config`` give a
    float32 model by default: one that trains as loaded (half-precision parameters would
    need mixed-precision training)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}
    assert json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert AutoConfig.from_pretrained(DEFAULT_MODEL_DIR).dtype == torch.float32


def test_card_states_the_run_of_its_step_log():
    """The card's schedule and final training loss are those of the run's step log
    (train_log.jsonl, shipped beside it)."""
    log = [json.loads(line) for line in (DEFAULT_MODEL_DIR / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == list(range(1, len(log) + 1))
    lrs = [record["lr"] for record in log]
    peak = max(range(len(lrs)), key=lrs.__getitem__) + 1
    assert lrs[0] == pytest.approx(1e-5) and lrs[peak - 1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)
    assert log[peak - 1]["beta1"] == pytest.approx(0.85) and log[0]["beta1"] == log[-1]["beta1"] == pytest.approx(0.99)
    last10 = sum(record["loss"] for record in log[-10:]) / 10
    card = (DEFAULT_MODEL_DIR / "README.md").read_text()
    assert (f"one-cycle (cosine) over {len(log)} steps: LR 1e-5 at step 1, up to 1e-3 at step {peak}, down to 1e-5 "
            f"at step {len(log)}; beta1 0.99 -> 0.85 (step {peak}) -> 0.99") in card
    assert (f"| final training loss | {log[-1]['loss']:.2f} nats/token at step {len(log)}, {last10:.2f} averaged over "
            f"steps {len(log) - 9}-{len(log)} (train batches) |") in card
    assert f"| tokens seen | {log[-1]['tokens']:,} " in card


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_from_config_of_the_folder(dtype):
    """``from_config(AutoConfig.from_pretrained(folder))`` on CPU builds the model in the
    folder's dtype (float32), or in the one asked for; its forward pass is finite."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(DEFAULT_MODEL_DIR)
    model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))
    assert {p.dtype for p in model.parameters()} == {dtype or torch.float32}
    ids = torch.tensor([[464, 2068, 7586, 21831, 11, 50256, 198]])
    with torch.no_grad():
        output = model(input_ids=ids, labels=ids)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)


def test_auto_tokenizer_loads_offline_with_gpt2_ids(offline, tiktoken_gpt2):
    """Same ids as gpt2_hf_tokenizer() and tiktoken's "gpt2", and decode() gives the text back."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    built = gpt2_hf_tokenizer()
    assert loaded.is_fast and len(loaded) == GPT2_VOCAB_SIZE
    for text in sample_texts():
        ids = loaded(text)["input_ids"]
        assert ids == built(text)["input_ids"] == tiktoken_gpt2.encode(text)
        assert loaded.decode(ids) == built.decode(ids) == text


def test_tokenizer_special_tokens(offline):
    """bos, eos (and unk) are <|endoftext|>, with the config's ids; no pad token, as GPT-2."""
    from transformers import AutoConfig, AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    config = AutoConfig.from_pretrained(DEFAULT_MODEL_DIR)
    assert loaded.bos_token == loaded.eos_token == loaded.unk_token == ENDOFTEXT
    assert loaded.bos_token_id == config.bos_token_id == ENDOFTEXT_ID
    assert loaded.eos_token_id == config.eos_token_id == ENDOFTEXT_ID
    assert loaded.pad_token is None
    assert loaded("a<|endoftext|>b")["input_ids"] == [64, ENDOFTEXT_ID, 65]


def test_pipeline_generates_as_model_generate(generator):
    """Greedy continuation of the pipeline == model.generate with the same model and tokenizer."""
    model, tokenizer = generator.model, generator.tokenizer
    assert model.config.model_type == "goom_ssm" and tokenizer.eos_token == ENDOFTEXT
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert expected.shape == (1, ids.shape[1] + 5)
    as_ids = generator(PROMPT, max_new_tokens=5, do_sample=False, return_tensors=True)
    assert as_ids[0]["generated_token_ids"] == expected[0].tolist()
    as_text = generator(PROMPT, max_new_tokens=5, do_sample=False, return_full_text=False)
    assert as_text[0]["generated_text"] == tokenizer.decode(expected[0, ids.shape[1]:])


def test_trained_gpt2_model_folder_loads_with_auto_tokenizer(tmp_path, offline):
    """goom_ssm.train writes the tokenizer files beside a GPT-2-vocabulary model."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from goom_ssm import train as train_mod
    from goom_ssm.cli import parse_args

    data = Path(__file__).parent / "data" / "english.txt"
    args = parse_args([
        "train", "--data", str(data), "--tokenizer", "gpt2", "--block-size", "32", "--hidden-size", "16",
        "--num-hidden-layers", "1", "--num-state-heads", "2", "--state-size", "4", "--batch-size", "2",
        "--micro-batch-size", "2", "--max-steps", "4", "--warmup-steps", "2", "--num-proc", "1",
        "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run"), "--no-progress",
        "--report-to", "none", "--save-every", "0"])
    try:
        final = Path(train_mod.train(args)["final_dir"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size == GPT2_VOCAB_SIZE
    loaded = AutoTokenizer.from_pretrained(final)
    assert loaded(ENGLISH)["input_ids"] == gpt2_hf_tokenizer()(ENGLISH)["input_ids"]
    assert loaded.eos_token == ENDOFTEXT
