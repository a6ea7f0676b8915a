"""One decoding step of a residual GOOM-SSM layer in three Triton launches.

For one token per sequence, a layer (:class:`goom_ssm.layers.GoomSSMBlock`) is a few
matrix-vector products around a tiny recurrent step; run op by op it is about sixteen
kernels, each much shorter than its launch. :func:`decode_step` runs it as three:

1. ``LayerNorm(h) @ [B | D]``: each state row's input ``Bu_j`` followed at once by that row's
   recurrent step ``x_j <- x_j A + Bu_j`` (the step of :mod:`goom_ssm.triton_scan`; rows do
   not mix, so each program owns one row, updated in place; a padded sequence, mask 0,
   keeps its state), and the skip term ``Du [M, 2E]``;
2. ``g = GLU(e^2 rows @ C + Du)`` ``[M, E]``, ``rows`` the new normalised state rows;
3. ``h + g @ W_out^T``, the layer's output.

:func:`head_logits` is the model's head for one token, with the cast of its logits to float32.

On Hopper GPUs and later the kernels are launched with programmatic dependent launch (PDL):
a kernel's programs start while the previous kernel still runs and wait until it has
finished and its writes are visible (``griddepcontrol.wait``), so the next launch's latency
hides behind the current kernel's work instead of following it. What they read before
waiting never depends on the previous kernel: for one sequence, each program's whole block of
the weights (and ``A``), so that reading the weights, most of a step's memory traffic,
overlaps the previous kernel; the products are then sums of products over that block. For
more sequences the products run on the tensor cores, in blocks of 16 or 32 rows, and the
weights are read block by block after the wait.

Products take their operands in the compute dtype (the autocast dtype where autocast is on,
else the weights' dtype) and accumulate in float32 (float64 for float64 weights), as the
layer's own matmuls do; intermediate results stay in the accumulation dtype. The
CUDA-graph decoder (:mod:`goom_ssm.modeling.cuda_graph_goom_ssm`) captures these launches.
"""

import functools
import os
from typing import Optional

import torch

from .constants import STATE_OUTPUT_LOG_SCALE
from .scan import ScaledRows
from .triton_common import HAS_TRITON, cdiv, compute_dtype, dot_block, next_power_of_2, tl, triton

