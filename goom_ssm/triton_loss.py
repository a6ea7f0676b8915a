"""The language model's cross-entropy from the head's logits in two Triton kernels (CUDA training).

transformers' loss (``ForCausalLMLoss``) upcasts the head's logits ``[N, V]`` to float32,
takes their ``log_softmax`` (a float32 ``[N, V]`` written and kept for the backward pass)
and the negative log-likelihood of the targets; its backward writes a float32 gradient,
then casts it to the head's dtype. With GPT-2's vocabulary those passes over ``[N, V]`` are
as costly as the whole head's products. :class:`HeadCrossEntropy` computes the same
numbers in two passes:

- forward, one program per row: the float32 logits the model returns (written once), the
  row's log-sum-exp (a running maximum and sum of exponentials per lane, merged at the end)
  and its loss ``logsumexp - logit[target]``;
- backward, one program per row: ``g (softmax - onehot(target))`` from the kept logits and
  log-sum-exp, written directly in the logits' dtype, ``g`` the row's gradient of its loss.

Only the head's own logits (half precision, where it matters) and one float per row are
kept for the backward pass, not the float32 ``log_softmax``. The plain reference is
``F.cross_entropy(logits.float(), targets, ignore_index=..., reduction="none")`` (the tests
hold the kernels to it); :meth:`GoomSSMForCausalLM.forward` reduces the rows' losses as
transformers does.
"""

import torch

from .triton_common import HAS_TRITON, next_power_of_2, tl, triton

if HAS_TRITON:

    @triton.jit
    def _forward_kernel(logits_ptr, row_stride, targets_ptr, out_ptr, lse_ptr, loss_ptr, V, ignore_index,
                        BLOCK: tl.constexpr):
        """Row ``r`` of ``logits [N, row_stride]`` (columns ``:V`` are the vocabulary's, the rest
        padding): ``out[r] = logits[r, :V]`` in float32 ``[N, V]``, ``lse[r]`` its log-sum-exp,
        ``loss[r] = lse[r] - logits[r, target]``, 0 where the target is ``ignore_index`` and NaN
        where it is outside the vocabulary."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        peak = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: the largest logit so far
        total = tl.zeros([BLOCK], tl.float32)  # per lane: sum of exp(logit - peak)
        for start in range(0, V, BLOCK):
            c = start + cols
            ok = c < V
            x = tl.load(logits_ptr + row * row_stride + c, mask=ok, other=float("-inf")).to(tl.float32)
            tl.store(out_ptr + row * V + c, x, mask=ok)
            new_peak = tl.maximum(peak, x)
            shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # lanes with no logit yet
            total = total * tl.exp(peak - shift) + tl.exp(x - shift)
            peak = new_peak
        row_peak = tl.max(peak, axis=0)
        lse = row_peak + tl.log(tl.sum(total * tl.exp(peak - row_peak), axis=0))
        target = tl.load(targets_ptr + row)
        counted = target != ignore_index
        known = (target >= 0) & (target < V)
        picked = tl.load(logits_ptr + row * row_stride + target, mask=counted & known, other=0.0).to(tl.float32)
        loss = tl.where(counted, tl.where(known, lse - picked, float("nan")), 0.0)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, loss)

    @triton.jit
    def _backward_kernel(logits_ptr, row_stride, targets_ptr, lse_ptr, grad_loss_ptr, grad_out_ptr, grad_ptr, V,
                         ignore_index, BLOCK: tl.constexpr, HAS_GRAD_OUT: tl.constexpr):
        """Row ``r``: ``grad[r] = g (exp(logits[r] - lse[r]) - onehot(target))`` over the
        vocabulary (``g = grad_loss[r]``, 0 where the target is ignored), plus ``grad_out[r]``
        (the gradient of the float32 logits ``[N, V]``) with ``HAS_GRAD_OUT``, and 0 in the
        padding columns; stored in ``grad``'s dtype ``[N, row_stride]``."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        target = tl.load(targets_ptr + row)
        g = tl.where(target != ignore_index, tl.load(grad_loss_ptr + row), 0.0)
        lse = tl.load(lse_ptr + row)
        for start in range(0, row_stride, BLOCK):
            c = start + cols
            ok = c < V
            x = tl.load(logits_ptr + row * row_stride + c, mask=ok, other=float("-inf")).to(tl.float32)
            grad = g * (tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0))
            if HAS_GRAD_OUT:
                grad += tl.load(grad_out_ptr + row * V + c, mask=ok, other=0.0)
            grad = tl.where(ok, grad, 0.0)
            tl.store(grad_ptr + row * row_stride + c, grad.to(grad_ptr.dtype.element_ty), mask=c < row_stride)


BLOCK_BYTES, NUM_WARPS = 16384, 8  # columns per loop step: 16 KiB of float32; warps per row


def _block(vocab_size: int) -> int:
    return min(BLOCK_BYTES // 4, next_power_of_2(vocab_size))


class HeadCrossEntropy(torch.autograd.Function):
    """``apply(logits, vocab_size, targets, ignore_index)`` -> ``(float32 logits [N, V], losses [N])``.

    ``logits [N, W]`` (any float dtype; ``W >= V = vocab_size``: columns past
    ``V`` are the padding of a padded head, dropped), ``targets [N]`` (int64). The losses are
    float32 ``-log_softmax(logits)[target]`` per row, 0 where the target is ``ignore_index``,
    NaN where it is outside the vocabulary. Gradients flow to ``logits`` (in its dtype, zero
    in the padding) from both outputs."""

    @staticmethod
    def forward(ctx, logits, vocab_size, targets, ignore_index):
        logits = logits.contiguous()
        rows, width = logits.shape
        out = torch.empty(rows, vocab_size, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows:
            _forward_kernel[(rows,)](logits, width, targets, out, lse, losses, vocab_size, ignore_index,
                                     BLOCK=_block(vocab_size), num_warps=NUM_WARPS)
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab_size, ctx.ignore_index = vocab_size, ignore_index
        ctx.set_materialize_grads(False)
        return out, losses

    @staticmethod
    def backward(ctx, grad_out, grad_losses):
        logits, targets, lse = ctx.saved_tensors
        rows, width = logits.shape
        if grad_losses is None:  # only the logits were used: their gradient, cast, and the padding's zeros
            grad = torch.zeros_like(logits)
            grad[:, : ctx.vocab_size] = grad_out
            return grad, None, None, None
        grad = torch.empty_like(logits)
        if rows:
            _backward_kernel[(rows,)](logits, width, targets, lse, grad_losses.float().contiguous(),
                                      grad_out.contiguous() if grad_out is not None else lse, grad, ctx.vocab_size,
                                      ctx.ignore_index, BLOCK=_block(ctx.vocab_size),
                                      HAS_GRAD_OUT=grad_out is not None, num_warps=NUM_WARPS)
        return grad, None, None, None
