"""The Triton scan against the naive recurrence and the pure-PyTorch scan, forward and backward.

Without a GPU the kernels run in Triton's interpreter (see conftest), so every case here is
checked on CPU too; the long and large cases run on CUDA only.
"""

import functools

import pytest
import torch

pytest.importorskip("triton")

from conftest import TRITON_DEVICE, random_scan_case  # noqa: E402
from goom_ssm.naive import naive_scan  # noqa: E402
from goom_ssm.scan import ScaledRows, chunked_scan, normalize_rows  # noqa: E402
from goom_ssm.triton_scan import default_steps_per_program, triton_scan  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


random_case = functools.partial(random_scan_case, device=TRITON_DEVICE)  # where the kernels run


def states_and_gradients(scan, u, A, initial, weights, **kwargs):
    """States of ``scan`` and the gradients of ``sum(weights * rows)`` in u, A and the initial rows."""
    u, A, init_rows = (t.detach().clone().requires_grad_(True) for t in (u, A, initial.rows))
    out = scan(u, A, ScaledRows(initial.log_scale, init_rows), **kwargs)
    (out.rows * weights).sum().backward()
    return out, (u.grad, A.grad, init_rows.grad)


# (length, chunk): one chunk, a partial last chunk, many chunks, chunks of one step.
CHUNKINGS = [(1, 16), (2, 16), (7, 3), (16, 16), (17, 16), (33, 4), (100, 8), (61, 1), (257, 16)]


@pytest.mark.parametrize("length, chunk", CHUNKINGS)
def test_equals_the_float64_recurrence_and_its_gradients(length, chunk):
    """float64 throughout: states equal the step-by-step recurrence, and gradients equal
    those of the pure-PyTorch scan (autograd through it), to float64 rounding."""
    g = torch.Generator().manual_seed(length)
    batch, n, d = (int(v) for v in torch.randint(1, 4, (3,), generator=g))
    d += 2  # d = 3..5, n = 1..3: sizes that are not powers of two
    radius = float(torch.empty(1).uniform_(0.5, 1.3, generator=g))
    u, A, initial = random_case(batch, length, n, d, radius, seed=length)
    log_scale, rows = naive_scan(u.cpu(), A.cpu(), ScaledRows(*(t.cpu() for t in initial)))
    weights = torch.randn(u.shape, generator=g, dtype=u.dtype).to(u.device)

    out, grads = states_and_gradients(triton_scan, u, A, initial, weights, steps_per_program=chunk)
    assert out.rows.shape == (batch, length, n, d) and out.log_scale.shape == (batch, length, n, 1)
    assert torch.allclose(out.rows.cpu(), rows, atol=1e-12)
    assert torch.allclose(out.log_scale.cpu(), log_scale, rtol=1e-13, atol=1e-12)
    _, expected = states_and_gradients(chunked_scan, u, A, initial, weights, chunk_size=5)
    for got, want in zip(grads, expected):
        assert ((got - want).norm() / want.norm()).item() < 1e-12


@pytest.mark.parametrize("length, chunk", [(1, 16), (20, 16), (45, 4)])
def test_shared_plain_initial_rows_equal_each_sequence_starting_from_them(length, chunk):
    """A plain ``[n, d]`` initial state (a layer's ``init_states``, shared by the batch) gives
    the states of the scaled, per-sequence form of the same rows, and their summed gradient."""
    u, A, _ = random_case(3, length, 2, 5, 1.1, seed=length)
    g = torch.Generator().manual_seed(length)
    plain = (torch.randn(2, 5, generator=g, dtype=u.dtype) * 30).to(u.device).requires_grad_(True)
    weights = torch.randn(u.shape, generator=g, dtype=u.dtype).to(u.device)

    def run(initial):
        u_, A_ = (t.detach().clone().requires_grad_(True) for t in (u, A))
        out = triton_scan(u_, A_, initial(plain), steps_per_program=chunk)
        (out.rows * weights).sum().backward()
        grads = (u_.grad, A_.grad, plain.grad.clone())
        plain.grad = None
        return out, grads

    shared, shared_grads = run(lambda rows: rows)
    expanded, expanded_grads = run(lambda rows: ScaledRows(*(t.expand(3, -1, -1) for t in normalize_rows(rows))))
    assert torch.allclose(shared.rows, expanded.rows, atol=1e-12)
    assert torch.allclose(shared.log_scale, expanded.log_scale, rtol=1e-13, atol=1e-12)
    for got, want in zip(shared_grads, expanded_grads):
        assert ((got - want).norm() / want.norm()).item() < 1e-12