if HAS_TRITON:
    from .triton_common import advance, load_matrix, normalized

    _TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                  torch.float16: tl.float16}

    @triton.jit
    def _wait_for_inputs(PDL: tl.constexpr):
        """With ``PDL``: wait until the previous kernel in the stream has finished and its writes
        are visible, then let the next kernel's programs start (they wait here in turn)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _layer_norm_stats(h_ptr, m, m_ok, E, eps, BM: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
        """Mean and ``1 / sqrt(var + eps)`` of rows ``m`` of ``h [M, E]``, in one pass: each
        block's mean and sum of squared deviations, merged into the running ones (Chan et al.).
        ``eps`` (a float64 argument) is rounded to ``ACC``."""
        mean = tl.zeros([BM], ACC)
        squares = tl.zeros([BM], ACC)
        seen = tl.zeros([1], ACC)
        for k0 in range(0, E, BK):
            k = k0 + tl.arange(0, BK)
            valid = (k < E)[None, :]
            x = tl.load(h_ptr + m[:, None] * E + k[None, :], mask=m_ok[:, None] & valid, other=0.0).to(ACC)
            count = tl.sum(valid.to(ACC), axis=1)
            block_mean = tl.sum(x, axis=1) / count
            deviation = tl.where(valid, x - block_mean[:, None], 0.0)
            total = seen + count
            delta = block_mean - mean
            mean += delta * (count / total)
            squares += tl.sum(deviation * deviation, axis=1) + delta * delta * (seen * count / total)
            seen = total
        return mean, 1.0 / tl.sqrt(squares / E + tl.full([1], eps, ACC))

    @triton.jit
    def _inputs(x_ptr, m, m_ok, k, K, mean, rstd, ln_w_ptr, ln_b_ptr, LAYER_NORM: tl.constexpr, DOT: tl.constexpr,
                ACC: tl.constexpr):
        """``f(x[m, k])`` rounded to ``DOT`` (zero past ``K``), ``x`` row-major ``[M, K]``: ``f`` the
        LayerNorm ``(x - mean) * rstd * ln_w + ln_b`` (computed in ``ACC``) with ``LAYER_NORM``, else the identity."""
        k_ok = k < K
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
        if LAYER_NORM:
            ln_w = tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(ACC)
            ln_b = tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(ACC)
            x = tl.where(k_ok[None, :], (x - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :], 0.0)
        return x.to(DOT)

    @triton.jit
    def _weight_blocks(w_ptr, second_w_offset, K, stride_wk, stride_wn, cols, cols_ok, PAIR: tl.constexpr,
                       KB: tl.constexpr, PREFETCH: tl.constexpr):
        """With ``PREFETCH``: rows ``:K`` and columns ``cols`` of the weight (strides ``stride_wk``,
        ``stride_wn``) as one ``[KB, BN]`` block, zero past ``K``, and with ``PAIR`` the same
        block of the weight at ``w_ptr + second_w_offset``; read before the kernel waits for its
        inputs, so that the reads overlap the previous kernel (weights never depend on it).
        Without: placeholders (:func:`_products` then reads the weights block by block)."""
        if PREFETCH:
            k = tl.arange(0, KB)
            offsets = k[:, None] * stride_wk + cols[None, :] * stride_wn
            ok = (k < K)[:, None] & cols_ok[None, :]
            first = tl.load(w_ptr + offsets, mask=ok, other=0.0)
            if PAIR:
                second = tl.load(w_ptr + second_w_offset + offsets, mask=ok, other=0.0)
            else:
                second = first
        else:
            first = tl.zeros([1, 1], tl.float32)
            second = first
        return first, second

    @triton.jit
    def _products(x_ptr, m, m_ok, K, w_ptr, second_w_offset, stride_wk, stride_wn, cols, cols_ok, mean, rstd,
                  ln_w_ptr, ln_b_ptr, first_block, second_block, LAYER_NORM: tl.constexpr, PAIR: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, DOT: tl.constexpr,
                  PREFETCH: tl.constexpr, ACC: tl.constexpr):
        """``f(x[m, :K]) @ w[:K, cols]`` ``[BM, BN]`` in ``ACC``, operands rounded to ``DOT`` (exact
        products, summed in ``ACC``), and with ``PAIR`` the same product with the second weight
        (else zeros); ``f`` and ``x`` as in :func:`_inputs`, the weights as in :func:`_weight_blocks`.
        With ``PREFETCH`` (one row, ``BM == 1``): against the blocks that function read, as
        sums of products, all of ``K`` at once; else block by block of ``BK`` rows of the
        weights, read here, on the tensor cores."""
        if PREFETCH:
            x = _inputs(x_ptr, m, m_ok, tl.arange(0, KB), K, mean, rstd, ln_w_ptr, ln_b_ptr, LAYER_NORM, DOT,
                        ACC).to(ACC)
            acc = tl.sum(x[:, :, None] * first_block.to(DOT).to(ACC)[None, :, :], axis=1)
            second = acc
            if PAIR:
                second = tl.sum(x[:, :, None] * second_block.to(DOT).to(ACC)[None, :, :], axis=1)
        else:
            acc = tl.zeros([BM, BN], ACC)
            second = tl.zeros([BM, BN], ACC)
            for k0 in range(0, K, BK):
                k = k0 + tl.arange(0, BK)
                x = _inputs(x_ptr, m, m_ok, k, K, mean, rstd, ln_w_ptr, ln_b_ptr, LAYER_NORM, DOT, ACC)
                w_offsets = k[:, None] * stride_wk + cols[None, :] * stride_wn
                w_ok = (k < K)[:, None] & cols_ok[None, :]
                acc += tl.dot(x, tl.load(w_ptr + w_offsets, mask=w_ok, other=0.0).to(DOT), input_precision="ieee")
                if PAIR:
                    w2 = tl.load(w_ptr + second_w_offset + w_offsets, mask=w_ok, other=0.0).to(DOT)
                    second += tl.dot(x, w2, input_precision="ieee")
        return acc, second

    @triton.jit
    def _norm_in_proj_step_kernel(h_ptr, ln_w_ptr, ln_b_ptr, b_ptr, d_ptr, a_ptr, s_ptr, v_ptr, mask_ptr,
                                  out_s_ptr, out_v_ptr, du_ptr, M, E, n, ND, eps: tl.float64, tiny: tl.constexpr,
                                  D: tl.constexpr, BLOCK_D: tl.constexpr, STATE: tl.constexpr,
                                  HAS_MASK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                  KB: tl.constexpr, DOT: tl.constexpr, PREFETCH: tl.constexpr, ACC: tl.constexpr,
                                  PDL: tl.constexpr):
        """Program ``(j, i)``, sequences ``m`` of row block ``i`` (axis 1). For ``j < n``: the
        state input of row ``j``, ``LN(h) @ B[:, j D:(j + 1) D]``, then the step of that row,
        ``x_j <- x_j A + Bu_j`` (state ``[M, n, 1]`` / ``[M, n, D]`` in ``STATE``; a
        sequence whose ``mask`` is 0 keeps its row), written to ``out`` (which may be the state
        itself: a row is read and written by its own program only). Other programs: column
        block ``j - n`` of ``Du = LN(h) @ D`` ``[M, ND]``. The weights (and ``A``) are read
        before waiting for ``h`` where :func:`_weight_blocks` says."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        m = pid_m * BM + tl.arange(0, BM)
        m_ok = m < M
        if pid_n < n:
            # (names apart from the other branch's: Triton wants a name's type equal in both)
            feats = tl.arange(0, BLOCK_D)
            row_cols = pid_n * D + feats
            b_block = _weight_blocks(b_ptr, 0, E, n * D, 1, row_cols, feats < D, False, KB, PREFETCH)[0]
            A, a_log_scale = normalized(load_matrix(a_ptr, feats, D, False).to(STATE), tiny)
            _wait_for_inputs(PDL)
            row_mean, row_rstd = _layer_norm_stats(h_ptr, m, m_ok, E, eps, BM, BK, ACC)
            u = _products(h_ptr, m, m_ok, E, b_ptr, 0, n * D, 1, row_cols, feats < D, row_mean, row_rstd, ln_w_ptr,
                          ln_b_ptr, b_block, b_block, True, False, BM, BLOCK_D, BK, KB, DOT, PREFETCH, ACC)[0]
            ok = m_ok[:, None] & (feats < D)[None, :]
            row = m * n + pid_n
            s = tl.load(s_ptr + row, mask=m_ok, other=0.0).to(tl.float64)
            v = tl.load(v_ptr + row[:, None] * D + feats[None, :], mask=ok, other=0.0)
            new_s, new_v = advance(s, v, u.to(STATE), tl.zeros([BM], tl.float64), A, a_log_scale, tiny)
            if HAS_MASK:
                keep = tl.load(mask_ptr + m, mask=m_ok, other=0) != 0
                new_s, new_v = tl.where(keep, new_s, s), tl.where(keep[:, None], new_v, v)
            tl.store(out_s_ptr + row, new_s.to(STATE), mask=m_ok)
            tl.store(out_v_ptr + row[:, None] * D + feats[None, :], new_v, mask=ok)
        else:
            cols = (pid_n - n) * BN + tl.arange(0, BN)
            cols_ok = cols < ND
            d_block = _weight_blocks(d_ptr, 0, E, ND, 1, cols, cols_ok, False, KB, PREFETCH)[0]
            _wait_for_inputs(PDL)
            mean, rstd = _layer_norm_stats(h_ptr, m, m_ok, E, eps, BM, BK, ACC)
            acc = _products(h_ptr, m, m_ok, E, d_ptr, 0, ND, 1, cols, cols_ok, mean, rstd, ln_w_ptr, ln_b_ptr,
                            d_block, d_block, True, False, BM, BN, BK, KB, DOT, PREFETCH, ACC)[0]
            tl.store(du_ptr + m[:, None] * ND + cols[None, :], acc, mask=m_ok[:, None] & cols_ok[None, :])

    @triton.jit
    def _output_block(M, N, BM: tl.constexpr, BN: tl.constexpr):
        """This program's output rows ``m`` (axis 1) and columns ``cols`` (axis 0), and which exist."""
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        return m, m < M, cols, cols < N

    @triton.jit
    def _output_glu_kernel(rows_ptr, c_ptr, du_ptr, g_ptr, M, NR, E, LOG_SCALE: tl.constexpr, BM: tl.constexpr,
                           BN: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, DOT: tl.constexpr,
                           PREFETCH: tl.constexpr, ACC: tl.constexpr, PDL: tl.constexpr):
        """``y = exp(LOG_SCALE) rows @ C + Du`` (``rows [M, NR]``, ``C [NR, 2E]``, ``Du [M, 2E]``),
        then ``g = y[:, :E] * sigmoid(y[:, E:])`` ``[M, E]``: both halves of its output columns ``cols`` here."""
        m, m_ok, cols, cols_ok = _output_block(M, E, BM, BN)
        ok = m_ok[:, None] & cols_ok[None, :]
        unused = tl.zeros([BM], ACC)
        value_w, gate_w = _weight_blocks(c_ptr, E, NR, 2 * E, 1, cols, cols_ok, True, KB, PREFETCH)
        _wait_for_inputs(PDL)
        value, gate = _products(rows_ptr, m, m_ok, NR, c_ptr, E, 2 * E, 1, cols, cols_ok, unused, unused, c_ptr, c_ptr,
                                value_w, gate_w, False, True, BM, BN, BK, KB, DOT, PREFETCH, ACC)
        scale = tl.exp(tl.full([1, 1], LOG_SCALE, ACC))  # in ACC: a float argument would be float32
        value = value * scale + tl.load(du_ptr + m[:, None] * 2 * E + cols[None, :], mask=ok, other=0.0)
        gate = gate * scale + tl.load(du_ptr + m[:, None] * 2 * E + E + cols[None, :], mask=ok, other=0.0)
        tl.store(g_ptr + m[:, None] * E + cols[None, :], value / (1.0 + tl.exp(-gate)), mask=ok)

    @triton.jit
    def _out_proj_residual_kernel(g_ptr, w_ptr, h_ptr, out_ptr, M, E, BM: tl.constexpr, BN: tl.constexpr,
                                  BK: tl.constexpr, KB: tl.constexpr, DOT: tl.constexpr, PREFETCH: tl.constexpr,
                                  ACC: tl.constexpr, PDL: tl.constexpr):
        """``out = h + g @ W^T`` with ``W [E, E]`` (an ``nn.Linear`` weight), all rows ``[M, E]``."""
        m, m_ok, cols, cols_ok = _output_block(M, E, BM, BN)
        ok = m_ok[:, None] & cols_ok[None, :]
        unused = tl.zeros([BM], ACC)
        w = _weight_blocks(w_ptr, 0, E, 1, E, cols, cols_ok, False, KB, PREFETCH)[0]
        _wait_for_inputs(PDL)
        acc = _products(g_ptr, m, m_ok, E, w_ptr, 0, 1, E, cols, cols_ok, unused, unused, w_ptr, w_ptr,
                        w, w, False, False, BM, BN, BK, KB, DOT, PREFETCH, ACC)[0]
        h = tl.load(h_ptr + m[:, None] * E + cols[None, :], mask=ok, other=0.0).to(ACC)
        tl.store(out_ptr + m[:, None] * E + cols[None, :], h + acc, mask=ok)

    @triton.jit
    def _head_kernel(h_ptr, w_ptr, out_ptr, M, E, V, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     KB: tl.constexpr, DOT: tl.constexpr, PREFETCH: tl.constexpr, ACC: tl.constexpr,
                     PDL: tl.constexpr):
        """``logits = h @ W^T`` ``[M, V]`` (``h [M, E]``, ``W [V, E]`` an ``nn.Linear`` weight),
        rounded to ``DOT`` as the head's own output is, then stored in float32."""
        m, m_ok, cols, cols_ok = _output_block(M, V, BM, BN)
        unused = tl.zeros([BM], ACC)
        w = _weight_blocks(w_ptr, 0, E, 1, E, cols, cols_ok, False, KB, PREFETCH)[0]
        _wait_for_inputs(PDL)
        acc = _products(h_ptr, m, m_ok, E, w_ptr, 0, 1, E, cols, cols_ok, unused, unused, w_ptr, w_ptr,
                        w, w, False, False, BM, BN, BK, KB, DOT, PREFETCH, ACC)[0]
        logits = acc.to(DOT).to(tl.float32)
        tl.store(out_ptr + m[:, None] * V + cols[None, :], logits, mask=m_ok[:, None] & cols_ok[None, :])


