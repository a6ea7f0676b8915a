"""Scans of x_t = x_{t-1} A + u_t against the naive step-by-step recurrence (goom_ssm.naive)."""

import pytest
import torch

from conftest import TRITON_DEVICE, random_scan_case as random_case, tiny_config
from goom_ssm.layers import GoomSSM
from goom_ssm.naive import naive_scan
from goom_ssm.scan import (ScaledRows, chunk_plan, chunked_scan, default_chunk_size, goom_prefix_scan, normalize_rows,
                           scaled_powers, split_plan, stepwise_scan)
from goom_ssm.triton_scan import HAS_TRITON, triton_scan


def assert_same_states(out: ScaledRows, log_scale, rows, rows_tol, scale_tol):
    assert torch.isfinite(out.rows).all() and torch.isfinite(out.log_scale).all()
    assert (out.rows.double() - rows).abs().max().item() <= rows_tol
    scale_err = ((out.log_scale.double() - log_scale).abs() / (log_scale.abs() + 1)).max().item()
    assert scale_err <= scale_tol


# Every scan, with options that cut the test cases below into several chunks, and where it runs.
TRITON_SCAN = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package"))
SCANS = {
    "chunked": (lambda u, A, initial: chunked_scan(u, A, initial, chunk_size=4), "cpu"),
    "goom_prefix": (goom_prefix_scan, "cpu"),
    "stepwise": (stepwise_scan, "cpu"),
    "triton": (lambda u, A, initial: triton_scan(u, A, initial, steps_per_program=4), TRITON_DEVICE),
}


def states_and_gradients(scan, u, A, initial, weights):
    """``scan``'s states and the gradients of ``sum(weights * rows)`` in ``u``, ``A`` and the
    initial rows (``initial``: ``ScaledRows`` or plain shared rows)."""
    u, A = (t.detach().clone().requires_grad_(True) for t in (u, A))
    plain = isinstance(initial, torch.Tensor)
    init_rows = (initial if plain else initial.rows).detach().clone().requires_grad_(True)
    out = scan(u, A, init_rows if plain else ScaledRows(initial.log_scale, init_rows))
    (out.rows * weights.to(out.rows.dtype)).sum().backward()
    return out, (u.grad, A.grad, init_rows.grad)


@pytest.mark.parametrize("shared_initial", [False, True], ids=["per-sequence-initial", "shared-plain-initial"])
@pytest.mark.parametrize("name", ["chunked", "goom_prefix", "stepwise", TRITON_SCAN])
def test_every_scan_equals_the_naive_recurrence_states_and_gradients(name, shared_initial):
    """Each scan against :func:`naive_scan` with the same arguments (float64; 13 steps in
    several chunks, sizes that are not powers of two, an initial state per sequence or plain
    rows shared by all): states, and the gradients in ``u``, ``A`` and the initial rows of a
    loss weighting every state row. The chunked, stepwise and Triton scans agree to float64 rounding
    (measured ~1e-15); the original design computes in float32 GOOMs, with the original's
    backward rules (which add float32's eps to every derivative of log and exp): states
    within 1e-5, gradients within 1e-4 (measured 6e-7 and 1.2e-5)."""
    scan, device = SCANS[name]
    u, A, initial = random_case(2, 13, 3, 5, 1.1, seed=4, device=device)
    g = torch.Generator().manual_seed(1)
    if shared_initial:
        initial = (torch.randn(3, 5, generator=g, dtype=torch.float64) * 30).to(device)
    weights = torch.randn(u.shape, generator=g, dtype=torch.float64).to(device)
    out, grads = states_and_gradients(scan, u, A, initial, weights)
    expected, expected_grads = states_and_gradients(naive_scan, u, A, initial, weights)
    states_tol, grads_tol = (1e-5, 1e-4) if name == "goom_prefix" else (1e-12, 1e-12)
    assert out.rows.shape == (2, 13, 3, 5) and out.log_scale.shape == (2, 13, 3, 1) and out.rows.dtype == A.dtype
    assert_same_states(out, *expected, rows_tol=states_tol, scale_tol=states_tol)
    for got, want in zip(grads, expected_grads):
        assert ((got - want).norm() / want.norm()).item() < grads_tol


