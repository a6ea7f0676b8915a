"""transformers integration: config, Auto classes, save/load, loss, cache, generate()."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from conftest import enable_checkpointing, tiny_config
from goom_ssm import GoomSSMCache, GoomSSMConfig, GoomSSMForCausalLM, GoomSSMModel
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME


def test_auto_classes_are_registered():
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("goom_ssm", vocab_size=97), GoomSSMConfig)
    assert type(AutoModel.from_config(config)) is GoomSSMModel
    assert type(AutoModelForCausalLM.from_config(config)) is GoomSSMForCausalLM


def test_default_config_is_the_published_124m_model():
    config = GoomSSMConfig()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (50257, 768, 24)
    assert (config.num_state_heads, config.state_size, config.eos_token_id) == (24, 32, 50256)
    with torch.device("meta"):
        model = GoomSSMForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 120e6 < n_params < 130e6


@pytest.mark.parametrize("bad", [
    dict(hidden_size=0), dict(num_hidden_layers=-1), dict(state_size=2.5), dict(scan_implementation="fft"),
    dict(layer_norm_epsilon=0.0), dict(pad_token_id=97), dict(num_state_heads=True), dict(scan_chunk_size=0),
])
def test_inconsistent_config_is_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiny_config(**bad)


def test_save_and_load_round_trip_is_bit_exact(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json"}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "goom_ssm"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "backbone.embeddings.weight" in keys and "lm_head.weight" not in keys  # tied: saved once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, loaded(ids).logits)


def test_initialisation_matches_the_original():
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(tiny_config(hidden_size=64, state_size=16, num_state_heads=3))
    ssm = model.backbone.layers[0].ssm
    assert torch.allclose(ssm.A @ ssm.A.T, 0.99 ** 2 * torch.eye(16), atol=1e-5)
    assert ssm.init_states.abs().max() <= 0.1
    assert ssm.B.abs().max() <= 1 / 64 ** 0.5 and ssm.B.abs().max() > 0.8 / 64 ** 0.5
    assert ssm.C.abs().max() <= 1 / 48 ** 0.5 and ssm.D.abs().max() <= 1 / 64 ** 0.5
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.backbone.embeddings.weight.abs().max() <= 1 / 64 ** 0.5
    norm = model.backbone.layers[0].norm
    assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))


def test_param_groups_decay_everything_but_layer_norms(tiny_model):
    decay, no_decay = tiny_model.get_param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert all("norm" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(tiny_model.parameters()))


def test_labels_give_the_shifted_cross_entropy(tiny_model):
    ids = torch.randint(0, 97, (3, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = tiny_model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, expected)


def test_inputs_embeds_hidden_states_and_tuple_outputs(tiny_model):
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        by_ids = tiny_model(ids, output_hidden_states=True)
        by_embeds = tiny_model(inputs_embeds=tiny_model.get_input_embeddings()(ids))
        as_tuple = tiny_model(ids, return_dict=False, use_cache=False)
    assert torch.equal(by_ids.logits, by_embeds.logits)
    assert len(by_ids.hidden_states) == tiny_model.config.num_hidden_layers + 1
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], by_ids.logits)


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, monkeypatch, every_n_layers):
    """Checkpointed layers plan their own scans; so does the reference run here (without the
    shared plans, whose stacked products round differently on some BLAS builds): the gradients
    are then the same to the bit. transformers' ``every_n_layers`` checkpoints every n-th layer."""
    ids = torch.randint(0, 97, (2, 9))
    tiny_model.train()
    with monkeypatch.context() as patch:
        patch.setattr("goom_ssm.modeling.modeling_goom_ssm.shared_chunk_plans", lambda *args: None)
        tiny_model(ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    enable_checkpointing(tiny_model, every_n_layers=every_n_layers)  # checks which layers checkpoint
    tiny_model(ids, labels=ids).loss.backward()
    for a, p in zip(plain, tiny_model.parameters()):
        assert torch.equal(a, p.grad)


def test_a_batch_gives_the_same_logits_as_each_sequence_alone(tiny_model):
    ids = torch.randint(0, 97, (4, 21))
    with torch.no_grad():
        batch = tiny_model(ids).logits
        for i in range(4):
            assert torch.allclose(tiny_model(ids[i : i + 1]).logits, batch[i : i + 1], atol=1e-6)


def test_padded_batch_matches_each_sequence_alone(tiny_model):
    """A padded position is an identity step: left and right padding change nothing."""
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 7))
    pad = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        alone_a, alone_b = tiny_model(a).logits, tiny_model(b).logits
        left = tiny_model(torch.cat([a, torch.cat([pad, b], 1)]),
                          attention_mask=torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]))
        right = tiny_model(torch.cat([a, torch.cat([b, pad], 1)]),
                           attention_mask=torch.cat([torch.ones(1, 12), torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], 1)]))
    assert torch.allclose(left.logits[0], alone_a[0], atol=1e-5)
    assert torch.allclose(left.logits[1, 5:], alone_b[0], atol=1e-5)
    assert torch.allclose(right.logits[1, :7], alone_b[0], atol=1e-5)
    # the cache after a right-padded prompt is the state after its last real token
    assert torch.allclose(right[CACHE_NAME].states[0].rows[1], tiny_model(b, use_cache=True)[CACHE_NAME].states[0].rows[0], atol=1e-6)


