"""transformers classes of GOOM-SSM language models.

``GoomSSMModel``: token embedding -> ``num_hidden_layers`` residual GOOM-SSM layers ->
LayerNorm. ``GoomSSMForCausalLM`` adds a bias-free head tied to the embedding, a shifted
cross-entropy loss, and generation with a recurrent-state cache (:class:`GoomSSMCache`).
``GoomSSMForSequenceClassification`` scores the hidden state of each sequence's last real
token; ``GoomSSMForTokenClassification`` scores every token.
"""

import math
import warnings
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import GenerationMixin, PreTrainedModel
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.modeling_outputs import (
    BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutput, TokenClassifierOutput,
)

from ..layers import GoomSSM, GoomSSMBlock, is_plain, shared_chunk_plans
from ..triton_common import HAS_TRITON
from ..triton_loss import HeadCrossEntropy
from .cache_goom_ssm import CACHE_NAME, GoomSSMCache
from .cuda_graph_goom_ssm import CUDAGraphDecoder, decoders_of
from .generation_goom_ssm import decodes_greedily_without_host_waits, greedy_decode
from .configuration_goom_ssm import GoomSSMConfig


class GoomSSMPreTrainedModel(PreTrainedModel):
    config_class = GoomSSMConfig
    config: GoomSSMConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GoomSSMBlock"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own GoomSSMCache

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, with corrupt weight files reported as such."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"the weights of {pretrained_model_name_or_path} are corrupt or truncated (model.safetensors: {error})"
            ) from error

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """The original's initialisation: SSM parameters as in ``GoomSSM.reset_parameters``;
        linear maps and the (tied) embedding ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LayerNorm 1, 0.
        Linear biases (only the token classifier has one) start at 0."""
        if isinstance(module, GoomSSM):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            bound = 1.0 / math.sqrt(module.weight.shape[1])
            nn.init.uniform_(module.weight, -bound, bound)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        """The backbone's token embedding (:class:`GoomSSMModel` overrides this with its own)."""
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.backbone.set_input_embeddings(new_embeddings)

    def get_param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups as in the original: ``weight_decay`` on the embedding, linear
        weights and all SSM parameters; none on LayerNorm parameters."""
        decayed = {id(p) for m in self.modules() if isinstance(m, (nn.Embedding, nn.Linear)) for p in [m.weight]}
        decayed |= {id(p) for m in self.modules() if isinstance(m, GoomSSM) for p in m.parameters()}
        params = list(self.parameters())  # tied weights appear once
        return [
            {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
        ]


def _check_input_ids(input_ids: torch.Tensor) -> None:
    """Type and shape of ``input_ids`` (the values: :func:`_check_token_range`)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one token per sequence")


