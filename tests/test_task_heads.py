"""Task heads: ``GoomSSMForSequenceClassification`` and ``GoomSSMForTokenClassification``.

Pooling of the last real token (padding mask, pad token id, neither), each problem type's loss
against its formula written out, the token classifier's loss with -100 labels, fine-tuning with
the ``Trainer`` and PEFT LoRA, and loading both heads as remote code where goom-ssm is not installed.
"""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification, Trainer,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

from conftest import tiny_config
from goom_ssm import GoomSSMForCausalLM, GoomSSMForSequenceClassification, GoomSSMForTokenClassification
from goom_ssm.hub import AUTO_MAP, add_remote_code
from test_hub import fresh_python, run_remote  # noqa: F401  (fresh_python is a fixture)

VOCAB = 97  # tiny_config's


def model_of(model_class, seed=0, **config):
    torch.manual_seed(seed)
    return model_class(tiny_config(**config)).eval()


def padded(sequences, side, pad_id=0):
    """``(ids, attention_mask)`` ``[batch, longest]`` of 1-D id tensors padded on ``side``."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(longest - len(s), longest) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return ids, mask


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_sequence_its_own_logits(side):
    """With a padding mask, each sequence is scored at its last real token, and padded
    positions are identity steps: a padded batch gives every sequence its logits alone (float64)."""
    model = model_of(GoomSSMForSequenceClassification, num_labels=3, scan_chunk_size=4).double()
    torch.manual_seed(1)
    sequences = [torch.randint(1, VOCAB, (n,)) for n in (11, 4, 7)]
    ids, mask = padded(sequences, side)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        alone = torch.cat([model(s[None]).logits for s in sequences])
    assert batch.dtype == torch.float64 and batch.shape == (3, 3)
    torch.testing.assert_close(batch, alone, rtol=1e-12, atol=1e-12)


def test_without_a_mask_the_last_token_that_is_not_padding_is_scored():
    """As GPT-2: with ``config.pad_token_id`` and no mask, the last non-pad token (right padding
    does not reach it through the recurrence)."""
    pad = VOCAB - 1
    model = model_of(GoomSSMForSequenceClassification, pad_token_id=pad).double()
    torch.manual_seed(1)
    sequences = [torch.randint(0, pad, (n,)) for n in (9, 3)]
    ids, _ = padded(sequences, "right", pad_id=pad)
    with torch.no_grad():
        batch = model(ids).logits
        alone = torch.cat([model(s[None]).logits for s in sequences])
    torch.testing.assert_close(batch, alone, rtol=1e-12, atol=1e-12)


def test_without_mask_or_pad_token_only_a_single_sequence_is_scored():
    model = model_of(GoomSSMForSequenceClassification)
    assert model.config.pad_token_id is None
    ids = torch.randint(0, VOCAB, (2, 6))
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        last = model.score(model.backbone(ids).last_hidden_state[:, -1])
        torch.testing.assert_close(model(ids[:1]).logits, last[:1])  # the last position
        torch.testing.assert_close(model(inputs_embeds=embeds[:1]).logits, last[:1])
        for inputs in ({"input_ids": ids}, {"inputs_embeds": embeds}):
            with pytest.raises(ValueError, match="cannot tell where each of the 2 sequences ends"):
                model(**inputs)
        # with a mask, inputs_embeds are pooled like ids
        mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
        torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits)


def test_a_batch_of_inputs_embeds_without_a_mask_is_scored_at_the_last_position_with_a_warning():
    """As GPT-2: pad tokens cannot be told in embeddings."""
    model = model_of(GoomSSMForSequenceClassification, pad_token_id=0)
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        with pytest.warns(UserWarning, match="scored at the last position"):
            logits = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        torch.testing.assert_close(logits, model(ids).logits)


def test_a_sequence_of_padding_only_is_refused():
    model = model_of(GoomSSMForSequenceClassification, pad_token_id=0)
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        with pytest.raises(ValueError, match="sequence 1 of the batch has no real token"):
            model(ids, attention_mask=torch.tensor([[1] * 5, [0] * 5]))
        with pytest.raises(ValueError, match="sequence 0 of the batch has no real token"):
            model(torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[1:]]))


# --------------------------------------------------------------------------- losses


def scored(model, labels, **kwargs):
    ids, mask = padded([torch.arange(1, 8), torch.arange(20, 24), torch.arange(40, 46)], "right")
    out = model(ids, attention_mask=mask, labels=labels, **kwargs)
    return out.loss, out.logits.detach()


def test_regression_loss_is_the_mean_squared_error():
    model = model_of(GoomSSMForSequenceClassification, num_labels=1).double()
    labels = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    loss, logits = scored(model, labels)
    assert model.config.problem_type == "regression"  # chosen for num_labels == 1, and kept
    assert logits.shape == (3, 1)
    torch.testing.assert_close(loss, ((logits[:, 0] - labels) ** 2).mean())
    torch.testing.assert_close(scored(model, labels[:, None])[0], loss)  # [batch, 1] labels too
    torch.testing.assert_close(scored(model, labels, num_items_in_batch=2)[0], ((logits[:, 0] - labels) ** 2).sum() / 2)


def test_several_output_regression_loss_is_the_mean_squared_error():
    model = model_of(GoomSSMForSequenceClassification, num_labels=2, problem_type="regression").double()
    labels = torch.tensor([[0.5, 1.0], [-1.0, 0.0], [2.0, 3.0]], dtype=torch.float64)
    loss, logits = scored(model, labels)
    torch.testing.assert_close(loss, ((logits - labels) ** 2).mean())


def test_single_label_loss_is_the_cross_entropy():
    model = model_of(GoomSSMForSequenceClassification, num_labels=4).double()
    labels = torch.tensor([3, 0, 2])
    loss, logits = scored(model, labels)
    assert model.config.problem_type == "single_label_classification"  # chosen for integer labels
    log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
    torch.testing.assert_close(loss, -log_probs[torch.arange(3), labels].mean())
    # -100 leaves a sequence out; with the Trainer's num_items_in_batch the sum is divided by it
    ignored = torch.tensor([3, -100, 2])
    torch.testing.assert_close(scored(model, ignored)[0], -(log_probs[0, 3] + log_probs[2, 2]) / 2)
    torch.testing.assert_close(scored(model, labels, num_items_in_batch=torch.tensor(6))[0],
                               -log_probs[torch.arange(3), labels].sum() / 6)


def test_multi_label_loss_is_the_binary_cross_entropy_with_logits():
    model = model_of(GoomSSMForSequenceClassification, num_labels=3).double()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.25]], dtype=torch.float64)
    loss, logits = scored(model, labels)
    assert model.config.problem_type == "multi_label_classification"  # chosen for float labels
    p = torch.sigmoid(logits)
    expected = -(labels * p.log() + (1 - labels) * (1 - p).log())
    torch.testing.assert_close(loss, expected.mean())
    torch.testing.assert_close(scored(model, labels, num_items_in_batch=4)[0], expected.sum() / 4)


def test_the_chosen_problem_type_is_saved_with_the_model(tmp_path):
    model = model_of(GoomSSMForSequenceClassification, num_labels=2)
    scored(model, torch.tensor([[1.0, 0.0]] * 3))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["problem_type"] == "multi_label_classification"


@pytest.mark.parametrize("labels, error, match", [
    (torch.tensor([1, 0]), ValueError, r"single_label_classification with num_labels=3 needs labels of shape \(3,\)"),
    (torch.tensor([1.0, 0.0, 2.0]), TypeError, "integer class ids"),
])
def test_bad_labels_are_refused(labels, error, match):
    model = model_of(GoomSSMForSequenceClassification, num_labels=3, problem_type="single_label_classification")
    with pytest.raises(error, match=match):
        scored(model, labels)


def test_multi_label_labels_of_another_shape_are_refused():
    model = model_of(GoomSSMForSequenceClassification, num_labels=3, problem_type="multi_label_classification")
    with pytest.raises(ValueError, match=r"needs labels of shape \(3, 3\), got \(3,\)"):
        scored(model, torch.tensor([1.0, 0.0, 1.0]))


def test_token_classification_loss_leaves_out_minus_100_labels():
    model = model_of(GoomSSMForTokenClassification, num_labels=5).double()
    ids, mask = padded([torch.arange(1, 8), torch.arange(20, 24)], "right")
    labels = torch.randint(0, 5, ids.shape)
    labels[mask == 0] = -100  # padding
    labels[0, 2] = -100
    out = model(ids, attention_mask=mask, labels=labels)
    assert isinstance(out, TokenClassifierOutput) and out.logits.shape == (2, 7, 5)
    log_probs = out.logits.detach().log_softmax(-1)
    kept = labels != -100
    terms = -log_probs[kept].gather(1, labels[kept][:, None])
    assert len(terms) == 10
    torch.testing.assert_close(out.loss, terms.mean())
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels, num_items_in_batch=20).loss,
                               terms.sum() / 20)
    # the real tokens' logits are those of each sequence alone
    with torch.no_grad():
        torch.testing.assert_close(out.logits[1, :4], model(ids[1:, :4]).logits[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 7\)"):
        model(ids, labels=labels[:, :3])


# --------------------------------------------------------------------------- common behaviour


@pytest.mark.parametrize("model_class, output_class", [
    (GoomSSMForSequenceClassification, SequenceClassifierOutput),
    (GoomSSMForTokenClassification, TokenClassifierOutput),
])
def test_outputs_keywords_and_labels_config(model_class, output_class):
    id2label = {0: "negative", 1: "neutral", 2: "positive"}
    model = model_of(model_class, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    assert model.config.num_labels == 3
    ids = torch.randint(0, VOCAB, (1, 5))
    labels = torch.tensor([2]) if model_class is GoomSSMForSequenceClassification else torch.tensor([[0, 1, 2, 1, 0]])
    with torch.no_grad():
        out = model(ids, labels=labels, output_hidden_states=True)
        assert isinstance(out, output_class) and out.logits.shape[-1] == 3
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        as_tuple = model(ids, labels=labels, output_hidden_states=True, return_dict=False)
        assert len(as_tuple) == 3 and torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
        assert len(model(ids, return_dict=False)) == 1
        with pytest.raises(TypeError, match=r"does not understand: \['cache', 'shift_labels'\]"):
            model(ids, cache=object(), shift_labels=labels)


def test_classifier_dropout_applies_in_training_only():
    model = model_of(GoomSSMForTokenClassification, classifier_dropout=0.5)
    assert model.dropout.p == 0.5 and model_of(GoomSSMForTokenClassification).dropout.p == 0.0
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model.eval()(ids).logits)


# --------------------------------------------------------------------------- loading and fine-tuning


@pytest.fixture(scope="module")
def causal_lm_folder(tmp_path_factory):
    """A (random) tiny language model's folder: the pretrained model the heads start from."""
    folder = tmp_path_factory.mktemp("lm")
    model_of(GoomSSMForCausalLM).save_pretrained(folder)
    return folder


