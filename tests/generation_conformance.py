"""Generation conformance tests of goom-ssm (the project's own), run in ``test_hf_common.py``
as the ``GenerationTesterMixin`` that transformers' source distribution does not ship.

Every generation mode that applies to a recurrent model, each checked against a reference
computed without the mode's machinery: greedy and beam search against the same search run
without a cache (every step re-reads the whole sequence), cache continuation against one call,
``inputs_embeds`` prompts against ids, left padding against each sequence alone, and the
returned dictionaries against a plain forward. Modes that need to roll a cache back (assisted
and prompt-lookup decoding) must refuse with a clear error, since a recurrent state cannot be
cropped.
"""

import torch
from transformers.testing_utils import torch_device

from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME, GoomSSMCache


class GenerationConformanceMixin:
    """Needs ``self.model_tester.prepare_config_and_inputs_for_common()`` and ``all_generative_model_classes``;
    runs on transformers' test device (CUDA where there is one: then through the CUDA-graph decoder)."""

    max_new_tokens = 6

    def _generative_models(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_generative_model_classes:
            torch.manual_seed(0)
            yield model_class(config).to(torch_device).eval(), inputs["input_ids"].to(torch_device)

    def _generate(self, model, ids, **kwargs):
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", model.config.pad_token_id)
        with torch.no_grad():
            return model.generate(ids, **kwargs)

    def _with_and_without_cache(self, model, ids, seed=0, **kwargs):
        """``generate`` with the cache and without it, each from the random state ``seed``."""
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(seed)
            runs.append(self._generate(model, ids, use_cache=use_cache, **kwargs))
        return runs

    def test_greedy_generate_with_cache_equals_without(self):
        for model, ids in self._generative_models():
            cached, uncached = self._with_and_without_cache(model, ids)
            self.assertEqual(cached.shape, (ids.shape[0], ids.shape[1] + self.max_new_tokens))
            self.assertTrue(torch.equal(cached, uncached))

    def test_greedy_generate_follows_the_argmax_of_a_full_forward(self):
        for model, ids in self._generative_models():
            out = self._generate(model, ids, return_dict_in_generate=True, output_scores=True, output_logits=True)
            with torch.no_grad():
                logits = model(out.sequences[:, :-1]).logits[:, ids.shape[1] - 1:]
            for step, step_logits in enumerate(out.logits):  # a step and a scan round differently (float32)
                torch.testing.assert_close(step_logits, logits[:, step], rtol=1e-4, atol=1e-4)
                self.assertTrue(torch.equal(out.sequences[:, ids.shape[1] + step], logits[:, step].argmax(-1)))

    def test_sample_generate_is_reproducible_and_cache_independent(self):
        for model, ids in self._generative_models():
            self.assertTrue(torch.equal(*self._with_and_without_cache(model, ids, seed=7, do_sample=True, top_k=5)))

    def test_beam_search_with_cache_equals_without(self):
        for model, ids in self._generative_models():
            cached, uncached = self._with_and_without_cache(model, ids, num_beams=3, num_return_sequences=2)
            self.assertEqual(cached.shape[0], 2 * ids.shape[0])
            self.assertTrue(torch.equal(cached, uncached))

    def test_beam_sample_generate_is_cache_independent(self):
        for model, ids in self._generative_models():
            runs = self._with_and_without_cache(model, ids, seed=3, do_sample=True, num_beams=2)
            self.assertTrue(torch.equal(*runs))

    def test_generate_returns_the_recurrent_cache(self):
        for model, ids in self._generative_models():
            out = self._generate(model, ids, return_dict_in_generate=True)
            cache = out[CACHE_NAME]
            self.assertIsInstance(cache, GoomSSMCache)
            self.assertEqual(cache.get_seq_length(), out.sequences.shape[1] - 1)
            self.assertEqual(len(cache), model.config.num_hidden_layers)
            self.assertTrue(all(cache.is_linear))

    def test_generate_continues_from_a_given_cache(self):
        for model, ids in self._generative_models():
            whole = self._generate(model, ids, max_new_tokens=2 * self.max_new_tokens)
            with torch.no_grad():
                cache = model(ids[:, :-1], use_cache=True)[CACHE_NAME]
            continued = self._generate(model, ids, max_new_tokens=2 * self.max_new_tokens, **{CACHE_NAME: cache})
            self.assertTrue(torch.equal(whole, continued))

    def test_generate_from_inputs_embeds_equals_from_ids(self):
        for model, ids in self._generative_models():
            from_ids = self._generate(model, ids)
            embeds = model.get_input_embeddings()(ids)
            with torch.no_grad():
                from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=self.max_new_tokens, do_sample=False,
                                             pad_token_id=model.config.pad_token_id)
            self.assertTrue(torch.equal(from_embeds, from_ids[:, ids.shape[1]:]))

    def test_left_padded_batch_generates_as_each_sequence_alone(self):
        for model, ids in self._generative_models():
            short = ids[1:2, 2:]
            padded = torch.cat([torch.full_like(ids[1:2, :2], model.config.pad_token_id), short], dim=1)
            batch = torch.cat([ids[:1], padded])
            mask = torch.ones_like(batch)
            mask[1, :2] = 0
            together = self._generate(model, batch, attention_mask=mask)
            self.assertTrue(torch.equal(together[:1], self._generate(model, ids[:1])))
            self.assertTrue(torch.equal(together[1:, 2:], self._generate(model, short)))

    def test_generate_dict_outputs_hidden_states_and_scores(self):
        for model, ids in self._generative_models():
            out = self._generate(model, ids, return_dict_in_generate=True, output_scores=True,
                                 output_hidden_states=True)
            self.assertEqual(len(out.scores), self.max_new_tokens)
            self.assertEqual(len(out.hidden_states), self.max_new_tokens)
            self.assertEqual(out.hidden_states[0][-1].shape[:2], ids.shape)  # the prompt's pass
            self.assertEqual(out.hidden_states[1][-1].shape[:2], (ids.shape[0], 1))  # one token a step

    def test_assisted_decoding_refuses_to_crop_a_recurrent_state(self):
        """Refused before transformers' loop starts, with the reason, on every release (5.25's
        assisted loop would raise its own RuntimeError first)."""
        from transformers import GenerationConfig

        for model, ids in self._generative_models():
            for options in (dict(assistant_model=model), dict(prompt_lookup_num_tokens=2),
                            dict(generation_config=GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=2))):
                with self.assertRaisesRegex(ValueError, "cannot use assisted decoding"):
                    self._generate(model, ids, **options)
