"""GOOM arithmetic: values, signs, the zero floor, the original's backward rules, and
log-matmul-exp at magnitudes far outside the float range."""

import math

import torch

from goom_ssm.gooms import LOG_ZERO, goom_exp, goom_log, log_matmul_exp


def test_log_and_exp_round_trip_signs_and_zero():
    x = torch.tensor([3.0, -2.5, 0.0, 1e-30, -1e30])
    z = goom_log(x)
    assert z.dtype == torch.complex64
    assert torch.allclose(z.real[[0, 1, 3, 4]], x[[0, 1, 3, 4]].abs().log())
    assert torch.equal(z.imag, torch.tensor([0.0, math.pi, 0.0, 0.0, math.pi]))
    assert z.real[2] == LOG_ZERO and math.isfinite(LOG_ZERO)
    assert torch.allclose(goom_exp(z), x, rtol=1e-6)
    assert goom_exp(z)[2] == 0.0


def test_backward_rules_of_the_original():
    eps = torch.finfo(torch.float32).eps
    x = torch.tensor([2.0, -4.0, 0.0], requires_grad=True)
    goom_log(x).real.sum().backward()
    # d log|x| / dx = sign(x) / (|x| + eps), with sign(0) = +1
    assert torch.allclose(x.grad, torch.tensor([1 / (2 + eps), -1 / (4 + eps), 1 / eps]))

    z = torch.tensor([0.5, -1.0], requires_grad=True)
    w = goom_exp(torch.complex(z, torch.tensor([0.0, math.pi])))
    w.sum().backward()
    # d exp(z) / dz = exp(z) + eps * sign(real(exp(z)))
    expected = torch.tensor([math.exp(0.5) + eps, -math.exp(-1.0) - eps])
    assert torch.allclose(z.grad, expected, rtol=1e-5)


def test_log_matmul_exp_equals_float64_matmul():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 7).double(), torch.randn(3, 7, 4).double()
    out = log_matmul_exp(goom_log(a.float()), goom_log(b.float()))
    assert torch.allclose(goom_exp(out).double(), a @ b, rtol=1e-4, atol=1e-5)


def test_log_matmul_exp_far_beyond_float_range():
    torch.manual_seed(1)
    a, b = torch.randn(4, 6).double(), torch.randn(6, 3).double()
    # Scale a by e^600 and b by e^300: the products are ~e^900 and every operand is outside
    # the float32 (and float64) range, so only GOOMs can hold them. (As in the original,
    # operands are only ever scaled down, so magnitudes below ~e^-87 would underflow.)
    log_a = goom_log(a.float()) + 600.0
    log_b = goom_log(b.float()) + 300.0
    out = log_matmul_exp(log_a, log_b)
    assert torch.isfinite(out.real).all()
    expected = a @ b  # times e^900
    # float32 log-magnitudes near 900 are resolved to ~6e-5, so values to ~1e-4 relative
    assert torch.allclose(goom_exp(out - 900.0).double(), expected, rtol=2e-4, atol=1e-4)

