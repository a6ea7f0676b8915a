"""The fused layer's LayerNorm with its neighbouring element-wise passes, one Triton launch each way.

:class:`goom_ssm.fused_block.FusedBlock` normalises the layer's input ``x [T, E]`` (float32,
or float64) and casts the result to the products' dtype; its backward sums the two products
that form ``h``'s gradient, runs LayerNorm's backward and adds the residual's gradient. In
ATen that is two passes over ``[T, E]`` forward and five backward (a cast, an add, the input
gradient, the weight and bias gradients, the residual's add), each reading and writing the
activations in memory. Here:

- :func:`layer_norm_forward`: ``h = ((x - mean) * rstd * weight + bias)`` rounded to the
  products' dtype, ``mean`` and ``rstd = 1 / sqrt(var + eps)`` (biased variance) ``[T]``;
  the reference is ``torch.native_layer_norm(x, (E,), weight, bias, eps)`` then ``.to(dtype)``.
- :func:`layer_norm_backward`: for ``grad_h = grad_a + grad_b`` (each read in its own dtype,
  summed in ``x``'s), ``x``'s gradient plus ``grad_residual``, and the weight's and bias's
  gradients; the reference is ``aten.native_layer_norm_backward`` of that ``grad_h``, plus
  ``grad_residual``.

Each row is normalised whole in one program (``E`` up to a few thousand features); statistics
and gradients are summed in ``x``'s dtype (float32, or float64), as ATen's ``acc_type``. The
weight's and bias's gradients are summed per program over its rows, then over programs.
Equal to the references to rounding (``tests/test_triton_layer_norm.py``), not to the bit.
"""

import torch

from .triton_common import HAS_TRITON, cdiv, next_power_of_2, tl, triton