@pytest.mark.parametrize("name", ["chunked", "goom_prefix", "stepwise", TRITON_SCAN])
def test_every_scan_reads_inputs_of_any_float_dtype_in_the_dtype_of_A(name):
    """``u`` in bfloat16 gives the states of its float32 values, in ``A``'s float32."""
    scan, device = SCANS[name]
    u, A, initial = random_case(2, 9, 2, 4, 0.9, dtype=torch.float32, seed=6, device=device)
    half = u.to(torch.bfloat16)
    out, expected = scan(half, A, initial), scan(half.float(), A, initial)
    assert out.rows.dtype == out.log_scale.dtype == torch.float32
    assert torch.equal(out.rows, expected.rows) and torch.equal(out.log_scale, expected.log_scale)


LENGTHS = [1, 2, 3, 7, 63, 64, 65, 100, 255, 257, 1000, 1023, 4096]


@pytest.mark.parametrize("length", LENGTHS)
def test_chunked_scan_equals_the_naive_recurrence_float64(length):
    g = torch.Generator().manual_seed(length)
    batch, n, d = (int(v) for v in torch.randint(1, 5, (3,), generator=g))
    d = d + 2
    chunk = int(torch.randint(1, 80, (1,), generator=g))
    radius = float(torch.empty(1).uniform_(0.5, 1.2, generator=g))
    u, A, initial = random_case(batch, length, n, d, radius, seed=length)
    log_scale, rows = naive_scan(u, A, initial)
    out = chunked_scan(u, A, initial, chunk_size=chunk)
    assert out.rows.shape == (batch, length, n, d) and out.log_scale.shape == (batch, length, n, 1)
    assert_same_states(out, log_scale, rows, rows_tol=1e-9, scale_tol=1e-12)


@pytest.mark.parametrize("radius", [0.01, 0.5, 1.0, 1.5, 100.0])
def test_chunked_scan_float32_at_any_spectral_radius(radius):
    """float32 rounding accumulates over the 700 steps; the original design's scan, on the
    same case, is off by up to 4e-7 (radius 0.01), 9e-6 (1.0), 6e-5 (1.5), 7e-4 (100)."""
    u, A, initial = random_case(2, 700, 3, 6, radius, dtype=torch.float32, seed=3)
    log_scale, rows = naive_scan(u, A, initial)
    out = chunked_scan(u, A, initial, chunk_size=64)
    assert_same_states(out, log_scale, rows, rows_tol=2e-4, scale_tol=1e-5)
    if radius > 1:  # magnitudes far beyond float64, e.g. 100^700 = e^3224
        assert log_scale[:, -1].min() > 700 * 0.9 * torch.log(torch.tensor(radius))


@pytest.mark.parametrize("length", [1, 5, 64, 333])
def test_original_design_scan_equals_the_naive_recurrence(length):
    u, A, initial = random_case(2, length, 3, 5, 1.1, dtype=torch.float32, seed=length)
    log_scale, rows = naive_scan(u, A, initial)
    assert_same_states(goom_prefix_scan(u, A, initial), log_scale, rows, rows_tol=1e-4, scale_tol=1e-6)


def test_continuing_from_a_carried_state_equals_one_scan():
    u, A, initial = random_case(3, 300, 2, 5, 1.3, seed=7)
    whole = chunked_scan(u, A, initial, chunk_size=16)
    first = chunked_scan(u[:, :123], A, initial, chunk_size=16)
    carried = ScaledRows(first.log_scale[:, -1], first.rows[:, -1])
    rest = chunked_scan(u[:, 123:], A, carried, chunk_size=16)
    assert torch.allclose(rest.rows, whole.rows[:, 123:], atol=1e-10)
    assert torch.allclose(rest.log_scale, whole.log_scale[:, 123:], rtol=1e-12)


