"""The GOOM-SSM recurrence as Triton kernels: the fast path on CUDA, forward and backward.

Same inputs and outputs as :func:`goom_ssm.scan.chunked_scan`: the states of
``x_t = x_{t-1} A + u_t``, every row in scaled form (a log-scale ``s`` and a row ``v`` whose
largest magnitude is 1: the numbers of the GOOM ``log x``), so that no magnitude
overflows. One kernel runs the recurrence step by step, ``A`` in registers, a block of
state rows per program. To fill the GPU at any batch size the sequence is cut into chunks
of ``L`` steps (``K`` chunks), evaluated in three launches:

1. every chunk but the last from a zero state, in parallel: its end state ``E_k``;
2. the states entering the chunks, ``S_k = S_{k-1} A^L + E_{k-1}`` from the initial state:
   the same recurrence over ``K - 1`` steps, with ``A^L`` (squared up in float64 by a small
   kernel of its own) and inputs in scaled form;
3. every chunk from its entering state (read in place: the initial state or ``S_k``), in
   parallel, writing every step.

The backward pass is the adjoint recurrence ``lambda_t = lambda_{t+1} A^T + g_t e^{-s_t}``
(``g_t`` the gradient of the output rows, whose scales ``s_t`` are detached as in the
original): the same three launches in reverse time, its inputs in scaled form too. The
third writes ``du_t = lambda_t``, accumulates ``dA = sum_t x_{t-1}^T lambda_t``, each
term's two scales added before exponentiating, so gradients are right however large the
states and however small the adjoints, and ends with the initial state's gradient
``lambda_0 A^T``. Every step but these launches happens inside the kernels, because at
small batches the host's time per launch, not the GPU's, bounds training. Only the outputs are saved for the backward pass:
memory is ``O(T)``, with no ``O(T log T)`` intermediates.

The forward and the backward (:func:`scan_forward`, :func:`scan_backward`) are joined by
an ``autograd.Function``. Under ``torch.compile`` they are the custom operators
``goom_ssm::scan`` and ``goom_ssm::scan_backward``, so that ``torch.compile(fullgraph=True)``
keeps them whole; in eager mode they are called directly (an operator's dispatch costs
more host time than its four kernel launches). Without a GPU the kernels run under
Triton's interpreter (``TRITON_INTERPRET=1`` before importing), as the tests do.
"""

import math
from typing import Optional, Union

import torch

from .scan import ScaledRows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the pure-PyTorch scans
    triton = None

HAS_TRITON = triton is not None
NO_STATE_LOG_SCALE = -1e30  # log-scale of "no state yet": a zero row that any input outweighs
# Measured on an H200 (rows of 32, 1024 programs): a step of 8 rows takes 1.3 us in one warp,
# 10.5 us in four.
ROWS_PER_PROGRAM = 8  # state rows advanced together by one program
NUM_WARPS = 1
MIN_CHUNK, MAX_CHUNK = 16, 256