# Launch configuration of the tensor-core blocks (more than PREFETCH_MAX_ROWS sequences; tuned
# on an H200), by kernel ("input": LayerNorm, input projections and the step; "output": the
# GLU's and the output projection's; "head"): output columns per program (more programs read
# the weights in parallel) and warps. The output kernels (one program per column block of E,
# against 2E for the input projections) run twice as many programs of 16 columns with 2 warps:
# a faster graph replay of the decoding step (timings: benchmarks/results/design_notes.md).
# Then the bytes of each weight row per reduction step (fewer, larger loads in flight) and
# rows per program: 16, or 32 above 16 sequences.
BLOCK_LAUNCH = {"input": (32, 4), "output": (16, 2), "head": (32, 4)}
BLOCK_K_BYTES, NUM_STAGES = 512, 3
# For one sequence each program reads its whole block of the weights (every row of its
# columns) before it waits for the previous kernel, forms the products as sums of products
# (no tensor-core block of 16 rows for one) and takes the LayerNorm's statistics in one pass
# over the row: output columns per program and warps (the input kernel's 32 columns and 8
# warps: a faster graph replay of the step, timings in benchmarks/results/design_notes.md).
PREFETCH_MAX_ROWS = 1
PREFETCH_LAUNCH = {"input": (32, 8), "output": (8, 2), "head": (16, 4)}


