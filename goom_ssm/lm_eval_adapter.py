"""lm-evaluation-harness for GOOM-SSM models: the ``goom_ssm`` lm-eval model and ``goom-ssm lm-eval``.

Importing this module registers lm-eval's model name ``goom_ssm`` (:class:`GoomSSMLM`); it
needs lm-eval (``pip install "goom-ssm[eval]"``).

lm-eval loads models with ``AutoModelForCausalLM.from_pretrained``, which knows
``model_type="goom_ssm"`` only once ``goom_ssm`` is imported, and lm-eval has no plugin
mechanism that would import it. Run lm-eval through ``goom-ssm lm-eval`` instead, with exactly
lm-eval's own arguments::

    goom-ssm lm-eval --model goom_ssm --model_args pretrained=converted/ \\
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
available that way (``goom_ssm`` is registered by importing ``goom_ssm.lm_eval_adapter``).

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

import sys
from pathlib import Path
from typing import Sequence

import torch

from .extras import require

require("lm_eval", "eval", "lm-evaluation-harness")
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import goom_ssm  # noqa: E402,F401  (registers model_type "goom_ssm" with the Auto classes)
from .evaluation import score_sequences  # noqa: E402

__all__ = ["LM_EVAL_TASKS_DIR", "GoomSSMLM", "run_lm_eval"]

LM_EVAL_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
"""lm-eval task configs shipped with the package (pass as ``--include_path``)."""


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


def run_lm_eval(argv: Sequence[str]) -> None:
    """Run lm-eval's command line (``lm-eval`` / ``lm_eval``) with the ``goom_ssm`` model
    registered; adds ``--include_path LM_EVAL_TASKS_DIR`` unless an ``--include_path`` is given."""
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
