"""Recurrent-state cache of GOOM-SSM models, for ``generate()`` and incremental forward passes."""

from typing import Optional

import torch

from ..scan import ScaledRows


class GoomSSMCache:
    """The recurrent state of every layer after the tokens consumed so far.

    Its size does not depend on how many tokens were consumed: per layer, a log-scale
    ``[batch, num_state_heads, 1]`` and rows ``[batch, num_state_heads, state_size]``
    (float32), i.e. the GOOM state ``log x`` of the original implementation. Feeding the
    next tokens with this cache continues the recurrence exactly where it stopped.

    Passed to and returned from the models as ``past_key_values`` (transformers' name for a
    cache); ``generate()`` creates one, reorders it for beam search and slices the inputs
    with :meth:`get_seq_length`.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config, batch_size: int):
        self.num_hidden_layers = config.num_hidden_layers
        self.num_state_heads = config.num_state_heads
        self.state_size = config.state_size
        self.batch_size = batch_size
        self.states: list[Optional[ScaledRows]] = [None] * config.num_hidden_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return self.num_hidden_layers

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.num_hidden_layers}, batch_size={self.batch_size}, "
                f"seen_tokens={self.seen_tokens})")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens consumed so far."""
        return self.seen_tokens

    def get_state(self, layer_idx: int) -> Optional[ScaledRows]:
        """State of layer ``layer_idx``, or ``None`` before the first token."""
        return self.states[layer_idx]

    def advance(self, states: list[ScaledRows], num_tokens: int) -> None:
        """Store every layer's state after ``num_tokens`` more tokens."""
        self.states = list(states)
        self.seen_tokens += num_tokens

    def check_compatible(self, config, batch_size: int) -> None:
        """Raise ``ValueError`` if this cache was made for another model or batch size."""
        ours = (self.num_hidden_layers, self.num_state_heads, self.state_size)
        theirs = (config.num_hidden_layers, config.num_state_heads, config.state_size)
        if ours != theirs:
            raise ValueError(
                f"past_key_values was made for a model with (layers, state heads, state size) = {ours}, "
                f"but this model has {theirs}"
            )
        if batch_size != self.batch_size:
            raise ValueError(f"past_key_values holds a batch of {self.batch_size} sequences, but the inputs have {batch_size}")

    def _map_states(self, fn) -> None:
        self.states = [None if s is None else ScaledRows(fn(s.log_scale), fn(s.rows)) for s in self.states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows ``beam_idx`` (beam search)."""
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))
        self.batch_size = len(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only batch rows ``indices``."""
        self.reorder_cache(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times in place (as ``torch.repeat_interleave``)."""
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))
        self.batch_size *= repeats

    def reset(self) -> None:
        """Forget all consumed tokens."""
        self.states = [None] * self.num_hidden_layers
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back to an earlier position; re-run the prefix instead")
