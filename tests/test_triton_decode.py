"""The fused single-token layer step against the layer itself (interpreted on CPU, see conftest)."""

import copy

import pytest
import torch

pytest.importorskip("triton")

from conftest import TRITON_DEVICE, norm_relative_error  # noqa: E402
from goom_ssm.layers import GoomSSMBlock  # noqa: E402
from goom_ssm.scan import ScaledRows, normalize_rows  # noqa: E402
from goom_ssm.triton_decode import decode_step, head_logits  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton's interpreter "
                                "multiplies bfloat16 wrongly and rounds it toward zero)")


def make_case(batch, d_emb, n, d, dtype, device=TRITON_DEVICE, seed=0):
    """A layer with non-trivial LayerNorm parameters, an input and a state at a large scale."""
    torch.manual_seed(seed)
    block = GoomSSMBlock(d_emb=d_emb, n_hid=n, d_hid=d).to(device=device, dtype=dtype)
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.2, 0.2)
    hidden = (torch.randn(batch, 1, d_emb, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    state_dtype = block.ssm.state_dtype
    rows = normalize_rows(torch.randn(batch, n, d, dtype=torch.float64)).rows
    log_scale = torch.randn(batch, n, 1, dtype=torch.float64) * 20
    state = ScaledRows(log_scale.to(device, state_dtype), rows.to(device, state_dtype))
    return block, hidden, state


def clone(state):
    return ScaledRows(state.log_scale.clone(), state.rows.clone())


def fused_step(block, hidden, state, **options):
    """:func:`decode_step` with ``block``'s tensors."""
    ssm = block.ssm
    return decode_step(hidden, state, norm_weight=block.norm.weight, norm_bias=block.norm.bias, norm_eps=block.norm.eps,
                       A=ssm.A, B=ssm.B, C=ssm.C, D=ssm.D, out_weight=block.out_proj.weight, **options)


@pytest.mark.parametrize("batch", [1, 3, 65])
@torch.no_grad()
def test_float64_step_equals_the_layer_with_padding_in_place(batch):
    """Sizes that are not powers of two; batch 65 spans two row blocks. Every third sequence
    is padded: its state must come back unchanged, bit for bit. The layer's own fused step
    (what the CUDA-graph decoder runs) updates the state in place. The LayerNorm's epsilon is
    large and not a float32 number: rounded to float32 in the kernel, it would move the result
    far past the tolerance."""
    block, hidden, state = make_case(batch, 40, 3, 5, torch.float64)
    block.norm.eps = 1 / 3
    mask = (torch.arange(batch) % 3 != 1)[:, None].to(hidden.device)
    expected_hidden, expected_state = block(hidden, state, mask)

    buffers = clone(state)
    out, new_state = block.fused_decode_step(hidden, buffers, mask)
    assert new_state.rows is buffers.rows and out.shape == hidden.shape and out.dtype == hidden.dtype
    assert torch.allclose(out, expected_hidden, rtol=1e-12, atol=1e-12)
    assert torch.allclose(new_state.rows, expected_state.rows, rtol=1e-12, atol=1e-12)
    assert torch.allclose(new_state.log_scale, expected_state.log_scale, rtol=1e-12, atol=1e-12)
    padded = ~mask[:, 0]
    assert torch.equal(new_state.rows[padded], state.rows[padded])
    assert torch.equal(new_state.log_scale[padded], state.log_scale[padded])


@torch.no_grad()
def test_new_state_tensors_leave_the_old_state_alone():
    block, hidden, state = make_case(2, 24, 2, 4, torch.float64)
    kept = clone(state)
    out, new_state = fused_step(block, hidden, state)
    expected_hidden, expected_state = block(hidden, kept)
    assert torch.equal(state.rows, kept.rows) and torch.equal(state.log_scale, kept.log_scale)
    assert torch.allclose(out, expected_hidden, rtol=1e-12, atol=1e-12)
    assert torch.allclose(new_state.rows, expected_state.rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 4])  # one sequence: sums of products; more: tensor-core blocks
@torch.no_grad()
def test_float32_error_is_that_of_the_layer(batch):
    """float32, the 124M model's state shape (24 rows of 32) on a narrower layer: against the
    float64 layer, the fused step's error is at most twice the float32 layer's."""
    block, hidden, state = make_case(batch, 96, 24, 32, torch.float32)
    exact = copy.deepcopy(block).double()(hidden.double(), ScaledRows(*(t.double() for t in state)))
    eager = block(hidden, state)
    fused = fused_step(block, hidden, state)
    for ours, theirs, want in zip((fused[0], fused[1].rows), (eager[0], eager[1].rows), (exact[0], exact[1].rows)):
        assert norm_relative_error(ours, want) <= 2 * norm_relative_error(theirs, want) + 1e-7


@needs_cuda
@pytest.mark.parametrize("weights", ["bfloat16", "autocast"])
@pytest.mark.parametrize("batch", [1, 64])
@torch.no_grad()
def test_half_precision_error_is_that_of_the_layer(weights, batch):
    """bfloat16 weights, or float32 weights under bfloat16 autocast, at the 124M layer's sizes:
    against the float64 layer with the same weights, the fused step's error is at most 1.5x
    the eager layer's (it rounds the same operands, and keeps intermediates in float32)."""
    block, hidden, state = make_case(batch, 768, 24, 32, torch.float32, device="cuda")
    if weights == "bfloat16":
        block, hidden = block.to(torch.bfloat16), hidden.to(torch.bfloat16)
    exact = copy.deepcopy(block).double()(hidden.double(), ScaledRows(*(t.double() for t in state)))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=weights == "autocast"):
        eager = block(hidden, state)
        fused = fused_step(block, hidden, state)
    assert fused[0].dtype == eager[0].dtype
    for ours, theirs, want in zip((fused[0], fused[1].rows), (eager[0], eager[1].rows), (exact[0], exact[1].rows)):
        assert norm_relative_error(ours, want) <= 1.5 * norm_relative_error(theirs, want)