if HAS_TRITON:
    _NO_STATE = tl.constexpr(NO_STATE_LOG_SCALE)

    @triton.jit
    def _advance(s, v, u, u_log_scale, A, a_log_scale, tiny):
        """One step ``x <- x A + u`` for a block of rows: ``x = exp(s) v`` with ``s [R]``,
        ``v [R, D]``; ``u [R, D]`` scaled by ``exp(u_log_scale [R])``; ``A`` normalised, with
        log-scale ``a_log_scale``. Both terms are summed at their larger scale, then the row
        is renormalised (an all-zero row gets the log of ``tiny``, as ``normalize_rows``).
        Log-scales are float64: they grow by a sum every step, which float32 would round
        at each of thousands of steps (at s ~ 800, by up to 3e-5 a step)."""
        if v.shape[0] >= 16:
            # At 16 rows and more Triton would turn the broadcast product below into a TF32
            # tensor-core product (errors ~1e-4 in float32): ask for an exact one.
            w = tl.dot(v, A, input_precision="ieee")
        else:
            w = tl.sum(v[:, :, None] * A[None, :, :], axis=1)
        carried = s + a_log_scale
        u_peak = tl.maximum(tl.max(tl.abs(u), axis=1), tiny)
        common = tl.maximum(carried, tl.log(u_peak).to(tl.float64) + u_log_scale)
        z = (tl.exp((carried - common).to(v.dtype))[:, None] * w
             + tl.exp((u_log_scale - common).to(v.dtype))[:, None] * u)
        peak = tl.maximum(tl.max(tl.abs(z), axis=1), tiny)
        return common + tl.log(peak).to(tl.float64), z / peak[:, None]

    @triton.jit
    def _normalized(M, tiny):
        """A matrix divided by its largest magnitude, and the (float64) log of that magnitude."""
        peak = tl.maximum(tl.max(tl.max(tl.abs(M), axis=1), axis=0), tiny)
        return M / peak, tl.log(peak).to(tl.float64)

    @triton.jit
    def _load_matrix(a_ptr, feats, D: tl.constexpr, TRANSPOSE: tl.constexpr):
        """The ``[D, D]`` matrix at ``a_ptr`` (row-major), or its transpose, zero-padded to the block."""
        ok = (feats < D)[:, None] & (feats < D)[None, :]
        if TRANSPOSE:
            return tl.load(a_ptr + feats[None, :] * D + feats[:, None], mask=ok, other=0.0)
        return tl.load(a_ptr + feats[:, None] * D + feats[None, :], mask=ok, other=0.0)

    @triton.jit(do_not_specialize=["exponent"])
    def _power_kernel(a_ptr, out_s_ptr, out_v_ptr, exponent, tiny: tl.constexpr, D: tl.constexpr,
                      BLOCK: tl.constexpr, TRANSPOSE: tl.constexpr):
        """``exp(out_s) out_v = M^exponent`` for ``M = A`` (or ``A^T``), ``A [D, D]``, by repeated
        squaring in float64 (the carry across chunks multiplies by it many times), every
        product normalised (so no power overflows)."""
        feats = tl.arange(0, BLOCK)
        ok = (feats < D)[:, None] & (feats < D)[None, :]
        base, base_s = _normalized(_load_matrix(a_ptr, feats, D, TRANSPOSE).to(tl.float64), tiny)
        result = tl.where(ok & (feats[:, None] == feats[None, :]), 1.0, 0.0).to(base.dtype)
        result_s = tl.zeros_like(base_s)
        e = exponent
        while e > 0:
            if e % 2 == 1:
                result, s = _normalized(tl.dot(result, base), tiny)
                result_s += base_s + s
            e = e // 2
            if e > 0:
                base, s = _normalized(tl.dot(base, base), tiny)
                base_s = 2 * base_s + s
        tl.store(out_v_ptr + feats[:, None] * D + feats[None, :], result, mask=ok)  # rounded to the output's dtype
        tl.store(out_s_ptr, result_s)

    @triton.jit
    def _load_input(u_ptr, u_scale_ptr, step, feats, row_ok, ok, dtype: tl.constexpr, D: tl.constexpr,
                    HAS_U_SCALE: tl.constexpr, NEGATE_U_SCALE: tl.constexpr):
        """Input rows ``step`` (indices into ``[B, T, n]``) and their log-scales (0 without
        ``HAS_U_SCALE``; the stored ones negated with ``NEGATE_U_SCALE``)."""
        u = tl.load(u_ptr + step[:, None] * D + feats[None, :], mask=ok, other=0.0).to(dtype)
        if HAS_U_SCALE:
            u_log_scale = tl.load(u_scale_ptr + step, mask=row_ok, other=0.0).to(tl.float64)
            if NEGATE_U_SCALE:
                u_log_scale = -u_log_scale
        else:
            u_log_scale = tl.zeros(step.shape, tl.float64)
        return u, u_log_scale

    @triton.jit
    def _load_init_scale(scale_ptr, index, ok, SHARED_INIT: tl.constexpr):
        """Log-scales of initial rows (float64), 0 for shared plain rows."""
        if SHARED_INIT:
            return tl.zeros(index.shape, tl.float64)
        return tl.load(scale_ptr + index, mask=ok, other=0.0).to(tl.float64)

    @triton.jit
    def _recurrence_kernel(
        u_ptr, u_scale_ptr, a_ptr, a_scale_ptr, start_s_ptr, start_v_ptr, carry_s_ptr, carry_v_ptr,
        out_s_ptr, out_v_ptr, end_s_ptr, end_v_ptr,
        fwd_s_ptr, fwd_v_ptr, init_s_ptr, init_v_ptr, grad_a_ptr, grad_init_ptr,
        seq_len, n_rows, chunk_len, first_chunk, tiny: tl.constexpr,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, REVERSE: tl.constexpr,
        TRANSPOSE_A: tl.constexpr, HAS_U_SCALE: tl.constexpr, NEGATE_U_SCALE: tl.constexpr,
        HAS_A_SCALE: tl.constexpr, HAS_START: tl.constexpr, HAS_CARRY: tl.constexpr,
        WRITE_STEPS: tl.constexpr, PLAIN_STEPS: tl.constexpr, WRITE_ENDS: tl.constexpr, GRADIENTS: tl.constexpr,
        SHARED_INIT: tl.constexpr,
    ):
        """Program (c, b, r): chunk ``first_chunk + c`` of sequence ``b``, state rows
        ``r * BLOCK_R ...``. Contiguous layouts: ``u [B, T, n, D]`` (any float dtype) and
        its log-scales ``[B, T, n]``; ``A [D, D]`` (or its transpose, ``TRANSPOSE_A``;
        normalised here, times ``exp(a_scale)``; states are computed in its dtype). The state
        entering a chunk: ``start`` (``[B, n]`` / ``[B, n, D]``; ``SHARED_INIT``: no log-scales, plain
        rows ``[n, D]`` for every sequence) for the first chunk in the direction of travel, ``carry``
        (``[B, K - 1, n]`` / ``[..., D]``, the K - 1 other chunks in time order), else none.
        Outputs: chunk ends ``[B, C, n]`` / ``[B, C, n, D]`` (C = launched chunks); every
        step ``[B, T, n]`` / ``[B, T, n, D]`` (``PLAIN_STEPS``: ``exp(s) v`` only).
        ``GRADIENTS`` (the adjoint pass): also sum ``x_{t-1}^T lambda_t`` over this program's
        steps into ``grad_a [programs, D, D]`` (``x`` from the forward states ``fwd`` and the
        initial state ``init``, laid out as ``start``), and write ``grad_init = exp(init_s) lambda_0 A^T [B, n, D]``."""
        pid_c, b, pid_r = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        chunk = first_chunk + pid_c
        num_chunks = tl.cdiv(seq_len, chunk_len)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        feats = tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & (feats < D)[None, :]
        A, a_log_scale = _normalized(_load_matrix(a_ptr, feats, D, TRANSPOSE_A), tiny)
        if HAS_A_SCALE:
            a_log_scale += tl.load(a_scale_ptr).to(tl.float64)

        s = tl.full([BLOCK_R], _NO_STATE, tl.float64)
        v = tl.zeros([BLOCK_R, BLOCK_D], A.dtype)
        start_chunk = num_chunks - 1 if REVERSE else 0
        init = rows if SHARED_INIT else b * n_rows + rows
        if HAS_START:
            start_ok = rows < tl.where(chunk == start_chunk, n_rows, 0)
            s = tl.where(start_ok, _load_init_scale(start_s_ptr, init, start_ok, SHARED_INIT), s)
            v = tl.where(start_ok[:, None], tl.load(start_v_ptr + init[:, None] * D + feats[None, :],
                                                    mask=start_ok[:, None] & ok, other=0.0), v)
        if HAS_CARRY:
            carry = (b * (num_chunks - 1) + chunk - (0 if REVERSE else 1)) * n_rows + rows
            carry_ok = rows < tl.where(chunk == start_chunk, 0, n_rows)
            s = tl.where(carry_ok, tl.load(carry_s_ptr + carry, mask=carry_ok, other=0.0).to(tl.float64), s)
            v = tl.where(carry_ok[:, None], tl.load(carry_v_ptr + carry[:, None] * D + feats[None, :],
                                                    mask=carry_ok[:, None] & ok, other=0.0), v)
        if GRADIENTS:
            init_s = _load_init_scale(init_s_ptr, init, row_ok, SHARED_INIT)
            init_v = tl.load(init_v_ptr + init[:, None] * D + feats[None, :], mask=ok, other=0.0)
            grad_a = tl.zeros([BLOCK_D, BLOCK_D], A.dtype)

        n_steps = tl.minimum(chunk_len, seq_len - chunk * chunk_len)
        first_t = chunk * chunk_len + (n_steps - 1 if REVERSE else 0)
        direction = -1 if REVERSE else 1
        # The input of step t + 1 is loaded while step t computes (the load's latency would
        # otherwise be most of a step's time).
        u_next, u_scale_next = _load_input(u_ptr, u_scale_ptr, (b * seq_len + first_t) * n_rows + rows, feats,
                                           row_ok, ok, A.dtype, D, HAS_U_SCALE, NEGATE_U_SCALE)
        for i in range(0, n_steps):
            t = first_t + direction * i
            step = (b * seq_len + t) * n_rows + rows
            u, u_log_scale = u_next, u_scale_next
            t_next = tl.minimum(tl.maximum(t + direction, chunk * chunk_len), chunk * chunk_len + n_steps - 1)
            u_next, u_scale_next = _load_input(u_ptr, u_scale_ptr, (b * seq_len + t_next) * n_rows + rows, feats,
                                               row_ok, ok, A.dtype, D, HAS_U_SCALE, NEGATE_U_SCALE)
            if GRADIENTS:
                prev = (b * seq_len + tl.maximum(t - 1, 0)) * n_rows + rows
                x_s = tl.load(fwd_s_ptr + prev, mask=row_ok, other=0.0).to(tl.float64)
                x_v = tl.load(fwd_v_ptr + prev[:, None] * D + feats[None, :], mask=ok, other=0.0)
            s, v = _advance(s, v, u, u_log_scale, A, a_log_scale, tiny)
            if WRITE_STEPS:
                if PLAIN_STEPS:
                    plain = tl.where(v == 0, 0.0, v * tl.exp(s.to(v.dtype))[:, None])
                    tl.store(out_v_ptr + step[:, None] * D + feats[None, :], plain, mask=ok)
                else:
                    tl.store(out_s_ptr + step, s.to(A.dtype), mask=row_ok)
                    tl.store(out_v_ptr + step[:, None] * D + feats[None, :], v, mask=ok)
            if GRADIENTS:
                x_s = tl.where(t == 0, init_s, x_s)
                x_v = tl.where(t == 0, init_v, x_v)
                x_v = x_v * tl.exp((x_s + s).to(x_v.dtype))[:, None]  # both scales at once: finite whenever the term is
                grad_a += tl.sum(x_v[:, :, None] * v[:, None, :], axis=0)

        if WRITE_ENDS:
            end = (b * tl.num_programs(0) + pid_c) * n_rows + rows
            tl.store(end_s_ptr + end, s.to(A.dtype), mask=row_ok)
            tl.store(end_v_ptr + end[:, None] * D + feats[None, :], v, mask=ok)
        if GRADIENTS:
            program = (b * tl.num_programs(0) + pid_c) * tl.num_programs(2) + pid_r
            square_ok = (feats < D)[:, None] & (feats < D)[None, :]
            tl.store(grad_a_ptr + program * D * D + feats[:, None] * D + feats[None, :], grad_a, mask=square_ok)
            # The chunk holding t = 0 ends at lambda_0 (A here is the normalised A^T).
            w = tl.sum(v[:, :, None] * A[None, :, :], axis=1)
            grad_init = tl.exp((init_s + s + a_log_scale).to(w.dtype))[:, None] * w
            init_ok = rows < tl.where(chunk == 0, n_rows, 0)
            tl.store(grad_init_ptr + (b * n_rows + rows)[:, None] * D + feats[None, :], grad_init,
                     mask=init_ok[:, None] & (feats < D)[None, :])


