"""The fused residual layer (one autograd node) against the layer's module path.

Both run the same operations in the same dtypes, but for the fused layer's LayerNorm (its
own Triton kernels, which sum in another order), so outputs, final states and every gradient
are as close to the float64 module path as the module path itself is, in float64, float32
and under bf16 autocast. Without a GPU the Triton kernels run in Triton's interpreter (see
conftest)."""

import copy
import functools

import pytest
import torch

pytest.importorskip("triton")

from conftest import TRITON_DEVICE  # noqa: E402
from goom_ssm import fused_block  # noqa: E402
from goom_ssm.layers import GoomSSMBlock  # noqa: E402
from goom_ssm.triton_scan import default_steps_per_program  # noqa: E402


def outputs_and_gradients(block, forward, x, weights, final_weight):
    """``forward(x)``'s output, final state and the gradients of a loss using both, in ``x`` and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    block.zero_grad()
    out, state = forward(x)
    loss = (out * weights).sum()
    if final_weight is not None:  # else the final state gets no gradient (None in the backward)
        loss = loss + final_weight * state.rows.sum()
    loss.backward()
    return [out, state.log_scale, state.rows, x.grad] + [p.grad for p in block.parameters()]


# final_weight None: the final state gets no gradient, so under autocast the scan reads the
# rows' gradient in bf16 (no float32 copy to add it to).
@pytest.mark.parametrize("dtype, autocast, final_weight", [(torch.float64, False, 0.3), (torch.float32, False, 0.3),
                                                           (torch.float32, True, 0.3), (torch.float32, True, None)])
@pytest.mark.parametrize("seq_len, packed", [(1, False), (40, False), (40, True)])
def test_fused_layer_is_as_exact_as_the_module_path(dtype, autocast, final_weight, seq_len, packed):
    """One step, and 40 steps: three chunks of the kernels (16, 16 and 8 steps: several chunk
    ends carried across, a partial last chunk). Also for packed documents (``starts``:
    one-token documents, and starts on and next to the kernels' chunk boundaries). Each
    result's error against the float64 module path: at most 4x the module path's own (their
    roundings differ in place, not in size), plus 16 roundings of the dtype for float64,
    where the module path is the reference."""
    assert seq_len == 1 or default_steps_per_program(seq_len) == 16  # the chunks named above
    torch.manual_seed(seq_len)
    block = GoomSSMBlock(d_emb=32, n_hid=3, d_hid=8, scan_implementation="triton").to(TRITON_DEVICE, dtype)
    x = torch.randn(2, seq_len, 32, dtype=dtype, device=TRITON_DEVICE)
    weights = torch.randn_like(x)
    starts = None
    if packed:
        starts = torch.zeros(2, seq_len, dtype=torch.bool, device=TRITON_DEVICE)
        starts[0, [3, 4, 5, 16, 31, 32]] = True
        starts[1, [1, 15, 39]] = True
    results = []
    for forward in (functools.partial(block._forward_fused, starts=starts),
                    functools.partial(block._forward_modules, starts=starts)):
        with torch.autocast(TRITON_DEVICE, dtype=torch.bfloat16, enabled=autocast):
            results.append(outputs_and_gradients(block, forward, x, weights, final_weight))
    exact = copy.deepcopy(block).double()
    expected = outputs_and_gradients(exact, functools.partial(exact._forward_modules, starts=starts), x.double(),
                                     weights.double(), final_weight)
    names = ["out", "final log-scale", "final rows", "x.grad"] + [f"{name}.grad" for name, _ in block.named_parameters()]
    for name, fused, modules, reference in zip(names, *results, expected):
        assert fused.dtype == modules.dtype, name
        error, module_error = ((got.double() - reference).abs().max().item() for got in (fused, modules))
        bound = 4 * module_error + 16 * torch.finfo(dtype).eps / 2 * reference.abs().max().item()
        assert error <= bound, f"{name}: error {error:.3e}, the module path's {module_error:.3e}"


def test_the_layer_trains_fused_only_where_the_fused_node_is_the_same_computation(monkeypatch):
    calls = []
    apply = fused_block.FusedBlock.apply
    monkeypatch.setattr(fused_block.FusedBlock, "apply", lambda *args: calls.append(1) or apply(*args))

    def fused(block, x, **kwargs):
        calls.clear()
        block(x, **kwargs)
        return bool(calls)

    block = GoomSSMBlock(d_emb=16, n_hid=2, d_hid=4, scan_implementation="triton").to(TRITON_DEVICE)
    x = torch.randn(2, 5, 16, device=TRITON_DEVICE)
    assert fused(block, x)
    with torch.autocast(TRITON_DEVICE, dtype=torch.bfloat16):
        assert fused(block, x)
    with torch.no_grad():
        assert not fused(block, x)  # inference: the module path costs no autograd nodes
    assert not fused(block, x, mask=torch.ones(2, 5, dtype=torch.bool, device=TRITON_DEVICE))
    assert not fused(block, x, state=block.ssm.initial_state(2))
    assert fused(block, x, starts=torch.tensor([[0, 0, 1, 0, 0]] * 2, dtype=torch.bool, device=TRITON_DEVICE))
    handle = block.ssm.register_forward_hook(lambda *args: None)
    assert not fused(block, x)  # a hook must see its module called
    handle.remove()
    assert not fused(GoomSSMBlock(d_emb=16, n_hid=2, d_hid=4, scan_implementation="chunked").to(TRITON_DEVICE), x)
    wrapped = GoomSSMBlock(d_emb=16, n_hid=2, d_hid=4, scan_implementation="triton").to(TRITON_DEVICE)
    wrapped.out_proj = type("LoraLinear", (torch.nn.Linear,), {})(16, 16, bias=False).to(TRITON_DEVICE)
    assert not fused(wrapped, x)  # an adapter (PEFT wraps modules and parameters) must run as it is
    assert not fused(block.to(torch.bfloat16), x.to(torch.bfloat16))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_of_fused_layers_gives_the_same_gradients(use_reentrant):
    """Reentrant checkpointing runs the first forward without grad (the module path) and
    recomputes with it (the fused node): the same gradients to float32's rounding (the layers
    after the first get the module path's inputs); the non-reentrant kind fuses both: equal."""
    from conftest import enable_checkpointing, tiny_config
    from goom_ssm import GoomSSMForCausalLM

    ids = torch.randint(0, 97, (2, 30), device=TRITON_DEVICE)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GoomSSMForCausalLM(tiny_config(hidden_size=32, num_state_heads=2, state_size=8,
                                               scan_implementation="triton")).to(TRITON_DEVICE).train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        if use_reentrant:
            torch.testing.assert_close(a, b, rtol=0, atol=64 * torch.finfo(a.dtype).eps * b.abs().max().item())
        else:
            assert torch.equal(a, b)