def make_head(batch, d_emb, vocab, dtype, device=TRITON_DEVICE):
    torch.manual_seed(1)
    head = torch.nn.Linear(d_emb, vocab, bias=False).to(device=device, dtype=dtype)
    return head, (torch.randn(batch, 1, d_emb, dtype=torch.float64) * 2).to(device=device, dtype=dtype)


@pytest.mark.parametrize("batch", [1, 3, 65])
@torch.no_grad()
def test_head_equals_the_linear_layer(batch):
    """float64 to rounding, and float32 within twice the linear layer's error, a vocabulary
    that is not a multiple of the block."""
    head, hidden = make_head(batch, 40, 97, torch.float64)
    logits = head_logits(hidden, head.weight)
    assert logits.shape == (batch, 1, 97) and logits.dtype == torch.float32
    assert torch.equal(logits, head(hidden).float())  # float64 sums agree long before the cast
    head, hidden = head.float(), hidden.float()
    exact = head.double()(hidden.double())
    assert norm_relative_error(head_logits(hidden, head.float().weight), exact) <= 2 * norm_relative_error(
        head.float()(hidden), exact) + 1e-7


@needs_cuda
@pytest.mark.parametrize("weights", ["bfloat16", "autocast"])
@pytest.mark.parametrize("batch", [1, 64])
@torch.no_grad()
def test_half_precision_head_is_the_linear_layer(weights, batch):
    """The 124M head (GPT-2 vocabulary): logits rounded to bfloat16 as the layer's output is,
    and against the float64 product, an error at most 1.5x the linear layer's."""
    head, hidden = make_head(batch, 768, 50257, torch.float32, device="cuda")
    if weights == "bfloat16":
        head, hidden = head.to(torch.bfloat16), hidden.to(torch.bfloat16)
    exact = copy.deepcopy(head).double()(hidden.double())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=weights == "autocast"):
        ours, theirs = head_logits(hidden, head.weight), head(hidden).float()
    assert ours.dtype == torch.float32 and torch.equal(ours, ours.bfloat16().float())
    assert norm_relative_error(ours, exact) <= 1.5 * norm_relative_error(theirs, exact)


@needs_cuda
@pytest.mark.parametrize("batch", [1, 2])  # one sequence: the weights are read before the wait
@torch.no_grad()
def test_dependent_launches_equal_plain_launches(batch, monkeypatch):
    """Programmatic dependent launch (taken on Hopper and later) changes when a kernel starts,
    not what it computes: the layers' steps, one after another in a CUDA graph as the decoder
    runs them, agree bit for bit with and without it."""
    from goom_ssm import triton_decode
    from goom_ssm.modeling.cuda_graph_goom_ssm import capture_graph

    device = torch.device("cuda")
    assert triton_decode._dependent_launch(device) == (torch.cuda.get_device_capability(device)[0] >= 9)
    blocks = [make_case(batch, 768, 24, 32, torch.bfloat16, device="cuda", seed=seed)[0] for seed in range(4)]
    hidden, state = make_case(batch, 768, 24, 32, torch.bfloat16, device="cuda")[1:]

    def replayed():
        states = [clone(state) for _ in blocks]

        def step():
            h = hidden
            for block, s in zip(blocks, states):
                h, _ = block.fused_decode_step(h, s)
            return h

        graph, out = capture_graph(step, warmups=1)
        for s in states:  # the warm-up stepped them; the replays start from the same states
            s.log_scale.copy_(state.log_scale)
            s.rows.copy_(state.rows)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        return out.clone(), [s.rows.clone() for s in states]

    dependent = replayed()
    monkeypatch.setattr(triton_decode, "_dependent_launch", lambda device: False)
    plain = replayed()
    assert torch.equal(dependent[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(dependent[1], plain[1]))