@pytest.mark.parametrize("radius", [0.01, 1.0, 1.5, 100.0])
def test_float32_error_is_that_of_the_pure_pytorch_scan(radius):
    """float32 rounding, 700 steps, against the float64 recurrence: the kernel's errors in the
    rows and log-scales are at most twice the chunked scan's (measured: 0.2x to 1.1x);
    magnitudes reach 100^700 = e^3224 with nothing infinite."""
    u, A, initial = random_case(2, 700, 3, 6, radius, dtype=torch.float32, seed=3)
    log_scale, rows = naive_scan(u.cpu(), A.cpu(), ScaledRows(*(t.cpu() for t in initial)))
    ours = triton_scan(u, A, initial, steps_per_program=32)
    theirs = chunked_scan(u.cpu(), A.cpu(), ScaledRows(*(t.cpu() for t in initial)), chunk_size=64)
    assert torch.isfinite(ours.rows).all() and torch.isfinite(ours.log_scale).all()

    def errors(out):
        rows_error = (out.rows.cpu().double() - rows).abs().max().item()
        scale_error = ((out.log_scale.cpu().double() - log_scale).abs() / (log_scale.abs() + 1)).max().item()
        return rows_error, scale_error

    for ours_error, theirs_error in zip(errors(ours), errors(theirs)):
        assert ours_error <= 2 * theirs_error + 1e-7


def test_float32_gradients_at_a_huge_dynamic_range():
    """States near e^1660 and adjoints near e^-1660, 4096 steps: the float32 gradients are ten
    times closer to the float64 ones than the pure-PyTorch scan's (measured ~1e-6 against
    ~5e-5 on CPU): every dA term is formed from its two log-scales at once, and the kernels
    keep log-scales in float64 from stage to stage and for the backward, where a float32 one
    near 1660 is rounded by up to 6e-5 (as in the pure-PyTorch scan)."""
    u, A, initial = random_case(1, 4096, 2, 8, 1.5, dtype=torch.float32, seed=5)
    weights = torch.randn(u.shape, generator=torch.Generator().manual_seed(0)).to(u.device)
    out, grads = states_and_gradients(triton_scan, u, A, initial, weights)
    assert out.log_scale.max() > 1600
    cpu = [t.cpu() for t in (u, A, *initial, weights)]
    _, pytorch_grads = states_and_gradients(chunked_scan, cpu[0], cpu[1], ScaledRows(cpu[2], cpu[3]), cpu[4])
    _, exact_grads = states_and_gradients(chunked_scan, *(t.double() for t in cpu[:2]),
                                          ScaledRows(*(t.double() for t in cpu[2:4])), cpu[4].double())
    for got, theirs, exact in zip(grads, pytorch_grads, exact_grads):
        assert torch.isfinite(got).all()
        error = lambda g: ((g.cpu().double() - exact).norm() / exact.norm()).item()  # noqa: E731
        assert error(got) <= 0.1 * error(theirs)


def test_half_precision_inputs_are_read_as_they_are():
    u, A, initial = random_case(2, 40, 3, 4, 1.1, dtype=torch.float32, seed=2)
    half = u.to(torch.bfloat16).requires_grad_(True)
    out = triton_scan(half, A, initial, steps_per_program=8)
    expected = triton_scan(half.detach().float(), A, initial, steps_per_program=8)
    assert torch.equal(out.rows, expected.rows) and torch.equal(out.log_scale, expected.log_scale)
    assert out.rows.dtype == torch.float32
    out.rows.sum().backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()


def test_zero_inputs_and_zero_initial_state_stay_finite():
    u, A, _ = random_case(1, 30, 2, 4, 1.0, dtype=torch.float32)
    u[:, :10] = 0
    zero = normalize_rows(torch.zeros(1, 2, 4, device=u.device))
    out = triton_scan(u, A, zero, steps_per_program=4)
    assert torch.equal(out.rows[:, :10], torch.zeros_like(out.rows[:, :10]))
    expected = chunked_scan(u.cpu(), A.cpu(), ScaledRows(*(t.cpu() for t in zero)))
    assert torch.allclose(out.rows[:, 10:].cpu(), expected.rows[:, 10:], atol=1e-6)


def test_host_launch_arithmetic_equals_tritons():
    import triton

    from goom_ssm.triton_common import cdiv, next_power_of_2

    for a in range(0, 300):
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 32, 257):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert next_power_of_2(2**20 + 1) == 2**21 and cdiv(10**12 + 1, 10**6) == 10**6 + 1


def test_default_steps_per_program():
    assert [default_steps_per_program(t) for t in (1, 100, 1024, 4096, 65536, 2**20)] == [16, 16, 32, 64, 256, 256]


