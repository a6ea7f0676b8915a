"""Initialisation in every parameter dtype: ``from_config(cfg, dtype=half precision)`` works
(the orthogonal ``A`` is drawn in float32 and rounded), the float32 and float64 draws are
those of ``torch.nn.init`` on the parameters themselves, and weights marked as loaded are
left alone."""

import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from goom_ssm import GoomSSM, GoomSSMConfig
from goom_ssm.cli import DEFAULT_MODEL_DIR

HALF = [torch.float16, torch.bfloat16]
GAIN = 0.99
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_state_heads=2, state_size=16,
             transition_init_gain=GAIN)


def ssm_layers(model) -> list[GoomSSM]:
    """The model's SSM layers."""
    return [m for m in model.modules() if isinstance(m, GoomSSM)]


def recipe(n_hid: int, d_hid: int, d_inp: int, d_out: int, dtype: torch.dtype, seed: int) -> dict:
    """GoomSSM's initialisation written out with torch.nn.init on tensors of ``dtype``, except
    ``A``, drawn in float32 (float64 for float64) and rounded to ``dtype``."""
    torch.manual_seed(seed)
    init_states = nn.init.uniform_(torch.empty(n_hid, d_hid, dtype=dtype), -0.1, 0.1)
    A = nn.init.orthogonal_(torch.empty(d_hid, d_hid, dtype=torch.promote_types(dtype, torch.float32)), gain=GAIN)
    params = {"init_states": init_states, "A": A.to(dtype)}
    for name, shape in (("B", (d_inp, n_hid * d_hid)), ("C", (n_hid * d_hid, d_out)), ("D", (d_inp, d_out))):
        bound = 1.0 / math.sqrt(shape[0])
        params[name] = nn.init.uniform_(torch.empty(shape, dtype=dtype), -bound, bound)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF])
def test_reset_parameters_follows_the_recipe(dtype):
    """Same seed -> the recipe's values exactly, and the same random numbers consumed."""
    layer = GoomSSM(d_inp=24, d_out=16, n_hid=4, d_hid=8, transition_init_gain=GAIN).to(dtype)
    torch.manual_seed(3)
    layer.reset_parameters()
    after_layer = torch.rand(4)
    expected = recipe(4, 8, 24, 16, dtype, seed=3)
    after_recipe = torch.rand(4)
    for name, value in expected.items():
        actual = getattr(layer, name)
        assert actual.dtype == dtype and torch.equal(actual, value), name
    assert torch.equal(after_layer, after_recipe)


def test_float32_draw_is_nn_init_orthogonal_on_the_parameter():
    """For float32, A is what nn.init.orthogonal_ on the parameter itself gives."""
    layer = GoomSSM(d_inp=24, d_out=16, n_hid=4, d_hid=8, transition_init_gain=GAIN)
    torch.manual_seed(5)
    nn.init.uniform_(layer.init_states, -0.1, 0.1)
    direct = nn.init.orthogonal_(layer.A, gain=GAIN).detach().clone()
    torch.manual_seed(5)
    layer.reset_parameters()
    assert torch.equal(layer.A, direct)


@pytest.mark.parametrize("dtype", HALF)
def test_from_config_in_half_precision(dtype):
    """A model of that dtype whose A is GAIN times an orthogonal matrix up to rounding, and
    whose forward pass is finite."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(GoomSSMConfig(**SMALL), dtype=dtype)
    assert model.dtype == dtype and {p.dtype for p in model.parameters()} == {dtype}
    assert torch.get_default_dtype() == torch.float32
    unit_roundoff = torch.finfo(dtype).eps / 2
    for layer in ssm_layers(model):
        A = layer.A.detach().float()
        gram = A @ A.T / GAIN**2
        # rounding each entry by at most unit_roundoff (relative) moves a Gram entry by < 2 * unit_roundoff
        assert (gram - torch.eye(A.shape[0])).abs().max() < 2.1 * unit_roundoff
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        output = model(input_ids=ids, labels=ids)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_loaded_A_is_not_reinitialised(dtype):
    """Under transformers' guarded init functions (as in from_pretrained), an A marked
    _is_hf_initialized keeps its values; the other parameters are drawn."""
    from transformers.initialization import guard_torch_init_functions

    layer = GoomSSM(d_inp=24, d_out=16, n_hid=4, d_hid=8).to(dtype)
    A, B = layer.A.detach().clone(), layer.B.detach().clone()
    layer.A._is_hf_initialized = True
    with guard_torch_init_functions():
        layer.reset_parameters()
    assert torch.equal(layer.A, A) and not torch.equal(layer.B, B)


def test_from_pretrained_in_bfloat16_keeps_the_checkpoint():
    """Loading the shipped (float32) model as bfloat16 gives the checkpoint's values, rounded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.bfloat16)
    checkpoint = load_file(str(DEFAULT_MODEL_DIR / "model.safetensors"))
    for name, value in model.state_dict().items():
        if name in checkpoint:
            assert torch.equal(value, checkpoint[name].to(torch.bfloat16)), name