def default_chunk_length(seq_len: int) -> int:
    """Steps per chunk: the power of two nearest ``sqrt(seq_len)`` (balancing the parallel
    passes, ``L`` steps each, against the carry over ``T / L`` chunks), within 16..256."""
    return min(MAX_CHUNK, max(MIN_CHUNK, 2 ** round(math.log2(max(seq_len, 1)) / 2)))


def _recurrence(u, A, chunk_len, num_chunks, *, first_chunk=0, reverse=False, transpose=False, u_log_scale=None,
                negate_u_scale=False, a_log_scale=None, start: Optional[ScaledRows] = None,
                carry: Optional[ScaledRows] = None, steps=False, plain_dtype=None, ends=False, gradients_from=None):
    """Launch ``_recurrence_kernel`` over ``num_chunks`` chunks (from ``first_chunk``) of
    ``u [B, T, n, d]`` (see the kernel for the options); returns a dict of the outputs asked
    for: ``steps`` (``ScaledRows`` ``[B, T, n, 1]`` / ``[B, T, n, d]``, or given
    ``plain_dtype`` the tensor ``exp(s) v`` in that dtype),
    ``ends`` (``ScaledRows`` ``[B, num_chunks, n, 1]`` / ``[..., d]``), and with
    ``gradients_from = (forward states, initial state)`` ``grad_a [d, d]`` and ``grad_init [B, n, d]``.
    An initial state (``start``, or the second of ``gradients_from``) with an empty log-scale
    holds plain rows ``[n, d]`` shared by every sequence. States are computed and stored in ``A``'s dtype."""
    batch, seq_len, n, d = u.shape
    state_dtype, device = A.dtype, u.device
    block_r = min(ROWS_PER_PROGRAM, triton.next_power_of_2(n))
    grid = (num_chunks, batch, triton.cdiv(n, block_r))
    out = {}
    empty = u.new_empty(0)
    none = ScaledRows(empty, empty)
    plain = plain_dtype is not None
    step_s = step_v = end_s = end_v = grad_a = grad_init = empty
    if steps:
        step_v = torch.empty(batch, seq_len, n, d, dtype=plain_dtype or state_dtype, device=device)
        step_s = empty if plain else torch.empty(batch, seq_len, n, 1, dtype=state_dtype, device=device)
        out["steps"] = step_v if plain else ScaledRows(step_s, step_v)
    if ends:
        end_s = torch.empty(batch, num_chunks, n, 1, dtype=state_dtype, device=device)
        end_v = torch.empty(batch, num_chunks, n, d, dtype=state_dtype, device=device)
        out["ends"] = ScaledRows(end_s, end_v)
    forward_states, initial = gradients_from if gradients_from is not None else (none, start or none)
    if gradients_from is not None:
        grad_a = torch.empty(grid[0] * grid[1] * grid[2], d, d, dtype=state_dtype, device=device)
        grad_init = out["grad_init"] = torch.empty(batch, n, d, dtype=state_dtype, device=device)
    start, carry = start or none, carry or none
    _recurrence_kernel[grid](
        u, empty if u_log_scale is None else u_log_scale, A, empty if a_log_scale is None else a_log_scale,
        start.log_scale, start.rows, carry.log_scale, carry.rows,
        step_s, step_v, end_s, end_v, *forward_states, *initial, grad_a, grad_init,
        seq_len, n, chunk_len, first_chunk, torch.finfo(state_dtype).tiny,  # constexpr: a float argument would be float32
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_R=block_r, REVERSE=reverse,
        TRANSPOSE_A=transpose,
        HAS_U_SCALE=u_log_scale is not None, NEGATE_U_SCALE=negate_u_scale, HAS_A_SCALE=a_log_scale is not None,
        HAS_START=start.rows.numel() > 0, HAS_CARRY=carry.rows.numel() > 0,
        WRITE_STEPS=steps, PLAIN_STEPS=plain, WRITE_ENDS=ends, GRADIENTS=gradients_from is not None,
        SHARED_INIT=initial.rows.numel() > 0 and initial.log_scale.numel() == 0, num_warps=NUM_WARPS,
    )
    if gradients_from is not None:
        out["grad_a"] = grad_a.sum(0)
    return out


