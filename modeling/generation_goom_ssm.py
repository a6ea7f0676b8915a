"""Greedy decoding for ``generate()`` without the host waiting for the device after every token.

transformers' decoding loop (``GenerationMixin._sample``) asks after every new token whether
all sequences have finished (``unfinished_sequences.max() == 0``), which makes the host wait
until the device has computed that token: the host cannot queue the next step meanwhile, so
each token costs the host's time plus the device's. :func:`greedy_decode` runs the same
steps in the same order (prefill, then per token: the model's step, the logits processors,
argmax, padding of finished sequences, the stopping criteria), and reads whether all
sequences have finished only every few tokens: after 1, 1, 2, 4, 8, then every
:data:`MAX_UNREAD_STEPS` tokens. If they finished in between, the tokens after the step at
which they did are dropped, so the result is the tokens transformers' loop returns. The
steps run past that point change nothing the caller can see: the cache they advance is
generate()'s own and is not returned, and greedy decoding draws no random numbers.

Where the model's CUDA-graph decoder runs the steps, the only logits processor is a
repetition penalty (or none), and EOS is the only stopping criterion besides the length, the
steps after the first run in chunks of up to :data:`MAX_UNREAD_STEPS` (powers of two), each
chunk one graph replay that also picks the tokens (:func:`next_greedy_tokens`: the penalty,
the argmax, the padding of finished rows, the EOS check;
:meth:`~.cuda_graph_goom_ssm.CUDAGraphDecoder.greedy_tokens`); the host reads whether all
rows have finished once per chunk.

:func:`decodes_greedily_without_host_waits` says when this applies: greedy decoding whose
result is only the token ids (no ``return_dict_in_generate``), no streamer, no cache passed
in by the caller, one process (no ``synced_gpus``), a maximum length, and a pad token where an
EOS token stops sequences. Anything else runs transformers' own loop.
"""

from typing import NamedTuple, Optional

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from .cache_goom_ssm import CACHE_NAME

MAX_UNREAD_STEPS = 16  # tokens decoded at most between two reads of the "all finished" flag
_CACHE_ARGUMENTS = (CACHE_NAME, "past_key_values")


class GreedyRule(NamedTuple):
    """What a greedy step does besides the argmax (transformers' greedy step with these
    settings and no other logits processor)."""

    pad_token_id: Optional[torch.Tensor]  # [] long: the token of rows that have finished
    eos_token_ids: Optional[torch.Tensor]  # [k] long, or None where no EOS token finishes rows
    repetition_penalty: Optional[float]  # RepetitionPenaltyLogitsProcessor's, or None


def next_greedy_tokens(logits: torch.Tensor, unfinished: torch.Tensor, rule: GreedyRule,
                       seen: Optional[torch.Tensor]) -> tuple:
    """One greedy step's tokens ``[batch]`` and the rows that go on after it ``[batch]``
    (long), from the step's ``logits [batch, vocab]`` (float32) and ``unfinished`` before it:
    the values transformers' greedy loop computes. With a repetition penalty, ``seen
    [batch, vocab]`` (bool) marks the ids each row holds so far and gets the new tokens; the
    penalised logits are those of transformers' processor (divided by the penalty where
    positive, multiplied where negative, the same operations on the same values)."""
    if rule.repetition_penalty is not None:
        penalty = rule.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    next_tokens = logits.argmax(dim=-1)
    if rule.eos_token_ids is not None:
        next_tokens = _padded_if_finished(next_tokens, unfinished, rule.pad_token_id)
        unfinished = unfinished & ~torch.isin(next_tokens, rule.eos_token_ids)
    if rule.repetition_penalty is not None:
        seen.scatter_(1, next_tokens[:, None], True)
    return next_tokens, unfinished


def decodes_greedily_without_host_waits(generation_config, stopping_criteria, synced_gpus: bool, streamer,
                                        model_kwargs: dict) -> bool:
    """Whether ``generate()``'s call (the arguments of ``GenerationMixin._sample``) can run
    :func:`greedy_decode` (see the module docstring)."""
    return (
        not generation_config.do_sample and not generation_config.return_dict_in_generate
        and streamer is None and not synced_gpus
        and all(model_kwargs.get(name) is None for name in _CACHE_ARGUMENTS)
        and stopping_criteria.max_length is not None
        and (generation_config._pad_token_tensor is not None or not _has_eos_criteria(stopping_criteria))
    )


