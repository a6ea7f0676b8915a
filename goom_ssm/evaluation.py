"""Evaluation of GOOM-SSM language models: exact perplexity, and lm-evaluation-harness.

GOOM-SSM models are recurrent: the state after ``t`` tokens summarises all of them in a
fixed size (:class:`~goom_ssm.GoomSSMCache`). Long texts are therefore scored *exactly*
and in linear time by running them block by block and carrying the cache across blocks:
every token is conditioned on all the tokens before it, however long the text, and no
token is computed twice. Sliding-window evaluation (re-running the last ``max_length``
tokens for each window), which transformer perplexity scripts use, is neither needed nor
exact here.

Perplexity
----------
:func:`perplexity` scores a text, a file, several documents, or token ids::

    from pathlib import Path

    import goom_ssm
    from goom_ssm.evaluation import perplexity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("converted/").eval()
    tok = AutoTokenizer.from_pretrained("converted/")
    result = perplexity(model, tok, Path("test.txt"), block_size=1024)
    print(result.perplexity, result.total_nll, result.num_tokens)

or from the shell: ``python -m goom_ssm.evaluation perplexity converted/ test.txt``.

By default ``<|endoftext|>`` (the tokenizer's bos, else eos token) is put before each
document so that its first token is scored too, as lm-eval's rolling log-likelihood and
Hugging Face ``evaluate``'s ``perplexity`` metric (``add_start_token=True``) do; the
result is then ``exp`` of the mean cross-entropy of ``model(ids, labels=ids)`` over
``ids = [bos] + tokens`` in one forward pass, whatever ``block_size`` is.

``evaluate.load("perplexity")`` cannot be used offline: the metric's script is not part of
the ``evaluate`` package but fetched from the Hugging Face Hub on first use, and without
network access (or with ``HF_HUB_OFFLINE=1`` and no cached copy) it raises
``FileNotFoundError: Couldn't find a module script at .../perplexity/perplexity.py.
Module 'perplexity' doesn't exist on the Hugging Face Hub either.`` (checked with
evaluate 0.4.6). Where it can be fetched, it loads the model by name with
``AutoModelForCausalLM`` (so ``import goom_ssm`` first) and scores each text on its own, in
padded batches, with ``add_start_token=True`` by default, returning the per-text
``perplexities`` and their ``mean_perplexity``. :func:`perplexity` is the documented,
tested equivalent here: the same start token and natural-log cross-entropy, per-document
values in ``documents`` / ``document_perplexities`` (their mean is ``mean_perplexity``), and
the corpus perplexity ``exp(total NLL / tokens)`` in ``perplexity``.

lm-evaluation-harness
---------------------
lm-eval loads models with ``AutoModelForCausalLM.from_pretrained``, which knows
``model_type="goom_ssm"`` only once ``goom_ssm`` is imported, and lm-eval has no plugin
mechanism that would import it. Run lm-eval through this module instead, with exactly
lm-eval's own arguments::

    python -m goom_ssm.evaluation lm-eval --model goom_ssm --model_args pretrained=converted/ \\
        --tasks goom_ssm_local --device cpu --batch_size 8

This imports ``goom_ssm``, registers the ``goom_ssm`` lm-eval model (:class:`GoomSSMLM`),
adds the task folder shipped with the package (``goom_ssm/lm_eval_tasks``, tasks
``goom_ssm_cloze``, ``goom_ssm_documents`` and the tag ``goom_ssm_local``) as
``--include_path`` unless one is given, and runs lm-eval's command line. ``--model hf``
works too (same loading, lm-eval's stock ``HFLM``).

A folder that carries the self-contained remote code (``goom_ssm.hub.add_remote_code``, as
``goom-ssm push`` publishes it) also works with plain lm-eval and no wrapper, like any
custom Hub architecture: ``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True
--include_path <goom_ssm/lm_eval_tasks> --tasks goom_ssm_local``. Only ``--model hf`` is
available that way (``goom_ssm`` is registered by importing this module).

``--model goom_ssm`` is lm-eval's ``HFLM`` with two differences, both exact where ``hf``
approximates:

* ``loglikelihood_rolling`` (perplexity tasks such as wikitext): each document is run once,
  in blocks of ``max_length`` tokens with the recurrent cache carried between blocks, so
  every token is conditioned on the whole document before it. ``hf`` splits a document
  longer than ``max_length`` (2048 by default) into disjoint windows that see nothing
  before the window.
* ``loglikelihood`` (multiple choice): a context plus continuation longer than
  ``max_length + 1`` tokens is scored with the cache instead of being truncated on the left.
  Shorter requests (almost all) go through ``HFLM`` unchanged.

For ``goom_ssm``, ``max_length`` (a model argument) is therefore only the number of tokens
per forward pass, a memory bound, not a context limit. Generation (``generate_until``) is
``HFLM``'s, whose prompts are left-truncated to ``max_length - max_gen_toks`` tokens.

In Python, import this module before ``lm_eval.simple_evaluate(model="goom_ssm", ...)``
(``model="hf"`` only needs ``import goom_ssm``), and pass
``task_manager=lm_eval.tasks.TaskManager(include_path=LM_EVAL_TASKS_DIR)`` for the local tasks.
"""

