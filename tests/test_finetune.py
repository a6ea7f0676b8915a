"""Fine-tuning GOOM-SSM models with Hugging Face ``Trainer`` and with PEFT LoRA, on CPU.

A tiny random model with the GPT-2 vocabulary learns from a local English text
(``tests/data/english.txt``) for 20 steps: the held-out loss must fall, and what the
Trainer saves must reload with identical outputs. The shipped model, as ``from_pretrained``
loads it, fine-tunes for a few steps on The Tempest.

Padding: GPT-2's tokenizer has no pad token, and ``DataCollatorForLanguageModeling`` pads
every batch with ``tokenizer.pad`` (which raises without one) and sets the labels of
positions holding ``pad_token_id`` to -100. The usual choice, also made here, is
``tokenizer.pad_token = tokenizer.eos_token``: no new token, so no embedding resize. Its one
side effect is that genuine ``<|endoftext|>`` tokens in the data are left out of the loss
too (their attention mask stays 1, so the model still reads them). The blocks below are all
of the same length and contain no ``<|endoftext|>``, so nothing is padded or masked.
Padded positions, where there are any, are identity steps of the recurrence
(``attention_mask`` = 0), so right padding does not change the real tokens' outputs.
"""

import math
from pathlib import Path

import pytest
import torch
from conftest import enable_checkpointing

ENGLISH = Path(__file__).parent / "data" / "english.txt"
BLOCK = 32  # tokens per training example
STEPS = 20


def tiny_gpt2_vocab_model(seed=0):
    from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM

    torch.manual_seed(seed)
    config = GoomSSMConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_state_heads=2, state_size=8)
    return GoomSSMForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer():
    from goom_ssm.conversion.tokenizer import gpt2_hf_tokenizer

    tok = gpt2_hf_tokenizer()
    tok.pad_token = tok.eos_token  # see the module docstring
    return tok


@pytest.fixture(scope="module")
def splits(tokenizer):
    """Blocks of 32 tokens of english.txt: all but the last 4 to train on, those 4 held out."""
    Dataset = pytest.importorskip("datasets").Dataset

    ids = tokenizer.encode(ENGLISH.read_text())
    blocks = [ids[i:i + BLOCK] for i in range(0, len(ids) - BLOCK + 1, BLOCK)]
    assert len(blocks) >= 30 and tokenizer.eos_token_id not in ids
    return Dataset.from_dict({"input_ids": blocks[:-4]}), Dataset.from_dict({"input_ids": blocks[-4:]})


