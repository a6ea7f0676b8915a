"""Exact perplexity with the recurrent cache, and the lm-evaluation-harness integration.

Everything is local: a tiny random GOOM-SSM model with the GPT-2 vocabulary and the offline
GPT-2 tokenizer, saved to a temporary folder; the lm-eval tasks shipped in
``goom_ssm/lm_eval_tasks``. Every value lm-eval reports is checked against the model
called directly (one forward pass over the whole sequence, no cache).
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from goom_ssm.cli import main
from goom_ssm.evaluation import perplexity, score_sequences
from goom_ssm.lm_eval_adapter import LM_EVAL_TASKS_DIR

ENGLISH = Path(__file__).parent / "data" / "english.txt"
EOT = 50256  # <|endoftext|>: the start token of every scored document


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM
    from goom_ssm.conversion.tokenizer import save_gpt2_tokenizer

    torch.manual_seed(0)
    config = GoomSSMConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_state_heads=2, state_size=8)
    out = tmp_path_factory.mktemp("tiny_gpt2_vocab")
    GoomSSMForCausalLM(config).save_pretrained(out)
    save_gpt2_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def one_pass_logprob(model, ids, score_from=1):
    """Sum of log p(ids[j] | ids[:j]) for j >= score_from, from one forward pass without cache."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logprobs[score_from - 1:].sum().item()


def read_jsonl(name):
    return [json.loads(line) for line in (LM_EVAL_TASKS_DIR / name).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- perplexity()


def test_perplexity_equals_mean_cross_entropy_of_one_forward_pass(model, tokenizer):
    """Blocks carried through the cache give exp(mean cross-entropy of model(ids, labels=ids))."""
    text = ENGLISH.read_text()
    ids = [EOT] + tokenizer.encode(text)
    assert len(ids) > 1000
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids]), use_cache=False).loss.item()
    for block_size in (7, 64, 100_000):
        result = perplexity(model, tokenizer, text, block_size=block_size)
        assert result.num_tokens == len(ids) - 1
        assert result.mean_nll == pytest.approx(loss, rel=1e-6)
        assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
        assert result.total_nll == pytest.approx(loss * (len(ids) - 1), rel=1e-6)
    # One token per forward pass: the cache is the only context there is.
    short = ids[:120]
    step_by_step = score_sequences(model, [short], block_size=1)[0]
    assert step_by_step.num_tokens == 119
    assert step_by_step.logprob == pytest.approx(one_pass_logprob(model, short), rel=1e-6)


def test_perplexity_inputs_files_ids_and_documents(model, tokenizer, model_dir, tmp_path):
    text = ENGLISH.read_text()[:1500]
    expected = perplexity(model, tokenizer, text, block_size=50)
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    assert perplexity(model, tokenizer, path, block_size=50).total_nll == pytest.approx(expected.total_nll, rel=1e-6)
    name_as_text = perplexity(model, tokenizer, str(path))  # a str is a text, never a file name
    assert name_as_text.num_tokens == len(tokenizer.encode(str(path))) < expected.num_tokens
    with pytest.raises(FileNotFoundError, match="text file not found"):
        perplexity(model, tokenizer, tmp_path / "missing.txt")
    ids = tokenizer.encode(text)
    assert perplexity(model, ids, block_size=50).total_nll == pytest.approx(expected.total_nll, rel=1e-6)
    assert perplexity(model, torch.tensor(ids), block_size=50).num_tokens == expected.num_tokens

    # Without the start token the first token is context only: labels=ids in one pass.
    no_start = perplexity(model, tokenizer, text, block_size=50, add_start_token=False)
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids]), use_cache=False).loss.item()
    assert no_start.num_tokens == len(ids) - 1
    assert no_start.mean_nll == pytest.approx(loss, rel=1e-6)
    with pytest.raises(TypeError, match="tokenizer"):
        perplexity(model, None, text)
    for empty in ("", ["", ""]):  # nothing to score is an error, not an infinite or NaN perplexity
        with pytest.raises(ValueError, match="nothing to score"):
            perplexity(model, tokenizer, empty)

    # Several documents, batched (padding is an identity step and is not scored): each is
    # scored from the start state, as if alone; the corpus perplexity pools their tokens.
    docs = [text[:200], text[200:1100], "Hello", "", text[1100:]]
    batched = perplexity(model, tokenizer, docs, block_size=16, batch_size=3)
    alone = [perplexity(model, tokenizer, d, block_size=1000) if d else None for d in docs]
    for (nll, n), single in zip(batched.documents, alone):
        if single is not None:
            assert n == single.num_tokens
            assert nll == pytest.approx(single.total_nll, rel=1e-5, abs=1e-5)
    assert batched.documents[3] == (0.0, 0)  # an empty document among others scores nothing
    assert math.isnan(batched.document_perplexities[3])
    assert batched.document_perplexities[1] == pytest.approx(alone[1].perplexity, rel=1e-5)
    assert batched.num_tokens == sum(r.num_tokens for r in alone if r is not None)
    assert batched.perplexity == pytest.approx(math.exp(batched.total_nll / batched.num_tokens))


