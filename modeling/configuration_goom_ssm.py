"""Configuration of GOOM-SSM language models."""

import importlib

from transformers import PretrainedConfig

from ..constants import ENDOFTEXT_ID, GPT2_VOCAB_SIZE, SCAN_IMPLEMENTATIONS


def _register_model_classes() -> None:
    """In the goom_ssm package, register the model classes with the Auto classes when a config is
    first made (``goom_ssm.modeling`` defers their import); a remote-code copy of this file does nothing."""
    if __package__ == "goom_ssm.modeling":
        importlib.import_module(__package__).register_model_classes()


class GoomSSMConfig(PretrainedConfig):
    r"""Configuration of a :class:`GoomSSMModel` / :class:`GoomSSMForCausalLM`.

    Defaults give the published 124M model (GPT-2 vocabulary). Field names follow
    transformers' conventions; the original implementation's names are in brackets.

    Args:
        vocab_size: tokens in the vocabulary [vocab_sz].
        hidden_size: embedding features per token [d_emb].
        num_hidden_layers: residual recurrent layers [n_res].
        num_state_heads: hidden state rows per token, like attention heads [n_hid].
        state_size: features per hidden state row [d_hid].
        layer_norm_epsilon: epsilon of every LayerNorm.
        init_state_range: initial states are drawn from U(-init_state_range, init_state_range).
        transition_init_gain: gain of the orthogonal initialisation of the transition matrix A.
        scan_implementation: ``"auto"`` (default: the Triton kernels on CUDA when Triton is
            installed, else ``"chunked"``), ``"triton"`` (fused recurrence kernels, forward and
            backward), ``"chunked"`` (pure PyTorch, any device) or ``"goom_prefix"`` (the
            original's complex parallel prefix scan, slow; for reference). All compute the same
            states to float32 rounding; the choice is a matter of speed only.
        scan_chunk_size: time steps per dense chunk of the chunked (pure PyTorch) scan, its
            ``chunk_size``; ``None`` (default): 8 on CPU, 32 on other devices (a matter of speed
            only). The Triton scan does not read it: it chooses its steps per program from the
            sequence length (:func:`goom_ssm.triton_scan.default_steps_per_program`).
        use_cache: return a recurrent-state cache from the forward pass (for generation).
        decode_with_cuda_graphs: on CUDA, run single-token decoding steps through a captured
            CUDA graph (one per batch size), instead of launching every kernel from Python; with
            Triton (and the ``"auto"`` or ``"triton"`` scan) each layer's step is three fused kernels.
        fuse_cross_entropy: on CUDA with Triton, compute transformers' causal LM loss from a
            half-precision head with the two kernels of :mod:`goom_ssm.triton_loss` instead of a
            float32 ``log_softmax`` (the same loss, faster); ``False``: transformers' loss function as is.
        tie_word_embeddings: tie the output head to the input embeddings (as the original).
        bos_token_id, eos_token_id, pad_token_id: special ids; bos and eos default to GPT-2's
            ``<|endoftext|>`` (50256), and to ``None`` when the vocabulary is smaller.
    """

    model_type = "goom_ssm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the cache, under either release's name

    def __init__(
        self,
        vocab_size: int = GPT2_VOCAB_SIZE,
        hidden_size: int = 768,
        num_hidden_layers: int = 24,
        num_state_heads: int = 24,
        state_size: int = 32,
        layer_norm_epsilon: float = 1e-5,
        init_state_range: float = 0.1,
        transition_init_gain: float = 0.99,
        scan_implementation: str = "auto",
        scan_chunk_size: int | None = None,
        use_cache: bool = True,
        decode_with_cuda_graphs: bool = True,
        fuse_cross_entropy: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = ENDOFTEXT_ID,
        eos_token_id: int | None = ENDOFTEXT_ID,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_state_heads = num_state_heads
        self.state_size = state_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.init_state_range = init_state_range
        self.transition_init_gain = transition_init_gain
        self.scan_implementation = scan_implementation
        self.scan_chunk_size = scan_chunk_size
        self.use_cache = use_cache
        self.decode_with_cuda_graphs = decode_with_cuda_graphs
        self.fuse_cross_entropy = fuse_cross_entropy
        if bos_token_id is not None and bos_token_id >= vocab_size:
            bos_token_id = None  # the GPT-2 defaults do not apply to a smaller vocabulary
        if eos_token_id is not None and eos_token_id >= vocab_size:
            eos_token_id = None
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_sizes()
        _register_model_classes()

    def validate_sizes(self):
        """Raise ``ValueError`` naming the first inconsistent field."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_state_heads", "state_size", "scan_chunk_size"):
            value = getattr(self, name)
            if name == "scan_chunk_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GoomSSMConfig.{name} must be a positive integer, got {value!r}")
        if self.scan_implementation not in SCAN_IMPLEMENTATIONS:
            raise ValueError(
                f"GoomSSMConfig.scan_implementation must be one of {SCAN_IMPLEMENTATIONS}, got {self.scan_implementation!r}"
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GoomSSMConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name, None)
            ids = value if isinstance(value, (list, tuple)) else [value]
            for token_id in ids:
                if token_id is not None and not 0 <= token_id < self.vocab_size:
                    raise ValueError(f"GoomSSMConfig.{name}={value!r} is outside the vocabulary [0, {self.vocab_size})")