def _in_graph(tensor: torch.Tensor) -> bool:
    """Whether a check that waits for ``tensor``'s values (a device-to-host copy) must be
    skipped: while ``torch.compile`` traces, or while a CUDA graph is being captured
    (:class:`goom_ssm.graphed_step.GraphedTrainingStep` checks the token ids before each replay)."""
    return torch.compiler.is_compiling() or (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_token_range(ids: torch.Tensor, vocab_size: int, name: str = "input_ids",
                       ignore_index: Optional[int] = None) -> None:
    """Raises if an id of ``ids`` (named ``name`` in the error; ``ignore_index``, where given,
    passes) is outside the vocabulary: waits for ``ids`` (one device-to-host copy), so graphs
    skip it (:func:`_in_graph`)."""
    if _in_graph(ids) or not ids.numel():
        return
    if ignore_index is not None:
        ids = torch.where(ids == ignore_index, 0, ids)
    _check_id_range(*torch.stack(torch.aminmax(ids)).tolist(), vocab_size=vocab_size, name=name,
                    ignore_index=ignore_index)


def _check_id_range(low: int, high: int, vocab_size: int, name: str = "input_ids",
                    ignore_index: Optional[int] = None) -> None:
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        besides = "" if ignore_index is None else f" and is not ignore_index ({ignore_index})"
        raise ValueError(f"{name} contains token id {bad}, outside the vocabulary [0, {vocab_size}){besides}")


_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _refuse_unknown_kwargs(model_name: str, kwargs: dict, allowed: tuple) -> None:
    """Raise ``TypeError`` naming every keyword argument the model does not understand (``None`` values pass)."""
    unknown = sorted(k for k, v in kwargs.items() if k not in allowed and v is not None)
    if unknown:
        raise TypeError(f"{model_name}.forward() got keyword arguments it does not understand: {unknown}")


def _cache_argument(cache, past_key_values):
    """The cache, given under transformers' name of 5.24+ (``cache``) or of earlier releases
    (``past_key_values``, deprecated with a warning where the release has renamed it)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("give the cache once: as `cache` or as `past_key_values`, not both")
    if past_key_values is not None and CACHE_NAME == "cache" and not torch.compiler.is_compiling():
        warnings.warn("`past_key_values` is deprecated: transformers 5.24 renamed it `cache`", FutureWarning,
                      stacklevel=3)
    return past_key_values if cache is None else cache


def _current_mask(attention_mask: torch.Tensor, batch: int, seq_len: int, past: int) -> torch.Tensor:
    """The columns of ``attention_mask`` for the current tokens (shape checked only): the mask
    covers the current tokens, or the ``past`` tokens the cache has consumed and the current ones."""
    if attention_mask.ndim != 2 or attention_mask.shape[0] != batch or (
            attention_mask.shape[1] != seq_len and attention_mask.shape[1] != past + seq_len):
        widths = f"{seq_len} or {past + seq_len}" if past else f"{seq_len}"
        raise ValueError(
            f"attention_mask must have shape [batch={batch}, {widths}] (a padding mask, "
            f"1 = real token, over the current tokens" + (f" or over the {past} cached ones and them" if past else "")
            + f"), got {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -seq_len:]


def _state_mask(attention_mask: Optional[torch.Tensor], batch: int, seq_len: int, past: int) -> Optional[torch.Tensor]:
    """The part of ``attention_mask`` for the current tokens as bool ``[batch, seq_len]``,
    or ``None`` when every current token is real. The value checks (0/1 entries, all real)
    wait for the mask, so compiled and exported graphs skip them and keep the mask."""
    if attention_mask is None:
        return None
    mask = _current_mask(attention_mask, batch, seq_len, past)
    if torch.compiler.is_compiling():
        return mask.bool()
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 (padding) and 1 (real token)")
        mask = mask.bool()
    return None if bool(mask.all()) else mask


def _document_starts(position_ids: Optional[torch.Tensor], batch: int, seq_len: int, mask: Optional[torch.Tensor],
                     carried: bool) -> Optional[torch.Tensor]:
    """Where packed documents start, from ``position_ids [batch, seq_len]`` (or ``[1, seq_len]``
    for every sequence) that count ``0, 1, 2, ...`` within each document, as transformers'
    ``DataCollatorWithFlattening`` gives them: bool ``[batch, seq_len]``, True at each real token
    whose position is 0 and before which the sequence holds a state that is not the initial one
    (an earlier real token, or a ``carried`` cache); None where there is no such token. Without
    ``position_ids``, None. The value checks (non-negative; +1 from one real token to the
    next, or 0) wait for the ids, so graphs skip them (:func:`_in_graph`)."""
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be an integer tensor [batch, seq_len], got {type(position_ids).__name__}")
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise TypeError("position_ids must be an integer tensor [batch, seq_len] (0 at each packed document's first "
                        f"token), got dtype {position_ids.dtype}")
    if position_ids.ndim != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must have shape [batch={batch}, seq_len={seq_len}] (or [1, {seq_len}]), "
                         f"got {tuple(position_ids.shape)}")
    position_ids = position_ids.expand(batch, seq_len)
    real = torch.ones_like(position_ids, dtype=torch.bool) if mask is None else mask
    seen = real.cumsum(dim=1) - real.long()  # real tokens before each position
    starts = (position_ids == 0) & real & ((seen > 0) if not carried else True)
    if _in_graph(starts):
        return starts
    # Compare each real token with the real token before it (the padding between is skipped).
    last_real = torch.cummax(torch.where(real, torch.arange(seq_len, device=real.device), -1), dim=1).values[:, :-1]
    previous = position_ids.gather(1, last_real.clamp(min=0))  # the id of the last real token before t
    follows = real[:, 1:] & (last_real >= 0)
    wrong = follows & (position_ids[:, 1:] != 0) & (position_ids[:, 1:] != previous + 1)
    negative, miscounted, any_start = torch.stack([(position_ids < 0).any(), wrong.any(), starts.any()]).tolist()
    if negative:
        raise ValueError("position_ids must be non-negative (0 at each packed document's first token)")
    if miscounted:
        row, column = wrong.nonzero()[0].tolist()
        raise ValueError(
            f"position_ids must count up by 1 within a packed document and restart at 0 at the next one (as "
            f"transformers' DataCollatorWithFlattening gives them); sequence {row} has {position_ids[row, column + 1]} "
            f"at position {column + 1} after {previous[row, column]}"
        )
    return starts if any_start else None


class GoomSSMModel(GoomSSMPreTrainedModel):
    """Embedding, residual GOOM-SSM layers and final LayerNorm; outputs hidden states."""

    def __init__(self, config: GoomSSMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GoomSSMBlock(
                d_emb=config.hidden_size, n_hid=config.num_state_heads, d_hid=config.state_size,
                layer_norm_eps=config.layer_norm_epsilon,
                scan_implementation=config.scan_implementation, chunk_size=config.scan_chunk_size,
                init_state_range=config.init_state_range, transition_init_gain=config.transition_init_gain,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embeddings = new_embeddings

    def run_layers(self, hidden_states: torch.Tensor, states: Optional[list], mask: Optional[torch.Tensor],
                   output_hidden_states: bool = False, call_layer=None, starts: Optional[torch.Tensor] = None):
        """Every residual layer then the final LayerNorm, without input checks (no host syncs).

        Args:
            hidden_states: ``[batch, seq_len, hidden_size]`` embeddings.
            states: per layer, the ``ScaledRows`` state to continue from (or ``None``), or ``None``.
            mask: ``[batch, seq_len]`` bool padding mask, or ``None``.
            call_layer: ``call_layer(layer, hidden_states, state, mask)`` runs one layer (default: a call;
                not with ``starts``).
            starts: ``[batch, seq_len]`` bool, the first token of each packed document (see
                :func:`_document_starts`), or ``None``.

        Returns:
            normalised hidden states, the per-layer states after the last token, and (if asked)
            the tuple of embeddings and layer outputs (the last one after the final LayerNorm).
        """
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        checkpointing = self.training and any(layer.gradient_checkpointing for layer in self.layers)
        # Checkpointed layers (GradientCheckpointingLayer) plan their own scans: a reentrant
        # checkpoint passes no gradient to tensors nested in its arguments.
        plans = None if checkpointing or call_layer is not None else shared_chunk_plans(self.layers, hidden_states)
        new_states = []
        for i, layer in enumerate(self.layers):
            state = states[i] if states is not None else None
            if call_layer is not None:
                hidden_states, state = call_layer(layer, hidden_states, state, mask)
            else:
                hidden_states, state = layer(hidden_states, state, mask, None if plans is None else plans[i], starts)
            new_states.append(state)
            if output_hidden_states and i < len(self.layers) - 1:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return hidden_states, new_states, all_hidden_states

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        cache: Optional[GoomSSMCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values: Optional[GoomSSMCache] = None,
        position_ids: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> Union[tuple, BaseModelOutputWithPast]:
        """
        Args:
            input_ids: ``[batch, seq_len]`` token ids (or give ``inputs_embeds [batch, seq_len, hidden_size]``).
            attention_mask: ``[batch, seq_len]`` or ``[batch, past + seq_len]``, 1 for real tokens and 0 for
                padding; a padded position is an identity step of every recurrence.
            cache: a :class:`GoomSSMCache` to continue from (and update in place); ``past_key_values`` is
                the same argument under transformers' name before 5.24.
            use_cache: return the cache after these tokens (default ``config.use_cache`` in eval mode).
            output_hidden_states: also return the embeddings and every layer's output.
            position_ids: ``[batch, seq_len]`` (or ``[1, seq_len]``) for packed documents (padding-free
                training): each document's positions count from 0, as transformers'
                ``DataCollatorWithFlattening`` gives them, and every layer's state restarts from its
                initial state at each 0, as if the document were alone (a 0 after a cache's tokens
                starts afresh too). A model without position embeddings reads nothing else from them.

        Returns the last hidden states ``[batch, seq_len, hidden_size]``, the cache under
        :data:`CACHE_NAME` (transformers' name for it in the installed release) and the hidden states.
        """
        _refuse_unknown_kwargs(type(self).__name__, kwargs, ())
        cache = _cache_argument(cache, past_key_values)
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            _check_input_ids(input_ids)
            _check_token_range(input_ids, self.config.vocab_size)
            inputs_embeds = self.embeddings(input_ids)
        elif inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size or inputs_embeds.shape[1] == 0:
            raise ValueError(
                f"inputs_embeds must have shape [batch, seq_len >= 1, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}"
            )
        batch, seq_len = inputs_embeds.shape[:2]
        if cache is not None:
            if not isinstance(cache, GoomSSMCache):
                raise TypeError(f"{CACHE_NAME} must be a GoomSSMCache, got {type(cache).__name__}")
            cache.check_compatible(self.config, batch)
        mask = _state_mask(attention_mask, batch, seq_len, cache.get_seq_length() if cache is not None else 0)
        # A segment of a sequence split over processes (goom_ssm.distributed) follows a carried state too.
        carried = (cache is not None and cache.get_seq_length() > 0) or (position_ids is not None and any(
            m.sequence_group is not None for m in self.modules() if isinstance(m, GoomSSM)))
        starts = _document_starts(position_ids, batch, seq_len, mask, carried)
        if cache is None and use_cache:
            cache = GoomSSMCache(self.config, batch)

        states = cache.states if cache is not None else None
        hidden_states, states, all_hidden_states = self.run_layers(inputs_embeds, states, mask, output_hidden_states,
                                                                   starts=starts)
        if cache is not None:
            cache.advance(states, seq_len)

        cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                       **{CACHE_NAME: cache})


class GoomSSMForCausalLM(GoomSSMPreTrainedModel, GenerationMixin):
    """GOOM-SSM language model: :class:`GoomSSMModel` and a head tied to the embedding."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: GoomSSMConfig):
        super().__init__(config)
        self.backbone = GoomSSMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def generate(self, inputs: Optional[torch.Tensor] = None, *args, **kwargs):
        """transformers' ``generate``, with the prompt's shape checked first: ``input_ids`` (or
        ``inputs``) ``[batch, seq_len]`` and an ``attention_mask`` of the same shape. Assisted
        decoding (an assistant model, prompt lookup, early exit, multi-token prediction) is
        refused: it rolls the cache back over rejected draft tokens, which a recurrent state cannot."""
        config = kwargs.get("generation_config") or self.generation_config
        assisted = [name for name in _ASSISTED_DECODING_OPTIONS
                    if kwargs.get(name, getattr(config, name, None)) not in (None, False)]
        if assisted:
            raise ValueError(f"GOOM-SSM cannot use assisted decoding ({', '.join(assisted)} set): it crops the "
                             f"cache back over rejected draft tokens, and a recurrent state cannot be rolled back")
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(ids.shape)} "
                             f"(for one sequence: ids[None] or tokenizer(..., return_tensors='pt').input_ids)")
        mask = kwargs.get("attention_mask")
        if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, "
                             f"got {tuple(mask.shape)}")
        return super().generate(inputs, *args, **kwargs)

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """transformers' decoding loop for greedy decoding and sampling; greedy decoding that
        returns only the token ids runs :func:`~.generation_goom_ssm.greedy_decode` instead: the
        same tokens, with the host reading the device's progress every few tokens instead of
        after each one (:mod:`~.generation_goom_ssm`)."""
        if decodes_greedily_without_host_waits(generation_config, stopping_criteria, synced_gpus, streamer,
                                               model_kwargs):
            return greedy_decode(self, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)
        return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Optional[GoomSSMCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        next_sequence_length: Optional[int] = None,
        past_key_values: Optional[GoomSSMCache] = None,
        **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not consumed yet (``generate`` says how many in
        ``next_sequence_length``: one per step after the prompt). ``inputs_embeds`` is the prompt
        while the cache has consumed none of it."""
        cache = _cache_argument(cache, past_key_values)
        seen = cache.get_seq_length() if cache is not None else 0
        if inputs_embeds is not None and seen == 0:
            model_inputs = {"input_ids": None, "inputs_embeds": inputs_embeds}
        else:
            if next_sequence_length is None and seen > 0:
                next_sequence_length = input_ids.shape[1] - seen
            if next_sequence_length is not None:
                input_ids = input_ids[:, -next_sequence_length:]
            model_inputs = {"input_ids": input_ids.contiguous()}
        for unused in ("position_ids", "cache_position", "token_type_ids", "is_first_iteration"):
            kwargs.pop(unused, None)
        model_inputs.update({CACHE_NAME: cache, "attention_mask": attention_mask}, **kwargs)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        """transformers' update between two ``generate()`` steps, less the attention mask once a
        cache holds the tokens fed so far: their padding is in the recurrent state, and every later
        token is one that ``generate()`` appends as real (its mask column would be 1), so the
        following steps run without a mask (no per-step concatenation, checks or copies of it)."""
        if outputs.get(CACHE_NAME) is not None:
            model_kwargs.pop("attention_mask", None)
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        cache: Optional[GoomSSMCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional[GoomSSMCache] = None,
        position_ids: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> Union[tuple, CausalLMOutputWithPast]:
        """
        Args:
            labels: ``[batch, seq_len]`` target ids; the loss is the mean cross-entropy of the
                logits at position ``t`` against ``labels[:, t + 1]`` (shifted inside), ignoring -100.
            logits_to_keep: if a positive int, compute logits only for the last that many positions.
            position_ids: packed documents, see :meth:`GoomSSMModel.forward`.
            kwargs: only the loss's options (``num_items_in_batch``, as the ``Trainer`` passes it,
                ``ignore_index``, ``shift_labels``); any other keyword is refused.
            Other arguments: see :meth:`GoomSSMModel.forward`.

        Returns ``logits [batch, seq_len, vocab_size]`` (float32), ``loss``, and the cache under
        :data:`CACHE_NAME`.
        """
        _refuse_unknown_kwargs(type(self).__name__, kwargs, _LOSS_KWARGS)
        if labels is not None:  # checked before the forward is queued: the wait is short
            _check_token_range(kwargs.get("shift_labels", labels), self.config.vocab_size, "labels",
                               kwargs.get("ignore_index", -100))
        cache = _cache_argument(cache, past_key_values)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        decoder = None if position_ids is not None else self._cuda_graph_decoder(input_ids, cache, labels,
                                                                                  output_hidden_states)
        if decoder is not None:
            logits = self._decode_with_cuda_graph(decoder, input_ids, attention_mask, cache)
            if not return_dict:
                return (logits, cache)
            return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache})
        outputs = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=True,
            position_ids=position_ids,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        if labels is None:
            logits, loss = self._logits(hidden_states), None
        else:
            if labels.shape != hidden_states.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(hidden_states.shape[:2])}, got {tuple(labels.shape)}")
            logits, loss = self._logits_and_loss(hidden_states, labels, **kwargs)

        cache = getattr(outputs, CACHE_NAME)
        if not return_dict:
            output = tuple(v for v in (logits, cache, outputs.hidden_states) if v is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: cache})

    def _head_product(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head's product ``[..., W]`` in its compute dtype, ``W >= vocab_size``: on CUDA, for
        many positions at once and a vocabulary that is not a multiple of 64 (GPT-2's 50257), the
        product runs against the weight padded with zero rows, whose logits (``[..., vocab_size:]``)
        are dropped by the callers: cuBLAS has no fast kernel for the odd size
        (benchmarks/results/design_notes.md)."""
        head = self.lm_head
        padding = -head.weight.shape[0] % 64 if is_plain(head) else 0
        if padding and hidden_states.is_cuda and hidden_states.shape[:-1].numel() >= 1024:
            bias = None if head.bias is None else F.pad(head.bias, (0, padding))
            return F.linear(hidden_states, F.pad(head.weight, (0, 0, 0, padding)), bias)
        return head(hidden_states)

    def _logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head's float32 logits ``[..., vocab_size]``."""
        return self._head_product(hidden_states)[..., : self.config.vocab_size].float().contiguous()

    def _logits_and_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor, **kwargs) -> tuple:
        """The float32 logits and transformers' causal LM loss (``self.loss_function`` with ``kwargs``).

        With ``config.fuse_cross_entropy``, where that function is transformers' own
        (``ForCausalLMLoss``) and the head's product is in half precision on CUDA with Triton,
        outside ``torch.compile`` (:meth:`_fused_loss_applies`):
        the same loss from :class:`~goom_ssm.triton_loss.HeadCrossEntropy`'s rows (the targets
        shifted, the rows' losses summed and divided as transformers does), without the float32
        ``log_softmax``.
        """
        vocab_size = self.config.vocab_size
        product = self._head_product(hidden_states)
        if not self._fused_loss_applies(product):
            logits = product[..., :vocab_size].float().contiguous()
            return logits, self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        ignore_index = kwargs.get("ignore_index", -100)
        targets = kwargs.get("shift_labels")
        if targets is None:  # position t predicts the label of t + 1
            targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        positions = product.shape[:-1].numel()
        if targets.numel() != positions:
            raise ValueError(f"shift_labels must have {positions} labels (one per position), got shape "
                             f"{tuple(targets.shape)}")
        flat_logits, losses = HeadCrossEntropy.apply(product.reshape(positions, -1), vocab_size,
                                                     targets.reshape(-1).to(product.device, torch.long), ignore_index)
        items = kwargs.get("num_items_in_batch")
        if items is None:  # the mean over the counted positions
            items = (targets != ignore_index).sum().to(product.device)
        elif torch.is_tensor(items):
            items = items.to(product.device)
        return flat_logits.view(*product.shape[:-1], vocab_size), losses.sum() / items

    def _fused_loss_applies(self, product: torch.Tensor) -> bool:
        """Whether :meth:`_logits_and_loss` takes the Triton cross-entropy for the head's ``product``."""
        return (self.config.fuse_cross_entropy and HAS_TRITON and product.is_cuda
                and product.dtype in (torch.float16, torch.bfloat16)
                and not torch.compiler.is_compiling() and self.loss_function is LOSS_MAPPING["ForCausalLM"])

    def _cuda_graph_decoder(self, input_ids, cache, labels, output_hidden_states) -> Optional[CUDAGraphDecoder]:
        """The captured CUDA graph that runs this call, if it is one decoding step of a plain
        model (see :mod:`~goom_ssm.modeling.cuda_graph_goom_ssm`); else None (the module path)."""
        if not (
            self.config.decode_with_cuda_graphs and input_ids is not None and input_ids.shape[-1] == 1
            and input_ids.ndim == 2 and input_ids.is_cuda and isinstance(cache, GoomSSMCache)
            and cache.states[0] is not None and labels is None and not output_hidden_states
            and not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        ):
            return None
        _check_input_ids(input_ids)
        decoders = decoders_of(self)
        key = (input_ids.shape[0], torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)
        decoder = decoders.get(key)
        if decoder is not None and decoder.is_current_for(cache):
            return decoder
        if not is_plain(self, (GoomSSMForCausalLM, GoomSSMModel)):
            return None
        if decoder is None or not decoder.is_valid_for(self):
            decoder = decoders[key] = CUDAGraphDecoder(self, input_ids.shape[0])
        return decoder

    def _decode_with_cuda_graph(self, decoder, input_ids, attention_mask, cache: GoomSSMCache) -> torch.Tensor:
        batch = input_ids.shape[0]
        if not decoder.is_current_for(cache) or cache.batch_size != batch:  # else it ran the previous step
            cache.check_compatible(self.config, batch)
        mask = None if attention_mask is None else _current_mask(attention_mask, batch, 1, cache.get_seq_length()) != 0
        return decoder(input_ids, mask, cache, _check_id_range)