if __name__ == "__main__":
    # ``python -m goom_ssm.evaluation``: run the importable copy of this module, so that the
    # lm-eval model is defined and registered once (as goom_ssm.evaluation.GoomSSMLM).
    import sys

    from goom_ssm.evaluation import main

    sys.exit(main())

import argparse
import json
import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

import goom_ssm  # noqa: F401  (registers model_type "goom_ssm" with the Auto classes)
from .modeling.cache_goom_ssm import CACHE_NAME

__all__ = [
    "LM_EVAL_TASKS_DIR",
    "PerplexityResult",
    "SequenceScore",
    "main",
    "perplexity",
    "score_sequences",
]

LM_EVAL_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
"""lm-eval task configs shipped with the package (pass as ``--include_path``)."""


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class SequenceScore:
    """Log-likelihood of the scored tokens of one sequence.

    Attributes:
        logprob: sum of ``log p(token | all tokens before it)`` over the scored tokens (nats).
        num_tokens: how many tokens were scored.
        greedy: whether every scored token was the model's most likely next token.
    """

    logprob: float
    num_tokens: int
    greedy: bool


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def score_sequences(
    model,
    sequences: Sequence[Sequence[int]],
    score_from: Optional[Sequence[int]] = None,
    *,
    block_size: int = 1024,
    batch_size: int = 1,
    device: Optional[Union[str, torch.device]] = None,
) -> list[SequenceScore]:
    """Score token sequences exactly with the recurrent cache, ``block_size`` tokens per forward pass.

    Token ``j >= 1`` of ``sequences[i]`` is predicted from tokens ``0 .. j-1``, all of them,
    whatever ``block_size`` is: the sequence runs block by block and the recurrent state is
    carried from block to block (cost linear in the length). Token 0 is context only.

    Args:
        model: a GOOM-SSM causal LM (``GoomSSMForCausalLM``, or a PEFT model wrapping one).
        sequences: token ids, one list per sequence (lengths may differ).
        score_from: per sequence, the position of the first scored token (>= 1; default 1:
            every token but the first). Earlier tokens are context only.
        block_size: tokens per forward pass (a memory bound: the logits of one block are
            ``batch_size * block_size * vocab_size`` floats).
        batch_size: sequences run side by side (right-padded; padding is an identity step
            of the recurrence and is not scored).
        device: where to run (default: the model's device).

    Returns:
        one :class:`SequenceScore` per sequence, in the order given.
    """
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}")
    sequences = [list(map(int, s)) for s in sequences]
    starts = [1] * len(sequences) if score_from is None else [int(s) for s in score_from]
    if len(starts) != len(sequences):
        raise ValueError(f"score_from has {len(starts)} entries for {len(sequences)} sequences")
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        if start < 1:
            raise ValueError(f"score_from[{i}] = {start}: token 0 has no context and cannot be scored")
        if start > len(seq):
            raise ValueError(f"score_from[{i}] = {start} is past the end of a sequence of {len(seq)} tokens")
    device = torch.device(device) if device is not None else _model_device(model)

    results: list[Optional[SequenceScore]] = [None] * len(sequences)
    todo = []
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        if start >= len(seq):  # nothing to score (e.g. a single token)
            results[i] = SequenceScore(0.0, 0, True)
        else:
            todo.append(i)
    todo.sort(key=lambda i: -len(sequences[i]))  # similar lengths together: less padding

    with torch.inference_mode():
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            scores = _score_batch(model, [sequences[i] for i in batch], [starts[i] for i in batch], block_size, device)
            for i, score in zip(batch, scores):
                results[i] = score
    return results


