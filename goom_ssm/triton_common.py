"""What the Triton kernels of :mod:`goom_ssm.triton_scan` and :mod:`goom_ssm.triton_decode` share.

Triton itself, imported here in a ``try`` block: transformers' check of the packages a
remote-code file needs skips imports in ``try`` blocks, so CPU-only installs load the model
without Triton (``HAS_TRITON`` is then False and ``triton`` and ``tl`` are None). The two
kernel modules take ``triton`` and ``tl`` from here, never by an import of their own.

The step of a block of state rows in scaled form (:func:`advance`) and the loading and
normalising of the transition matrix that it needs, the dtype rule of the fused paths'
matrix products (:func:`compute_dtype`), and the launch arithmetic of the host code
(:func:`cdiv`, :func:`next_power_of_2`, :func:`dot_block`: Triton's own ``cdiv`` and
``next_power_of_2`` are constexpr functions, made to be called inside kernels, whose calls
from Python take far longer than the arithmetic).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the pure-PyTorch scans
    triton = tl = None

HAS_TRITON = triton is not None  # without it, the Triton functions below are not defined


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two at or above ``n >= 1`` (0 for 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def dot_block(d: int) -> int:
    """A block of ``d`` columns that ``tl.dot`` takes: a power of two, and at least 16 (its smallest)."""
    return max(16, next_power_of_2(d))


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the products' operands: autocast's when it is on for the weight's device, else the weight's."""
    if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


if HAS_TRITON:

    @triton.jit
    def advance(s, v, u, u_log_scale, A, a_log_scale, tiny):
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
    def normalized(M, tiny):
        """A matrix divided by its largest magnitude, and the (float64) log of that magnitude."""
        peak = tl.maximum(tl.max(tl.max(tl.abs(M), axis=1), axis=0), tiny)
        return M / peak, tl.log(peak).to(tl.float64)

    @triton.jit
    def load_matrix(a_ptr, feats, D: tl.constexpr, TRANSPOSE: tl.constexpr):
        """The ``[D, D]`` matrix at ``a_ptr`` (row-major), or its transpose, zero-padded to the block."""
        ok = (feats < D)[:, None] & (feats < D)[None, :]
        if TRANSPOSE:
            return tl.load(a_ptr + feats[None, :] * D + feats[:, None], mask=ok, other=0.0)
        return tl.load(a_ptr + feats[:, None] * D + feats[None, :], mask=ok, other=0.0)
