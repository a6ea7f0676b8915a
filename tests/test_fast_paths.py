"""One rule for every fast path (``goom_ssm.layers.is_plain``): adapters, wrapped parameters,
subclassed layers and hooks take the module path, so they apply exactly; models deep-copy
and pickle after generation. The generation tests run on CUDA too (CUDA-graph decoder)."""

import copy
import io

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config
from goom_ssm import GoomSSMForCausalLM, GoomSSMModel
from goom_ssm.layers import is_plain
from goom_ssm.modeling.cuda_graph_goom_ssm import decoders_of

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
MODEL_TYPES = (GoomSSMForCausalLM, GoomSSMModel)


def make_model(device="cpu"):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_state_heads=2, state_size=8)
    return GoomSSMForCausalLM(config).to(device).eval()


def lora(model, **targets):
    """``model`` with random (non-identity) LoRA adapters on ``targets``."""
    peft = pytest.importorskip("peft", minversion="0.17")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **targets)
    return peft.get_peft_model(model, config).eval()


def generate(model, ids):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_plain_model_is_plain():
    model = make_model()
    assert is_plain(model, MODEL_TYPES)
    assert all(is_plain(block) for block in model.backbone.layers)


@pytest.mark.parametrize("change", ["hook", "pre_hook", "subclass", "parametrization", "replaced_forward"])
def test_anything_but_plain_modules_is_not_plain(change):
    model = make_model()
    block = model.backbone.layers[1]
    if change == "hook":
        block.out_proj.register_forward_hook(lambda *args: None)
    elif change == "pre_hook":
        block.ssm.register_forward_pre_hook(lambda *args: None)
    elif change == "subclass":
        block.out_proj = Doubled(32, 32, bias=False)
    elif change == "parametrization":
        torch.nn.utils.parametrize.register_parametrization(block.ssm, "B", nn.Identity())
    else:  # as accelerate's hooks do
        block.norm.forward = block.norm.forward
    assert not is_plain(block)
    assert not is_plain(model, MODEL_TYPES)
    assert is_plain(model.backbone.layers[0])


@pytest.mark.parametrize("targets", [dict(target_modules=["out_proj"]),
                                     dict(target_modules=[], target_parameters=["ssm.B", "ssm.C", "ssm.D"])],
                         ids=["out_proj", "ssm_parameters"])
def test_lora_wrapped_layers_are_not_plain(targets):
    model = lora(make_model(), **targets)
    assert not any(is_plain(block) for block in model.get_base_model().backbone.layers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("targets", [dict(target_modules=["out_proj"]),
                                     dict(target_modules=[], target_parameters=["ssm.B", "ssm.C", "ssm.D"])],
                         ids=["out_proj", "ssm_parameters"])
def test_generation_with_an_unmerged_adapter_equals_the_merged_model(device, targets):
    ids = torch.randint(0, 300, (2, 9), device=device)
    adapted = lora(make_model(device), **targets)
    tokens, logits = generate(adapted, ids)
    merged = adapted.merge_and_unload()
    assert is_plain(merged, MODEL_TYPES)
    merged_tokens, merged_logits = generate(merged, ids)
    base_tokens, _ = generate(make_model(device), ids)
    assert not torch.equal(tokens, base_tokens)  # the adapter changes the model
    assert torch.equal(tokens, merged_tokens)
    torch.testing.assert_close(logits, merged_logits, rtol=1e-4, atol=1e-4)
    if device == "cuda":
        assert decoders_of(merged)  # the merged (plain) model decodes through the graph


@pytest.mark.parametrize("device", DEVICES)
def test_an_adapter_added_after_generation_applies(device):
    """A graph captured before the adapter existed is not replayed for the adapted model."""
    ids = torch.randint(0, 300, (1, 7), device=device)
    model = make_model(device)
    generate(model, ids)
    adapted = lora(model, target_modules=["out_proj"])
    tokens, logits = generate(adapted, ids)
    merged_tokens, merged_logits = generate(adapted.merge_and_unload(), ids)
    assert torch.equal(tokens, merged_tokens)
    torch.testing.assert_close(logits, merged_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_a_hook_added_after_generation_runs_on_every_step(device):
    ids = torch.randint(0, 300, (1, 5), device=device)
    model = make_model(device)
    generate(model, ids)
    calls = []
    model.backbone.layers[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    generate(model, ids)
    assert calls == [5] + [1] * 11  # the prompt, then one call per generated token after the first


@pytest.mark.parametrize("device", DEVICES)
def test_the_model_deep_copies_and_pickles_after_generation(device):
    ids = torch.randint(0, 300, (2, 6), device=device)
    model = make_model(device)
    expected, _ = generate(model, ids)
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    for other in (copied, unpickled):
        assert torch.equal(generate(other, ids)[0], expected)
    assert torch.equal(generate(model, ids)[0], expected)


@pytest.mark.parametrize("name", ["seq_idx", "cu_seq_lens_q", "output_attentions", "foo"])
def test_forward_refuses_keywords_it_does_not_understand(name):
    model = make_model()
    with pytest.raises(TypeError, match=name):
        model(torch.tensor([[1, 2, 3]]), **{name: True})
    with pytest.raises(TypeError, match=name):
        model.backbone(torch.tensor([[1, 2, 3]]), **{name: True})