@functools.lru_cache
def _dependent_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL: CUDA GPUs of compute capability 9
    (Hopper) and above; not in Triton's interpreter."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _launch_settings(weight: torch.Tensor, M: int, K: int, kernel: str):
    """For ``kernel``'s products (a key of :data:`BLOCK_LAUNCH`) with ``weight`` over ``M`` rows
    and ``K`` terms: the accumulation dtype, the kernel's block sizes (``settings["BN"]``: the
    output columns per program), dtypes and launch options, and the number of row blocks."""
    dot = compute_dtype(weight)
    acc = torch.float64 if dot == torch.float64 else torch.float32
    prefetch = M <= PREFETCH_MAX_ROWS
    block_n, num_warps = (PREFETCH_LAUNCH if prefetch else BLOCK_LAUNCH)[kernel]
    bm = 1 if prefetch else 16 if M <= 16 else 32
    pdl = _dependent_launch(weight.device)
    block_k = next_power_of_2(K) if prefetch else BLOCK_K_BYTES // weight.element_size()
    settings = dict(BM=bm, BN=block_n, BK=block_k, KB=next_power_of_2(K),
                    DOT=_TL_DTYPES[dot], PREFETCH=prefetch, ACC=_TL_DTYPES[acc], PDL=pdl, num_warps=num_warps,
                    num_stages=NUM_STAGES, launch_pdl=pdl)
    return acc, settings, cdiv(M, bm)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(hidden, weight).float()`` for ``hidden [M, 1, E]`` and a head's weight ``[V, E]``
    (a bias-free ``nn.Linear``) in one launch: ``[M, 1, V]`` float32."""
    M, _, E = hidden.shape
    V = weight.shape[0]
    _, settings, rows_m = _launch_settings(weight, M, E, "head")
    logits = torch.empty(M, 1, V, dtype=torch.float32, device=hidden.device)
    _head_kernel[(cdiv(V, settings["BN"]), rows_m)](hidden.contiguous(), weight.contiguous(), logits, M, E, V,
                                                     **settings)
    return logits


def decode_step(hidden: torch.Tensor, state: ScaledRows, *, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                norm_eps: float, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                out_weight: torch.Tensor, mask: Optional[torch.Tensor] = None,
                out_state: Optional[ScaledRows] = None):
    """One token through a residual layer (:class:`~goom_ssm.layers.GoomSSMBlock`) given by its
    tensors, no autograd. The layer's ``E = d_emb``, ``n = n_hid``, ``d = d_hid`` are read from them.

    Args:
        hidden: ``[M, 1, E]`` the layer's input.
        state: the SSM state before the token, log-scale ``[M, n, 1]`` and rows ``[M, n, d]``
            (contiguous; float32, or float64: the states are computed in its dtype).
        norm_weight, norm_bias, norm_eps: the LayerNorm's (``[E]``, ``[E]``, epsilon).
        A, B, C, D: the SSM's matrices, ``[d, d]``, ``[E, n d]``, ``[n d, 2E]``, ``[E, 2E]``.
        out_weight: the output projection's weight ``[E, E]`` (a bias-free ``nn.Linear``).
        mask: ``[M, 1]`` bool, False for a padded position (its state is kept); or None.
        out_state: buffers for the new state (may be ``state`` itself: updated in place);
            new tensors if None.

    Returns:
        ``(output [M, 1, E] in hidden's dtype, new state)``: what the layer's ``forward(hidden, state, mask)`` gives.
    """
    M, _, E = hidden.shape
    n, d = state.rows.shape[1:]
    state_dtype = state.rows.dtype
    if state_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"decode_step: the state must be float32 or float64, got {state_dtype}")
    acc, settings, rows_m = _launch_settings(B, M, E, "input")
    hidden = hidden.contiguous()

    if out_state is None:
        out_state = ScaledRows(torch.empty_like(state.log_scale), torch.empty_like(state.rows))
    Du = torch.empty(M, 2 * E, dtype=acc, device=hidden.device)
    _norm_in_proj_step_kernel[(n + cdiv(2 * E, settings["BN"]), rows_m)](
        hidden, norm_weight, norm_bias, B.contiguous(), D.contiguous(), A.contiguous(),
        state.log_scale, state.rows, mask.reshape(M) if mask is not None else Du, out_state.log_scale, out_state.rows,
        Du, M, E, n, 2 * E, norm_eps, torch.finfo(state_dtype).tiny, D=d, BLOCK_D=dot_block(d),
        STATE=_TL_DTYPES[state_dtype], HAS_MASK=mask is not None, **settings)

    g = torch.empty(M, E, dtype=acc, device=hidden.device)
    _, settings, _ = _launch_settings(C, M, n * d, "output")
    _output_glu_kernel[(cdiv(E, settings["BN"]), rows_m)](out_state.rows, C.contiguous(), Du, g, M, n * d,
                                                          E, STATE_OUTPUT_LOG_SCALE, **settings)
    out = torch.empty_like(hidden)
    _, settings, _ = _launch_settings(out_weight, M, E, "output")
    _out_proj_residual_kernel[(cdiv(E, settings["BN"]), rows_m)](g, out_weight.contiguous(), hidden,
                                                                 out, M, E, **settings)
    return out, out_state