def test_scaled_powers_match_matrix_power():
    torch.manual_seed(0)
    M = torch.randn(5, 5, dtype=torch.float64)
    powers = scaled_powers(normalize_rows(M, dims=(-2, -1)), 13)
    for k in range(14):
        expected = torch.linalg.matrix_power(M, k)
        assert torch.allclose(powers.log_scale[k].exp() * powers.rows[k], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length, chunk", [(1, 4), (5, 4), (100, 7), (1000, 8)])
def test_a_plan_for_a_stack_of_matrices_is_each_matrix_plan(length, chunk):
    """``chunk_plan`` of a stack ``[3, d, d]`` (what a model computes for all its layers at
    once), split per matrix, equals each matrix's own plan at every level, and the scan with
    it follows the naive recurrence."""
    cases = [random_case(2, length, 3, 5, radius, seed=i) for i, radius in enumerate((0.3, 1.0, 50.0))]
    plans = split_plan(chunk_plan(torch.stack([A for _, A, _ in cases]), length, chunk))
    assert len(plans) == 3
    for plan, (u, A, initial) in zip(plans, cases):
        own = chunk_plan(A, length, chunk)
        assert len(plan) == len(own) >= (2 if length > chunk else 1)
        for level, own_level in zip(plan, own):
            for part, own_part in zip(level, own_level):
                assert part.shape == own_part.shape and torch.allclose(part, own_part, rtol=1e-12, atol=1e-14)
        out = chunked_scan(u, A, initial, plan=plan)
        assert_same_states(out, *naive_scan(u, A, initial), rows_tol=1e-9, scale_tol=1e-12)


@pytest.mark.parametrize("implementation", ["chunked", "triton"])
def test_gradients_are_those_of_the_exact_recurrence(implementation):
    """gradcheck on the states themselves, x = exp(log_scale) * rows (scale constants are
    detached, as in the original, so this is the derivative of the true recurrence). Chunks
    of 4 and 2 steps: several chunks and their carries (the Triton kernels run in the
    interpreter on CPU)."""
    if implementation == "chunked":
        scan, options, device, sizes = chunked_scan, dict(chunk_size=4), "cpu", (2, 11, 2, 3)
    else:
        if not HAS_TRITON:
            pytest.skip("needs the triton package")
        # small: interpreted on CPU
        scan, options, device, sizes = triton_scan, dict(steps_per_program=2), TRITON_DEVICE, (1, 5, 2, 3)
    u, A, initial = random_case(*sizes, 0.9, seed=11, device=device)
    u.requires_grad_(True)
    A.requires_grad_(True)
    init_rows = initial.rows.clone().requires_grad_(True)

    def states(u, A, init_rows):
        out = scan(u, A, ScaledRows(initial.log_scale, init_rows), **options)
        return out.log_scale.exp() * out.rows

    assert torch.autograd.gradcheck(states, (u, A, init_rows))


def test_stress_layer_states_stay_finite_forward_and_backward():
    u, A, initial = random_case(1, 4096, 2, 8, 1.5, dtype=torch.float32, seed=5)
    u.requires_grad_(True)
    A.requires_grad_(True)
    out = chunked_scan(u, A, initial)
    assert out.log_scale.max() > 1600  # ~ 4096 * log(1.5): e^1660, far past float64
    out.rows.square().sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(A.grad).all()


def test_the_default_chunk_size_is_chosen_for_the_device():
    """8 steps on CPU (where the dense chunk products dominate), 32 elsewhere; a model's
    ``scan_chunk_size=None`` (the default) uses it."""
    assert default_chunk_size(torch.device("cpu")) == 8 and default_chunk_size("cuda") == 32
    u, A, initial = random_case(2, 70, 3, 4, 1.1, torch.float32, seed=3, device="cpu")
    assert torch.equal(chunked_scan(u, A, initial).rows, chunked_scan(u, A, initial, chunk_size=8).rows)
    assert tiny_config().scan_chunk_size is None
    ssm = GoomSSM(d_inp=8, d_out=16, n_hid=3, d_hid=4)
    x = torch.randn(2, 30, 8)
    default_out = ssm(x)[0]
    ssm.chunk_size = 8
    assert torch.equal(default_out, ssm(x)[0])
