"""The fused layer's LayerNorm kernels (goom_ssm.triton_layer_norm) against their references,
ATen's ``native_layer_norm`` and ``native_layer_norm_backward``, computed in float64. On CPU the
kernels run in Triton's interpreter (see conftest)."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import TRITON_DEVICE  # noqa: E402
from goom_ssm import triton_layer_norm  # noqa: E402
from goom_ssm.triton_layer_norm import layer_norm_backward, layer_norm_forward  # noqa: E402

EPS = 1e-5
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}


def case(T, E, dtype, grad_dtype, seed=0):
    """``x [T, E]`` (a mean and scale per row), weight, bias, the two parts of ``h``'s gradient
    in ``grad_dtype``, and the residual's gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=g, dtype=torch.float64) * torch.rand(T, 1, generator=g, dtype=torch.float64) * 3
    x = x + torch.randn(T, 1, generator=g, dtype=torch.float64)
    weight = 1 + 0.3 * torch.randn(E, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(E, generator=g, dtype=torch.float64)
    grad_a, grad_b, grad_residual = (torch.randn(T, E, generator=g, dtype=torch.float64) for _ in range(3))
    to = {"device": TRITON_DEVICE, "dtype": dtype}
    return (x.to(**to), weight.to(**to), bias.to(**to), grad_a.to(TRITON_DEVICE, grad_dtype),
            grad_b.to(TRITON_DEVICE, grad_dtype), grad_residual.to(**to))


def assert_within(got, expected, bound, what):
    error = (got.double() - expected).abs().max().item()
    assert error <= bound, f"{what}: error {error:.3e} above {bound:.3e}"


# E: a power of two, one that is not (masked columns), the 124M model's; T not a multiple of the rows per program.
@pytest.mark.parametrize("dtype, out_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("T, E", [(1, 32), (13, 24), (9, 768)])
def test_forward_equals_layer_norm_then_the_cast(dtype, out_dtype, T, E):
    x, weight, bias, *_ = case(T, E, dtype, dtype)
    h, mean, rstd = layer_norm_forward(x, weight, bias, EPS, out_dtype)
    expected, expected_mean, expected_rstd = torch.native_layer_norm(x.double(), (E,), weight.double(), bias.double(),
                                                                     EPS)
    assert h.dtype == out_dtype and mean.dtype == rstd.dtype == dtype and mean.shape == rstd.shape == (T,)
    # Statistics to a few roundings of the dtype; h to its rounding to out_dtype plus the
    # errors of the value it was rounded from. The rounding: half an ulp (to nearest) on a GPU,
    # one in Triton's interpreter, which rounds float32 to bfloat16 toward zero.
    unit = UNIT_ROUNDOFF[dtype]
    assert_within(mean, expected_mean.view(-1), 8 * unit * x.abs().max().item(), "mean")
    assert_within(rstd / expected_rstd.view(-1), torch.ones_like(expected_rstd.view(-1)), 16 * unit, "rstd")
    scale = expected.abs().amax(dim=1, keepdim=True)
    rounding = UNIT_ROUNDOFF[out_dtype] * (1 if TRITON_DEVICE == "cuda" else 2)
    relative = (h.double() - expected).abs() / (expected.abs() * rounding + 16 * unit * scale)
    assert relative.max().item() <= 1.0


@pytest.mark.parametrize("dtype, grad_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("T, E", [(1, 32), (13, 24), (9, 768), (70, 40)])
@pytest.mark.parametrize("residual", [True, False])
def test_backward_equals_the_layer_norm_backward_plus_the_residual(dtype, grad_dtype, T, E, residual):
    x, weight, bias, grad_a, grad_b, grad_residual = case(T, E, dtype, grad_dtype)
    _, mean, rstd = layer_norm_forward(x, weight, bias, EPS, dtype)
    grad_x, grad_weight, grad_bias = layer_norm_backward(grad_a, grad_b, x, weight, mean, rstd,
                                                         grad_residual if residual else None)
    assert grad_x.dtype == grad_weight.dtype == grad_bias.dtype == dtype
    assert grad_x.shape == (T, E) and grad_weight.shape == grad_bias.shape == (E,)
    # the reference: grad_h summed as the fused layer's ATen ops did (in x's dtype), then float64
    grad_h = (grad_a.to(dtype) + grad_b.to(dtype)).double()
    expected = torch.ops.aten.native_layer_norm_backward(grad_h, x.double(), (E,), mean.double().view(T, 1),
                                                         rstd.double().view(T, 1), weight.double(), bias.double(),
                                                         [True, True, True])
    expected_x = expected[0] + (grad_residual.double() if residual else 0)
    # float64 sums of T or E terms: a few roundings per term of the largest magnitude summed
    unit = UNIT_ROUNDOFF[dtype]
    terms = grad_h.abs().max().item() * (1 + x.abs().max().item() * rstd.max().item())
    assert_within(grad_x, expected_x, 8 * unit * (E * terms * weight.abs().max().item() * rstd.max().item()
                                                   + expected_x.abs().max().item()), "grad_x")
    assert_within(grad_weight, expected[1], 8 * unit * T * terms, "grad_weight")
    assert_within(grad_bias, expected[2], 8 * unit * T * terms, "grad_bias")


def test_the_weight_gradients_sum_over_every_program(monkeypatch):
    """Blocks of 4 rows (18 for 70 rows): with fewer programs than blocks each program loops
    over several; with one program, over all."""
    monkeypatch.setattr(triton_layer_norm, "BLOCK_ELEMENTS", 4 * 64)
    x, weight, bias, grad_a, grad_b, _ = case(70, 40, torch.float64, torch.float64)
    _, mean, rstd = layer_norm_forward(x, weight, bias, EPS, torch.float64)
    results = []
    for programs in (1, 3, 18):
        monkeypatch.setattr(triton_layer_norm, "_backward_programs", lambda device, blocks, p=programs: min(p, blocks))
        results.append(layer_norm_backward(grad_a, grad_b, x, weight, mean, rstd))
    for got in results[1:]:
        assert torch.equal(got[0], results[0][0])  # rows do not depend on the programs
        torch.testing.assert_close(got[1], results[0][1], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[2], results[0][2], rtol=1e-12, atol=0)
