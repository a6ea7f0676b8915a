"""The residual GOOM-SSM layer as one autograd node: the training fast path on CUDA.

:class:`goom_ssm.layers.GoomSSMBlock` computes, with ``h = LayerNorm(x)``::

    out = x + W_out GLU(rows(states(h B)) (e^2 C) + h D)

as some 30 operations forward and 45 backward, each an autograd node with its own host
cost. At the batch sizes where a training step is bound by the host (the 124M model's 24
layers at batch 8 x 1024 on an H200), :class:`FusedBlock` runs the same operations, in the
same dtypes, as one node with a hand-written backward: about 20 operations forward and 30
backward (many of them views), none with autograd's bookkeeping, which shortens such a step
(timings: ``benchmarks/results/design_notes.md``). The LayerNorm runs with its neighbouring
element-wise passes as one Triton kernel each way (:mod:`goom_ssm.triton_layer_norm`: forward
with the cast of ``h``; backward with the sum of ``h``'s two gradients and the residual's),
which sums in another order than ATen's: the fused layer equals the module path to rounding,
not to the bit.

``GoomSSMBlock`` uses it when it trains in eager mode with the Triton scan from the layer's
own initial state (packed documents too), without a padding mask, with float32 (or float64) parameters, under
autocast or not, and plain submodules without hooks; everything else, including
``torch.compile`` (whose own fusion sees the operations), takes the module path, which the
tests hold it as exact as.
"""

import torch
import torch.nn.functional as F

from .triton_layer_norm import layer_norm_backward, layer_norm_forward
from .triton_scan import default_steps_per_program, kernel_resets, kernel_restart, scan_backward, scan_forward


class FusedBlock(torch.autograd.Function):
    """``apply(x, norm_weight, norm_bias, eps, init_states, A, B, C, D, out_weight, state_output_scale, compute_dtype,
    starts)`` -> ``(out [batch, seq_len, d_emb], final log-scale [batch, n, 1], final rows [batch, n, d])``.

    ``x [batch, seq_len, d_emb]`` and every parameter in one dtype (float32 or float64; the
    states are computed in it); ``compute_dtype``: the dtype of the matrix products (autocast's,
    or the parameters'); ``starts [batch, seq_len]`` (bool) or None: the first token of each
    packed document, where the state restarts from ``init_states``, as in
    :meth:`goom_ssm.layers.GoomSSM.forward`. The final log-scale is a constant, as everywhere
    in this package.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, init_states, A, B, C, D, out_weight, state_output_scale,
                compute_dtype, starts):
        batch, seq_len, d_emb = x.shape
        n, d = init_states.shape
        x_rows = x.contiguous().view(batch * seq_len, d_emb)
        h, mean, rstd = layer_norm_forward(x_rows, norm_weight, norm_bias, eps, compute_dtype)
        B_c, D_c, out_weight_c = B.to(compute_dtype), D.to(compute_dtype), out_weight.to(compute_dtype)
        C_c = (state_output_scale * C).to(compute_dtype)
        Bu = h.mm(B_c).view(batch, seq_len, n, d)
        resets, restart = kernel_resets(starts, Bu), kernel_restart(None if starts is None else init_states, A)
        shared = A.new_empty(0)  # no log-scales: init_states are plain rows shared by the batch
        chunk_len = default_steps_per_program(seq_len)
        log_scale, rows, power_log_scale, power_rows = scan_forward(Bu, A, shared, init_states, chunk_len, resets,
                                                                    restart)
        rows_c = rows.view(batch * seq_len, n * d).to(compute_dtype)
        y = rows_c.mm(C_c) + h.mm(D_c)
        glu = F.glu(y, dim=-1)
        out = x + glu.mm(out_weight_c.t()).view(batch, seq_len, d_emb)

        ctx.save_for_backward(x_rows, mean, rstd, norm_weight, h, B_c, C_c, D_c, out_weight_c, A, shared,
                              init_states, log_scale, rows, power_log_scale, power_rows, rows_c, y, glu, resets,
                              restart)
        ctx.state_output_scale, ctx.chunk_len, ctx.Bu_dtype = state_output_scale, chunk_len, Bu.dtype
        ctx.x_shape = x.shape
        final_log_scale = log_scale[:, -1].to(A.dtype)  # the states' dtype; the backward keeps the float64 ones
        ctx.mark_non_differentiable(final_log_scale)
        ctx.set_materialize_grads(False)
        return out, final_log_scale, rows[:, -1]

    @staticmethod
    def backward(ctx, grad_out, _, grad_final_rows):
        (x_rows, mean, rstd, norm_weight, h, B_c, C_c, D_c, out_weight_c, A, shared, init_states, log_scale,
         rows, power_log_scale, power_rows, rows_c, y, glu, resets, restart) = ctx.saved_tensors
        batch, seq_len, d_emb = ctx.x_shape
        dtype = x_rows.dtype
        if grad_out is None:  # only the final state was used
            grad_out = x_rows.new_zeros(ctx.x_shape)
        # Each product's gradients as autograd forms them (mm's backward; casts back to the
        # parameters' dtype); the two uses of h summed in x's dtype, in the LayerNorm's backward.
        grad_o = grad_out.to(out_weight_c.dtype).view(-1, d_emb)
        grad_out_weight = grad_o.t().mm(glu).to(dtype)
        grad_y = torch.ops.aten.glu_backward(grad_o.mm(out_weight_c), y, -1)
        grad_C = rows_c.t().mm(grad_y).to(dtype) * ctx.state_output_scale
        # The scan reads the rows' gradient in any dtype, as exactly as the float32 cast would.
        grad_rows = grad_y.mm(C_c.t()).view(rows.shape)
        if grad_final_rows is not None:
            grad_rows = grad_rows.to(rows.dtype)
            grad_rows[:, -1] += grad_final_rows
        grad_D = h.t().mm(grad_y).to(dtype)
        grad_Bu, grad_A, grad_init, grad_restart = scan_backward(grad_rows, A, shared, init_states, log_scale, rows,
                                                                 power_log_scale, power_rows, ctx.chunk_len,
                                                                 ctx.Bu_dtype, resets, restart)
        if grad_restart.numel():  # init_states are the restart rows too
            grad_init = grad_init + grad_restart
        grad_Bu = grad_Bu.to(h.dtype).view(batch * seq_len, -1)
        grad_B = h.t().mm(grad_Bu).to(dtype)
        grad_x, grad_norm_weight, grad_norm_bias = layer_norm_backward(
            grad_y.mm(D_c.t()), grad_Bu.mm(B_c.t()), x_rows, norm_weight, mean, rstd,
            grad_out.reshape(-1, d_emb).contiguous())
        return (grad_x.view(ctx.x_shape), grad_norm_weight, grad_norm_bias, None, grad_init, grad_A, grad_B, grad_C, grad_D,
                grad_out_weight, None, None, None)