def test_heads_load_a_language_model_and_initialise_themselves_with_init_weights(causal_lm_folder):
    lm = AutoModelForCausalLM.from_pretrained(causal_lm_folder)
    bound = 1 / tiny_config().hidden_size ** 0.5
    heads = [(AutoModelForSequenceClassification, GoomSSMForSequenceClassification, "score"),
             (AutoModelForTokenClassification, GoomSSMForTokenClassification, "classifier")]
    for auto_class, model_class, head in heads:
        model = auto_class.from_pretrained(causal_lm_folder, num_labels=4)
        assert type(model) is model_class
        for name, value in lm.backbone.state_dict().items():
            assert torch.equal(model.backbone.state_dict()[name], value), name
        weight = getattr(model, head).weight
        assert weight.shape == (4, tiny_config().hidden_size)
        assert weight.abs().max() <= bound and weight.abs().min() > 0  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert torch.equal(model.classifier.bias, torch.zeros(4))


def task_examples(count, seed):
    """Sequences of 3-9 tokens among ids 1-8, labelled by their last token: 1 if it is below 5."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(3, 10, (1,), generator=generator))
        ids = torch.randint(1, 9, (length,), generator=generator)
        examples.append({"input_ids": ids, "labels": int(ids[-1] < 5)})
    return examples


def collate_right_padded(examples):
    ids, mask = padded([e["input_ids"] for e in examples], "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


def classification_trainer(model, output_dir, steps=30):
    args = TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, max_steps=steps, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0,
        save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=task_examples(240, seed=0),
                   eval_dataset=task_examples(64, seed=1), data_collator=collate_right_padded)


def test_trainer_fine_tunes_a_sequence_classifier(causal_lm_folder, tmp_path):
    torch.manual_seed(0)  # the new head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(causal_lm_folder, num_labels=2)
    trainer = classification_trainer(model, tmp_path)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.5 * before, (before, after)
    assert model.config.problem_type == "single_label_classification"


def test_lora_fine_tunes_a_sequence_classifier_and_its_adapter_reloads(causal_lm_folder, tmp_path):
    pytest.importorskip("peft", minversion="0.17")
    from peft import LoraConfig, PeftModel, get_peft_model

    # the README's LoRA targets, and the new head trained whole (and saved with the adapter)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="SEQ_CLS", target_modules=["out_proj"],
                        target_parameters=["ssm.B", "ssm.C", "ssm.D"], modules_to_save=["score"])
    torch.manual_seed(0)  # the new head's initialisation
    base = AutoModelForSequenceClassification.from_pretrained(causal_lm_folder, num_labels=2)
    frozen = {n: p.detach().clone() for n, p in base.backbone.named_parameters()}
    model = get_peft_model(base, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(f"{target}.lora_A" in n for n in trainable) for target in ("out_proj", "ssm"))
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    trainer = classification_trainer(model, tmp_path / "run")
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.5 * before, (before, after)
    for name, param in model.get_base_model().backbone.named_parameters():  # only the adapters changed
        if "lora_" not in name:
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), name

    model.eval().save_pretrained(tmp_path / "adapter")
    batch = collate_right_padded(task_examples(8, seed=2))
    del batch["labels"]
    with torch.no_grad():
        expected = model(**batch).logits
        torch.manual_seed(123)  # the fresh base's score differs from the trained one: the adapter brings it
        fresh = AutoModelForSequenceClassification.from_pretrained(causal_lm_folder, num_labels=2).eval()
        assert not torch.allclose(fresh(**batch).logits, expected)
        reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        assert torch.equal(reloaded(**batch).logits, expected)


def test_both_heads_load_as_remote_code_without_goom_ssm(fresh_python, tmp_path):
    assert AUTO_MAP["AutoModelForSequenceClassification"] == "modeling_goom_ssm.GoomSSMForSequenceClassification"
    assert AUTO_MAP["AutoModelForTokenClassification"] == "modeling_goom_ssm.GoomSSMForTokenClassification"
    ids, mask = padded([torch.arange(1, 8), torch.arange(20, 24)], "left")
    expected = {"ids": ids, "mask": mask}
    folders = {}
    for auto_class, model_class in ((AutoModelForSequenceClassification, GoomSSMForSequenceClassification),
                                    (AutoModelForTokenClassification, GoomSSMForTokenClassification)):
        model = model_of(model_class, num_labels=3)
        folder = folders[auto_class.__name__] = tmp_path / auto_class.__name__
        model.save_pretrained(folder)
        add_remote_code(folder)
        with torch.no_grad():
            expected[auto_class.__name__] = model(ids, attention_mask=mask).logits
        assert type(auto_class.from_pretrained(folder)) is model_class  # where goom-ssm is installed: its classes
    torch.save(expected, tmp_path / "expected.pt")
    body = f"""
from transformers import AutoModelForTokenClassification
expected = torch.load({str(tmp_path / 'expected.pt')!r})
token_model = AutoModelForTokenClassification.from_pretrained(
    {str(folders['AutoModelForTokenClassification'])!r}, trust_remote_code=True).eval()
assert type(token_model).__module__.startswith("transformers_modules"), type(token_model).__module__
for name, loaded in (("AutoModelForSequenceClassification", model), ("AutoModelForTokenClassification", token_model)):
    with torch.no_grad():
        assert torch.equal(loaded(expected["ids"], attention_mask=expected["mask"]).logits, expected[name]), name
print("remote heads OK", type(model).__name__, type(token_model).__name__)
"""
    output = run_remote(fresh_python, folders["AutoModelForSequenceClassification"], tmp_path, body,
                        auto_class="AutoModelForSequenceClassification")
    assert "remote heads OK GoomSSMForSequenceClassification GoomSSMForTokenClassification" in output