GENERATE_SETTINGS = [
    dict(do_sample=False),
    dict(do_sample=True, temperature=0.8),
    dict(do_sample=True, top_k=5),
    dict(do_sample=True, top_p=0.9),
    dict(do_sample=False, num_beams=3),
    dict(do_sample=True, num_return_sequences=2),
]


@pytest.mark.parametrize("settings", GENERATE_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_generate_with_and_without_cache_is_identical(tiny_model, settings):
    ids = torch.randint(0, 97, (2, 8))
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outputs.append(tiny_model.generate(ids, max_new_tokens=12, use_cache=use_cache, pad_token_id=0, **settings))
    assert outputs[0].shape[1] == 20
    assert torch.equal(outputs[0], outputs[1])


def test_batched_generation_with_left_padding_equals_single(tiny_model):
    a, b = torch.randint(1, 97, (1, 10)), torch.randint(1, 97, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 10), torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], 1)]).long()
    together = tiny_model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone_b = tiny_model.generate(b, max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone_a = tiny_model.generate(a, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(together[0], alone_a[0])
    assert torch.equal(together[1, 4:], alone_b[0])


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_feeds_the_mask_while_the_cache_does_not_hold_the_prompt(tiny_model, use_cache):
    """With a cache, only the prompt's forward gets the padding mask (every later token is real);
    without one, every step re-reads the whole sequence with its whole mask."""
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    masks = []
    hook = tiny_model.register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    tiny_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                        use_cache=use_cache)
    hook.remove()
    assert len(masks) == 4 and torch.equal(masks[0], mask)
    if use_cache:
        assert all(m is None for m in masks[1:])
    else:
        for step, m in enumerate(masks[1:], start=1):
            assert torch.equal(m, torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], 1))


def test_decoding_feeds_one_token_per_step_and_the_cache_stays_the_same_size(tiny_model):
    seen_lengths = []
    hook = tiny_model.backbone.layers[0].register_forward_pre_hook(lambda m, args: seen_lengths.append(args[0].shape[1]))
    ids = torch.randint(0, 97, (1, 30))
    out = tiny_model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    hook.remove()
    assert seen_lengths == [30] + [1] * 9
    cache = out[CACHE_NAME]
    assert isinstance(cache, GoomSSMCache) and cache.get_seq_length() == 39
    sizes = [s.rows.numel() + s.log_scale.numel() for s in cache.states]
    assert sizes == [1 * 2 * 4 + 1 * 2] * 2  # batch x heads x (state_size + 1), whatever the length


def test_cache_from_another_batch_or_model_is_refused(tiny_model):
    ids = torch.randint(0, 97, (2, 5))
    cache = tiny_model(ids, use_cache=True)[CACHE_NAME]
    with pytest.raises(ValueError, match="batch of 2"):
        tiny_model(ids[:1], cache=cache)
    other = GoomSSMForCausalLM(tiny_config(num_hidden_layers=3)).eval()
    with pytest.raises(ValueError, match="made for a model"):
        other(ids, cache=cache)
    with pytest.raises(TypeError, match="GoomSSMCache"):
        tiny_model(ids, cache=((torch.zeros(1),),))


