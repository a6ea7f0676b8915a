"""Sequence parallelism: one sequence split over the processes of a ``torch.distributed`` group.

Each process of a group of ``P`` holds one segment of ``T`` consecutive tokens of every
sequence (segment ``r`` on the group's rank ``r``). The recurrence ``x_t = x_{t-1} A + u_t``
is linear, so a segment's states from any entering state ``c`` are its states from zero
plus ``c A^k``, ``k`` the real (unpadded) steps of the segment up to and including ``t``.
Each layer therefore

1. scans its own segment from the zero state, with the layer's scan (chunked on CPU,
   Triton on CUDA), padding as identity steps, restarting at packed documents' starts;
2. all-gathers, over the group, the state entering the sequence (rank 0's) and every
   segment's end state from zero (a log-scale and a normalised row per head), with the
   number of real steps of each segment and whether a document starts in it;
3. folds the ends of the segments before its own into the state entering its segment
   (``c <- c A^k + end``, or ``c <- end`` past a segment where a document starts), and adds
   ``c A^k`` to its states from zero up to its first document start: the carry.

The gather is differentiable (:func:`all_gather`, torch's functional collective, whose
backward is a reduce-scatter), so the backward pass sends each segment's end-state
gradient back to its process, and every process's parameter gradients are its share of the
single-process gradients: summed over the group they equal them. Every process's output
depends on the gathered tensor (the entering state comes from it, rank 0's included), so
every process takes part in each backward collective.

:func:`sequence_parallel_loss` splits a language-model batch over a group and scales the
loss so that the gradients averaged over all processes (DDP or FSDP) are those of the
group's whole sequences; ``goom-ssm train --sequence-parallel N`` uses it.
"""

from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .scan import ScaledRows, add_scaled, initial_rows, normalize_rows, scaled_powers


def set_sequence_group(model: torch.nn.Module, group: Optional[dist.ProcessGroup]) -> None:
    """Make every :class:`~goom_ssm.layers.GoomSSM` in ``model`` treat its input as this
    process's segment of sequences split over ``group`` (None: whole sequences again).
    While set, the layers run the module path (not the fused training node)."""
    from .layers import GoomSSM

    ssms = [m for m in model.modules() if isinstance(m, GoomSSM)]
    if not ssms:
        raise ValueError(f"{type(model).__name__} has no GoomSSM layer to split the sequence of")
    for ssm in ssms:
        ssm.sequence_group = group