# generate()'s options that select assisted decoding (transformers' GenerationConfig.get_generation_mode)
_ASSISTED_DECODING_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")
_CLASSIFICATION_LOSS_KWARGS = ("num_items_in_batch", "ignore_index")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def _classification_loss_kwargs(model_name: str, kwargs: dict) -> dict:
    """The loss's options in a head's ``kwargs``, refusing any other keyword whose value is not ``None``."""
    _refuse_unknown_kwargs(model_name, kwargs, _CLASSIFICATION_LOSS_KWARGS)
    return {k: v for k, v in kwargs.items() if k in _CLASSIFICATION_LOSS_KWARGS and v is not None}


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str,
                         num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
                         ignore_index: int = -100) -> torch.Tensor:
    """transformers' loss for ``problem_type`` (one of :data:`PROBLEM_TYPES`), of ``logits [items, num_labels]``:

    - ``"regression"``: mean squared error against float ``labels`` of the logits' shape;
    - ``"single_label_classification"``: cross-entropy against integer class ids ``labels [items]``,
      leaving out the items labelled ``ignore_index``;
    - ``"multi_label_classification"``: binary cross-entropy with logits against ``labels`` of the
      logits' shape (0/1, or probabilities).

    The loss is the mean over the items' terms, or, with ``num_items_in_batch`` (as the ``Trainer``
    passes it, counting labels other than -100 over all its accumulated batches), their sum
    divided by it, for each problem type.
    """
    reduction = "mean" if num_items_in_batch is None else "sum"
    if problem_type == "single_label_classification":
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"single-label classification needs integer class ids as labels, got dtype {labels.dtype}")
        loss = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction=reduction)
    elif problem_type == "regression":
        loss = F.mse_loss(logits, labels.to(logits.dtype), reduction=reduction)
    else:
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in float32, or float64 if they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _last_real_positions(real: torch.Tensor) -> torch.Tensor:
    """The position of the last ``True`` in each row of ``real [batch, seq_len]`` (bool), as
    ``[batch]``. Raises if a row has none (not while compiling: the check waits for ``real``)."""
    positions = torch.arange(real.shape[1], device=real.device)
    last = torch.where(real, positions, -1).amax(dim=1)
    if not torch.compiler.is_compiling() and bool((last < 0).any()):
        row = int((last < 0).nonzero()[0, 0])
        raise ValueError(f"sequence {row} of the batch has no real token (it is all padding): nothing to classify")
    return last