@needs_cuda
@pytest.mark.parametrize("rows", [24, 5])
@pytest.mark.parametrize("length", [1, 2, 3, 31, 32, 33, 1000, 1024, 4097, 16384, 65536])
def test_long_sequences_on_cuda_match_the_pure_pytorch_scan(length, rows):
    """The 124M model's state sizes (24 rows of 32; also 5 rows, a partly filled block of
    rows), batch 2, default chunking, float32, forward and backward: against the float64
    chunked scan, the kernel's errors are at most twice (states) or three times (gradients)
    those of the float32 chunked scan."""
    u, A, initial = random_case(2, length, rows, 32, 1.0, dtype=torch.float32, seed=length, device="cuda")
    weights = torch.randn_like(u)
    out, grads = states_and_gradients(triton_scan, u, A, initial, weights)
    pytorch, pytorch_grads = states_and_gradients(chunked_scan, u, A, initial, weights)
    exact, exact_grads = states_and_gradients(chunked_scan, u.double(), A.double(),
                                              ScaledRows(*(t.double() for t in initial)), weights.double())

    def errors(states):
        rows_error = (states.rows.double() - exact.rows).abs().max().item()
        scale_error = ((states.log_scale.double() - exact.log_scale).abs() / (exact.log_scale.abs() + 1)).max().item()
        return rows_error, scale_error

    for ours, theirs in zip(errors(out), errors(pytorch)):
        assert ours <= 2 * theirs + 1e-7
    for got, theirs, want in zip(grads, pytorch_grads, exact_grads):
        error = lambda g: ((g.double() - want).norm() / want.norm()).item()  # noqa: E731
        assert error(got) <= 3 * error(theirs) + 1e-7


def test_compiled_model_with_the_kernels_has_no_graph_break_and_equal_gradients():
    """``torch.compile(fullgraph=True)`` takes the scan's operators without a graph break (on CUDA
    Inductor traces their launches; on CPU, where the kernels run interpreted and the operators
    are opaque, the ``aot_eager`` backend traces the model's graph around them)."""
    from conftest import tiny_config
    from goom_ssm import GoomSSMForCausalLM

    torch.manual_seed(0)
    model = GoomSSMForCausalLM(tiny_config(hidden_size=64, num_state_heads=4, state_size=16,
                                           scan_implementation="triton")).to(TRITON_DEVICE).train()
    length = 300 if TRITON_DEVICE == "cuda" else 40
    ids = torch.randint(0, 97, (2, length), device=TRITON_DEVICE)
    model(ids, labels=ids).loss.backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    backend = "inductor" if TRITON_DEVICE == "cuda" else "aot_eager"
    torch.compile(model, fullgraph=True, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    for a, p in zip(eager, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-3, atol=1e-5)


def test_every_launch_of_the_operators_goes_through_wrap(monkeypatch):
    """Inside the Triton operators each launch of the forward and backward stages goes through
    ``wrap`` (``wrap_triton`` with compiled kernels, for ``torch.compile`` to trace it; a launch
    outside it would meet fake tensors): every stage and the power, with resets and restart
    rows, wrapped as often as launched, and the same states and gradients as unwrapped."""
    from goom_ssm import triton_scan

    class Counted:
        """A kernel that counts its launches."""

        def __init__(self, kernel):
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid):
            self.launches += 1
            return self.kernel[grid]

    kernels = [Counted(triton_scan._recurrence_kernel), Counted(triton_scan._power_kernel)]
    monkeypatch.setattr(triton_scan, "_recurrence_kernel", kernels[0])
    monkeypatch.setattr(triton_scan, "_power_kernel", kernels[1])
    wrapped = []

    def wrap(kernel):
        wrapped.append(kernel)
        return kernel

    u, A, initial = random_case(2, 40, 3, 4, 0.9, seed=5)
    starts = torch.rand(2, 40, generator=torch.Generator().manual_seed(5)) < 0.1
    resets = triton_scan.kernel_resets(starts.to(u.device), u)
    restart = triton_scan.kernel_restart(initial.rows[0], A)
    grad_rows = torch.randn_like(u)
    results = []
    for w in (None, wrap):
        states, power = triton_scan._forward(u, A, initial, 8, resets, restart, wrap=w)
        grads = triton_scan._backward(grad_rows, A, initial, states, power, 8, u.dtype, resets, restart, wrap=w)
        results.append([*states, *power, *grads])
    assert [k.launches for k in kernels] == [12, 2]  # per pass: 3 stages each way, one power (the backward reuses it)
    assert wrapped.count(kernels[0]) == 6 and wrapped.count(kernels[1]) == 1 and len(wrapped) == 7
    for plain, traced in zip(*results):
        assert torch.equal(plain, traced)


def test_matrix_power_kernel():
    """``A^k`` by squaring in the kernel equals the float64 matrix power, at radii where the
    powers reach e^+-180 (each product is normalised)."""
    from goom_ssm.triton_scan import _power

    for radius in (0.05, 1.0, 20.0):
        _, A, _ = random_case(1, 1, 1, 5, radius, seed=7)
        for exponent in (1, 2, 3, 7, 16, 37, 60):
            log_scale, rows = _power(A.contiguous(), exponent)
            assert rows.abs().max().item() == pytest.approx(1.0)
            expected = torch.linalg.matrix_power(A.cpu(), exponent)
            got = (log_scale.exp() * rows).cpu()
            assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())
