"""GOOM-SSM language models: deep RNNs whose layers run a non-diagonal linear state-space
recurrence over generalized orders of magnitude (GOOMs), for Hugging Face transformers.

Importing ``goom_ssm`` registers the model with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` (model_type ``"goom_ssm"``).
"""

from .layers import GoomSSM, GoomSSMBlock
from .modeling import GoomSSMCache, GoomSSMConfig, GoomSSMForCausalLM, GoomSSMModel, GoomSSMPreTrainedModel

__version__ = "0.1.0"

__all__ = [
    "GoomSSM", "GoomSSMBlock", "GoomSSMCache", "GoomSSMConfig", "GoomSSMForCausalLM", "GoomSSMModel",
    "GoomSSMPreTrainedModel",
]