def test_perplexity_command_line(model, tokenizer, model_dir, tmp_path, capsys):
    path = tmp_path / "doc.txt"
    path.write_text(ENGLISH.read_text()[:800], encoding="utf-8")
    assert main(["perplexity", str(model_dir), str(path), "--block-size", "32", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = perplexity(model, tokenizer, path, block_size=1000)
    assert printed["num_tokens"] == expected.num_tokens
    assert printed["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)


def test_score_sequences_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="token 0"):
        score_sequences(model, [[1, 2, 3]], score_from=[0])
    with pytest.raises(ValueError, match="past the end"):
        score_sequences(model, [[1, 2, 3]], score_from=[4])
    with pytest.raises(ValueError, match="positive"):
        score_sequences(model, [[1, 2, 3]], block_size=0)


# --------------------------------------------------------------------------- lm-eval

@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def task_manager(lm_eval):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LM_EVAL_TASKS_DIR), include_defaults=False)


def evaluate(model_name, model_dir, task_manager, tasks, model_args=""):
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model_name, model_args=f"pretrained={model_dir}{model_args}", tasks=tasks, device="cpu",
        batch_size=3, task_manager=task_manager, log_samples=True,
    )


def cloze_expectations(model, tokenizer):
    """Per question, the log-likelihood of each choice after the question, computed directly."""
    expected = []
    for item in read_jsonl("cloze.jsonl"):
        context = tokenizer.encode(item["question"])
        lls = []
        for choice in item["choices"]:
            whole = tokenizer.encode(item["question"] + " " + choice)
            assert whole[:len(context)] == context
            lls.append(one_pass_logprob(model, whole, score_from=len(context)))
        expected.append((item, lls))
    return expected


def test_lm_eval_multiple_choice_matches_direct_scoring(model, tokenizer, model_dir, task_manager):
    expected = cloze_expectations(model, tokenizer)
    acc = sum(max(range(len(lls)), key=lls.__getitem__) == item["answer"] for item, lls in expected) / len(expected)
    acc_norm = sum(
        max(range(len(lls)), key=lambda i: lls[i] / len(item["choices"][i])) == item["answer"] for item, lls in expected
    ) / len(expected)
    # goom_ssm with max_length=5: most requests are longer than that and take the exact
    # cache path instead of HFLM's left truncation; the rest go through HFLM.
    for name, args in (("hf", ""), ("goom_ssm", ""), ("goom_ssm", ",max_length=5")):
        results = evaluate(name, model_dir, task_manager, ["goom_ssm_cloze"], args)
        metrics = results["results"]["goom_ssm_cloze"]
        assert metrics["acc,none"] == pytest.approx(acc), (name, args)
        assert metrics["acc_norm,none"] == pytest.approx(acc_norm), (name, args)
        samples = sorted(results["samples"]["goom_ssm_cloze"], key=lambda s: s["doc_id"])
        assert len(samples) == len(expected) == 20
        for sample, (item, lls) in zip(samples, expected):
            got = [ll for ll, _ in sample["filtered_resps"]]
            assert got == pytest.approx(lls, rel=1e-5, abs=1e-4), (name, args, item["question"])
    # hf with max_length=5 truncates those requests on the left: not the same numbers.
    truncated = evaluate("hf", model_dir, task_manager, ["goom_ssm_cloze"], ",max_length=5")
    samples = sorted(truncated["samples"]["goom_ssm_cloze"], key=lambda s: s["doc_id"])
    differ = [any(abs(got - ll) > 1e-3 for (got, _), ll in zip(s["filtered_resps"], lls))
              for s, (_, lls) in zip(samples, expected)]
    assert 5 <= sum(differ) < len(differ)


