"""The GOOM-SSM recurrence as Triton kernels: the fast path on CUDA, forward and backward.

Same inputs and outputs as :func:`goom_ssm.scan.chunked_scan`: the states of
``x_t = x_{t-1} A + u_t``, every row in scaled form (a log-scale ``s`` and a row ``v`` whose
largest magnitude is 1: the numbers of the GOOM ``log x``), so that no magnitude
overflows. One kernel runs the recurrence step by step, ``A`` in registers, a block of
state rows per program. To fill the GPU at any batch size the sequence is cut into chunks
of ``L`` steps (``K`` chunks; ``L`` is :func:`triton_scan`'s ``steps_per_program``: each
program runs the steps of one chunk), evaluated in three stages, each a launch of that
kernel with its ``STAGE``:

1. :func:`_chunk_end_states` (``"chunk_ends"``): every chunk but the last from a zero state,
   in parallel: its end state ``E_k``;
2. :func:`_carry_across_chunks` (``"carry"``): the states entering the chunks,
   ``S_k = S_{k-1} A^L + E_{k-1}`` from the initial state: the same recurrence over
   ``K - 1`` steps, with ``A^L`` (squared up in float64 by a small kernel of its own,
   :func:`_power`) and inputs in scaled form;
3. :func:`_every_step` (``"steps"``): every chunk from its entering state (read in place: the
   initial state or ``S_k``), in parallel, writing every step.

The backward pass is the adjoint recurrence ``lambda_t = lambda_{t+1} A^T + g_t e^{-s_t}``
(``g_t`` the gradient of the output rows, whose scales ``s_t`` are detached as in the
original): the same three stages in reverse time (the kernel's ``ADJOINT``), its inputs in
scaled form too, its carry with the forward's power read transposed (``(A^T)^L = (A^L)^T``).
The third, :func:`_every_adjoint_step`, writes ``du_t = lambda_t``, accumulates
``dA = sum_t x_{t-1}^T lambda_t``, each term's two scales added before exponentiating, so
gradients are right however large the states and however small the adjoints, and ends with
the initial state's gradient ``lambda_0 A^T``. Every step but these launches happens inside
the kernels, because at small batches the host's time per launch, not the GPU's, bounds
training. Only the outputs are saved for the backward pass: memory is ``O(T)``, with no
``O(T log T)`` intermediates.

Packed documents (``resets``, uint8 ``[B, T]``): before a flagged step the state is replaced
by the restart rows (``reset_state``, plain ``[n, d]``, loaded once per program) or dropped;
the carry stage reads a chunk's flags itself, and the adjoint sums ``lambda_t A^T`` over the
flagged steps for the restart rows' gradient, so packing adds no operation on the host.

The forward and the backward (:func:`scan_forward`, :func:`scan_backward`) are joined by
an ``autograd.Function``. Under ``torch.compile`` they are the operators ``goom_ssm::scan``
and ``goom_ssm::scan_backward`` (``torch.compile(fullgraph=True)`` traces them: Inductor
launches their kernels itself); in eager mode they are called directly (an operator's
dispatch costs more host time than its four kernel launches). Without a GPU the kernels run under
Triton's interpreter (``TRITON_INTERPRET=1`` before importing), as the tests do.
"""

import math
from typing import NamedTuple, Optional, Union

import torch

from .constants import NO_STATE_LOG_SCALE
from .scan import ScaledRows
from .triton_common import HAS_TRITON, cdiv, dot_block, next_power_of_2, tl, triton

ROWS_PER_PROGRAM = 8  # state rows advanced together by one program
NUM_WARPS = 1  # one warp per program: its steps are quicker than in four (benchmarks/results/design_notes.md)
MIN_STEPS_PER_PROGRAM, MAX_STEPS_PER_PROGRAM = 16, 256
# The log-scales the stages hand on (chunk ends, carries, A^L, and the states the backward reads)
# stay float64, as in the kernels: a float32 one near s ~ 1660 is rounded by up to 6e-5, and the
# carry chain and the adjoint (whose inputs are scaled by the states' log-scales) add such roundings.
INTERMEDIATE_SCALE_DTYPE = torch.float64