def _power(A: torch.Tensor, exponent: int, transpose: bool = False) -> ScaledRows:
    """``A^exponent`` (or ``(A^T)^exponent``) as a 1-element log-scale and a normalised ``[d, d]`` matrix."""
    d = A.shape[-1]
    log_scale = torch.empty(1, dtype=A.dtype, device=A.device)
    rows = torch.empty(d, d, dtype=A.dtype, device=A.device)
    _power_kernel[(1,)](A, log_scale, rows, exponent, torch.finfo(A.dtype).tiny, D=d,
                        BLOCK=max(16, triton.next_power_of_2(d)), TRANSPOSE=transpose)
    return ScaledRows(log_scale, rows)


def _forward(u, A, initial: ScaledRows, chunk_len: int) -> ScaledRows:
    num_chunks = triton.cdiv(u.shape[1], chunk_len)
    carry = None
    if num_chunks > 1:  # the states entering chunks 1 .. K-1
        local_ends = _recurrence(u, A, chunk_len, num_chunks - 1, ends=True)["ends"]
        power = _power(A, chunk_len)
        carry = _recurrence(local_ends.rows, power.rows, num_chunks - 1, 1, u_log_scale=local_ends.log_scale,
                            a_log_scale=power.log_scale, start=initial, steps=True)["steps"]
    return _recurrence(u, A, chunk_len, num_chunks, start=initial, carry=carry, steps=True)["steps"]