def _classifier_output(output_class: type, loss, logits: torch.Tensor, hidden_states, return_dict: bool):
    """``output_class(loss, logits, hidden_states)``, or the tuple of those that are not ``None``."""
    if not return_dict:
        return tuple(v for v in (loss, logits, hidden_states) if v is not None)
    return output_class(loss=loss, logits=logits, hidden_states=hidden_states)


class GoomSSMForSequenceClassification(GoomSSMPreTrainedModel):
    """:class:`GoomSSMModel` and a bias-free linear head ``score`` (``hidden_size -> num_labels``)
    on the hidden state of each sequence's last real token, as transformers' GPT-2 classifier.
    ``config.num_labels``, ``id2label``/``label2id`` and ``problem_type`` as usual."""

    def __init__(self, config: GoomSSMConfig):
        super().__init__(config)
        self.backbone = GoomSSMModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[tuple, SequenceClassifierOutput]:
        """
        Args:
            input_ids, inputs_embeds, attention_mask, output_hidden_states: see :meth:`GoomSSMModel.forward`.
            labels: ``[batch]`` class ids (single-label), ``[batch]`` or ``[batch, 1]`` targets (regression,
                ``num_labels == 1``), or ``[batch, num_labels]`` (multi-label, or regression on several
                outputs). Without ``config.problem_type`` it is chosen as transformers does, and kept in
                the config: regression if ``num_labels == 1``, else single-label for int64/int32 labels,
                else multi-label. See :func:`_classification_loss`.
            kwargs: only the loss's options (``num_items_in_batch``, as the ``Trainer`` passes it,
                ``ignore_index``); any other keyword is refused.

        The pooled position of a sequence is its last real token, as in GPT-2's classifier: the
        last position whose ``attention_mask`` is 1 (left or right padding); without a mask, the
        last token that is not ``config.pad_token_id`` (the recurrence then also reads the pad
        tokens), or, for ``inputs_embeds``, the last position (with a warning for a batch); with
        neither a mask nor ``config.pad_token_id``, the last position of a single sequence (a
        batch is refused).

        Returns ``logits [batch, num_labels]`` (float32, or float64 for a float64 model), ``loss``
        and (if asked) the hidden states.
        """
        loss_kwargs = _classification_loss_kwargs(type(self).__name__, kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        last = self._pooled_positions(input_ids, attention_mask, hidden_states)
        logits = _at_least_float32(self.score(hidden_states[torch.arange(len(last), device=last.device), last]))

        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, **loss_kwargs)
        return _classifier_output(SequenceClassifierOutput, loss, logits, outputs.hidden_states, return_dict)

    def _pooled_positions(self, input_ids, attention_mask, hidden_states: torch.Tensor) -> torch.Tensor:
        """The position ``[batch]`` of each sequence's last real token (see :meth:`forward`);
        ``attention_mask`` has been checked by the backbone."""
        batch, seq_len = hidden_states.shape[:2]
        if attention_mask is not None:
            return _last_real_positions(_current_mask(attention_mask, batch, seq_len, past=0) != 0)
        if self.config.pad_token_id is None and batch > 1:
            raise ValueError(f"cannot tell where each of the {batch} sequences ends: give attention_mask "
                             "(1 = real token, 0 = padding), or set config.pad_token_id")
        if input_ids is not None and self.config.pad_token_id is not None:
            return _last_real_positions(input_ids != self.config.pad_token_id)
        if batch > 1:
            warnings.warn("inputs_embeds without attention_mask: every sequence is scored at the last position, "
                          "as if none were padded (give attention_mask for a padded batch)", stacklevel=3)
        return torch.full((batch,), seq_len - 1, device=hidden_states.device)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """The loss of ``logits [batch, num_labels]`` (see :meth:`forward`), labels' shape checked."""
        num_labels = self.config.num_labels
        if self.config.problem_type is None:
            if num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        problem_type = self.config.problem_type
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"config.problem_type must be one of {PROBLEM_TYPES} (or None), got {problem_type!r}")
        batch = logits.shape[0]
        one_per_sequence = problem_type == "single_label_classification" or num_labels == 1
        expected = [(batch,), (batch, 1)] if one_per_sequence else [tuple(logits.shape)]
        if tuple(labels.shape) not in expected:
            raise ValueError(f"{problem_type} with num_labels={num_labels} needs labels of shape "
                             f"{' or '.join(map(str, expected))}, got {tuple(labels.shape)}")
        single_label = problem_type == "single_label_classification"
        labels = labels.reshape(batch) if single_label else labels.reshape(logits.shape)
        return _classification_loss(logits, labels, problem_type, **kwargs)


