"""Scans of the non-diagonal linear recurrence ``x_t = x_{t-1} A + u_t`` at any magnitude.

Every state row is held in *scaled form*: a log-scale ``s`` and a row ``v`` whose largest
magnitude is 1, so that ``x = exp(s) * v``. These are the same numbers as the GOOM
``log x`` (``s = max(real(log x))``, ``v = exp(log x - s)``), without complex tensors,
and no magnitude ever overflows or underflows to a wrong value, however far the
recurrence grows or decays.

Two pure-PyTorch algorithms compute the states (``goom_ssm.triton_scan`` holds the CUDA one):

- :func:`chunked_scan`, the default pure-PyTorch path: each chunk of ``L`` steps is one
  dense matrix product with the (shared) powers ``A^0 .. A^L``; the states at chunk
  boundaries follow the same recurrence with ``A^L`` and are computed by recursing on
  the chunk-end values, so depth is ``O(log_L T)`` and memory ``O(T)``.
- :func:`goom_prefix_scan`, the original design: an inclusive parallel prefix scan of
  complex log-matmul-exps over the stacked matrices ``[[A], [u_t]]``, ``O(T log T)``
  memory. Kept as the literal reference and as the benchmark baseline.

All scale constants (maxima, log-scales) are detached, as in the original, so gradients
are those of the exact recurrence.
"""

from typing import NamedTuple, Optional

import torch

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


def add_scaled(scale_a: torch.Tensor, a: torch.Tensor, scale_b: torch.Tensor, b: torch.Tensor) -> ScaledRows:
    """``exp(scale_a) * a + exp(scale_b) * b`` in scaled form (scales broadcast against the
    rows' leading dims, with a trailing dim of 1), summed at the larger of the two scales."""
    common = torch.maximum(scale_a, scale_b)
    peak_scale, rows = normalize_rows((scale_a - common).exp() * a + (scale_b - common).exp() * b)
    return ScaledRows(common + peak_scale, rows)


def scan_step(u: torch.Tensor, A: torch.Tensor, state: ScaledRows) -> ScaledRows:
    """One step ``x = x_prev A + u`` (what :func:`chunked_scan` gives for one token, with
    fewer operations): u ``[batch, n, d]``, state as in ``chunked_scan``'s ``initial``."""
    A_scale, A_rows = normalize_rows(A, dims=(-2, -1))
    u_scale, u_rows = normalize_rows(u)
    return add_scaled(state.log_scale + A_scale, state.rows @ A_rows, u_scale, u_rows)


def scaled_powers(base: ScaledRows, n: int) -> ScaledRows:
    """Powers ``M^0 .. M^n`` of the matrix ``M = exp(base.log_scale) * base.rows``.

    ``base``: log_scale of shape ``[]``, rows ``[d, d]``. Returns log_scale ``[n + 1]`` and
    rows ``[n + 1, d, d]``, each power normalised by its own largest magnitude, computed by
    repeated doubling (``O(log n)`` batched products).
    """
    d = base.rows.shape[-1]
    log_scale = torch.stack([torch.zeros_like(base.log_scale), base.log_scale]).reshape(2, 1, 1)
    rows = torch.stack([torch.eye(d, dtype=base.rows.dtype, device=base.rows.device), base.rows])
    while rows.shape[0] <= n:
        k = rows.shape[0] - 1  # powers 0..k known: M^(j+k) = M^j @ M^k for j = 1..k
        new_scale, new_rows = normalize_rows(rows[1:] @ rows[k], dims=(-2, -1))  # one [k*d, d] @ [d, d] product
        log_scale = torch.cat([log_scale, log_scale[k] + log_scale[1:] + new_scale])
        rows = torch.cat([rows, new_rows])
    return ScaledRows(log_scale[: n + 1].view(-1), rows[: n + 1])


def default_chunk_size(device: torch.device) -> int:
    """Steps per chunk of :func:`chunked_scan` when none is given. On CPU, 8: the dense chunk
    products cost ``n L d^2`` multiply-adds per token, which at ``L = 64`` rival the layer's
    projections (forward + backward at ``d = 32`` measured 3.5-7x faster than at 64, for 256
    to 4,096 steps, with the same float32 error). Elsewhere 64, where fewer and larger
    operations pay (a GPU at small batch is bound by the host's launches)."""
    return 8 if torch.device(device).type == "cpu" else 64


def chunked_scan(u: torch.Tensor, A: torch.Tensor, initial: ScaledRows, chunk_size: Optional[int] = None) -> ScaledRows:
    """States of ``x_t = x_{t-1} A + u_t`` for every ``t``, in scaled form.

    Args:
        u: ``[batch, seq_len, n, d]`` inputs (plain floats).
        A: ``[d, d]`` transition matrix (row-vector convention), shared by all rows and steps.
        initial: state before the first step, log_scale ``[batch, n, 1]``, rows ``[batch, n, d]``.
        chunk_size: steps per dense chunk (default: :func:`default_chunk_size` for ``u``'s device).

    Returns:
        ``ScaledRows`` with log_scale ``[batch, seq_len, n, 1]`` and rows ``[batch, seq_len, n, d]``.
    """
    length = max(1, min(chunk_size or default_chunk_size(u.device), u.shape[1]))
    powers = scaled_powers(normalize_rows(A, dims=(-2, -1)), length)
    return _scan(u, powers, initial)