@contextmanager
def sequence_parallel(model: torch.nn.Module, group: dist.ProcessGroup):
    """:func:`set_sequence_group` for the duration of a ``with`` block."""
    set_sequence_group(model, group)
    try:
        yield model
    finally:
        set_sequence_group(model, None)


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``tensor`` of every process of ``group`` concatenated along dim 0, in rank order; its
    backward sends each process the gradient of its part (summed over the group). torch's
    differentiable functional all-gather: ``all_gather_single_autograd``, named
    ``all_gather_tensor_autograd`` in earlier releases."""
    from torch.distributed import _functional_collectives  # imported here: torch builds without distributed lack it

    gather = getattr(_functional_collectives, "all_gather_single_autograd", None)
    if gather is None:
        gather = _functional_collectives.all_gather_tensor_autograd
    return gather(tensor.contiguous(), 0, group)


def zero_state(batch: int, n: int, d: int, dtype: torch.dtype, device) -> ScaledRows:
    """The zero state ``[batch, n, 1]`` / ``[batch, n, d]``: zero rows at the log-scale that
    :func:`~goom_ssm.scan.normalize_rows` gives an all-zero row (the log of the smallest normal
    float), so that a state added to it keeps its own scale (any state above that magnitude)."""
    return normalize_rows(torch.zeros(batch, n, d, dtype=dtype, device=device))


def _advance(state: ScaledRows, powers: ScaledRows, steps: torch.Tensor) -> ScaledRows:
    """``state A^steps`` (``steps [batch]``, at most the powers' length), unnormalised: rows
    ``[batch, n, d]`` with log-scale ``[batch, n, 1]``."""
    return ScaledRows(state.log_scale + powers.log_scale[steps][:, None, None], state.rows @ powers.rows[steps])


def _dropped(state: ScaledRows, drop: torch.Tensor, zero: ScaledRows) -> ScaledRows:
    """``state`` with the zero state where ``drop`` (bool, broadcast against the leading dims)."""
    drop = drop[..., None, None]
    zero_scale = zero.log_scale.flatten()[0]
    return ScaledRows(torch.where(drop, zero_scale, state.log_scale), torch.where(drop, 0.0, state.rows))


def sequence_parallel_states(ssm, Bu: torch.Tensor, state: Optional[ScaledRows], mask: Optional[torch.Tensor],
                             chunk_plan: Optional[list] = None, starts: Optional[torch.Tensor] = None) -> ScaledRows:
    """The states of this process's segment of sequences split over ``ssm.sequence_group``
    (see the module docstring), what :meth:`GoomSSM._scan` gives for a whole sequence.

    Args:
        ssm: the :class:`~goom_ssm.layers.GoomSSM` layer.
        Bu: ``[batch, T, n, d]`` this segment's inputs (the same ``T`` on every process).
        state: the state entering the whole sequence (used from rank 0; None: ``init_states``).
        mask: ``[batch, T]`` bool (True = real token) of this segment, or None.
        chunk_plan: the chunked scan's plan for ``T`` steps, if computed already.
        starts: ``[batch, T]`` bool, the first tokens of packed documents in this segment (the
            state restarts from ``init_states`` there), or None.

    Returns ``ScaledRows`` (log-scale ``[batch, T, n, 1]``, rows ``[batch, T, n, d]``) in the
    layer's state dtype.
    """
    group = ssm.sequence_group
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    batch, seq_len, n, d = Bu.shape
    dtype = ssm.state_dtype
    start = ssm.initial_state(batch) if state is None else initial_rows(state, batch, dtype)
    zero = zero_state(batch, n, d, dtype, Bu.device)
    if mask is None:
        local = ssm._scan(Bu, zero, chunk_plan, starts)
        steps = torch.full((batch,), seq_len, device=Bu.device)
        seen = None  # real steps up to each position: t + 1
    else:
        local = ssm._masked_scan(Bu, zero, mask, chunk_plan, starts)
        seen = mask.long().cumsum(dim=1)  # [batch, T]
        steps = seen[:, -1]
    # Past a document's start, no state from before the segment reaches the states.
    if starts is None:
        restarted = torch.zeros(batch, seq_len, dtype=torch.bool, device=Bu.device)
    else:
        restarted = starts.cumsum(dim=1) > 0

    # One gather: [start; end] rows with their log-scales appended (constants, as everywhere).
    # Every process sends its entering state, though only rank 0's is used: so every process's
    # initial-state parameters are in its graph (with a zero gradient), as DDP expects.
    sent = torch.stack([torch.cat([start.rows, start.log_scale.detach()], dim=-1),
                        torch.cat([local.rows[:, -1], local.log_scale[:, -1].detach()], dim=-1)])
    gathered = all_gather(sent, group).view(size, 2, batch, n, d + 1)
    all_steps, all_cut = all_gather(torch.stack([steps, restarted[:, -1].long()]), group).view(size, 2, batch).unbind(1)

    A_scale, A_rows = normalize_rows(ssm.A.to(dtype), dims=(-2, -1))
    powers = scaled_powers(ScaledRows(A_scale, A_rows), seq_len)  # A^0 .. A^T: [T + 1], [T + 1, d, d]
    entering = ScaledRows(gathered[0, 0, ..., d:], gathered[0, 0, ..., :d])  # the state entering rank 0's segment
    for k in range(rank):
        carried = _dropped(_advance(entering, powers, all_steps[k]), all_cut[k].bool(), zero)
        entering = add_scaled(*carried, gathered[k, 1, ..., d:], gathered[k, 1, ..., :d])

    # The carry c A^k for k = 0 .. T, then at each position the k of its real steps.
    carry_scale = entering.log_scale[:, None] + powers.log_scale[None, :, None, None]  # [batch, T + 1, n, 1]
    carry_rows = torch.einsum("bnd,kde->bkne", entering.rows, powers.rows)  # [batch, T + 1, n, d]
    if seen is None:
        carry_scale, carry_rows = carry_scale[:, 1:], carry_rows[:, 1:]
    else:
        index = seen[:, :, None, None]
        carry_scale = carry_scale.gather(1, index.expand(-1, -1, n, 1))
        carry_rows = carry_rows.gather(1, index.expand(-1, -1, n, d))
    carry = _dropped(ScaledRows(carry_scale, carry_rows), restarted, zero)
    return add_scaled(*carry, local.log_scale, local.rows)


def split_batch(input_ids: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                ignore_index: int = -100) -> dict:
    """This process's part of the micro-batches of ``group`` for a causal language model.

    The group's processes gather their micro-batches (``input_ids``, ``labels`` and, if
    given, ``attention_mask`` and the packed documents' ``position_ids``, ``[batch, seq_len]``
    on each, ``seq_len`` a multiple of the group's size) into one of ``size * batch``
    sequences, and each takes its segment of ``seq_len / size`` tokens of all of them. Labels
    are shifted before the split (position ``t`` predicts ``labels[t + 1]``, across segment
    boundaries).

    Returns the model's keyword arguments: the segment's ``input_ids``, ``labels``,
    ``attention_mask`` and ``position_ids``, ``shift_labels`` (its shifted labels,
    ``ignore_index`` after each sequence's last token) and ``num_items_in_batch`` (labels other than ``ignore_index`` in
    the group's whole batch), so that the loss is this segment's share of the group's mean.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    parts = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
    for name, tensor in parts.items():
        if tensor is not None and (tensor.ndim != 2 or tensor.shape != input_ids.shape):
            raise ValueError(f"{name} must have the shape [batch, seq_len] of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(tensor.shape)}")
    seq_len = input_ids.shape[1]
    if seq_len % size:
        raise ValueError(f"sequences of {seq_len} tokens do not split into {size} equal segments")
    whole = {name: None if tensor is None else all_gather(tensor, group) for name, tensor in parts.items()}
    shifted = F.pad(whole["labels"][:, 1:], (0, 1), value=ignore_index)
    segment = slice(rank * (seq_len // size), (rank + 1) * (seq_len // size))
    split = {name: None if tensor is None else tensor[:, segment] for name, tensor in whole.items()}
    return {**split, "shift_labels": shifted[:, segment].contiguous(),
            "num_items_in_batch": (shifted != ignore_index).sum()}


def sequence_parallel_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup,
                           attention_mask: Optional[torch.Tensor] = None,
                           position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss of this process in a sequence-parallel step of a causal language model
    whose layers are split over ``group`` (:func:`set_sequence_group`): its segment's share
    of the group's mean loss (:func:`split_batch`) times the group's size. Averaged over
    all processes, as DDP and FSDP average gradients, these give the gradients and the mean
    loss of the group's whole sequences, averaged over the data-parallel groups."""
    loss = model(**split_batch(input_ids, labels, group, attention_mask, position_ids), use_cache=False).loss
    return loss * dist.get_world_size(group)