def greedy_decode(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
                  model_kwargs: dict) -> torch.LongTensor:
    """The token ids ``[batch, prompt + new]`` that transformers' greedy loop returns for these
    arguments (those of ``GenerationMixin._sample``), read back from the device every few tokens only."""
    pad_token_id = generation_config._pad_token_tensor
    has_eos_criteria = _has_eos_criteria(stopping_criteria)
    max_length = stopping_criteria.max_length
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    unread: list[torch.Tensor] = []  # per step since the last read: whether any sequence is unfinished
    read_steps, due = 0, 1  # steps read so far; steps to decode before the next read
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        del outputs
        next_tokens = logits_processor(input_ids, logits).argmax(dim=-1)
        if has_eos_criteria:
            next_tokens = _padded_if_finished(next_tokens, unfinished, pad_token_id)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        unread.append(unfinished.any())
        # read at the maximum length too, where the maximum-length criterion finishes every sequence
        if len(unread) >= due or input_ids.shape[1] >= max_length:
            finished_at = _first_finished(torch.stack(unread))
            if finished_at is not None:  # the tokens of the steps after it are dropped
                return input_ids[:, : input_ids.shape[1] - len(unread) + finished_at + 1]
            read_steps += len(unread)
            unread, due = [], min(MAX_UNREAD_STEPS, read_steps)
        next_sequence_length = 1 if model_kwargs["use_cache"] else None
        model_inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                           **model_kwargs)
        if read_steps == 1 and not unread:  # after the first token: can the rest run in graph chunks?
            chunks = _graph_chunks_decoder(model, model_inputs, logits_processor, stopping_criteria, pad_token_id)
            if chunks is not None:
                decoder, rule = chunks
                return _decode_in_graph_chunks(decoder, model, model_inputs[CACHE_NAME], input_ids, unfinished,
                                               max_length, rule)
        outputs = model(**model_inputs, return_dict=True)


def _padded_if_finished(next_tokens: torch.Tensor, unfinished: torch.Tensor, pad_token_id: torch.Tensor) -> torch.Tensor:
    """``next_tokens [batch]`` with ``pad_token_id`` for the rows that have finished
    (``unfinished [batch]`` long, 0 for them), as transformers' loop computes it."""
    return next_tokens * unfinished + pad_token_id * (1 - unfinished)


def _graph_chunks_decoder(model, model_inputs: dict, logits_processor, stopping_criteria, pad_token_id):
    """``(decoder, rule)``: the CUDA-graph decoder that can run the following steps in chunks
    (see the module docstring) for these inputs of the next step, and the :class:`GreedyRule`
    of ``generate()``'s settings; or None."""
    # logits_to_keep 0 (all) or 1 (the last) are the same for the one token of a step
    others = {k: v for k, v in model_inputs.items() if k not in ("input_ids", CACHE_NAME, "use_cache")
              and not (k == "logits_to_keep" and isinstance(v, int) and v in (0, 1))}
    penalties = [p for p in logits_processor if type(p) is RepetitionPenaltyLogitsProcessor]
    if (len(penalties) != len(logits_processor) or len(penalties) > 1
            or any(p.prompt_ignore_length is not None for p in penalties)
            or any(type(c) not in (MaxLengthCriteria, EosTokenCriteria) for c in stopping_criteria)
            or any(v is not None and v is not False for v in others.values()) or not model_inputs.get("use_cache")):
        return None
    ids, cache = model_inputs["input_ids"], model_inputs[CACHE_NAME]
    decoder = model._cuda_graph_decoder(ids, cache, None, False)
    if decoder is None or (_has_eos_criteria(stopping_criteria)
                           and not 0 <= int(pad_token_id) < model.config.vocab_size):
        return None  # a pad id outside the vocabulary: the step-by-step path refuses it
    cache.check_compatible(model.config, ids.shape[0])
    eos_token_ids = _eos_token_ids(stopping_criteria, ids.device)
    rule = GreedyRule(pad_token_id if eos_token_ids is not None else None, eos_token_ids,
                      penalties[0].penalty if penalties else None)
    return decoder, rule


def _decode_in_graph_chunks(decoder, model, cache, input_ids: torch.LongTensor, unfinished: torch.Tensor,
                            max_length: int, rule: GreedyRule) -> torch.LongTensor:
    """:func:`greedy_decode`'s result from here on (``input_ids [batch, length]`` decoded so far,
    the last token not yet in ``cache``), in chunks of graph-replayed steps."""
    seen = None
    if rule.repetition_penalty is not None:  # the ids each row holds, as the penalty reads them
        seen = torch.zeros(input_ids.shape[0], model.config.vocab_size, dtype=torch.bool, device=input_ids.device)
        seen.scatter_(1, input_ids, True)
    while input_ids.shape[1] < max_length:
        steps = min(MAX_UNREAD_STEPS, 1 << (max_length - input_ids.shape[1]).bit_length() - 1)
        tokens, any_unfinished, unfinished, seen = decoder.greedy_tokens(model, cache, input_ids[:, -1], unfinished,
                                                                         seen, steps, rule)
        input_ids = torch.cat([input_ids, tokens], dim=-1)
        finished_at = _first_finished(any_unfinished)
        if finished_at is not None:
            return input_ids[:, : input_ids.shape[1] - steps + finished_at + 1]
    return input_ids


def _eos_token_ids(stopping_criteria, device) -> Optional[torch.Tensor]:
    """The EOS ids of every EOS criterion ``[k]`` (long), or None where there is none."""
    ids = [c.eos_token_id.to(device).view(-1) for c in stopping_criteria if isinstance(c, EosTokenCriteria)]
    return torch.cat(ids).long() if ids else None


def _has_eos_criteria(stopping_criteria) -> bool:
    """Whether an EOS token stops sequences (transformers' test: a criterion with ``eos_token_id``)."""
    return any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)


def _first_finished(any_unfinished: torch.Tensor) -> Optional[int]:
    """The index of the first step after which no sequence was unfinished, or None, from
    ``any_unfinished [steps]`` (bool, per step; one read from the device for all of them)."""
    return next((i for i, flag in enumerate(any_unfinished.tolist()) if not flag), None)
