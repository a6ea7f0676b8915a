"""Scans of the non-diagonal linear recurrence ``x_t = x_{t-1} A + u_t`` at any magnitude.

Every state row is held in *scaled form*: a log-scale ``s`` and a row ``v`` whose largest
magnitude is 1, so that ``x = exp(s) * v``. These are the same numbers as the GOOM
``log x`` (``s = max(real(log x))``, ``v = exp(log x - s)``), without complex tensors,
and no magnitude ever overflows or underflows to a wrong value, however far the
recurrence grows or decays.

Every scan takes the arguments ``(u, A, initial)`` with one meaning (see :func:`chunked_scan`)
and gives the states of :func:`goom_ssm.naive.naive_scan`, the step-by-step definition the
tests hold them to. Three pure-PyTorch algorithms compute them (``goom_ssm.triton_scan``
holds the CUDA one):

- :func:`chunked_scan`, the default pure-PyTorch path: each chunk of ``L`` steps is one
  dense matrix product with the (shared) powers ``A^0 .. A^L``; the states at chunk
  boundaries follow the same recurrence with ``A^L`` and are computed by recursing on
  the chunk-end values, so depth is ``O(log_L T)`` and memory ``O(T)``. What each level
  needs of the powers of ``A`` (its :class:`ChunkLevel`) depends on ``A`` alone:
  :func:`chunk_plan` computes it, for a stack of matrices (a model's layers) at once.
- :func:`goom_prefix_scan`, the original design: an inclusive parallel prefix scan of
  complex log-matmul-exps over the stacked matrices ``[[A], [u_t]]``, ``O(T log T)``
  memory. Kept as the literal reference and as the benchmark baseline.
- :func:`stepwise_scan`, for ``torch.export`` with a dynamic length (and ONNX): the decoding
  step (:func:`scan_step`) in a loop, one graph for every length.

Every scan also takes ``resets [batch, seq_len]`` (bool, keyword): at a step whose flag is
set, the state before it is replaced by ``reset_state`` (``[n, d]`` plain rows, keyword;
None: no state, ``x_t = u_t``), so that no earlier step reaches this one or any later one
(packed documents: :class:`goom_ssm.layers.GoomSSM` flags each document's first token and
restarts from its initial state there).

All scale constants (maxima, log-scales) are detached, as in the original, so gradients
are those of the exact recurrence.
"""

from typing import NamedTuple, Optional, Union

import torch

from .constants import NO_STATE_LOG_SCALE
from .gooms import GOOM_FLOAT_DTYPE, goom_exp, goom_log, log_matmul_exp


class ScaledRows(NamedTuple):
    """Rows ``exp(log_scale) * rows``: ``log_scale [..., n, 1]``, ``rows [..., n, d]``."""

    log_scale: torch.Tensor
    rows: torch.Tensor


