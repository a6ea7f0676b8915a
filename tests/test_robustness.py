"""Numerical robustness: half-precision autocast, adversarial weights, very long sequences.

States of any magnitude are fine by design: they are held as a log-scale and a normalised
row (the GOOM form), so nothing overflows however far the recurrence grows or decays.
"""

import pytest
import torch

from conftest import tiny_config
from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME


def set_spectral_radius(model, radius):
    with torch.no_grad():
        for layer in model.backbone.layers:
            A = layer.ssm.A
            A.mul_(radius / torch.linalg.eigvals(A.double()).abs().max().item())


def all_finite(model, *tensors):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return all(torch.isfinite(t).all() for t in (*tensors, *grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("radius", [0.01, 1.0, 100.0])
def test_124m_model_under_autocast_with_adversarial_transitions(dtype, radius):
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(GoomSSMConfig(num_hidden_layers=2)).train()  # 124M widths, 2 of 24 layers
    set_spectral_radius(model, radius)
    ids = torch.randint(0, 50257, (1, 48))
    with torch.autocast("cpu", dtype=dtype):
        out = model(ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    assert all_finite(model, out.logits, out.loss, *out.hidden_states)


def test_huge_inputs_and_weights_stay_finite():
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(tiny_config()).train()
    with torch.no_grad():
        model.backbone.embeddings.weight.mul_(1e6)
        for layer in model.backbone.layers:
            layer.ssm.B.mul_(1e3)
            layer.ssm.init_states.mul_(1e-20)
    set_spectral_radius(model, 50.0)
    ids = torch.randint(0, 97, (2, 300))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all_finite(model, out.logits, out.loss)


def test_65536_tokens_forward_and_backward():
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(tiny_config(num_hidden_layers=1)).train()
    set_spectral_radius(model, 1.2)
    ids = torch.randint(0, 97, (1, 65536))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all_finite(model, out.logits, out.loss)


@torch.no_grad()
def test_state_carried_across_a_million_tokens():
    """2^20 tokens fed in blocks through the cache (the mechanism generation uses): the
    log-scale of the state grows to ~radius-log x 1M, e^300000, with no inf or NaN."""
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    set_spectral_radius(model, 1.5)
    cache = None
    for block in range(16):
        ids = torch.randint(0, 97, (1, 65536))
        out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out[CACHE_NAME]
        assert torch.isfinite(out.logits).all()
    state = cache.states[0]
    assert cache.get_seq_length() == 2**20
    assert torch.isfinite(state.rows).all() and state.log_scale.min() > 2**20 * 0.3
    for _ in range(100):  # and single-token steps continue from there
        out = model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        assert torch.isfinite(out.logits).all()