if HAS_TRITON:
    from .triton_common import advance, load_matrix, normalized

    _NO_STATE = tl.constexpr(NO_STATE_LOG_SCALE)

    @triton.jit(do_not_specialize=["exponent"])
    def _power_kernel(a_ptr, out_s_ptr, out_v_ptr, exponent, tiny: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        """``exp(out_s) out_v = A^exponent``, ``A [D, D]``, by repeated squaring in float64 (the
        carry across chunks multiplies by it many times), every product normalised (so no power
        overflows)."""
        feats = tl.arange(0, BLOCK)
        ok = (feats < D)[:, None] & (feats < D)[None, :]
        base, base_s = normalized(load_matrix(a_ptr, feats, D, False).to(tl.float64), tiny)
        result = tl.where(ok & (feats[:, None] == feats[None, :]), 1.0, 0.0).to(base.dtype)
        result_s = tl.zeros_like(base_s)
        e = exponent
        while e > 0:
            if e % 2 == 1:
                result, s = normalized(tl.dot(result, base), tiny)
                result_s += base_s + s
            e = e // 2
            if e > 0:
                base, s = normalized(tl.dot(base, base), tiny)
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
    def _is_reset(reset_ptr, b, t, seq_len, flag_len, shift, SPAN: tl.constexpr, SPAN_BLOCK: tl.constexpr):
        """Whether step ``t < seq_len`` of sequence ``b`` drops the state before it (False past
        the end). The flags ``reset [B, flag_len]``: one per step (``SPAN`` 0), or, for the
        carry across chunks, ``SPAN`` per step: step ``t`` (chunk ``t``) is flagged when one
        of the flags ``t * SPAN + shift ...`` (within ``flag_len``) is set (``SPAN_BLOCK``:
        the power of two at or above ``SPAN``)."""
        if SPAN == 0:
            return tl.load(reset_ptr + b * flag_len + t, mask=t < seq_len, other=0) != 0
        offset = tl.arange(0, SPAN_BLOCK)
        index = t * SPAN + shift + offset
        limit = tl.where(t < seq_len, flag_len, 0)
        flags = tl.load(reset_ptr + b * flag_len + index, mask=(offset < SPAN) & (index < limit), other=0)
        return tl.max(flags, axis=0) != 0

    @triton.jit
    def _load_resets(reset_ptr, b, t, seq_len, flag_len, shift, REVERSE: tl.constexpr, SPAN: tl.constexpr,
                     SPAN_BLOCK: tl.constexpr):
        """The flags step ``t`` reads: whether to drop the state (forward) or adjoint (``REVERSE``:
        when step ``t + 1`` resets) before it, and whether step ``t`` itself resets."""
        own = _is_reset(reset_ptr, b, t, seq_len, flag_len, shift, SPAN, SPAN_BLOCK)
        if REVERSE:
            return _is_reset(reset_ptr, b, t + 1, seq_len, flag_len, shift, SPAN, SPAN_BLOCK), own
        return own, own

    @triton.jit
    def _recurrence_kernel(
        u_ptr, u_scale_ptr, a_ptr, a_scale_ptr, start_s_ptr, start_v_ptr, carry_s_ptr, carry_v_ptr,
        out_s_ptr, out_v_ptr, fwd_s_ptr, fwd_v_ptr, init_s_ptr, init_v_ptr, grad_a_ptr, grad_init_ptr, reset_ptr,
        restart_ptr, grad_restart_ptr, seq_len, n, chunk_len, first_chunk, flag_len, flag_shift, tiny: tl.constexpr,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
        STAGE: tl.constexpr, ADJOINT: tl.constexpr, HAS_CARRY: tl.constexpr, SHARED_INIT: tl.constexpr,
        HAS_RESETS: tl.constexpr, HAS_RESTART: tl.constexpr, FLAG_SPAN: tl.constexpr, FLAG_BLOCK: tl.constexpr,
    ):
        """Program (c, b, r): chunk ``first_chunk + c`` of sequence ``b``, state rows
        ``r * BLOCK_R ...``, of one stage (see the module docstring). Contiguous layouts:
        ``u [B, T, n, D]`` (any float dtype) and its log-scales ``[B, T, n]``; ``A [D, D]``
        (normalised here, times ``exp(a_scale)``; states are computed in its dtype); the
        initial state, as ``start`` in the forward stages and as ``init`` in the adjoint steps,
        ``[B, n]`` / ``[B, n, D]`` (``SHARED_INIT``: no log-scales, plain rows ``[n, D]`` for
        every sequence).

        ``STAGE``: ``"chunk_ends"`` runs each chunk from a zero state and writes its end to
        ``out`` ``[B, C, n]`` / ``[B, C, n, D]`` (C = launched chunks); ``"carry"`` runs one
        chunk, its inputs in scaled form (the chunk ends, ``u_scale``) and ``A`` the power
        ``A^L`` (``a_scale``); ``"steps"`` runs each chunk from the state entering it: for the
        first chunk in the direction of travel the initial state, for the others the
        ``carry`` (``[B, K - 1, n]`` / ``[..., D]``, the K - 1 other chunks in time order, with
        ``HAS_CARRY``). The last two write every step to ``out`` ``[B, T, n]`` / ``[B, T, n, D]``.

        ``ADJOINT`` (the backward pass): in reverse time, nothing entering the first chunk in
        that direction (the last in time); ``A`` is read transposed (in the carry, the forward's
        power ``A^L``: its transpose is ``(A^T)^L``), and except in the carry the inputs'
        log-scales ``u_scale`` (the forward states' ``s_t``) are negated. Its ``"steps"`` stage
        writes ``exp(s) v`` only, sums ``x_{t-1}^T lambda_t`` over this program's steps into
        ``grad_a [programs, D, D]`` (``x`` from the forward states ``fwd`` and the initial
        state), and writes ``grad_init = exp(init_s) lambda_0 A^T [B, n, D]``.

        ``HAS_RESETS``: ``reset [B, flag_len]`` (uint8) marks the steps before which the forward
        state is dropped (the carry reads them a chunk of ``FLAG_SPAN`` at a time, from
        ``flag_shift``: see :func:`_is_reset`). Forward, the state is dropped before a flagged
        step, or with ``HAS_RESTART`` replaced by the plain rows ``restart [n, D]``; in the
        adjoint, dropped before step ``t`` when step ``t + 1`` is flagged (``x_t`` does not
        reach it). A flagged step's ``grad_a`` term has ``x_{t-1}`` the restart rows (none
        without), a flag at ``t = 0`` makes ``grad_init`` zero, and with ``HAS_RESTART`` the
        adjoint steps write ``grad_restart [C, B, n, D]``: this program's ``sum lambda_t A^T``
        over its flagged steps."""
        REVERSE: tl.constexpr = ADJOINT
        TRANSPOSE_A: tl.constexpr = ADJOINT
        NEGATE_U_SCALE: tl.constexpr = ADJOINT and STAGE != "carry"
        HAS_U_SCALE: tl.constexpr = ADJOINT or STAGE == "carry"
        HAS_A_SCALE: tl.constexpr = STAGE == "carry"
        HAS_START: tl.constexpr = not ADJOINT and STAGE != "chunk_ends"
        WRITE_ENDS: tl.constexpr = STAGE == "chunk_ends"
        WRITE_STEPS: tl.constexpr = STAGE != "chunk_ends"
        GRADIENTS: tl.constexpr = ADJOINT and STAGE == "steps"

        pid_c, b, pid_r = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        chunk = first_chunk + pid_c
        num_chunks = tl.cdiv(seq_len, chunk_len)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        feats = tl.arange(0, BLOCK_D)
        row_ok = rows < n
        ok = row_ok[:, None] & (feats < D)[None, :]
        A, a_log_scale = normalized(load_matrix(a_ptr, feats, D, TRANSPOSE_A), tiny)
        if HAS_A_SCALE:
            a_log_scale += tl.load(a_scale_ptr).to(tl.float64)

        s = tl.full([BLOCK_R], _NO_STATE, tl.float64)
        v = tl.zeros([BLOCK_R, BLOCK_D], A.dtype)
        start_chunk = num_chunks - 1 if REVERSE else 0
        init = rows if SHARED_INIT else b * n + rows
        if HAS_START:
            start_ok = rows < tl.where(chunk == start_chunk, n, 0)
            s = tl.where(start_ok, _load_init_scale(start_s_ptr, init, start_ok, SHARED_INIT), s)
            v = tl.where(start_ok[:, None], tl.load(start_v_ptr + init[:, None] * D + feats[None, :],
                                                    mask=start_ok[:, None] & ok, other=0.0), v)
        if HAS_CARRY:
            carry = (b * (num_chunks - 1) + chunk - (0 if REVERSE else 1)) * n + rows
            carry_ok = rows < tl.where(chunk == start_chunk, 0, n)
            s = tl.where(carry_ok, tl.load(carry_s_ptr + carry, mask=carry_ok, other=0.0).to(tl.float64), s)
            v = tl.where(carry_ok[:, None], tl.load(carry_v_ptr + carry[:, None] * D + feats[None, :],
                                                    mask=carry_ok[:, None] & ok, other=0.0), v)
        if GRADIENTS:
            init_s = _load_init_scale(init_s_ptr, init, row_ok, SHARED_INIT)
            init_v = tl.load(init_v_ptr + init[:, None] * D + feats[None, :], mask=ok, other=0.0)
            grad_a = tl.zeros([BLOCK_D, BLOCK_D], A.dtype)
            if HAS_RESTART:
                grad_restart = tl.zeros([BLOCK_R, BLOCK_D], A.dtype)
        if HAS_RESTART:  # the rows a flagged step restarts from (plain, shared by the sequences)
            restart_v = tl.load(restart_ptr + rows[:, None] * D + feats[None, :], mask=ok, other=0.0).to(A.dtype)

        n_steps = tl.minimum(chunk_len, seq_len - chunk * chunk_len)
        first_t = chunk * chunk_len + (n_steps - 1 if REVERSE else 0)
        direction = -1 if REVERSE else 1
        # The input (and reset flags) of step t + 1 are loaded while step t computes (the loads'
        # latency would otherwise be most of a step's time).
        u_next, u_scale_next = _load_input(u_ptr, u_scale_ptr, (b * seq_len + first_t) * n + rows, feats,
                                           row_ok, ok, A.dtype, D, HAS_U_SCALE, NEGATE_U_SCALE)
        if HAS_RESETS:
            drop_next, own_next = _load_resets(reset_ptr, b, first_t, seq_len, flag_len, flag_shift, REVERSE, FLAG_SPAN,
                                                FLAG_BLOCK)
        for i in range(0, n_steps):
            t = first_t + direction * i
            step = (b * seq_len + t) * n + rows
            u, u_log_scale = u_next, u_scale_next
            t_next = tl.minimum(tl.maximum(t + direction, chunk * chunk_len), chunk * chunk_len + n_steps - 1)
            u_next, u_scale_next = _load_input(u_ptr, u_scale_ptr, (b * seq_len + t_next) * n + rows, feats,
                                               row_ok, ok, A.dtype, D, HAS_U_SCALE, NEGATE_U_SCALE)
            if HAS_RESETS:
                drop, own_reset = drop_next, own_next
                drop_next, own_next = _load_resets(reset_ptr, b, t_next, seq_len, flag_len, flag_shift, REVERSE,
                                                   FLAG_SPAN, FLAG_BLOCK)
            if GRADIENTS:
                prev = (b * seq_len + tl.maximum(t - 1, 0)) * n + rows
                x_s = tl.load(fwd_s_ptr + prev, mask=row_ok, other=0.0).to(tl.float64)
                x_v = tl.load(fwd_v_ptr + prev[:, None] * D + feats[None, :], mask=ok, other=0.0)
            if HAS_RESETS:
                if HAS_RESTART and not ADJOINT:
                    s = tl.where(drop, 0.0, s)
                    v = tl.where(drop, restart_v, v)
                else:
                    s = tl.where(drop, _NO_STATE, s)
                    v = tl.where(drop, 0.0, v)
            s, v = advance(s, v, u, u_log_scale, A, a_log_scale, tiny)
            if WRITE_STEPS:
                if GRADIENTS:  # the adjoint's steps are the gradient of u: plain rows in u's dtype
                    plain = tl.where(v == 0, 0.0, v * tl.exp(s.to(v.dtype))[:, None])
                    tl.store(out_v_ptr + step[:, None] * D + feats[None, :], plain, mask=ok)
                else:
                    tl.store(out_s_ptr + step, s.to(out_s_ptr.dtype.element_ty), mask=row_ok)
                    tl.store(out_v_ptr + step[:, None] * D + feats[None, :], v, mask=ok)
            if GRADIENTS:
                x_s = tl.where(t == 0, init_s, x_s)
                x_v = tl.where(t == 0, init_v, x_v)
                if HAS_RESTART:  # a reset step's x_{t-1} is the restart rows, and they get lambda_t A^T
                    x_s = tl.where(own_reset, 0.0, x_s)
                    x_v = tl.where(own_reset, restart_v, x_v)
                    grad_restart += tl.where(own_reset, plain, 0.0)
                elif HAS_RESETS:  # a reset step has no x_{t-1} A term
                    x_v = tl.where(own_reset, 0.0, x_v)
                x_v = x_v * tl.exp((x_s + s).to(x_v.dtype))[:, None]  # both scales at once: finite whenever the term is
                grad_a += tl.sum(x_v[:, :, None] * v[:, None, :], axis=0)

        if WRITE_ENDS:
            end = (b * tl.num_programs(0) + pid_c) * n + rows
            tl.store(out_s_ptr + end, s.to(out_s_ptr.dtype.element_ty), mask=row_ok)
            tl.store(out_v_ptr + end[:, None] * D + feats[None, :], v, mask=ok)
        if GRADIENTS:
            program = (b * tl.num_programs(0) + pid_c) * tl.num_programs(2) + pid_r
            square_ok = (feats < D)[:, None] & (feats < D)[None, :]
            tl.store(grad_a_ptr + program * D * D + feats[:, None] * D + feats[None, :], grad_a, mask=square_ok)
            # The chunk holding t = 0 ends at lambda_0 (A here is the normalised A^T).
            w = tl.sum(v[:, :, None] * A[None, :, :], axis=1)
            grad_init = tl.exp((init_s + s + a_log_scale).to(w.dtype))[:, None] * w
            if HAS_RESETS:
                grad_init = tl.where(_is_reset(reset_ptr, b, 0, seq_len, flag_len, 0, 0, 1), 0.0, grad_init)
            init_ok = rows < tl.where(chunk == 0, n, 0)
            tl.store(grad_init_ptr + (b * n + rows)[:, None] * D + feats[None, :], grad_init,
                     mask=init_ok[:, None] & (feats < D)[None, :])
            if HAS_RESTART:
                w = tl.sum(grad_restart[:, :, None] * A[None, :, :], axis=1) * tl.exp(a_log_scale.to(A.dtype))
                out = (pid_c * tl.num_programs(1) + b) * n + rows
                tl.store(grad_restart_ptr + out[:, None] * D + feats[None, :], w, mask=ok)


def default_steps_per_program(seq_len: int) -> int:
    """Steps per program, the chunk length ``L``: the power of two nearest ``sqrt(seq_len)``
    (balancing the parallel stages, ``L`` steps each, against the carry over ``T / L``
    chunks), within 16..256."""
    return min(MAX_STEPS_PER_PROGRAM, max(MIN_STEPS_PER_PROGRAM, 2 ** round(math.log2(max(seq_len, 1)) / 2)))


class AdjointSteps(NamedTuple):
    """What the backward pass's last stage gives (:func:`_every_adjoint_step`)."""

    grad_u: torch.Tensor  # [B, T, n, d], in u's dtype
    grad_A: torch.Tensor  # [d, d]
    grad_init: torch.Tensor  # [B, n, d], per sequence
    grad_restart: torch.Tensor  # [n, d], or empty without restart rows


def _launch(stage: str, u, A, chunk_len: int, num_chunks: int, out: ScaledRows, *, adjoint: bool = False,
            first_chunk: int = 0, u_log_scale=None, a_log_scale=None, start: Optional[ScaledRows] = None,
            carry: Optional[ScaledRows] = None, forward_states: Optional[ScaledRows] = None,
            init: Optional[ScaledRows] = None, grad_a=None, grad_init=None, resets=None, flag_span: int = 0,
            flag_shift: int = 0, restart=None, grad_restart=None, wrap=None):
    """Launch ``_recurrence_kernel`` for ``stage`` over ``num_chunks`` chunks (from ``first_chunk``)
    of ``u [B, T, n, d]``, writing into ``out`` (see the kernel for the arguments); a tensor not
    given, or ``resets`` or ``restart`` with no elements, is passed empty. An initial state
    (``start`` or ``init``) with an empty log-scale holds plain rows ``[n, d]`` shared by every
    sequence. ``flag_span``: 0 for one reset flag per step of ``u``; for the carry, the chunk
    length (``resets`` are then the steps' flags, read a chunk at a time from ``flag_shift``).
    ``wrap``: None to launch the kernel directly; ``torch.library.wrap_triton`` inside the
    Triton operators (compiled kernels), for ``torch.compile`` to trace the launch."""
    _, seq_len, n, d = u.shape
    empty = u.new_empty(0)
    none = ScaledRows(empty, empty)
    initial = start or init or none
    start, carry, forward_states, init = start or none, carry or none, forward_states or none, init or none
    resets = empty if resets is None else resets
    restart = empty if restart is None else restart
    (wrap(_recurrence_kernel) if wrap else _recurrence_kernel)[_grid(u, num_chunks)](
        u, empty if u_log_scale is None else u_log_scale, A, empty if a_log_scale is None else a_log_scale,
        *start, *carry, *out, *forward_states, *init, empty if grad_a is None else grad_a,
        empty if grad_init is None else grad_init, resets, restart, empty if grad_restart is None else grad_restart,
        seq_len, n, chunk_len, first_chunk, resets.shape[-1] if resets.numel() else seq_len, flag_shift,
        torch.finfo(A.dtype).tiny,  # constexpr: a float argument would be float32
        D=d, BLOCK_D=next_power_of_2(d), BLOCK_R=_rows_per_program(n), STAGE=stage, ADJOINT=adjoint,
        HAS_CARRY=carry.rows.numel() > 0,
        SHARED_INIT=initial.rows.numel() > 0 and initial.log_scale.numel() == 0,
        HAS_RESETS=resets.numel() > 0, HAS_RESTART=resets.numel() > 0 and restart.numel() > 0,
        FLAG_SPAN=flag_span, FLAG_BLOCK=next_power_of_2(max(flag_span, 1)), num_warps=NUM_WARPS,
    )


def _rows_per_program(n: int) -> int:
    return min(ROWS_PER_PROGRAM, next_power_of_2(n))


def _grid(u, num_chunks: int) -> tuple:
    """Programs (chunks, sequences, blocks of state rows) for ``num_chunks`` chunks of ``u [B, T, n, d]``."""
    batch, _, n, _ = u.shape
    return num_chunks, batch, cdiv(n, _rows_per_program(n))


def _empty_states(like, steps: int, dtype, scale_dtype=None) -> ScaledRows:
    """Uninitialised states ``[B, steps, n, 1]`` / ``[B, steps, n, d]`` for inputs ``like [B, T, n, d]``,
    rows in ``dtype``, log-scales in ``scale_dtype`` (default ``dtype``)."""
    batch, _, n, d = like.shape
    return ScaledRows(torch.empty(batch, steps, n, 1, dtype=scale_dtype or dtype, device=like.device),
                      torch.empty(batch, steps, n, d, dtype=dtype, device=like.device))


def _chunk_end_states(u, A, chunk_len: int, resets, restart, adjoint_scales=None, wrap=None) -> ScaledRows:
    """Stage 1: the end state of every chunk but the last in the direction of travel, each
    from a zero state (a reset in it restarting from ``restart``, forward): ``[B, K - 1, n, 1]``
    / ``[B, K - 1, n, d]``. Forward: chunks ``0 .. K-2`` of ``u`` with ``A``. Adjoint
    (``adjoint_scales``: the forward states' log-scales ``s_t``; the inputs ``u`` are then
    ``g_t`` at ``-s_t``): chunks ``K-1 .. 1`` in reverse time with ``A^T``."""
    num_chunks = cdiv(u.shape[1], chunk_len) - 1
    ends = _empty_states(u, num_chunks, A.dtype, INTERMEDIATE_SCALE_DTYPE)
    adjoint = adjoint_scales is not None
    _launch("chunk_ends", u, A, chunk_len, num_chunks, ends, adjoint=adjoint, first_chunk=1 if adjoint else 0,
            u_log_scale=adjoint_scales, resets=resets, restart=None if adjoint else restart, wrap=wrap)
    return ends


def _carry_across_chunks(ends: ScaledRows, power: ScaledRows, resets, chunk_len: int,
                         initial: Optional[ScaledRows] = None, wrap=None) -> ScaledRows:
    """Stage 2: the states entering the chunks, ``S_k = S_{k-1} P + E_{k-1}``: the recurrence
    over the ``K - 1`` chunk ends ``E`` (as stage 1 gives them), with ``P = A^L`` from
    ``initial`` (forward: the states entering chunks ``1 .. K-1``), or with ``P = (A^T)^L``
    from zero in reverse time (``initial`` None, the adjoint: entering chunks ``K-2 .. 0``).
    ``power``: ``A^L`` as :func:`_power` gives it, in both directions (the adjoint reads it
    transposed). A chunk holding a reset (``resets [B, T]``,
    the steps' flags; in the adjoint, a reset at one of its steps' next steps) drops the
    state entering it: its end is all there is. Returns ``[B, K - 1, n, 1]`` / ``[..., d]`` in
    time order."""
    steps = ends.rows.shape[1]
    carry = _empty_states(ends.rows, steps, power.rows.dtype, INTERMEDIATE_SCALE_DTYPE)
    adjoint = initial is None
    _launch("carry", ends.rows, power.rows, steps, 1, carry, adjoint=adjoint, u_log_scale=ends.log_scale,
            a_log_scale=power.log_scale, start=initial, resets=resets,
            flag_span=chunk_len if resets.numel() else 0,  # no kernel of its own per chunk length without resets
            flag_shift=1 if adjoint else 0, wrap=wrap)
    return carry


def _every_step(u, A, chunk_len: int, initial: ScaledRows, carry: Optional[ScaledRows], resets,
                restart, wrap=None) -> ScaledRows:
    """Stage 3: every chunk of ``u`` from the state entering it (``initial`` for the first,
    ``carry`` from stage 2 for the others, None when there is one chunk): the states
    ``[B, T, n, 1]`` (float64, as the kernel holds them: the backward reads them) / ``[B, T, n, d]``."""
    states = _empty_states(u, u.shape[1], A.dtype, INTERMEDIATE_SCALE_DTYPE)
    _launch("steps", u, A, chunk_len, cdiv(u.shape[1], chunk_len), states, start=initial, carry=carry,
            resets=resets, restart=restart, wrap=wrap)
    return states


def _every_adjoint_step(grad_rows, A, chunk_len: int, initial: ScaledRows, states: ScaledRows,
                        carry: Optional[ScaledRows], u_dtype: torch.dtype, resets, restart, wrap=None) -> AdjointSteps:
    """Stage 3 of the backward pass: every chunk of the adjoint recurrence, inputs ``g_t =
    grad_rows`` at log-scales ``-s_t`` of the forward ``states``, from the adjoint entering it
    (``carry``; zero for the last chunk): the gradients of ``u`` (in ``u_dtype``), of ``A``,
    of the initial rows (per sequence) and of the ``restart`` rows."""
    batch, seq_len, n, d = grad_rows.shape
    num_chunks = cdiv(seq_len, chunk_len)
    grad_u = torch.empty(batch, seq_len, n, d, dtype=u_dtype, device=grad_rows.device)
    grad_a = torch.empty(math.prod(_grid(grad_rows, num_chunks)), d, d, dtype=A.dtype, device=grad_rows.device)
    grad_init = torch.empty(batch, n, d, dtype=A.dtype, device=grad_rows.device)
    restarts = resets.numel() > 0 and restart.numel() > 0
    grad_restart = torch.empty(num_chunks * batch if restarts else 0, n, d, dtype=A.dtype, device=grad_rows.device)
    _launch("steps", grad_rows, A, chunk_len, num_chunks, ScaledRows(grad_rows.new_empty(0), grad_u), adjoint=True,
            u_log_scale=states.log_scale, carry=carry, forward_states=states, init=initial, grad_a=grad_a,
            grad_init=grad_init, resets=resets, restart=restart, grad_restart=grad_restart, wrap=wrap)
    return AdjointSteps(grad_u, grad_a.sum(0), grad_init, grad_restart.sum(0) if restarts else A.new_empty(0))


def _power(A: torch.Tensor, exponent: int, wrap=None) -> ScaledRows:
    """``A^exponent`` as a 1-element log-scale and a normalised ``[d, d]`` matrix."""
    d = A.shape[-1]
    log_scale = torch.empty(1, dtype=INTERMEDIATE_SCALE_DTYPE, device=A.device)
    rows = torch.empty(d, d, dtype=A.dtype, device=A.device)
    (wrap(_power_kernel) if wrap else _power_kernel)[(1,)](
        A, log_scale, rows, exponent, torch.finfo(A.dtype).tiny, D=d, BLOCK=dot_block(d))
    return ScaledRows(log_scale, rows)


def _carried(seq_len: int, chunk_len: int) -> bool:
    """Whether ``seq_len`` steps make more than one chunk of ``chunk_len``: a carry across chunks, with ``A^L``."""
    return cdiv(seq_len, chunk_len) > 1


def _forward(u, A, initial: ScaledRows, chunk_len: int, resets, restart, wrap=None) -> tuple[ScaledRows, ScaledRows]:
    """The forward stages; ``resets [B, T]`` uint8, or empty for none; ``restart [n, d]``: the
    rows a reset restarts from, or empty for none; ``wrap`` as for :func:`_launch`. Returns
    the states and the power ``A^L`` that the carry used, which the backward's carry reads
    (both tensors empty where the sequence is one chunk: no carry)."""
    if _carried(u.shape[1], chunk_len):
        ends = _chunk_end_states(u, A, chunk_len, resets, restart, wrap=wrap)
        power = _power(A, chunk_len, wrap=wrap)
        carry = _carry_across_chunks(ends, power, resets, chunk_len, initial, wrap=wrap)
    else:
        carry, power = None, ScaledRows(A.new_empty(0, dtype=INTERMEDIATE_SCALE_DTYPE), A.new_empty(0))
    return _every_step(u, A, chunk_len, initial, carry, resets, restart, wrap=wrap), power


def _backward(grad_rows, A, initial: ScaledRows, states: ScaledRows, power: ScaledRows, chunk_len: int,
              u_dtype: torch.dtype, resets, restart, wrap=None):
    """The adjoint recurrence with ``A^T``, its inputs ``g_t`` at log-scales ``-s_t`` (``d loss
    / d x_t = g_t exp(-s_t)``), for the forward's ``states`` and ``power`` (as :func:`_forward`
    gives them): returns ``grad_u``, ``grad_A``, ``grad_init_rows`` (shaped as
    ``initial.rows``) and ``grad_restart`` (shaped as ``restart``); ``wrap`` as for :func:`_launch`."""
    carry = None
    if _carried(grad_rows.shape[1], chunk_len):
        ends = _chunk_end_states(grad_rows, A, chunk_len, resets, restart, adjoint_scales=states.log_scale, wrap=wrap)
        carry = _carry_across_chunks(ends, power, resets, chunk_len, wrap=wrap)
    grad_u, grad_A, grad_init, grad_restart = _every_adjoint_step(grad_rows, A, chunk_len, initial, states, carry,
                                                                  u_dtype, resets, restart, wrap=wrap)
    shared_init = initial.log_scale.numel() == 0
    return grad_u, grad_A, grad_init.sum(0) if shared_init else grad_init, grad_restart


# Compiled kernels are traced into the operators (``torch.library.triton_op``, each launch
# through ``wrap_triton``): Inductor then launches them from its own code, with no operator
# dispatch per call. Kernels under Triton's interpreter cannot be traced: there the operators
# are opaque (``custom_op``), with fake kernels of their own (``_WRAP`` is then None).
_define_op, _WRAP = ((torch.library.triton_op, torch.library.wrap_triton)
                     if HAS_TRITON and isinstance(_recurrence_kernel, triton.runtime.JITFunction)
                     else (torch.library.custom_op, None))


@_define_op("goom_ssm::scan", mutates_args=())
def _scan_op(u: torch.Tensor, A: torch.Tensor, init_log_scale: torch.Tensor, init_rows: torch.Tensor,
             chunk_len: int, resets: torch.Tensor, restart: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    states, power = _forward(u, A, ScaledRows(init_log_scale, init_rows), chunk_len, resets, restart, wrap=_WRAP)
    return *states, *power


@_define_op("goom_ssm::scan_backward", mutates_args=())
def _scan_backward_op(grad_rows: torch.Tensor, A: torch.Tensor, init_log_scale: torch.Tensor, init_rows: torch.Tensor,
                      log_scale: torch.Tensor, rows: torch.Tensor, power_log_scale: torch.Tensor,
                      power_rows: torch.Tensor, chunk_len: int, u_dtype: torch.dtype, resets: torch.Tensor,
                      restart: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_rows, A, ScaledRows(init_log_scale, init_rows), ScaledRows(log_scale, rows),
                     ScaledRows(power_log_scale, power_rows), chunk_len, u_dtype, resets, restart, wrap=_WRAP)


if _WRAP is None:  # a triton_op's fake kernel is its own body, traced

    @_scan_op.register_fake
    def _(u, A, init_log_scale, init_rows, chunk_len, resets, restart):
        batch, seq_len, n, d = u.shape
        carried = _carried(seq_len, chunk_len)  # a power only with a carry
        return (init_rows.new_empty(batch, seq_len, n, 1, dtype=INTERMEDIATE_SCALE_DTYPE),
                init_rows.new_empty(batch, seq_len, n, d),
                A.new_empty(1 if carried else 0, dtype=INTERMEDIATE_SCALE_DTYPE),
                A.new_empty((d, d) if carried else (0,)))

    @_scan_backward_op.register_fake
    def _(grad_rows, A, init_log_scale, init_rows, log_scale, rows, power_log_scale, power_rows, chunk_len, u_dtype,
          resets, restart):
        return (grad_rows.new_empty(grad_rows.shape, dtype=u_dtype), torch.empty_like(A), torch.empty_like(init_rows),
                torch.empty_like(restart) if resets.numel() and restart.numel() else restart.new_empty(0))


def scan_forward(u, A, init_log_scale, init_rows, chunk_len: int, resets, restart) -> tuple[torch.Tensor, ...]:
    """The forward launches (contiguous inputs; ``init_log_scale`` empty for shared plain
    ``init_rows [n, d]``; ``resets [B, T]`` uint8, empty for none; ``restart [n, d]``, the plain
    rows a reset restarts from, empty for none): log-scales ``[B, T, n, 1]`` (float64) and rows
    ``[B, T, n, d]``, and the power ``A^L`` for :func:`scan_backward` (log-scale ``[1]``,
    float64, and rows ``[d, d]``; both empty for one chunk). Under ``torch.compile`` the
    operator ``goom_ssm::scan`` (traced: its kernels launched from the compiled code); in eager
    mode a direct call: an operator's dispatch costs more host time than its kernels (timings:
    ``benchmarks/results/design_notes.md``)."""
    if torch.compiler.is_compiling():
        return _scan_op(u, A, init_log_scale, init_rows, chunk_len, resets, restart)
    states, power = _forward(u, A, ScaledRows(init_log_scale, init_rows), chunk_len, resets, restart)
    return *states, *power


def scan_backward(grad_rows, A, init_log_scale, init_rows, log_scale, rows, power_log_scale, power_rows,
                  chunk_len: int, u_dtype: torch.dtype, resets, restart):
    """The backward launches for :func:`scan_forward`'s outputs ``log_scale, rows, power_log_scale,
    power_rows`` and the gradient of the rows: ``grad_u`` (in ``u_dtype``), ``grad_A``,
    ``grad_init_rows``, ``grad_restart`` (empty without resets or restart rows)."""
    if torch.compiler.is_compiling():
        return _scan_backward_op(grad_rows, A, init_log_scale, init_rows, log_scale, rows, power_log_scale, power_rows,
                                 chunk_len, u_dtype, resets, restart)
    return _backward(grad_rows, A, ScaledRows(init_log_scale, init_rows), ScaledRows(log_scale, rows),
                     ScaledRows(power_log_scale, power_rows), chunk_len, u_dtype, resets, restart)


def kernel_resets(resets: Optional[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """``resets [B, T]`` (bool, or None) as the kernels read them: contiguous uint8, empty for none."""
    if resets is None:
        return u.new_empty(0, dtype=torch.uint8)
    return resets.contiguous().view(torch.uint8)


def kernel_restart(restart: Optional[torch.Tensor], A: torch.Tensor) -> torch.Tensor:
    """``restart [n, d]`` (the rows a reset restarts from, or None) as the kernels read them:
    contiguous, in ``A``'s dtype, empty for none."""
    if restart is None:
        return A.new_empty(0)
    return restart.to(A.dtype).contiguous()


class _Scan(torch.autograd.Function):
    """Autograd of :func:`scan_forward` (``torch.compile`` traces this class and keeps the
    operators whole; the operators' own ``register_autograd`` wrapper costs more host time:
    ``benchmarks/results/design_notes.md``)."""

    @staticmethod
    def forward(ctx, u, A, init_log_scale, init_rows, chunk_len, resets, restart):
        log_scale, rows, *power = scan_forward(u, A, init_log_scale, init_rows, chunk_len, resets, restart)
        ctx.save_for_backward(A, init_log_scale, init_rows, log_scale, rows, *power, resets, restart)
        ctx.chunk_len, ctx.u_dtype = chunk_len, u.dtype
        log_scale = log_scale.to(A.dtype)  # the states' dtype; the backward keeps the float64 ones
        ctx.mark_non_differentiable(log_scale)
        ctx.set_materialize_grads(False)
        return log_scale, rows

    @staticmethod
    def backward(ctx, grad_log_scale, grad_rows):
        if grad_rows is None:  # the log-scales are constants: no gradient reaches the inputs
            return None, None, None, None, None, None, None
        A, init_log_scale, init_rows, log_scale, rows, power_log_scale, power_rows, resets, restart = ctx.saved_tensors
        grad_u, grad_A, grad_init, grad_restart = scan_backward(grad_rows.contiguous(), A, init_log_scale, init_rows,
                                                                log_scale, rows, power_log_scale, power_rows,
                                                                ctx.chunk_len, ctx.u_dtype, resets, restart)
        return grad_u, grad_A, None, grad_init, None, None, grad_restart if grad_restart.numel() else None


def triton_scan(u: torch.Tensor, A: torch.Tensor, initial: Union[ScaledRows, torch.Tensor], *,
                resets: Optional[torch.Tensor] = None, reset_state: Optional[torch.Tensor] = None,
                steps_per_program: Optional[int] = None) -> ScaledRows:
    """States of ``x_t = x_{t-1} A + u_t`` for every ``t`` (Triton kernels; see the module
    docstring). The arguments and result of every scan (:func:`goom_ssm.scan.chunked_scan`):
    ``u [batch, seq_len, n, d]`` in any float dtype (read as is, computed in ``A``'s dtype,
    float32 or float64), ``A [d, d]``, ``initial`` ``[batch, n, 1]`` / ``[batch, n, d]``, or
    a plain ``[n, d]`` tensor of rows shared by every sequence (a layer's own initial state,
    taken with no per-call normalising and broadcasting), ``resets [batch, seq_len]`` (bool) or
    None, ``reset_state [n, d]`` (plain rows a reset restarts from) or None. Differentiable in
    ``u``, ``A``, the initial rows and ``reset_state``; the log-scales are constants, as
    everywhere in this package.

    The option of this scan, ``steps_per_program``: the steps each program runs one after
    another, the chunk length ``L`` (default :func:`default_steps_per_program`, from the
    length; a model's ``scan_chunk_size``, the chunked scan's, does not set it)."""
    if not HAS_TRITON:
        raise RuntimeError("the 'triton' scan needs the triton package; use scan_implementation='chunked'")
    chunk_len = steps_per_program or default_steps_per_program(u.shape[1])
    if isinstance(initial, torch.Tensor):  # shared plain rows: an empty log-scale says so to the kernels
        initial = ScaledRows(A.new_empty(0), initial)
    log_scale, rows = _Scan.apply(u.contiguous(), A.contiguous(), initial.log_scale.to(A.dtype).contiguous(),
                                  initial.rows.to(A.dtype).contiguous(), chunk_len, kernel_resets(resets, u),
                                  kernel_restart(reset_state, A))
    return ScaledRows(log_scale, rows)