if HAS_TRITON:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, h_ptr, mean_ptr, rstd_ptr, T, E, eps: tl.float64, BLOCK_E: tl.constexpr,
                        ROWS: tl.constexpr):
        """Rows ``ROWS * program .. + ROWS`` of ``x [T, E]``: ``h`` in ``h_ptr``'s dtype, ``mean``, ``rstd`` ``[T]``.
        ``eps`` is passed in float64 (a plain float argument would be float32) and rounded to ``x``'s dtype."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        k = tl.arange(0, BLOCK_E)
        r_ok, k_ok = r < T, k < E
        ok = r_ok[:, None] & k_ok[None, :]
        offsets = r.to(tl.int64)[:, None] * E + k[None, :]  # T * E may pass 2^31
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0)
        mean = tl.sum(x, axis=1) / E
        centered = tl.where(ok, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / E + tl.full([1], eps, x.dtype))
        w = tl.load(w_ptr + k, mask=k_ok, other=0.0)
        b = tl.load(b_ptr + k, mask=k_ok, other=0.0)
        h = centered * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + r, mean, mask=r_ok)
        tl.store(rstd_ptr + r, rstd, mask=r_ok)

    @triton.jit
    def _backward_kernel(ga_ptr, gb_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, gr_ptr, gx_ptr, partial_ptr, T, E,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr):
        """Rows ``ROWS * (program + k * programs) ..`` of ``[T, E]``: ``x``'s gradient (plus the
        residual's); this program's sums over its rows of the weight's and bias's gradients,
        ``partial[program, 0]`` and ``partial[program, 1]`` (``[programs, 2, E]``)."""
        pid, programs = tl.program_id(0), tl.num_programs(0)
        k = tl.arange(0, BLOCK_E)
        k_ok = k < E
        w = tl.load(w_ptr + k, mask=k_ok, other=0.0)
        grad_w = tl.zeros([BLOCK_E], w.dtype)
        grad_bias = tl.zeros([BLOCK_E], w.dtype)
        for start in range(pid * ROWS, T, programs * ROWS):
            r = start + tl.arange(0, ROWS)
            r_ok = r < T
            ok = r_ok[:, None] & k_ok[None, :]
            offsets = r.to(tl.int64)[:, None] * E + k[None, :]
            x = tl.load(x_ptr + offsets, mask=ok, other=0.0)
            grad_h = (tl.load(ga_ptr + offsets, mask=ok, other=0.0).to(x.dtype)
                      + tl.load(gb_ptr + offsets, mask=ok, other=0.0).to(x.dtype))
            mean = tl.load(mean_ptr + r, mask=r_ok, other=0.0)
            rstd = tl.load(rstd_ptr + r, mask=r_ok, other=0.0)
            x_hat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = grad_h * w[None, :]
            mean_g = tl.sum(g, axis=1) / E
            mean_g_x_hat = tl.sum(g * x_hat, axis=1) / E
            grad_x = (g - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
            if HAS_RESIDUAL:
                grad_x += tl.load(gr_ptr + offsets, mask=ok, other=0.0)
            tl.store(gx_ptr + offsets, grad_x, mask=ok)
            grad_w += tl.sum(grad_h * x_hat, axis=0)
            grad_bias += tl.sum(grad_h, axis=0)
        tl.store(partial_ptr + pid * 2 * E + k, grad_w, mask=k_ok)
        tl.store(partial_ptr + pid * 2 * E + E + k, grad_bias, mask=k_ok)

# Elements of a program's block of rows (rows of E features, padded to a power of two), and
# of each warp's share; the backward's programs per multiprocessor (each loops over blocks of
# rows, so that its sums of the weight's gradients cover many rows).
BLOCK_ELEMENTS, ELEMENTS_PER_WARP, BACKWARD_PROGRAMS_PER_SM = 4096, 1024, 4


def _blocks(E: int) -> dict:
    """The launch settings for rows of ``E`` features: the padded row ``BLOCK_E``, ``ROWS`` rows per
    block (fewer for wide rows, at least one) and the warps."""
    block_e = next_power_of_2(E)
    return dict(BLOCK_E=block_e, ROWS=max(1, BLOCK_ELEMENTS // block_e),
                num_warps=min(16, max(4, block_e // ELEMENTS_PER_WARP)))


def _backward_programs(device: torch.device, row_blocks: int) -> int:
    """Programs of the backward: ``BACKWARD_PROGRAMS_PER_SM`` per multiprocessor on CUDA (4 in
    the interpreter), at most one per row block."""
    per_device = (torch.cuda.get_device_properties(device).multi_processor_count * BACKWARD_PROGRAMS_PER_SM
                  if device.type == "cuda" else 4)
    return max(1, min(per_device, row_blocks))


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype):
    """``(h [T, E] in dtype, mean [T], rstd [T])`` of ``x [T, E]`` (contiguous, float32 or
    float64; ``weight``, ``bias`` ``[E]`` in its dtype); statistics in ``x``'s dtype."""
    T, E = x.shape
    h = torch.empty(T, E, dtype=dtype, device=x.device)
    mean = torch.empty(T, dtype=x.dtype, device=x.device)
    rstd = torch.empty_like(mean)
    blocks = _blocks(E)
    _forward_kernel[(cdiv(T, blocks["ROWS"]),)](x, weight, bias, h, mean, rstd, T, E, eps, **blocks)
    return h, mean, rstd


def layer_norm_backward(grad_a: torch.Tensor, grad_b: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, grad_residual=None):
    """``(grad_x [T, E], grad_weight [E], grad_bias [E])`` for ``h``'s gradient ``grad_a + grad_b``
    (``[T, E]``, any float dtypes, contiguous), ``x``, ``weight``, ``mean``, ``rstd`` as
    :func:`layer_norm_forward` took and gave them; ``grad_residual [T, E]`` in ``x``'s dtype
    (or None) is added to ``grad_x``."""
    T, E = x.shape
    blocks = _blocks(E)
    programs = _backward_programs(x.device, cdiv(T, blocks["ROWS"]))
    grad_x = torch.empty_like(x)
    partial = torch.empty(programs, 2, E, dtype=x.dtype, device=x.device)
    _backward_kernel[(programs,)](grad_a, grad_b, x, weight, mean, rstd, x if grad_residual is None else grad_residual,
                                  grad_x, partial, T, E, HAS_RESIDUAL=grad_residual is not None, **blocks)
    grad_weight, grad_bias = partial.sum(0)
    return grad_x, grad_weight, grad_bias
