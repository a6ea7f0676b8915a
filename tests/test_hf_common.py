"""transformers' own common tests (``ModelTesterMixin``, ``ConfigTester``) on GOOM-SSM models,
from the installed release's source distribution (see ``transformers_tests.py``), plus the
project's generation conformance tests as ``GenerationTesterMixin`` and ``torch.export``.

Set up as transformers' ``tests/models/mamba2/test_modeling_mamba2.py``: no attentions, no
position embeddings. The common tests that skip themselves do so for features the model does not
have (attentions, position embeddings, RoPE, experts, flash attention) or hardware CI lacks.
"""

import copy
import unittest
import warnings

import pytest
import torch

import transformers_tests
from generation_conformance import GenerationConformanceMixin
from goom_ssm import (
    GoomSSMConfig, GoomSSMForCausalLM, GoomSSMForSequenceClassification, GoomSSMForTokenClassification, GoomSSMModel,
)
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME, GoomSSMCache

modeling_common = transformers_tests.load("test_modeling_common")
configuration_common = transformers_tests.load("test_configuration_common")
ids_tensor = modeling_common.ids_tensor
# A built-in model's classes are listed in transformers' auto mappings, which the common tests
# read to choose inputs (labels for causal LMs and the task heads) and to leave base models (no
# loss) out of the training tests: list GoomSSM's there, in the test module's own copies only.
for _mapping, _class in (("MODEL_MAPPING_NAMES", GoomSSMModel),
                         ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", GoomSSMForCausalLM),
                         ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", GoomSSMForSequenceClassification),
                         ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", GoomSSMForTokenClassification)):
    setattr(modeling_common, _mapping, {**getattr(modeling_common, _mapping), "goom_ssm": _class.__name__})


class GoomSSMModelTester:
    """Small configurations and inputs for the common tests."""

    def __init__(self, parent, batch_size=3, seq_length=7, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_state_heads=2, state_size=8, is_training=True):
        self.parent, self.batch_size, self.seq_length = parent, batch_size, seq_length
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_state_heads, self.state_size, self.is_training = num_state_heads, state_size, is_training
        self.pad_token_id = self.bos_token_id = vocab_size - 1
        self.eos_token_id = None  # generation runs its full length (the conformance tests compare whole sequences)

    def get_config(self) -> GoomSSMConfig:
        return GoomSSMConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_state_heads=self.num_state_heads, state_size=self.state_size, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1)  # no pad/eos id inside
        return self.get_config(), {"input_ids": input_ids}


class GoomSSMModelTest(modeling_common.ModelTesterMixin, GenerationConformanceMixin, unittest.TestCase):
    all_model_classes = (
        GoomSSMModel, GoomSSMForCausalLM, GoomSSMForSequenceClassification, GoomSSMForTokenClassification,
    )
    has_attentions = False  # a recurrent model: no attention weights
    test_torch_exportable = False  # ExportTesterMixin is not in the sdist; export is tested below
    pipeline_model_mapping = {"feature-extraction": GoomSSMModel, "text-generation": GoomSSMForCausalLM}

    def setUp(self):
        self.model_tester = GoomSSMModelTester(self)
        self.config_tester = configuration_common.ConfigTester(
            self, config_class=GoomSSMConfig, hidden_size=37, common_properties=["hidden_size", "num_hidden_layers"]
        )

    def test_config(self):
        self.config_tester.run_common_tests()


@pytest.mark.parametrize("model_class", [GoomSSMModel, GoomSSMForCausalLM])
def test_cache_under_the_old_name_is_accepted(model_class):
    """``past_key_values`` (transformers' name before 5.24) gives what ``cache`` gives; on 5.24+
    it warns that the name is deprecated, as transformers' own models do."""
    torch.manual_seed(0)
    model = model_class(GoomSSMModelTester(None).get_config()).eval()
    ids = torch.randint(0, 98, (2, 5))
    with torch.no_grad():
        cache = model(ids[:, :3], use_cache=True)[CACHE_NAME]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = model(ids[:, 3:], past_key_values=_copy(cache), use_cache=True)
        new = model(ids[:, 3:], cache=_copy(cache), use_cache=True)
    deprecated = [w for w in caught if "`past_key_values` is deprecated" in str(w.message)]
    assert len(deprecated) == (1 if CACHE_NAME == "cache" else 0)
    assert torch.equal(old[0], new[0])
    assert old[CACHE_NAME].get_seq_length() == new[CACHE_NAME].get_seq_length() == 5
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=_copy(cache), past_key_values=_copy(cache))


class _Step(torch.nn.Module):
    """A model's cached forward with the cache and the padding mask as plain arguments."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask, cache):
        out = self.model(ids, attention_mask=mask, **{CACHE_NAME: cache}, use_cache=True)
        return out.logits, out[CACHE_NAME]


def test_torch_export_of_a_cached_forward():
    """``torch.export`` of a cached step with a padding mask: the cache goes in and out as a
    pytree, the mask's value checks stay out of the graph, the results equal eager ones."""
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(GoomSSMModelTester(None).get_config()).eval()
    ids = torch.randint(0, 98, (2, 5))
    padded = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])  # 3 past tokens, then 2 (one of them padding)
    with torch.no_grad():
        cache = model(ids[:, :3], attention_mask=padded[:, :3], use_cache=True)[CACHE_NAME]
        exported = torch.export.export(_Step(model), (ids[:, 3:], padded, _copy(cache)), strict=False)
        for step_mask in (padded, torch.ones_like(padded)):
            step_ids = ids[:, 3:]
            logits, new_cache = exported.module()(step_ids, step_mask, _copy(cache))
            expected_logits, expected_cache = _Step(model)(step_ids, step_mask, _copy(cache))
            assert isinstance(new_cache, GoomSSMCache) and new_cache.get_seq_length() == 5
            torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
            for got, want in zip(new_cache.states, expected_cache.states):
                torch.testing.assert_close(got.rows, want.rows, rtol=0, atol=0)
                torch.testing.assert_close(got.log_scale, want.log_scale, rtol=0, atol=0)


def _copy(cache: GoomSSMCache) -> GoomSSMCache:
    return copy.deepcopy(cache)


@pytest.mark.parametrize("name", ["cache_params", "state", "mems"])
def test_forward_refuses_an_unknown_cache_keyword(name):
    model = GoomSSMForCausalLM(GoomSSMModelTester(None).get_config())
    with pytest.raises(TypeError, match=name):
        model(torch.tensor([[1, 2]]), **{name: GoomSSMCache(model.config, 1)})


def test_trainer_predict_returns_the_logits_without_the_cache(tmp_path):
    """The ``Trainer`` drops the outputs named in ``keys_to_ignore_at_inference``: the cache,
    under the installed release's name (a cache is no array to gather across batches)."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GoomSSMForCausalLM(GoomSSMModelTester(None).get_config())
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 98, (4, 8))]
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    predictions = Trainer(model=model, args=args).predict(data).predictions
    assert predictions.shape == (4, 8, 99)