def make_trainer(model, tokenizer, splits, output_dir, learning_rate, **options):
    """A ``Trainer`` of ``STEPS`` steps at a constant learning rate that saves at the end
    (``options`` override those ``TrainingArguments``)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    settings = dict(
        output_dir=str(output_dir), use_cpu=True, max_steps=STEPS, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
        logging_steps=5, save_strategy="steps", save_steps=STEPS, report_to=[], seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **options})
    train, held_out = splits
    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def held_out_batch(splits):
    return torch.tensor(splits[1]["input_ids"])


def test_collator_needs_a_pad_token():
    from transformers import DataCollatorForLanguageModeling

    from goom_ssm.conversion.tokenizer import gpt2_hf_tokenizer

    collator = DataCollatorForLanguageModeling(gpt2_hf_tokenizer(), mlm=False)
    with pytest.raises(ValueError, match="padding token"):
        collator([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])


@pytest.fixture(scope="module")
def full_run(tokenizer, splits, tmp_path_factory):
    """20 steps of full fine-tuning of a random tiny model; the held-out loss before and after."""
    model = tiny_gpt2_vocab_model()
    output_dir = tmp_path_factory.mktemp("full")
    trainer = make_trainer(model, tokenizer, splits, output_dir, learning_rate=1e-2)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    return model.eval(), output_dir / f"checkpoint-{STEPS}", before, after


def test_trainer_trains_and_its_checkpoint_reloads(full_run, tokenizer, splits):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, checkpoint, before, after = full_run
    assert after < before - 1.0, (before, after)
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.backbone.embeddings.weight.data_ptr()  # still tied
    x = held_out_batch(splits)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    # The checkpoint is a complete model folder: its tokenizer loads too.
    assert AutoTokenizer.from_pretrained(checkpoint).encode("Four score") == tokenizer.encode("Four score")


def test_shipped_model_fine_tunes_as_loaded(tokenizer, tmp_path):
    """The shipped model exactly as ``from_pretrained`` loads it by default (its saved dtype)
    trains with the Trainer: 4 steps on 8 blocks of The Tempest (held out from its training)
    give finite, falling training losses and a lower loss on those blocks."""
    Dataset = pytest.importorskip("datasets").Dataset
    from transformers import AutoModelForCausalLM

    from goom_ssm.cli import DEFAULT_MODEL_DIR
    from goom_ssm.corpus import HELD_OUT_TEXT

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    ids = tokenizer.encode(HELD_OUT_TEXT.read_text(encoding="utf-8")[:3000])
    blocks = Dataset.from_dict({"input_ids": [ids[i:i + BLOCK] for i in range(0, 8 * BLOCK, BLOCK)]})
    assert len(blocks[-1]["input_ids"]) == BLOCK and tokenizer.eos_token_id not in ids[:8 * BLOCK]
    trainer = make_trainer(model, tokenizer, (blocks, blocks), tmp_path, learning_rate=1e-4, max_steps=4,
                           logging_steps=1, save_strategy="no", per_device_eval_batch_size=8)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0] and after < before - 0.5, (losses, before, after)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(splits, use_reentrant):
    x = held_out_batch(splits)
    grads = []
    for checkpointing in (False, True):
        model = tiny_gpt2_vocab_model().train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant)
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- PEFT LoRA

LORA_MODULES = ["out_proj"]  # the nn.Linear maps of the residual layers (lm_head: see below)
LORA_PARAMETERS = ["ssm.B", "ssm.C", "ssm.D"]  # raw nn.Parameters of GoomSSM (peft >= 0.17)


def lora_config(**overrides):
    from peft import LoraConfig

    # lm_head is tied to the embedding: a LoRA on it would be merged into the shared tensor,
    # i.e. into the input embedding too, so merge_and_unload() would change the model. It is
    # left out (as is the embedding, whose adapter would be saved as a full vocab x hidden copy).
    options = dict(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                   target_modules=LORA_MODULES, target_parameters=LORA_PARAMETERS)
    options.update(overrides)
    return LoraConfig(**options)


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft", minversion="0.17")  # LoraConfig(target_parameters=...)


def test_lora_trains_and_the_adapter_reloads_and_merges(peft, full_run, tokenizer, splits, tmp_path):
    """LoRA on top of the fully fine-tuned checkpoint (a random model's head, tied to its
    random embedding, is frozen under LoRA and bounds how far its loss can fall)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = full_run[1]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, lora_config())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for layer in range(2):  # every target got an adapter
        for target in ("out_proj", "ssm"):
            assert any(f"layers.{layer}.{target}." in n for n in trainable), (layer, target)
    assert sum("layers.0.ssm." in n for n in trainable) == 2 * len(LORA_PARAMETERS)  # lora_A and lora_B each

    trainer = make_trainer(model, tokenizer, splits, tmp_path / "lora", learning_rate=1e-2)
    before = trainer.evaluate()["eval_loss"]
    assert before == pytest.approx(full_run[3], rel=1e-5)  # the adapters start as the identity
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.1, (before, after)
    for name, param in model.get_base_model().named_parameters():  # only the adapters changed
        if "lora_" not in name:
            clean = name.replace(".base_layer", "")
            assert torch.equal(param, frozen[clean]), name

    model.eval()
    x = held_out_batch(splits)
    with torch.no_grad():
        expected = model(x).logits
    checkpoint = tmp_path / "lora" / f"checkpoint-{STEPS}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), checkpoint).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)

    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "GoomSSMForCausalLM"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_lora_with_gradient_checkpointing(peft, splits):
    """Frozen embeddings + reentrant checkpointing need inputs that require grad; transformers
    hooks the input embeddings for that, so LoRA gradients are the same as without checkpointing."""
    from peft import get_peft_model

    x = held_out_batch(splits)
    grads = []
    for checkpointing in (False, True):
        base = tiny_gpt2_vocab_model()
        if checkpointing:
            enable_checkpointing(base, use_reentrant=True)
        torch.manual_seed(1)  # init_lora_weights=False: lora_A and lora_B both random, all gradients non-zero
        model = get_peft_model(base, lora_config(init_lora_weights=False)).train()
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
