"""Generalized orders of magnitude (GOOMs) as complex tensors.

A GOOM of a real ``x`` is ``log(x)`` taken in the complex plane: real part ``log|x|``,
imaginary part 0 for ``x >= 0`` and pi for ``x < 0``; ``exp`` maps it back to the real
``x``. Products of reals become sums of GOOMs, so magnitudes far beyond the float range
stay finite. These functions follow the original implementation's numerics (Heinsen &
Kozachkov, TMLR 2025), including its backward rules, which keep gradients finite:

- ``d|x|/dx`` is -1 for ``x < 0`` and +1 otherwise (also at 0);
- ``d log(v)/dv = 1 / (v + eps)``;
- ``d exp(z)/dz = exp(z) + eps * sign(real(exp(z)))``;

with ``eps`` the machine epsilon of float32. ``log`` of an exact zero is clamped to
``LOG_ZERO = 2 * log(smallest normal float32)``, which ``exp`` maps back to 0.

The fast paths of this package do not use complex tensors (see ``goom_ssm.scan``); this
module is the literal, slow form used by the original-design scan and by the tests.
"""

import math

import torch

GOOM_FLOAT_DTYPE = torch.float32
LOG_ZERO = 2.0 * math.log(torch.finfo(GOOM_FLOAT_DTYPE).smallest_normal)


class _Abs(torch.autograd.Function):
    """``|x|`` with derivative -1 for negative inputs and +1 elsewhere, zero included."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.abs()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.where(x < 0, -grad, grad)


class _Log(torch.autograd.Function):
    """``log(v)`` of non-negative ``v``, floored at ``LOG_ZERO``; derivative ``1/(v+eps)``."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return v.log().clamp(min=LOG_ZERO)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad / (v + torch.finfo(v.dtype).eps)


class _Exp(torch.autograd.Function):
    """``exp(z)`` (real or complex) with derivative ``exp(z) + eps * sign(real(exp(z)))``."""

    @staticmethod
    def forward(ctx, z):
        out = z.exp()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        eps = torch.finfo(out.real.dtype).eps
        return grad * (out + torch.where(out.real < 0, -eps, eps))


def goom_log(x: torch.Tensor) -> torch.Tensor:
    """GOOM of a real tensor: complex tensor ``log|x| + i*pi*[x < 0]``, same shape as ``x``."""
    if x.is_complex():
        raise TypeError("goom_log expects a real tensor, got a complex one")
    log_abs = _Log.apply(_Abs.apply(x)).to(GOOM_FLOAT_DTYPE)
    return torch.complex(log_abs, (x < 0).to(log_abs.dtype) * math.pi)


def goom_exp(log_x: torch.Tensor) -> torch.Tensor:
    """Real tensor ``real(exp(log_x))`` of a GOOM tensor, same shape."""
    return _Exp.apply(log_x).real


def log_matmul_exp(log_x1: torch.Tensor, log_x2: torch.Tensor) -> torch.Tensor:
    """``log(exp(log_x1) @ exp(log_x2))`` over GOOMs, broadcasting leading dims.

    Shapes: ``[..., d1, d2] @ [..., d2, d3] -> [..., d1, d3]``. Rows of ``log_x1`` and
    columns of ``log_x2`` are scaled by their (detached, non-negative) largest real part
    before exponentiating, and the scales are added back in log space.
    """
    c1 = log_x1.real.detach().amax(dim=-1, keepdim=True).clamp(min=0)
    c2 = log_x2.real.detach().amax(dim=-2, keepdim=True).clamp(min=0)
    return goom_log(torch.matmul(goom_exp(log_x1 - c1), goom_exp(log_x2 - c2))) + c1 + c2