class GoomSSMForTokenClassification(GoomSSMPreTrainedModel):
    """:class:`GoomSSMModel` and a linear head ``classifier`` (``hidden_size -> num_labels``, with
    bias) on every position, after dropout of ``config.classifier_dropout`` where the config has
    it (none by default). ``config.num_labels`` and ``id2label``/``label2id`` as usual."""

    def __init__(self, config: GoomSSMConfig):
        super().__init__(config)
        self.backbone = GoomSSMModel(config)
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.0)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        position_ids: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> Union[tuple, TokenClassifierOutput]:
        """
        Args:
            input_ids, inputs_embeds, attention_mask, output_hidden_states, position_ids (packed
                documents): see :meth:`GoomSSMModel.forward`.
            labels: ``[batch, seq_len]`` class ids; the loss is the mean cross-entropy over the
                positions whose label is not -100 (label padded positions -100).
            kwargs: only the loss's options (``num_items_in_batch``, as the ``Trainer`` passes it,
                ``ignore_index``); any other keyword is refused.

        Returns ``logits [batch, seq_len, num_labels]`` (float32, or float64 for a float64 model),
        ``loss`` and (if asked) the hidden states.
        """
        loss_kwargs = _classification_loss_kwargs(type(self).__name__, kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False,
            output_hidden_states=output_hidden_states, return_dict=True, position_ids=position_ids,
        )
        logits = _at_least_float32(self.classifier(self.dropout(outputs.last_hidden_state)))

        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            loss = _classification_loss(logits.flatten(0, 1), labels.flatten(), "single_label_classification",
                                        **loss_kwargs)
        return _classifier_output(TokenClassifierOutput, loss, logits, outputs.hidden_states, return_dict)