@pytest.mark.parametrize("ids, error, match", [
    (torch.tensor([[1, 2, 97]]), ValueError, "token id 97"),
    (torch.tensor([[1, -1, 3]]), ValueError, "token id -1"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty"),
    (torch.tensor([1, 2, 3]), ValueError, r"\[batch, seq_len\]"),
])
def test_bad_input_ids_are_refused_with_a_clear_error(tiny_model, ids, error, match):
    with pytest.raises(error, match=match):
        tiny_model(ids)


def test_bad_attention_mask_is_refused(tiny_model):
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        tiny_model(ids, attention_mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="only 0"):
        tiny_model(ids, attention_mask=torch.full((2, 5), 2))


def test_training_forward_traces_as_one_graph(tiny_model):
    """torch.compile(model, fullgraph=True) needs a forward without graph breaks."""
    ids = torch.randint(0, 97, (2, 40))
    tiny_model.train()
    explanation = torch._dynamo.explain(tiny_model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_file_is_reported(tiny_model, tmp_path, damage):
    tiny_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"garbage" * 10)
    with pytest.raises(OSError, match="corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_padding_changes_no_gradient():
    """Backward through padded batches: the gradients of the real tokens' loss equal those of
    the sequences run alone (left and right padding in one batch)."""
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(tiny_config(scan_chunk_size=4)).train()
    a, b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 6))
    for ids in (a, b):
        model(ids, labels=ids).loss.backward()
    alone = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([a, torch.cat([b, pad], 1), torch.cat([pad, b], 1)[:, -11:]], 0)
    mask = torch.cat([torch.ones(1, 11), torch.cat([torch.ones(1, 6), torch.zeros(1, 5)], 1),
                      torch.cat([torch.zeros(1, 5), torch.ones(1, 6)], 1)]).long()
    logits = model(batch, attention_mask=mask).logits
    losses = [F.cross_entropy(logits[0, :-1], a[0, 1:]), F.cross_entropy(logits[1, :5], b[0, 1:]),
              F.cross_entropy(logits[2, 5:-1], b[0, 1:])]
    (losses[0] + 0.5 * losses[1] + 0.5 * losses[2]).backward()
    for expected, p in zip(alone, model.parameters()):
        assert torch.allclose(p.grad, expected, atol=1e-6), p.shape


def test_layers_plan_their_chunked_scans_at_once_with_the_same_results(monkeypatch):
    """The model plans every layer's chunked scan in one computation (the powers of all the
    layers' A as one stack); logits and every gradient equal those of layers that plan their
    own (float64, a padded batch)."""
    from goom_ssm import layers, scan
    from goom_ssm.modeling import modeling_goom_ssm

    calls = {"shared": 0, "own": 0}

    def counted(function, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(layers, "chunk_plan", counted(layers.chunk_plan, "shared"))
    monkeypatch.setattr(scan, "chunk_plan", counted(scan.chunk_plan, "own"))
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(tiny_config(num_hidden_layers=3, scan_chunk_size=4, scan_implementation="chunked"))
    model = model.double().train()
    ids = torch.randint(0, 97, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0

    def run():
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        return [out.logits.detach()] + [p.grad.clone() for p in model.parameters()]

    shared = run()
    assert calls == {"shared": 1, "own": 0}
    monkeypatch.setattr(modeling_goom_ssm, "shared_chunk_plans", lambda blocks, hidden_states: None)
    own = run()
    assert calls == {"shared": 1, "own": 3}
    for a, b in zip(shared, own):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_layers_that_cannot_share_a_plan_make_their_own():
    """No shared plan for one token, another scan, a layer on another device or offloaded
    (on the meta device), a sharded A (as FSDP leaves it between calls), a forward pre-hook
    (which may change A inside the SSM's own call) or a wrapped SSM."""
    from goom_ssm.layers import shared_chunk_plans

    model = GoomSSMModel(tiny_config(scan_implementation="chunked"))
    hidden = torch.randn(2, 9, 16)
    assert len(shared_chunk_plans(model.layers, hidden)) == 2
    assert shared_chunk_plans(model.layers, hidden[:, :1]) is None
    assert shared_chunk_plans(GoomSSMModel(tiny_config(scan_implementation="goom_prefix")).layers, hidden) is None
    model.layers[1].to("meta")
    assert shared_chunk_plans(model.layers, hidden) is None
    model.layers[1].to_empty(device="cpu")
    assert len(shared_chunk_plans(model.layers, hidden)) == 2
    full_A = model.layers[0].ssm.A
    model.layers[0].ssm.A = torch.nn.Parameter(full_A.detach().flatten()[:5])
    assert shared_chunk_plans(model.layers, hidden) is None
    model.layers[0].ssm.A = full_A
    handle = model.layers[1].ssm.register_forward_pre_hook(lambda module, args: None)
    assert shared_chunk_plans(model.layers, hidden) is None
    handle.remove()
    model.layers[0].ssm = torch.nn.Sequential(model.layers[0].ssm)
    assert shared_chunk_plans(model.layers, hidden) is None
