"""Exact perplexity of GOOM-SSM language models.

GOOM-SSM models are recurrent: the state after ``t`` tokens summarises all of them in a
fixed size (:class:`~goom_ssm.GoomSSMCache`). Long texts are therefore scored *exactly*
and in linear time by running them block by block and carrying the cache across blocks:
every token is conditioned on all the tokens before it, however long the text, and no
token is computed twice. Sliding-window evaluation (re-running the last ``max_length``
tokens for each window), which transformer perplexity scripts use, is neither needed nor
exact here.

:func:`perplexity` scores a text, a file, several documents, or token ids::

    from pathlib import Path

    import goom_ssm
    from goom_ssm.evaluation import perplexity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("converted/").eval()
    tok = AutoTokenizer.from_pretrained("converted/")
    result = perplexity(model, tok, Path("test.txt"), block_size=1024)
    print(result.perplexity, result.total_nll, result.num_tokens)

or from the shell: ``goom-ssm perplexity converted/ test.txt``.

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

lm-evaluation-harness runs through :mod:`goom_ssm.lm_eval_adapter`.
"""

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import goom_ssm  # noqa: F401  (registers model_type "goom_ssm" with the Auto classes)
from .modeling.cache_goom_ssm import CACHE_NAME

__all__ = ["PerplexityResult", "SequenceScore", "perplexity", "score_sequences"]


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
    progress: Optional[bool] = False,
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
        progress: show a progress bar over the forward passes (``None``: where stderr is a terminal).

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
    batches = [todo[b:b + batch_size] for b in range(0, len(todo), batch_size)]
    # Forward passes of each batch: its longest sequence's inputs in blocks.
    passes = sum(math.ceil((len(sequences[batch[0]]) - 1) / block_size) for batch in batches)

    disable = None if progress is None else not progress  # tqdm's None: shown where stderr is a terminal
    with torch.inference_mode(), tqdm(total=passes, desc="scoring", unit="block", disable=disable) as bar:
        for batch in batches:
            scores = _score_batch(model, [sequences[i] for i in batch], [starts[i] for i in batch], block_size, device,
                                  bar)
            for i, score in zip(batch, scores):
                results[i] = score
    return results


def _score_batch(model, seqs: list[list[int]], starts: list[int], block_size: int, device,
                 bar: tqdm) -> list[SequenceScore]:
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
        bar.update()
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
        perplexity: ``exp(total_nll / num_tokens)`` (corpus perplexity).
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
    """A text (``str``), a file (``os.PathLike``, e.g. ``pathlib.Path``), or a list of them."""
    items = text_or_file if isinstance(text_or_file, (list, tuple)) else [text_or_file]
    texts = []
    for item in items:
        if isinstance(item, os.PathLike):
            if not Path(item).is_file():
                raise FileNotFoundError(f"text file not found: {os.fspath(item)}")
            texts.append(Path(item).read_text(encoding="utf-8"))
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise TypeError(f"expected a text (str), a file (pathlib.Path) or a list of them, got {type(item).__name__}")
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
    progress: Optional[bool] = None,
) -> PerplexityResult:
    """Exact perplexity of texts under a GOOM-SSM model, computed with the recurrent cache.

    Each document's token stream runs through the model in blocks of ``block_size`` tokens,
    carrying the recurrent state from block to block, so every token is conditioned on all
    the tokens of its document before it (exact, linear time; no windows, no overlap).
    Documents are independent: each starts from the model's initial state.

    Args:
        model: a GOOM-SSM causal LM (or a PEFT model wrapping one).
        tokenizer_or_ids: a tokenizer (with ``text_or_file``), or token ids: one sequence
            (list or 1-D tensor) or several (list of lists or 2-D tensor), in which case
            ``text_or_file`` must be ``None``.
        text_or_file: a text (``str``), a file (``pathlib.Path``, read as UTF-8), or a list
            of these (one document each).
        block_size: tokens per forward pass (memory: ``batch_size * block_size * vocab``
            logits). Does not change the result beyond float rounding.
        batch_size: documents run side by side (padded; padding is not scored).
        add_start_token: put ``start_token_id`` before each document so that its first
            token is scored too (default, as lm-eval and ``evaluate``'s perplexity). With
            ``False`` the first token of each document is context only.
        start_token_id: default: the tokenizer's bos (else eos) token id, else the model's.
        device: where to run (default: the model's device).
        progress: show a progress bar over the forward passes (default: where stderr is a
            terminal).

    Returns:
        :class:`PerplexityResult`: total NLL, scored token count, corpus perplexity
        ``exp(total_nll / num_tokens)`` and per-document ``(nll, num_tokens)``.
    """
    if tokenizer_or_ids is None or isinstance(tokenizer_or_ids, (str, os.PathLike)):
        raise TypeError("give a tokenizer with the text, or the token ids to score "
                        "(load a tokenizer with AutoTokenizer.from_pretrained)")
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
    if all(len(seq) < 2 for seq in sequences):
        raise ValueError("nothing to score: the text has no tokens" if add_start_token else
                         "nothing to score: no document has more than one token (the first is context only)")
    scores = score_sequences(model, sequences, block_size=block_size, batch_size=batch_size, device=device,
                             progress=progress)
    documents = tuple((-s.logprob or 0.0, s.num_tokens) for s in scores)  # (no -0.0)
    total_nll = math.fsum(nll for nll, _ in documents)
    num_tokens = sum(n for _, n in documents)
    return PerplexityResult(total_nll=total_nll, num_tokens=num_tokens, perplexity=math.exp(total_nll / num_tokens),
                            documents=documents)