def normalize_rows(x: torch.Tensor, dims=(-1,)) -> ScaledRows:
    """Split ``x`` into a detached log of its largest magnitude over ``dims`` and ``x``
    divided by it. An all-zero row keeps zeros and the log of the smallest normal float."""
    peak = x.detach().abs().amax(dim=dims, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    return ScaledRows(peak.log(), x / peak)


def initial_rows(initial: Union[ScaledRows, torch.Tensor], batch_size: int, dtype: torch.dtype) -> ScaledRows:
    """A scan's ``initial`` argument in ``dtype`` and per-sequence scaled form: ``ScaledRows``
    (log-scale ``[batch, n, 1]``, rows ``[batch, n, d]``) as given, or a plain ``[n, d]``
    tensor of rows shared by every sequence, normalised and expanded to ``batch_size``."""
    if isinstance(initial, torch.Tensor):
        log_scale, rows = normalize_rows(initial.to(dtype))
        return ScaledRows(log_scale.expand(batch_size, -1, -1), rows.expand(batch_size, -1, -1))
    return ScaledRows(initial.log_scale.to(dtype), initial.rows.to(dtype))


def add_scaled(scale_a: torch.Tensor, a: torch.Tensor, scale_b: torch.Tensor, b: torch.Tensor) -> ScaledRows:
    """``exp(scale_a) * a + exp(scale_b) * b`` in scaled form (scales broadcast against the
    rows' leading dims, with a trailing dim of 1), summed at the larger of the two scales."""
    common = torch.maximum(scale_a, scale_b)
    peak_scale, rows = normalize_rows((scale_a - common).exp() * a + (scale_b - common).exp() * b)
    return ScaledRows(common + peak_scale, rows)


def drop_states(state: ScaledRows, drop: torch.Tensor) -> ScaledRows:
    """``state`` (log_scale ``[..., n, 1]``, rows ``[..., n, d]``) with the rows where ``drop``
    (bool, broadcastable to the log-scale's shape, e.g. ``resets[:, None, None]`` for one flag
    per sequence) is set replaced by no state: zero rows at
    :data:`~goom_ssm.constants.NO_STATE_LOG_SCALE`, which any input outweighs."""
    return ScaledRows(state.log_scale.masked_fill(drop, NO_STATE_LOG_SCALE), state.rows.masked_fill(drop, 0.0))


def scan_step(u: torch.Tensor, A: torch.Tensor, state: ScaledRows, *,
              resets: Optional[torch.Tensor] = None, reset_state: Optional[torch.Tensor] = None) -> ScaledRows:
    """One step ``x = x_prev A + u`` (what :func:`chunked_scan` gives for one token, with
    fewer operations): u ``[batch, n, d]``, state as in ``chunked_scan``'s ``initial``;
    ``resets [batch]``: the sequences whose state is replaced by ``reset_state [n, d]`` first
    (no state where it is None: ``x = u``)."""
    if resets is not None:
        u = restart_inputs(u, A, resets, reset_state)
        state = drop_states(state, resets[:, None, None])
    A_scale, A_rows = normalize_rows(A, dims=(-2, -1))
    u_scale, u_rows = normalize_rows(u)
    return add_scaled(state.log_scale + A_scale, state.rows @ A_rows, u_scale, u_rows)


def restart_inputs(u: torch.Tensor, A: torch.Tensor, resets: Optional[torch.Tensor],
                   reset_state: Optional[torch.Tensor]) -> torch.Tensor:
    """How the pure-PyTorch scans take ``reset_state``: the inputs ``u [batch, seq_len, n, d]``
    (any float dtype; or one step, ``[batch, n, d]`` with ``resets [batch]``) in ``A``'s dtype,
    with ``reset_state A`` (``reset_state [n, d]``) added at every step flagged in ``resets``.
    With the state before such a step dropped, ``x_t = reset_state A + u_t``: the recurrence
    restarts from ``reset_state``. ``u`` unchanged but for the dtype where either is None.
    Computed in ``A``'s dtype whether autocast is on or not."""
    u = u.to(A.dtype)
    if resets is None or reset_state is None:
        return u
    with torch.autocast(device_type=u.device.type, enabled=False):
        return torch.where(resets[..., None, None], u + reset_state.to(A.dtype) @ A, u)


def scaled_powers(base: ScaledRows, n: int) -> ScaledRows:
    """Powers ``M^0 .. M^n`` of the matrices ``M = exp(base.log_scale) * base.rows``.

    ``base``: rows ``[..., d, d]`` (any leading dims: a stack of matrices, each raised on its
    own), log_scale ``[...]`` or ``[..., 1, 1]``. Returns log_scale ``[..., n + 1]`` and rows
    ``[..., n + 1, d, d]``, each power normalised by its own largest magnitude, computed by
    repeated doubling (``O(log n)`` batched products).
    """
    lead, d = base.rows.shape[:-2], base.rows.shape[-1]
    base_scale = base.log_scale.reshape(lead)
    log_scale = torch.stack([torch.zeros_like(base_scale), base_scale], dim=-1)
    eye = torch.eye(d, dtype=base.rows.dtype, device=base.rows.device).expand_as(base.rows)
    rows = torch.stack([eye, base.rows], dim=-3)
    while rows.shape[-3] <= n:
        k = rows.shape[-3] - 1  # powers 0..k known: M^(j+k) = M^j @ M^k for j = 1..k
        new_scale, new_rows = normalize_rows(rows[..., 1:, :, :] @ rows[..., k : k + 1, :, :], dims=(-2, -1))
        log_scale = torch.cat([log_scale, log_scale[..., k : k + 1] + log_scale[..., 1:] + new_scale[..., 0, 0]], dim=-1)
        rows = torch.cat([rows, new_rows], dim=-3)
    return ScaledRows(log_scale[..., : n + 1], rows[..., : n + 1, :, :])


class ChunkLevel(NamedTuple):
    """One level of :func:`chunked_scan`, for chunks of ``L`` steps: what the scan needs of the
    powers of its transition matrix ``M`` (``A``, or at the next level ``A^L``), which depend
    on neither the batch nor the inputs. Leading dims ``[...]`` (none for one layer; one per
    layer for a stack of them, see :func:`chunk_plan`).

    - ``within [..., L d, L d]``: block ``(s, t)`` is ``exp(a_(t-s) - m_t) M^(t-s)`` (normalised
      rows) for ``s <= t``, else 0, so that ``h_t = sum_{s<=t} u_s M^(t-s)`` of a chunk's inputs
      is one product ``[.., L d] @ within``, in units of ``exp(m_t)``;
    - ``within_log_scale [..., L]``: ``m_t = max_{k<=t} a_k``, ``a_k`` the log-scale of ``M^k``;
    - ``carry [..., d, L d]``: the normalised ``M^1 .. M^L`` side by side, so that a chunk's
      start state times it gives its contribution to each step of the chunk;
    - ``carry_log_scale [..., L]``: ``a_1 .. a_L``.
    """

    within: torch.Tensor
    within_log_scale: torch.Tensor
    carry: torch.Tensor
    carry_log_scale: torch.Tensor


def _chunk_level(powers: ScaledRows) -> ChunkLevel:
    """The :class:`ChunkLevel` for chunks of ``L`` steps from the powers ``M^0 .. M^L``
    (log_scale ``[..., L + 1]``, rows ``[..., L + 1, d, d]``, as :func:`scaled_powers` gives)."""
    lead, L, d = powers.rows.shape[:-3], powers.rows.shape[-3] - 1, powers.rows.shape[-1]
    steps = torch.arange(L, device=powers.rows.device)
    lag = steps[:, None] - steps[None, :]  # [t, s]
    # The running maximum (torch.cummax's values, as a maximum over each row: it exports to ONNX).
    m = torch.where(lag >= 0, powers.log_scale[..., None, :L], -torch.inf).amax(dim=-1)  # [..., L]
    lag_index = lag.clamp(min=0)
    weight = torch.where(lag >= 0, (powers.log_scale[..., lag_index] - m[..., :, None]).exp(), 0.0)  # [..., t, s]
    within = powers.rows[..., lag_index, :, :] * weight[..., None, None]  # [..., t, s, i, j]
    within = within.movedim(-4, -2).reshape(*lead, L * d, L * d)  # rows (s, i), columns (t, j)
    carry = powers.rows[..., 1:, :, :].movedim(-3, -2).reshape(*lead, d, L * d)
    return ChunkLevel(within, m, carry, powers.log_scale[..., 1:])


def chunk_plan(A: torch.Tensor, seq_len: int, chunk_size: Optional[int] = None) -> list:
    """Every :class:`ChunkLevel` that :func:`chunked_scan` needs for ``seq_len`` steps of
    ``A [..., d, d]`` (leading dims: several matrices at once, e.g. one per layer, which
    takes as many operations as one): level 0 for chunks of ``L`` steps of ``A``, level 1
    for the ``K - 1`` chunk ends (``K`` chunks) with ``A^L``, and so on until one chunk is left.
    """
    L = max(1, min(chunk_size or default_chunk_size(A.device), seq_len))
    base = normalize_rows(A, dims=(-2, -1))
    levels, steps = [], seq_len
    while True:
        powers = scaled_powers(base, L)
        levels.append(_chunk_level(powers))
        chunks = -(-steps // L)
        if chunks == 1:
            return levels
        steps = chunks - 1
        base = ScaledRows(powers.log_scale[..., L], powers.rows[..., L, :, :])
        L = min(L, steps)


def split_plan(plan: list) -> list:
    """A plan for a stack of matrices (leading dim ``N``) as ``N`` plans, one per matrix. Split
    with ``unbind``, so that the backward gathers the ``N`` gradients with one ``stack``."""
    per_level = [[ChunkLevel(*parts) for parts in zip(*(t.unbind(0) for t in level))] for level in plan]
    return [list(levels) for levels in zip(*per_level)]


def default_chunk_size(device: torch.device) -> int:
    """Steps per chunk of :func:`chunked_scan` when none is given. On CPU, 8: the dense chunk
    products cost ``n L d^2`` multiply-adds per token, which at ``L = 64`` rival the layer's
    projections. Elsewhere 32: between more levels and launches (16) and larger chunk products
    (64). (Timings: ``benchmarks/results/design_notes.md``.)"""
    return 8 if torch.device(device).type == "cpu" else 32


def chunked_scan(u: torch.Tensor, A: torch.Tensor, initial: Union[ScaledRows, torch.Tensor], *,
                 resets: Optional[torch.Tensor] = None, reset_state: Optional[torch.Tensor] = None,
                 chunk_size: Optional[int] = None, plan: Optional[list] = None) -> ScaledRows:
    """States of ``x_t = x_{t-1} A + u_t`` for every ``t``, in scaled form.

    Args (those of every scan, with this meaning):
        u: ``[batch, seq_len, n, d]`` inputs (plain floats, any float dtype: computed in ``A``'s).
        A: ``[d, d]`` transition matrix (row-vector convention), shared by all rows and steps.
        initial: state before the first step: ``ScaledRows`` (log_scale ``[batch, n, 1]``, rows
            ``[batch, n, d]``), or a plain ``[n, d]`` tensor of rows shared by every sequence.
        resets: ``[batch, seq_len]`` bool, or None: the steps before which the state is
            replaced by ``reset_state``.
        reset_state: ``[n, d]`` plain rows shared by every sequence, the state a reset
            restarts from (``x_t = reset_state A + u_t``), or None: no state (``x_t = u_t``).

    Options of this scan:
        chunk_size: steps per dense chunk product (default: :func:`default_chunk_size` for
            ``u``'s device; a model's ``scan_chunk_size``).
        plan: ``chunk_plan(A, seq_len, chunk_size)``, if already computed (e.g. for all of a
            model's layers at once); ``chunk_size`` is then unused.

    Returns:
        ``ScaledRows`` in ``A``'s dtype, log_scale ``[batch, seq_len, n, 1]`` and rows
        ``[batch, seq_len, n, d]``. Differentiable in ``u``, ``A``, the initial rows and
        ``reset_state``; the log-scales are constants.
    """
    if plan is None:
        plan = chunk_plan(A, u.shape[1], chunk_size)
    return _scan(restart_inputs(u, A, resets, reset_state), plan, initial_rows(initial, u.shape[0], A.dtype), resets)


def _scan(u: torch.Tensor, plan: list, initial: ScaledRows, resets: Optional[torch.Tensor] = None) -> ScaledRows:
    """Recursive step of :func:`chunked_scan`: ``plan[0]`` is this level's :class:`ChunkLevel`.

    With ``resets``, the recurrence is ``x_t = g_t x_{t-1} A + u_t`` with ``g_t = 0`` at a
    reset, else 1: within a chunk, step by step (:func:`_within_chunks_with_resets`); the
    chunk ends obey the same kind of recurrence with ``A^L``, a chunk that holds a reset
    dropping the state that enters it; and the entering state reaches a step only if no reset
    lies between the chunk's start and it."""
    batch, seq_len, n, d = u.shape
    level = plan[0]
    L = level.within_log_scale.shape[-1]
    K = -(-seq_len // L)

    # Work in units where the inputs of each row peak at 1 (undone at the end).
    in_scale, u = normalize_rows(u, dims=(1, 3))  # in_scale [batch, 1, n, 1]
    s0 = initial.log_scale - in_scale[:, 0]
    u = torch.nn.functional.pad(u, (0, 0, 0, 0, 0, K * L - seq_len))
    u = u.view(batch, K, L, n, d).transpose(2, 3)  # [batch, K, n, L, d]

    # Within a chunk: h_t = sum_{s<=t} u_s A^(t-s), held as exp(m_t) * h_t (one product; with
    # resets, the sum from the chunk's last reset at or before t).
    m = level.within_log_scale
    if resets is None:
        h = (u.reshape(batch, K, n, L * d) @ level.within).view(batch, K, n, L, d)
    else:
        resets = torch.nn.functional.pad(resets, (0, K * L - seq_len)).view(batch, K, L)
        h = _within_chunks_with_resets(u, level, resets)

    # States entering each chunk: the initial state, then the chunk-end states, which obey
    # the same recurrence with A^L and inputs h_{L-1} (in units of exp(m_{L-1})).
    if K == 1:
        start_scale, start_rows = s0[:, None], initial.rows[:, None]
    else:
        chunk_resets = None if resets is None else resets[:, : K - 1].any(dim=-1)
        ends = _scan(h[:, : K - 1, :, L - 1], plan[1:], ScaledRows(s0 - m[L - 1], initial.rows), chunk_resets)
        start_scale = torch.cat([s0[:, None], ends.log_scale + m[L - 1]], dim=1)  # [batch, K, n, 1]
        start_rows = torch.cat([initial.rows[:, None], ends.rows], dim=1)  # [batch, K, n, d]

    # x_t = x_start A^(t+1) + exp(m_t) h_t
    carried = (start_rows.reshape(batch, K * n, d) @ level.carry).view(batch, K, n, L, d)
    carried_scale = start_scale[..., None] + level.carry_log_scale[:, None]  # [batch, K, n, L, 1]
    if resets is not None:  # the entering state reaches the steps before the chunk's first reset
        kept = (resets.cumsum(dim=-1) == 0)[:, :, None, :, None]  # [batch, K, 1, L, 1]
        carried, carried_scale = carried * kept, torch.where(kept, carried_scale, m[:, None])
    log_scale, rows = add_scaled(carried_scale, carried, m[:, None], h)
    log_scale = log_scale + in_scale[..., None]  # [batch, K, n, L, 1]

    def to_time_major(t):
        return t.transpose(2, 3).reshape(batch, K * L, n, t.shape[-1])[:, :seq_len]

    return ScaledRows(to_time_major(log_scale), to_time_major(rows))


def _within_chunks_with_resets(u: torch.Tensor, level: ChunkLevel, resets: torch.Tensor) -> torch.Tensor:
    """``h_t = sum_{s<=t} u_s A^(t-s)`` within each chunk, the sum starting at the chunk's last
    reset at or before ``t``, in units of ``exp(m_t)`` (``m = level.within_log_scale``), as
    :func:`_scan`'s one product gives it without resets: ``h_t = g_t h_{t-1} A + u_t`` step by
    step from no state, every chunk at once, in scaled form (each term of ``h_t`` is at most
    ``exp(m_t)`` times a row of peak 1, so the plain values never overflow).

    ``u [batch, K, n, L, d]`` (rows of peak at most 1), ``resets [batch, K, L]`` ->
    ``[batch, K, n, L, d]``."""
    batch, K, n, L, d = u.shape
    A_rows, A_scale = level.carry[..., :d], level.carry_log_scale[0]  # A normalised, and its log-scale
    state = ScaledRows(u.new_full((batch, K, n, 1), NO_STATE_LOG_SCALE), u.new_zeros(batch, K, n, d))
    h = []
    for t in range(L):
        state = drop_states(state, resets[:, :, t, None, None])
        u_scale, u_rows = normalize_rows(u[:, :, :, t])
        state = add_scaled(state.log_scale + A_scale, state.rows @ A_rows, u_scale, u_rows)
        h.append(state.rows * (state.log_scale - level.within_log_scale[t]).exp())
    return torch.stack(h, dim=3)


def is_dynamic_length(seq_len) -> bool:
    """Whether ``seq_len`` is a dynamic dimension of a graph that ``torch.export`` traces
    (``dynamic_shapes``, as in ``torch.onnx.export(..., dynamo=True)``). Such a graph must hold
    for every length, so the layers then run :func:`stepwise_scan` and take no branch on the
    length. Elsewhere (eager, ``torch.compile``, an export with a static length) the length is
    a number and the layers run as usual."""
    return isinstance(seq_len, torch.SymInt) and torch.compiler.is_exporting()


def stepwise_scan(u: torch.Tensor, A: torch.Tensor, initial: Union[ScaledRows, torch.Tensor], *,
                  resets: Optional[torch.Tensor] = None, reset_state: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None) -> ScaledRows:
    """Same arguments and outputs as :func:`chunked_scan`, computed one step after another
    (:func:`scan_step`, the decoding step) in PyTorch's ``scan`` higher-order op, which
    ``torch.export`` keeps as one loop (ONNX ``Scan``) for any length: the chunked scan's
    structure (chunk sizes, levels) depends on the length, so no one graph holds it for all.

    ``mask [batch, seq_len]`` (bool, True = real token), if given, makes every masked position
    an identity step: the state is carried through unchanged (its reset flag unread).
    """
    from torch._higher_order_ops import scan

    def step(state: tuple, inputs: tuple):  # tuples: the op takes no NamedTuple
        u_t, keep_t, reset_t = inputs  # [batch * n, d], [batch * n, 1], [batch * n, 1]
        new = scan_step(u_t, A, drop_states(ScaledRows(*state), reset_t))
        new = tuple(torch.where(keep_t, after, before) for after, before in zip(new, state))
        return new, tuple(t.clone() for t in new)  # its outputs may not alias one another

    # The loop runs on [batch * n, d] rows: ONNX's exporter fails on a loop body whose
    # product reshapes by a dynamic batch size.
    batch, seq_len, n, _ = u.shape
    u, initial = restart_inputs(u, A, resets, reset_state), initial_rows(initial, batch, A.dtype)
    keep = u.new_ones(batch, seq_len, dtype=torch.bool) if mask is None else mask
    resets = u.new_zeros(batch, seq_len, dtype=torch.bool) if resets is None else resets

    def per_row(flags):  # [batch, seq_len] -> [seq_len, batch * n, 1]
        return flags.T[:, :, None, None].expand(-1, -1, n, 1).flatten(1, 2)

    inputs = (u.movedim(1, 0).flatten(1, 2), per_row(keep), per_row(resets))
    initial = tuple(t.flatten(0, 1).contiguous() for t in initial)  # the op keeps the carry's strides: none expanded
    _, outputs = scan(step, initial, inputs)
    log_scale, rows = (t.unflatten(1, (batch, n)).movedim(0, 1) for t in outputs)
    return ScaledRows(log_scale, rows)


def goom_prefix_scan(u: torch.Tensor, A: torch.Tensor, initial: Union[ScaledRows, torch.Tensor], *,
                     resets: Optional[torch.Tensor] = None, reset_state: Optional[torch.Tensor] = None) -> ScaledRows:
    """The original design: same arguments and outputs as :func:`chunked_scan`, computed with
    a Sklansky parallel prefix scan of complex log-matmul-exps (float32 GOOMs), the same
    combination tree as the original, so that its backward rules act on the same numbers.

    Each element is ``log [[A], [u_t]]`` (``[d + n, d]``); two elements combine as
    ``[[A1, 0], [B1, I]] @ [[A2], [B2]]``; the scanned element ``t`` then maps the initial
    state to ``x_t = [x_0, I] @ [[A^t], [sum_s u_s A^(t-s)]]``. A reset's element is
    ``log [[0], [u_t]]`` (``0`` is GOOM's ``LOG_ZERO``): every combination through it zeroes
    what came before, the original paper's selective resetting of interim states (with
    ``reset_state``, ``u_t`` there holds ``reset_state A``: :func:`restart_inputs`).
    """
    batch, seq_len, n, d = u.shape
    dtype = A.dtype
    initial = initial_rows(initial, batch, dtype)
    u = restart_inputs(u, A, resets, reset_state)
    u, A = u.to(GOOM_FLOAT_DTYPE), A.to(GOOM_FLOAT_DTYPE)
    log_0s_atop_I = goom_log(torch.cat([u.new_zeros(d, n), torch.eye(n, dtype=u.dtype, device=u.device)]))

    def combine(earlier, later):
        padded = torch.cat([earlier, log_0s_atop_I.expand(*earlier.shape[:-2], d + n, n)], dim=-1)
        return log_matmul_exp(padded, later)

    transitions = A.expand(batch, seq_len, d, d)
    if resets is not None:
        transitions = transitions.masked_fill(resets[:, :, None, None], 0.0)
    elements = goom_log(torch.cat([transitions, u], dim=-2))  # [batch, T, d + n, d]
    # Sklansky scan, as the original: pad to a power of two (padding comes after every kept
    # position, so it never reaches a kept result); at each level, the second half of every
    # block of 2 * half elements combines with the last element of the first half.
    padded_len = 1 << max(0, (seq_len - 1).bit_length())
    elements = torch.nn.functional.pad(elements, (0, 0, 0, 0, 0, padded_len - seq_len))
    half = 1
    while half < padded_len:
        blocks = elements.view(batch, padded_len // (2 * half), 2 * half, d + n, d)
        updated = combine(blocks[:, :, half - 1 : half], blocks[:, :, half:])
        elements = torch.cat([blocks[:, :, :half], updated], dim=2).view(batch, padded_len, d + n, d)
        half *= 2
    elements = elements[:, :seq_len]

    log_x0 = goom_log(initial.rows.to(GOOM_FLOAT_DTYPE)) + initial.log_scale.to(GOOM_FLOAT_DTYPE)
    log_I = goom_log(torch.eye(n, dtype=u.dtype, device=u.device)).expand(batch, n, n)
    log_x = log_matmul_exp(torch.cat([log_x0, log_I], dim=-1)[:, None], elements)  # [batch, T, n, d]
    log_scale = log_x.real.detach().amax(dim=-1, keepdim=True)
    return ScaledRows(log_scale.to(dtype), goom_exp(log_x - log_scale).to(dtype))