def _backward(grad_rows, A, initial: ScaledRows, states: ScaledRows, chunk_len: int, u_dtype: torch.dtype):
    """The adjoint recurrence with ``A^T``, its inputs ``g_t`` at log-scales ``-s_t`` (``d loss
    / d x_t = g_t exp(-s_t)``): returns ``grad_u``, ``grad_A``, ``grad_init_rows`` (shaped as ``initial.rows``)."""
    num_chunks = triton.cdiv(grad_rows.shape[1], chunk_len)
    adjoint = dict(reverse=True, transpose=True, u_log_scale=states.log_scale, negate_u_scale=True)
    carry = None
    if num_chunks > 1:  # the adjoints entering chunks 0 .. K-2 from the right
        local_ends = _recurrence(grad_rows, A, chunk_len, num_chunks - 1, first_chunk=1, ends=True, **adjoint)["ends"]
        power = _power(A, chunk_len, transpose=True)
        carry = _recurrence(local_ends.rows, power.rows, num_chunks - 1, 1, reverse=True,
                            u_log_scale=local_ends.log_scale, a_log_scale=power.log_scale, steps=True)["steps"]
    out = _recurrence(grad_rows, A, chunk_len, num_chunks, carry=carry, steps=True, plain_dtype=u_dtype,
                      gradients_from=(states, initial), **adjoint)
    shared_init = initial.log_scale.numel() == 0
    return out["steps"], out["grad_a"], out["grad_init"].sum(0) if shared_init else out["grad_init"]