def _scan(u: torch.Tensor, powers: ScaledRows, initial: ScaledRows) -> ScaledRows:
    """Recursive step of :func:`chunked_scan`; ``powers`` holds ``A^0 .. A^L`` for chunks of L."""
    batch, seq_len, n, d = u.shape
    L = powers.rows.shape[0] - 1
    K = -(-seq_len // L)

    # Work in units where the inputs of each row peak at 1 (undone at the end).
    in_scale, u = normalize_rows(u, dims=(1, 3))  # in_scale [batch, 1, n, 1]
    s0 = initial.log_scale - in_scale[:, 0]
    u = torch.nn.functional.pad(u, (0, 0, 0, 0, 0, K * L - seq_len))
    u = u.view(batch, K, L, n, d).transpose(2, 3)  # [batch, K, n, L, d]

    # Within a chunk: h_t = sum_{s<=t} u_s A^(t-s), held as exp(m_t) * h_t with
    # m_t = max_{k<=t} log-scale(A^k), as one product with the matrix W[(s,i),(t,j)].
    m = torch.cummax(powers.log_scale[:L], dim=0).values  # [L]
    steps = torch.arange(L, device=u.device)
    lag = steps[:, None] - steps[None, :]  # [t, s]
    lag_index = lag.clamp(min=0)
    weight = torch.where(lag >= 0, (powers.log_scale[lag_index] - m[:, None]).exp(), 0.0)
    W = powers.rows[lag_index] * weight[..., None, None]  # [t, s, i, j]
    W = W.permute(1, 2, 0, 3).reshape(L * d, L * d)
    h = (u.reshape(batch, K, n, L * d) @ W).view(batch, K, n, L, d)

    # States entering each chunk: the initial state, then the chunk-end states, which obey
    # the same recurrence with A^L and inputs h_{L-1} (in units of exp(m_{L-1})).
    if K == 1:
        start_scale, start_rows = s0[:, None], initial.rows[:, None]
    else:
        step = ScaledRows(powers.log_scale[L], powers.rows[L])
        ends = _scan(h[:, : K - 1, :, L - 1], scaled_powers(step, min(L, K - 1)), ScaledRows(s0 - m[L - 1], initial.rows))
        start_scale = torch.cat([s0[:, None], ends.log_scale + m[L - 1]], dim=1)  # [batch, K, n, 1]
        start_rows = torch.cat([initial.rows[:, None], ends.rows], dim=1)  # [batch, K, n, d]

    # x_t = x_start A^(t+1) + exp(m_t) h_t
    carried = (start_rows.reshape(batch, K * n, d) @ powers.rows[1:].permute(1, 0, 2).reshape(d, L * d))
    carried = carried.view(batch, K, n, L, d)
    carried_scale = start_scale[..., None] + powers.log_scale[1:, None]  # [batch, K, n, L, 1]
    log_scale, rows = add_scaled(carried_scale, carried, m[:, None], h)
    log_scale = log_scale + in_scale[..., None]  # [batch, K, n, L, 1]

    def to_time_major(t):
        return t.transpose(2, 3).reshape(batch, K * L, n, t.shape[-1])[:, :seq_len]

    return ScaledRows(to_time_major(log_scale), to_time_major(rows))


def goom_prefix_scan(u: torch.Tensor, A: torch.Tensor, initial: ScaledRows) -> ScaledRows:
    """The original design: same inputs and outputs as :func:`chunked_scan`, computed with
    a Sklansky parallel prefix scan of complex log-matmul-exps (float32 GOOMs), the same
    combination tree as the original, so that its backward rules act on the same numbers.

    Each element is ``log [[A], [u_t]]`` (``[d + n, d]``); two elements combine as
    ``[[A1, 0], [B1, I]] @ [[A2], [B2]]``; the scanned element ``t`` then maps the initial
    state to ``x_t = [x_0, I] @ [[A^t], [sum_s u_s A^(t-s)]]``.
    """
    batch, seq_len, n, d = u.shape
    dtype = u.dtype
    u, A = u.to(GOOM_FLOAT_DTYPE), A.to(GOOM_FLOAT_DTYPE)
    log_0s_atop_I = goom_log(torch.cat([u.new_zeros(d, n), torch.eye(n, dtype=u.dtype, device=u.device)]))

    def combine(earlier, later):
        padded = torch.cat([earlier, log_0s_atop_I.expand(*earlier.shape[:-2], d + n, n)], dim=-1)
        return log_matmul_exp(padded, later)

    elements = goom_log(torch.cat([A.expand(batch, seq_len, d, d), u], dim=-2))  # [batch, T, d + n, d]
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
