"""Decoding one token at a time through a captured CUDA graph.

A single-token forward of a GOOM-SSM model is a few hundred small kernels (a recurrent step,
projections and norms per layer); launching them one by one costs far more than running
them. :class:`CUDAGraphDecoder` captures the whole step (embedding, every layer, head) once
per batch size and replays it, reading and writing the recurrent states in static buffers.
With Triton, each layer runs as three fused kernels (:mod:`goom_ssm.triton_decode`) that
update those buffers in place, and the head as one.

A cache that last ran through a decoder points at the decoder's buffers. Before another
cache uses the same decoder, the previous one gets private copies of its states, so a
cache a user kept is never overwritten.

The ids are checked against the vocabulary without holding the graph back: they are copied
to the host before the replay is queued, and read after it. An id outside the
vocabulary makes the graph change no state (every sequence is treated as padding, the ids
are clamped for the embedding), and the call raises.

For greedy decoding, :meth:`CUDAGraphDecoder.greedy_tokens` runs several steps in one replay:
each step's token choice (a repetition penalty, the argmax, the padding of finished rows, the
EOS check) runs inside the graph, and its token is the next step's input, so the host neither
feeds the ids nor waits for them.

A graph replays the kernels it captured, whatever happens to the modules afterwards, so it
is used only for a plain model (:func:`goom_ssm.layers.is_plain`: no adapter, wrapper,
quantised layer or hook; those decode op by op through their modules) whose parameters are
where they were at capture. That is checked when a cache first runs through a decoder (the
first step of each ``generate()``), not on every step. The decoders are kept beside the
model (:func:`decoders_of`), not on it, so that the model deep-copies and pickles.
"""

import weakref
from typing import Optional

import torch

from ..layers import GoomSSMBlock
from ..scan import ScaledRows
from ..triton_common import HAS_TRITON
from ..triton_decode import head_logits
from .generation_goom_ssm import GreedyRule, next_greedy_tokens


_DECODERS = weakref.WeakKeyDictionary()  # model -> {(batch size, autocast dtype): CUDAGraphDecoder}


