"""transformers classes of GOOM-SSM models, registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from .cache_goom_ssm import GoomSSMCache
from .configuration_goom_ssm import GoomSSMConfig
from .modeling_goom_ssm import GoomSSMForCausalLM, GoomSSMModel, GoomSSMPreTrainedModel
from .modeling_goom_ssm import GoomSSMForSequenceClassification, GoomSSMForTokenClassification

AutoConfig.register(GoomSSMConfig.model_type, GoomSSMConfig, exist_ok=True)
AutoModel.register(GoomSSMConfig, GoomSSMModel, exist_ok=True)
AutoModelForCausalLM.register(GoomSSMConfig, GoomSSMForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(GoomSSMConfig, GoomSSMForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(GoomSSMConfig, GoomSSMForTokenClassification, exist_ok=True)

__all__ = ["GoomSSMCache", "GoomSSMConfig", "GoomSSMForCausalLM", "GoomSSMModel", "GoomSSMPreTrainedModel"]
__all__ += ["GoomSSMForSequenceClassification", "GoomSSMForTokenClassification"]