def test_lm_eval_rolling_loglikelihood_is_exact_and_linear(lm_eval, model, tokenizer, model_dir, task_manager):
    """goom_ssm's rolling log-likelihood runs each document once through the cache, in
    blocks of max_length tokens: equal to one forward pass over the whole document, to
    perplexity(), and to hf's (whose single window holds these short documents)."""
    from goom_ssm.lm_eval_adapter import GoomSSMLM

    texts = [d["text"] for d in read_jsonl("documents.jsonl")]
    direct = [one_pass_logprob(model, [EOT] + tokenizer.encode(t)) for t in texts]
    ours = perplexity(model, tokenizer, texts, block_size=1000)
    assert [-nll for nll, _ in ours.documents] == pytest.approx(direct, rel=1e-6)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)

    lm = GoomSSMLM(pretrained=str(model_dir), device="cpu", batch_size=2, max_length=8)
    fed = []  # tokens given to each forward pass
    lm.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape),
                                       with_kwargs=True)
    runs = {
        "goom_ssm": lm_eval.simple_evaluate(model=lm, tasks=["goom_ssm_documents"], task_manager=task_manager,
                                            log_samples=True),
        "hf": evaluate("hf", model_dir, task_manager, ["goom_ssm_documents"]),
    }
    # Linear: every token of every document went through the model exactly once (the
    # documents run two at a time, so each batch costs as many steps as its longer one).
    lengths = sorted((len(tokenizer.encode(t)) for t in texts), reverse=True)
    assert all(shape[1] <= 8 for shape in fed)
    assert sum(shape[1] for shape in fed) == sum(lengths[0::2])
    for name, results in runs.items():
        samples = sorted(results["samples"]["goom_ssm_documents"], key=lambda s: s["doc_id"])
        assert [s["filtered_resps"][0] for s in samples] == pytest.approx(direct, rel=1e-5), name
        metrics = results["results"]["goom_ssm_documents"]
        assert metrics["word_perplexity,none"] == pytest.approx(math.exp(ours.total_nll / words), rel=1e-5), name
        assert metrics["byte_perplexity,none"] == pytest.approx(math.exp(ours.total_nll / num_bytes), rel=1e-5), name
        assert metrics["bits_per_byte,none"] == pytest.approx(ours.total_nll / num_bytes / math.log(2), rel=1e-5), name

    # hf with the same max_length cuts the documents into windows that see nothing before
    # them: not the full-context log-likelihood.
    windowed = evaluate("hf", model_dir, task_manager, ["goom_ssm_documents"], ",max_length=8")
    samples = sorted(windowed["samples"]["goom_ssm_documents"], key=lambda s: s["doc_id"])
    assert all(abs(s["filtered_resps"][0] - d) > 1.0 for s, d in zip(samples, direct))


def test_lm_eval_command_line_from_any_directory(lm_eval, model_dir, tmp_path, monkeypatch):
    """`goom-ssm lm-eval ...` runs lm-eval's CLI with the local tasks on
    its include path; their data files are found from another working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # lm-eval's CLI sets it; restored afterwards
    out = tmp_path / "results"
    main(["lm-eval", "--model", "goom_ssm", "--model_args", f"pretrained={model_dir}", "--tasks", "goom_ssm_local",
          "--device", "cpu", "--batch_size", "4", "--limit", "4", "--output_path", str(out)])
    [written] = list(out.rglob("results_*.json"))
    results = json.loads(written.read_text())["results"]
    assert set(results) >= {"goom_ssm_cloze", "goom_ssm_documents"}
    assert 0.0 <= results["goom_ssm_cloze"]["acc,none"] <= 1.0
    assert results["goom_ssm_documents"]["word_perplexity,none"] > 1.0


def test_plain_lm_eval_with_a_folder_carrying_remote_code(lm_eval, model, tokenizer, model_dir, tmp_path):
    """A folder with goom_ssm.hub's remote code (as `goom-ssm push` publishes it) works with
    plain `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`, in a
    process that never imports goom_ssm."""
    from goom_ssm.hub import add_remote_code

    folder = tmp_path / "published"
    shutil.copytree(model_dir, folder)
    add_remote_code(folder)
    out = tmp_path / "results"
    args = ["--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True", "--tasks", "goom_ssm_cloze",
            "--include_path", str(LM_EVAL_TASKS_DIR), "--device", "cpu", "--limit", "4", "--log_samples",
            "--output_path", str(out)]
    script = (
        "import sys\n"
        "from lm_eval.__main__ import cli_evaluate\n"
        f"sys.argv = ['lm_eval', *{args!r}]\n"
        "cli_evaluate()\n"
        "assert 'goom_ssm' not in sys.modules, 'goom_ssm was imported'\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    [samples_file] = list(out.rglob("samples_goom_ssm_cloze_*.jsonl"))
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    expected = cloze_expectations(model, tokenizer)
    assert len(samples) == 4
    for sample, (item, lls) in zip(samples, expected):
        got = [float(resp[0][0]) for resp in sample["resps"]]
        assert got == pytest.approx(lls, rel=1e-5, abs=1e-4), item["question"]
