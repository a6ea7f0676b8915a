"""GOOM-SSM language models: deep RNNs whose layers run a non-diagonal linear state-space
recurrence over generalized orders of magnitude (GOOMs), for Hugging Face transformers.

Importing ``goom_ssm`` registers the model with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``, ``AutoModelForSequenceClassification`` and
``AutoModelForTokenClassification`` (model_type ``"goom_ssm"``).
"""

from .layers import GoomSSM, GoomSSMBlock
from .modeling import GoomSSMCache, GoomSSMConfig, GoomSSMForCausalLM, GoomSSMModel, GoomSSMPreTrainedModel
from .modeling import GoomSSMForSequenceClassification, GoomSSMForTokenClassification

__version__ = "0.1.0"

__all__ = [
    "GoomSSM", "GoomSSMBlock", "GoomSSMCache", "GoomSSMConfig", "GoomSSMForCausalLM", "GoomSSMModel",
    "GoomSSMPreTrainedModel",
]
__all__ += ["GoomSSMForSequenceClassification", "GoomSSMForTokenClassification"]
