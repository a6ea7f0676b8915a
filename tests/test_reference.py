"""The converted original checkpoint reproduces the original implementation's outputs."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import TRITON_DEVICE, norm_relative_error, relative_error
from goom_ssm.conversion import original
from goom_ssm.layers import GoomSSM
from goom_ssm.naive import naive_scan
from goom_ssm.triton_scan import HAS_TRITON
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package"))
IMPLEMENTATIONS = ["chunked", "goom_prefix", TRITON]


def device_for(implementation):
    return TRITON_DEVICE if implementation == "triton" else "cpu"


def load(converted_tiny_dir, implementation, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(converted_tiny_dir, scan_implementation=implementation)
    return model.to(dtype).to(device_for(implementation)).eval()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_logits_full_and_continued(converted_tiny_dir, reference_vectors, implementation):
    v = reference_vectors
    model = load(converted_tiny_dir, implementation)
    ids, more_ids = v["input_ids"].to(model.device), v["more_ids"].to(model.device)
    with torch.no_grad():
        assert relative_error(model(ids).logits, v["logits"]) <= 1e-5
        assert relative_error(model(torch.cat([ids, more_ids], dim=1)).logits, v["logits_full"]) <= 1e-5
        prompt = model(ids, use_cache=True)
        continued = model(more_ids, cache=prompt[CACHE_NAME], use_cache=True).logits
        assert relative_error(continued, v["logits_continued"]) <= 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_greedy_generation_with_the_cache(converted_tiny_dir, reference_vectors, implementation):
    """The original's greedy ids through ``generate()`` (on CUDA, the "triton" model decodes
    through the CUDA-graph decoder)."""
    v = reference_vectors
    model = load(converted_tiny_dir, implementation)
    ids = v["input_ids"].to(model.device)
    out = model.generate(ids, max_new_tokens=v["greedy_ids"].shape[1], do_sample=False, use_cache=True)
    assert torch.equal(out[:, ids.shape[1]:].cpu(), v["greedy_ids"])


def named_gradients(model) -> dict:
    """Gradients under the original's parameter names."""
    params = dict(model.named_parameters())
    grads = {old: params[new].grad for old, new in original._TOP_NAMES.items()}
    for i in range(model.config.num_hidden_layers):
        for old, new in original._LAYER_NAMES.items():
            grads[f"res_layers.{i}.{old}"] = params[f"backbone.layers.{i}.{new}"].grad
    return grads


def loss_and_gradients(converted_tiny_dir, v, implementation, dtype=torch.float32):
    model = load(converted_tiny_dir, implementation, dtype).train()
    logits = model(v["input_ids"].to(model.device)).logits
    loss = F.cross_entropy(logits.flatten(0, 1).to(dtype), v["targets"].flatten().to(model.device))
    loss.backward()
    return loss.detach().cpu(), {name: grad.cpu() for name, grad in named_gradients(model).items()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_loss_and_every_gradient(converted_tiny_dir, reference_vectors, implementation):
    """Relative error per gradient tensor, ||ours - reference|| / ||reference||. (The
    reference gradients are themselves ~9e-5 away, in this measure, from the exact float64
    gradient: the original's backward adds eps = 1.2e-7 to every derivative of log and exp.)"""
    v = reference_vectors
    loss, grads = loss_and_gradients(converted_tiny_dir, v, implementation)
    assert torch.allclose(loss, v["loss"], rtol=1e-6)
    assert set(grads) == set(v["grads"])
    for name, expected in v["grads"].items():
        assert norm_relative_error(grads[name], expected) <= 1e-4, name


@pytest.mark.parametrize("implementation", ["chunked", TRITON])
def test_gradients_equal_exact_float64_gradients(converted_tiny_dir, reference_vectors, implementation):
    v = reference_vectors
    _, grads32 = loss_and_gradients(converted_tiny_dir, v, implementation)
    _, grads64 = loss_and_gradients(converted_tiny_dir, v, implementation, torch.float64)
    for name in grads32:
        assert relative_error(grads32[name], grads64[name]) <= 1e-5, name


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_stress_layer_matches_float64_sequential(stress_case, implementation):
    s = stress_case
    layer = GoomSSM(d_inp=16, d_out=12, n_hid=2, d_hid=8, scan_implementation=implementation)
    layer.load_state_dict({k: t for k, t in s["state_dict"].items() if k in dict(layer.named_parameters())})
    layer.to(device_for(implementation))
    u = s["u"].detach().to(device_for(implementation)).requires_grad_(True)  # a leaf; the fixture untouched
    y, state = layer(u)
    assert torch.isfinite(y).all()
    assert relative_error(y, s["y_float64_sequential"]) <= 1e-4
    assert torch.allclose(state.log_scale.double().cpu(), s["final_log_scale"], rtol=1e-6)
    y.square().mean().backward()
    assert torch.isfinite(u.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_stress_layer_against_our_own_float64_recurrence(stress_case):
    """The reference file's float64 output (y_float64_sequential), re-derived here from the naive recurrence."""
    s = stress_case
    sd = s["state_dict"]
    layer = GoomSSM(d_inp=16, d_out=12, n_hid=2, d_hid=8).double()
    layer.load_state_dict({k: t for k, t in sd.items() if k in dict(layer.named_parameters())})
    u = s["u"].double()
    Bu = (u @ layer.B).view(1, -1, 2, 8)
    log_scale, rows = naive_scan(Bu, layer.A, layer.initial_state(1))
    y = (torch.e ** 2 * rows).flatten(-2) @ layer.C + u @ layer.D
    assert relative_error(y, s["y_float64_sequential"]) <= 1e-9
    with torch.no_grad():
        assert relative_error(layer(u)[0], y) <= 1e-9

