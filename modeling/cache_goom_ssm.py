"""Recurrent-state cache of GOOM-SSM models, as a transformers ``Cache``.

transformers renamed the cache argument and output field from ``past_key_values`` to
``cache`` in 5.24; :data:`CACHE_NAME` is the name of the installed release, read from its
output classes, and the models accept and return the cache under it.
"""

from types import SimpleNamespace
from typing import Optional

import torch
import torch.utils._pytree as pytree
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..scan import ScaledRows

CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class GoomSSMCacheLayer:
    """The recurrent state of one layer: ``state`` is ``None`` before the first token, then a
    :class:`~goom_ssm.scan.ScaledRows` of log-scale ``[batch, num_state_heads, 1]`` and rows
    ``[batch, num_state_heads, state_size]`` (float32, or float64 for a float64 model).

    Implements the per-layer methods that transformers' ``Cache`` calls on its layers."""

    is_compileable = False  # generate() must not compile the model around it: the model has its own CUDA-graph step
    is_croppable = False  # a recurrent state cannot be rolled back
    supports_early_init = False

    def __init__(self):
        self.state: Optional[ScaledRows] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'empty' if self.state is None else tuple(self.state.rows.shape)})"

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = ScaledRows(fn(self.state.log_scale), fn(self.state.rows))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[torch.as_tensor(indices, device=t.device)])

    def reset(self) -> None:
        self.state = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back to an earlier position; re-run the prefix instead")

    def get_max_length(self) -> int:
        return -1


class GoomSSMCache(Cache):
    """The recurrent state of every layer after the tokens consumed so far.

    Its size does not depend on how many tokens were consumed: per layer, a log-scale
    ``[batch, num_state_heads, 1]`` and rows ``[batch, num_state_heads, state_size]``
    (float32), i.e. the GOOM state ``log x`` of the original implementation. Feeding the
    next tokens with this cache continues the recurrence exactly where it stopped.

    A transformers ``Cache`` of linear-attention-like layers (:class:`GoomSSMCacheLayer`):
    ``generate()`` creates it through the model's first forward, reorders it for beam
    search, repeats it for several return sequences, and slices the inputs with
    :meth:`get_seq_length`. It is a registered pytree (``torch.export``).
    """

    def __init__(self, config, batch_size: int):
        super().__init__(layers=[GoomSSMCacheLayer() for _ in range(config.num_hidden_layers)])
        self.num_hidden_layers = config.num_hidden_layers
        self.num_state_heads = config.num_state_heads
        self.state_size = config.state_size
        self._batch_size = batch_size
        self.seen_tokens = 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.num_hidden_layers}, batch_size={self.batch_size}, "
                f"seen_tokens={self.seen_tokens})")

    @property
    def states(self) -> list[Optional[ScaledRows]]:
        """Every layer's state (``None`` before the first token)."""
        return [layer.state for layer in self.layers]

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens consumed so far."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        raise ValueError("a GOOM-SSM cache holds recurrent states, not keys and values: it has no attention mask sizes")

    def update(self, *args, **kwargs):
        raise NotImplementedError("a GOOM-SSM cache holds recurrent states, not keys and values; the model advances it")

    def advance(self, states: list[ScaledRows], num_tokens: int) -> None:
        """Store every layer's state after ``num_tokens`` more tokens."""
        for layer, state in zip(self.layers, states, strict=True):
            layer.state = state
        self.seen_tokens += num_tokens

    def check_compatible(self, config, batch_size: int) -> None:
        """Raise ``ValueError`` if this cache was made for another model or batch size."""
        ours = (self.num_hidden_layers, self.num_state_heads, self.state_size)
        theirs = (config.num_hidden_layers, config.num_state_heads, config.state_size)
        if ours != theirs:
            raise ValueError(
                f"{CACHE_NAME} was made for a model with (layers, state heads, state size) = {ours}, "
                f"but this model has {theirs}"
            )
        if batch_size != self.batch_size:
            raise ValueError(f"{CACHE_NAME} holds a batch of {self.batch_size} sequences, but the inputs have {batch_size}")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows ``beam_idx`` (beam search)."""
        super().reorder_cache(beam_idx)
        self._batch_size = len(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only batch rows ``indices``."""
        super().batch_select_indices(indices)
        self._batch_size = len(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times in place (as ``torch.repeat_interleave``)."""
        super().batch_repeat_interleave(repeats)
        self._batch_size *= repeats

    def reset(self) -> None:
        """Forget all consumed tokens."""
        super().reset()
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back to an earlier position; re-run the prefix instead")


def _flatten(cache: GoomSSMCache):
    leaves = [t for state in cache.states for t in ((None, None) if state is None else state)]
    context = (cache.num_hidden_layers, cache.num_state_heads, cache.state_size, cache.batch_size, cache.seen_tokens)
    return leaves, context


def _unflatten(leaves, context) -> GoomSSMCache:
    num_hidden_layers, num_state_heads, state_size, batch_size, seen_tokens = context
    sizes = SimpleNamespace(num_hidden_layers=num_hidden_layers, num_state_heads=num_state_heads, state_size=state_size)
    cache = GoomSSMCache(sizes, batch_size)
    leaves = list(leaves)
    for layer, log_scale, rows in zip(cache.layers, leaves[0::2], leaves[1::2], strict=True):
        layer.state = None if rows is None else ScaledRows(log_scale, rows)
    cache.seen_tokens = seen_tokens
    return cache


def _flatten_with_keys(cache: GoomSSMCache):
    leaves, context = _flatten(cache)
    keys = [pytree.SequenceKey(i) for i in range(len(leaves))]
    return list(zip(keys, leaves)), context


pytree.register_pytree_node(
    GoomSSMCache, _flatten, _unflatten, serialized_type_name=f"{__name__}.GoomSSMCache",
    flatten_with_keys_fn=_flatten_with_keys,
)