@torch.library.custom_op("goom_ssm::scan", mutates_args=())
def _scan_op(u: torch.Tensor, A: torch.Tensor, init_log_scale: torch.Tensor, init_rows: torch.Tensor,
             chunk_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    states = _forward(u, A, ScaledRows(init_log_scale, init_rows), chunk_len)
    return states.log_scale, states.rows


@_scan_op.register_fake
def _(u, A, init_log_scale, init_rows, chunk_len):
    batch, seq_len, n, d = u.shape
    return (init_rows.new_empty(batch, seq_len, n, 1), init_rows.new_empty(batch, seq_len, n, d))


@torch.library.custom_op("goom_ssm::scan_backward", mutates_args=())
def _scan_backward_op(grad_rows: torch.Tensor, A: torch.Tensor, init_log_scale: torch.Tensor, init_rows: torch.Tensor,
                      log_scale: torch.Tensor, rows: torch.Tensor, chunk_len: int,
                      u_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_rows, A, ScaledRows(init_log_scale, init_rows), ScaledRows(log_scale, rows), chunk_len,
                     u_dtype)


@_scan_backward_op.register_fake
def _(grad_rows, A, init_log_scale, init_rows, log_scale, rows, chunk_len, u_dtype):
    return grad_rows.new_empty(grad_rows.shape, dtype=u_dtype), torch.empty_like(A), torch.empty_like(init_rows)


def scan_forward(u, A, init_log_scale, init_rows, chunk_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward launches (contiguous inputs; ``init_log_scale`` empty for shared plain
    ``init_rows [n, d]``): log-scales ``[B, T, n, 1]`` and rows ``[B, T, n, d]``. Under
    ``torch.compile`` the operator ``goom_ssm::scan`` (kept whole in the graph); in eager mode
    a direct call: an operator's dispatch cost more host time than its kernels (H200, forward
    + backward at tiny sizes: 1.19 ms through the operators, 0.39 ms direct; the 24 layers of
    a training step 72 -> 52 ms)."""
    if torch.compiler.is_compiling():
        return _scan_op(u, A, init_log_scale, init_rows, chunk_len)
    return tuple(_forward(u, A, ScaledRows(init_log_scale, init_rows), chunk_len))


def scan_backward(grad_rows, A, init_log_scale, init_rows, log_scale, rows, chunk_len: int, u_dtype: torch.dtype):
    """The backward launches for :func:`scan_forward`'s outputs ``log_scale, rows`` and the
    gradient of the rows: ``grad_u`` (in ``u_dtype``), ``grad_A``, ``grad_init_rows``."""
    if torch.compiler.is_compiling():
        return _scan_backward_op(grad_rows, A, init_log_scale, init_rows, log_scale, rows, chunk_len, u_dtype)
    return _backward(grad_rows, A, ScaledRows(init_log_scale, init_rows), ScaledRows(log_scale, rows), chunk_len,
                     u_dtype)


class _Scan(torch.autograd.Function):
    """Autograd of :func:`scan_forward` (``torch.compile`` traces this class and keeps the
    operators whole; the operators' own ``register_autograd`` wrapper cost ~0.8 ms of host
    time per layer and training step)."""

    @staticmethod
    def forward(ctx, u, A, init_log_scale, init_rows, chunk_len):
        log_scale, rows = scan_forward(u, A, init_log_scale, init_rows, chunk_len)
        ctx.save_for_backward(A, init_log_scale, init_rows, log_scale, rows)
        ctx.chunk_len, ctx.u_dtype = chunk_len, u.dtype
        ctx.mark_non_differentiable(log_scale)
        ctx.set_materialize_grads(False)
        return log_scale, rows

    @staticmethod
    def backward(ctx, grad_log_scale, grad_rows):
        if grad_rows is None:  # the log-scales are constants: no gradient reaches the inputs
            return None, None, None, None, None
        grad_u, grad_A, grad_init = scan_backward(grad_rows.contiguous(), *ctx.saved_tensors, ctx.chunk_len,
                                                  ctx.u_dtype)
        return grad_u, grad_A, None, grad_init, None


def triton_scan(u: torch.Tensor, A: torch.Tensor, initial: Union[ScaledRows, torch.Tensor],
                chunk_size: Optional[int] = None) -> ScaledRows:
    """States of ``x_t = x_{t-1} A + u_t`` for every ``t`` (Triton kernels; see the module
    docstring). Same arguments and result as :func:`goom_ssm.scan.chunked_scan`: ``u``
    ``[batch, seq_len, n, d]`` in any float dtype (read as is, computed in ``A``'s dtype,
    float32 or float64), ``A [d, d]``, ``initial`` ``[batch, n, 1]`` / ``[batch, n, d]``, or
    a plain ``[n, d]`` tensor: the initial rows of every sequence (a layer's own initial
    state, with no per-call normalising and broadcasting); ``chunk_size`` defaults to
    :func:`default_chunk_length`. Differentiable in ``u``, ``A`` and the initial rows; the
    log-scales are constants, as everywhere in this package."""
    if not HAS_TRITON:
        raise RuntimeError("the 'triton' scan needs the triton package; use scan_implementation='chunked'")
    chunk_len = chunk_size or default_chunk_length(u.shape[1])
    if isinstance(initial, torch.Tensor):  # shared plain rows: an empty log-scale says so to the kernels
        initial = ScaledRows(A.new_empty(0), initial)
    log_scale, rows = _Scan.apply(u.contiguous(), A.contiguous(), initial.log_scale.to(A.dtype).contiguous(),
                                  initial.rows.to(A.dtype).contiguous(), chunk_len)
    return ScaledRows(log_scale, rows)