def _score_batch(model, seqs: list[list[int]], starts: list[int], block_size: int, device) -> list[SequenceScore]:
    """One batch of :func:`score_sequences`: inputs are ``seq[:-1]``, targets ``seq[1:]``."""
    n_rows, length = len(seqs), max(len(s) for s in seqs) - 1
    inputs = torch.zeros(n_rows, length, dtype=torch.long)
    targets = torch.full((n_rows, length), -100, dtype=torch.long)
    mask = torch.zeros(n_rows, length, dtype=torch.long)
    for row, (seq, start) in enumerate(zip(seqs, starts)):
        n = len(seq) - 1
        inputs[row, :n] = torch.tensor(seq[:-1])
        targets[row, start - 1:n] = torch.tensor(seq[start:])
        mask[row, :n] = 1
    inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
    first_scored = min(starts) - 1  # first input position whose logits are needed

    logprob = torch.zeros(n_rows, dtype=torch.float64, device=device)
    greedy = torch.ones(n_rows, dtype=torch.bool, device=device)
    cache = None
    for b0 in range(0, length, block_size):
        b1 = min(length, b0 + block_size)
        block_mask = mask[:, b0:b1]
        # Logits only for the positions that are scored (a suffix of the block); a block
        # before them still runs, to advance the recurrent state, with one logit kept.
        keep = b1 - max(b0, first_scored)
        out = model(
            input_ids=inputs[:, b0:b1],
            attention_mask=None if bool(block_mask.all()) else block_mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=max(keep, 1),
        )
        cache = out[CACHE_NAME]
        if keep <= 0:
            continue
        logits = out.logits[:, -keep:].float()
        tgt = targets[:, b1 - keep:b1]
        valid = tgt != -100
        token_logprob = F.log_softmax(logits, dim=-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        logprob += torch.where(valid, token_logprob, 0.0).sum(dim=1, dtype=torch.float64)
        greedy &= ((logits.argmax(dim=-1) == tgt) | ~valid).all(dim=1)
    counts = [len(s) - st for s, st in zip(seqs, starts)]
    return [SequenceScore(float(lp), n, bool(g)) for lp, n, g in zip(logprob.tolist(), counts, greedy.tolist())]


# --------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one or more documents.

    Attributes:
        total_nll: summed negative log-likelihood of all scored tokens (nats).
        num_tokens: number of scored tokens.
        perplexity: ``exp(total_nll / num_tokens)`` (corpus perplexity; ``inf`` if nothing was scored).
        documents: per document, ``(nll, num_tokens)``.
    """

    total_nll: float
    num_tokens: int
    perplexity: float
    documents: tuple[tuple[float, int], ...] = field(default=())

    @property
    def document_perplexities(self) -> list[float]:
        """Per document, ``exp(nll / num_tokens)`` (``evaluate``'s ``perplexities``; ``nan`` if empty)."""
        return [math.exp(nll / n) if n else math.nan for nll, n in self.documents]

    @property
    def mean_nll(self) -> float:
        """Mean cross-entropy per scored token (nats): ``log(perplexity)``."""
        return self.total_nll / self.num_tokens if self.num_tokens else math.nan

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "total_nll": self.total_nll,
                "num_tokens": self.num_tokens, "num_documents": len(self.documents)}


def _is_tokenizer(obj) -> bool:
    return callable(getattr(obj, "encode", None)) and not isinstance(obj, (str, bytes, os.PathLike))


def _read_documents(text_or_file) -> list[str]:
    """A text, a file (``pathlib.Path``, or a ``str`` naming an existing file), or a list of them."""
    items = text_or_file if isinstance(text_or_file, (list, tuple)) else [text_or_file]
    texts = []
    for item in items:
        if isinstance(item, os.PathLike):
            texts.append(Path(item).read_text(encoding="utf-8"))
        elif isinstance(item, str):
            is_file = "\n" not in item and len(item) < 4096 and os.path.isfile(item)
            texts.append(Path(item).read_text(encoding="utf-8") if is_file else item)
        else:
            raise TypeError(f"expected a text, a file path or a list of them, got {type(item).__name__}")
    return texts


def _as_id_lists(ids) -> list[list[int]]:
    """One sequence (list or 1-D tensor of ints) or several (list of lists, or 2-D tensor)."""
    if isinstance(ids, torch.Tensor):
        if ids.ndim == 1:
            return [ids.tolist()]
        if ids.ndim == 2:
            return ids.tolist()
        raise ValueError(f"token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    ids = list(ids)
    if all(isinstance(t, numbers.Integral) or (isinstance(t, torch.Tensor) and t.ndim == 0) for t in ids):
        return [[int(t) for t in ids]]
    return [[int(t) for t in seq] for seq in ids]


def _start_token(model, tokenizer) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    raise ValueError("no start token: neither the tokenizer nor model.config has a bos or eos token id; "
                     "pass start_token_id=..., or add_start_token=False to leave the first token unscored")


def perplexity(
    model,
    tokenizer_or_ids,
    text_or_file=None,
    *,
    block_size: int = 1024,
    batch_size: int = 1,
    add_start_token: bool = True,
    start_token_id: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> PerplexityResult:
    """Exact perplexity of texts under a GOOM-SSM model, computed with the recurrent cache.

    Each document's token stream runs through the model in blocks of ``block_size`` tokens,
    carrying the recurrent state from block to block, so every token is conditioned on all
    the tokens of its document before it (exact, linear time; no windows, no overlap).
    Documents are independent: each starts from the model's initial state.

    Args:
        model: a GOOM-SSM causal LM, or the path of a folder to load with
            ``AutoModelForCausalLM.from_pretrained`` (its tokenizer is then loaded from the
            same folder if ``tokenizer_or_ids`` is ``None``).
        tokenizer_or_ids: a tokenizer (with ``text_or_file``), a tokenizer folder path, or
            token ids: one sequence (list or 1-D tensor) or several (list of lists or 2-D
            tensor), in which case ``text_or_file`` must be ``None``.
        text_or_file: a text, a ``pathlib.Path`` or a string naming an existing file (read
            as UTF-8), or a list of these (one document each).
        block_size: tokens per forward pass (memory: ``batch_size * block_size * vocab``
            logits). Does not change the result beyond float rounding.
        batch_size: documents run side by side (padded; padding is not scored).
        add_start_token: put ``start_token_id`` before each document so that its first
            token is scored too (default, as lm-eval and ``evaluate``'s perplexity). With
            ``False`` the first token of each document is context only.
        start_token_id: default: the tokenizer's bos (else eos) token id, else the model's.
        device: where to run (default: the model's device).

    Returns:
        :class:`PerplexityResult`: total NLL, scored token count, corpus perplexity
        ``exp(total_nll / num_tokens)`` and per-document ``(nll, num_tokens)``.
    """
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        model_dir = model
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        if tokenizer_or_ids is None:
            tokenizer_or_ids = model_dir
    if isinstance(tokenizer_or_ids, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer_or_ids = AutoTokenizer.from_pretrained(tokenizer_or_ids)

    if tokenizer_or_ids is None:
        raise ValueError("give a tokenizer (or its folder) with the text, or the token ids to score")
    tokenizer = tokenizer_or_ids if _is_tokenizer(tokenizer_or_ids) else None
    if tokenizer is not None:
        if text_or_file is None:
            raise ValueError("give the text (or file) to score after the tokenizer")
        sequences = [tokenizer.encode(text, add_special_tokens=False) for text in _read_documents(text_or_file)]
    else:
        if text_or_file is not None:
            raise ValueError("token ids were given instead of a tokenizer: text_or_file must be None")
        sequences = _as_id_lists(tokenizer_or_ids)

    if add_start_token:
        start = start_token_id if start_token_id is not None else _start_token(model, tokenizer)
        sequences = [[start] + seq for seq in sequences]
    scores = score_sequences(model, sequences, block_size=block_size, batch_size=batch_size, device=device)
    documents = tuple((-s.logprob or 0.0, s.num_tokens) for s in scores)  # (no -0.0)
    total_nll = math.fsum(nll for nll, _ in documents)
    num_tokens = sum(n for _, n in documents)
    ppl = math.exp(total_nll / num_tokens) if num_tokens else math.inf
    return PerplexityResult(total_nll=total_nll, num_tokens=num_tokens, perplexity=ppl, documents=documents)


# --------------------------------------------------------------------------- lm-eval model

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError:  # lm-eval is optional: `pip install lm-eval`
    HFLM = None

if HFLM is not None:

    @register_model("goom_ssm")
    class GoomSSMLM(HFLM):
        """lm-eval's ``HFLM`` for GOOM-SSM models, with exact long-context log-likelihoods.

        ``loglikelihood_rolling`` runs each document once through the model, in blocks of
        ``max_length`` tokens with the recurrent cache carried between blocks, so every
        token is conditioned on the whole document before it; ``loglikelihood`` does the
        same for the (rare) requests longer than ``max_length + 1`` tokens, which ``HFLM``
        would truncate. All model arguments are ``HFLM``'s (``pretrained``, ``device``,
        ``batch_size``, ``dtype``, ``peft``, ``max_length`` = tokens per forward pass, ...).
        """

        def __init__(self, pretrained, backend: str = "causal", **kwargs) -> None:
            super().__init__(pretrained=pretrained, backend=backend, **kwargs)

        def _block_batch_size(self) -> int:
            return self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 1

        def _autocast(self):
            """``mixed_precision_dtype`` as in ``HFLM._model_call`` (GOOM states stay float32)."""
            dtype = self.mixed_precision_dtype
            return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            strings = [req.args[0] for req in requests]
            sequences = [[self.prefix_token_id] + self.tok_encode(s) for s in strings]
            with self._autocast():
                scores = score_sequences(self.model, sequences, block_size=self.max_length,
                                         batch_size=self._block_batch_size(), device=self.device)
            results = []
            for string, score in zip(strings, scores):
                results.append(score.logprob)
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), score.logprob)
            return results

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            long = {i for i, (_, context, continuation) in enumerate(requests)
                    if len(context) + len(continuation) > self.max_length + 1}
            if not long:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            short = [r for i, r in enumerate(requests) if i not in long]
            short_results = iter(
                super()._loglikelihood_tokens(short, disable_tqdm=disable_tqdm, override_bs=override_bs) if short else []
            )
            long_list = sorted(long)
            with self._autocast():
                scores = score_sequences(
                    self.model, [requests[i][1] + requests[i][2] for i in long_list],
                    score_from=[len(requests[i][1]) for i in long_list],
                    block_size=self.max_length, batch_size=1, device=self.device,
                )
            long_results = dict(zip(long_list, scores))
            results = []
            for i, (request_str, _, _) in enumerate(requests):
                if i in long:
                    answer = (long_results[i].logprob, long_results[i].greedy)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    results.append(answer)
                else:
                    results.append(next(short_results))
            return results

    __all__.append("GoomSSMLM")


# --------------------------------------------------------------------------- command line


def run_lm_eval(argv: Sequence[str]) -> None:
    """Run lm-eval's command line (``lm-eval`` / ``lm_eval``) with ``goom_ssm`` imported and
    the ``goom_ssm`` model registered; adds ``--include_path LM_EVAL_TASKS_DIR`` unless an
    ``--include_path`` is given."""
    if HFLM is None:
        raise SystemExit("lm-eval is not installed: pip install 'lm-eval>=0.4,<0.5'")
    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(LM_EVAL_TASKS_DIR)]
    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's CLI parses sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved_argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m goom_ssm.evaluation {perplexity,lm-eval} ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("lm-eval", "lm_eval"):
        run_lm_eval(argv[1:])
        return 0

    parser = argparse.ArgumentParser(prog="python -m goom_ssm.evaluation",
                                     description="Evaluate GOOM-SSM language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("lm-eval", help="run lm-evaluation-harness (lm-eval's own arguments follow)",
                        add_help=False)
    ppl = commands.add_parser("perplexity", help="exact perplexity of text files (recurrent cache)")
    ppl.add_argument("model", help="model folder (with its tokenizer)")
    ppl.add_argument("files", nargs="+", help="UTF-8 text files, one document each")
    ppl.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    ppl.add_argument("--block-size", type=int, default=1024, help="tokens per forward pass (default 1024)")
    ppl.add_argument("--batch-size", type=int, default=1, help="documents run side by side (default 1)")
    ppl.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    ppl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="dtype of the float weights (GOOM states stay float32)")
    ppl.add_argument("--no-start-token", action="store_true",
                     help="do not put <|endoftext|> before each document (its first token is then not scored)")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    result = perplexity(model, tokenizer, [Path(f) for f in args.files], block_size=args.block_size,
                        batch_size=args.batch_size, add_start_token=not args.no_start_token)
    print(json.dumps(result.as_dict(), indent=2))
    return 0