def capture_graph(fn, device=None, warmups: int = 2):
    """Captures one call of ``fn`` in a CUDA graph on ``device`` (the current one if None),
    after ``warmups`` calls on a side stream that run its compilation, allocations and library
    initialisation outside the graph. The warm-up calls run ``fn`` for real, so whatever state
    it updates has changed; the capture itself runs nothing. Returns ``(graph, output)``, the
    output being what the captured call returned: static tensors that each replay rewrites."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def decoders_of(model) -> dict:
    """The captured decoders of ``model``, by (batch size, autocast dtype)."""
    return _DECODERS.setdefault(model, {})


class CUDAGraphDecoder:
    """Captured single-token step of ``model`` (a ``GoomSSMForCausalLM`` on CUDA, eval mode)
    for ``batch_size`` sequences. Each layer and the head run as the fused Triton kernels when
    the model's scan is ``"auto"`` or ``"triton"`` and Triton is installed, otherwise op by op.
    Call it with the ids, the mask and a cache holding the state of every layer (see :meth:`__call__`)."""

    def __init__(self, model, batch_size: int):
        config, device = model.config, model.device
        fused = HAS_TRITON and config.scan_implementation in ("auto", "triton")
        self.call_layer = GoomSSMBlock.fused_decode_step if fused else None
        head = model.lm_head  # the fused head is a bias-free linear map, as the model's own
        self.fused_head = fused and head.bias is None
        ssm = model.backbone.layers[0].ssm
        self.parameter_ptrs = _parameter_ptrs(model)
        self.vocab_size = config.vocab_size
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.mask = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
        self.mask_is_all_true = True  # skip refilling it for calls without a mask
        self.host_ids = torch.zeros(batch_size, 1, dtype=torch.long, pin_memory=True)
        self.host_ids_copied = torch.cuda.Event()
        self.states = [
            ScaledRows(torch.zeros(batch_size, config.num_state_heads, 1, dtype=ssm.state_dtype, device=device),
                       torch.zeros(batch_size, config.num_state_heads, config.state_size, dtype=ssm.state_dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        self.owner = lambda: None  # weak reference to the cache whose states are in self.states
        self.unfinished = torch.ones(batch_size, dtype=torch.long, device=device)  # greedy_tokens' rows that go on
        self.pad_token_id = torch.zeros((), dtype=torch.long, device=device)
        self.seen = None  # [batch, vocab] bool: greedy_tokens' ids held, with a repetition penalty
        self.greedy_graphs = {}  # (steps, number of EOS ids or None, penalty or None) -> _GreedyGraph

        self.graph, self.logits = capture_graph(lambda: self._step(model), device)

    def _step(self, model) -> torch.Tensor:
        ids = self.ids.clamp(0, self.vocab_size - 1)
        mask = self.mask & (ids == self.ids).all()  # an id outside the vocabulary: no state changes
        hidden = model.backbone.embeddings(ids)
        hidden, new_states, _ = model.backbone.run_layers(hidden, self.states, mask, call_layer=self.call_layer)
        for buffer, new in zip(self.states, new_states):
            if new.rows is not buffer.rows:  # the fused step writes into the buffers themselves
                buffer.log_scale.copy_(new.log_scale)
                buffer.rows.copy_(new.rows)
        return head_logits(hidden, model.lm_head.weight) if self.fused_head else model.lm_head(hidden).float()

    def is_valid_for(self, model) -> bool:
        """False once the model's parameters were moved or replaced (the graph reads the old memory)."""
        return _parameter_ptrs(model) == self.parameter_ptrs

    def is_current_for(self, cache) -> bool:
        """Whether ``cache`` ran the previous step through this decoder (and nothing needs checking)."""
        return self.owner() is cache

    def _take_buffers_for(self, cache) -> None:
        previous = self.owner()
        if previous is not None and previous is not cache and previous.states[0].rows is self.states[0].rows:
            previous.advance([ScaledRows(s.log_scale.clone(), s.rows.clone()) for s in self.states], 0)
        for buffer, state in zip(self.states, cache.states):
            if state.rows is not buffer.rows:
                buffer.log_scale.copy_(state.log_scale)
                buffer.rows.copy_(state.rows)
        self.owner = weakref.ref(cache)

    def __call__(self, ids: torch.Tensor, mask: Optional[torch.Tensor], cache, check_id_range) -> torch.Tensor:
        """One step for ``ids [batch, 1]`` and ``mask [batch, 1]`` (bool; None: no padding)
        from ``cache``'s states: advances ``cache`` and returns the logits ``[batch, 1, vocab_size]``
        (float32). ``check_id_range(lowest, highest, vocab_size)`` raises for ids outside the vocabulary;
        then ``cache`` is left as it was."""
        self.ids.copy_(ids)
        self.host_ids.copy_(self.ids, non_blocking=True)
        self.host_ids_copied.record()  # queued before the graph: waiting for it does not wait for the graph
        if mask is not None:
            self.mask.copy_(mask)
        elif not self.mask_is_all_true:
            self.mask.fill_(True)
        self.mask_is_all_true = mask is None
        self._take_buffers_for(cache)
        self.graph.replay()
        self.host_ids_copied.synchronize()
        ids = self.host_ids.view(-1).tolist()
        check_id_range(min(ids), max(ids), self.vocab_size)
        cache.advance(self.states, 1)
        return self.logits.clone()

    def greedy_tokens(self, model, cache, last_tokens: torch.Tensor, unfinished: torch.Tensor,
                      seen: Optional[torch.Tensor], steps: int, rule: GreedyRule) -> tuple:
        """The next ``steps`` tokens of greedy decoding from ``cache``'s states, in one replay;
        advances ``cache`` by ``steps`` tokens. Each step feeds the previous token and picks the
        next as ``rule`` says (:func:`~.generation_goom_ssm.next_greedy_tokens`).

        Args:
            last_tokens: ``[batch]`` each row's newest token, not yet in ``cache``.
            unfinished: ``[batch]`` long, 1 for the rows that go on.
            seen: ``[batch, vocab]`` bool, the ids each row holds, where ``rule`` has a
                repetition penalty; else None.
            rule: the pad id (in the vocabulary: not checked here), EOS ids and penalty.

        Returns ``tokens [batch, steps]``, ``any_unfinished [steps]`` (bool: whether some row
        goes on after each step), and ``unfinished`` and ``seen`` after the last step.
        """
        eos = rule.eos_token_ids
        key = (steps, None if eos is None else eos.numel(), rule.repetition_penalty)
        greedy = self.greedy_graphs.get(key)
        if greedy is None:
            if rule.repetition_penalty is not None and self.seen is None:
                self.seen = torch.zeros(self.ids.shape[0], self.vocab_size, dtype=torch.bool, device=self.ids.device)
            greedy = self.greedy_graphs[key] = _GreedyGraph(self, model, steps, rule)
        self.ids.copy_(last_tokens[:, None])
        self.unfinished.copy_(unfinished)
        if eos is not None:
            self.pad_token_id.copy_(rule.pad_token_id)
            greedy.eos_token_ids.copy_(eos)
        if seen is not None:
            self.seen.copy_(seen)
        if not self.mask_is_all_true:
            self.mask.fill_(True)
            self.mask_is_all_true = True
        self._take_buffers_for(cache)
        greedy.graph.replay()
        cache.advance(self.states, steps)
        return (greedy.tokens.clone(), greedy.any_unfinished.clone(), self.unfinished.clone(),
                None if seen is None else self.seen.clone())

    def _greedy_steps(self, model, steps: int, rule: GreedyRule) -> tuple:
        """The operations :meth:`greedy_tokens` replays (see there), ``rule`` holding this
        decoder's buffers."""
        unfinished, tokens, any_unfinished = self.unfinished, [], []
        seen = self.seen if rule.repetition_penalty is not None else None
        for _ in range(steps):
            next_tokens, unfinished = next_greedy_tokens(self._step(model)[:, -1], unfinished, rule, seen)
            self.ids.copy_(next_tokens[:, None])
            tokens.append(next_tokens)
            any_unfinished.append(unfinished.any())
        self.unfinished.copy_(unfinished)
        return torch.stack(tokens, dim=1), torch.stack(any_unfinished)


class _GreedyGraph:
    """:meth:`CUDAGraphDecoder.greedy_tokens`'s capture for one number of steps, of EOS ids and
    one repetition penalty: the graph, its EOS ids' buffer and its outputs. Capturing runs
    nothing, so the states a cache keeps in the decoder's buffers are left as they are (the
    step's kernels were built and its libraries initialised by the decoder's own capture)."""

    def __init__(self, decoder: CUDAGraphDecoder, model, steps: int, rule: GreedyRule):
        has_eos = rule.eos_token_ids is not None
        self.eos_token_ids = torch.empty_like(rule.eos_token_ids) if has_eos else None
        static_rule = GreedyRule(decoder.pad_token_id if has_eos else None, self.eos_token_ids,
                                 rule.repetition_penalty)
        self.graph, (self.tokens, self.any_unfinished) = capture_graph(
            lambda: decoder._greedy_steps(model, steps, static_rule), warmups=0)


def _parameter_ptrs(model) -> tuple:
    return tuple(p.data_ptr() for p in model.parameters())
