"""transformers classes of GOOM-SSM models, registered with the Auto classes.

Importing this package registers :class:`GoomSSMConfig` with ``AutoConfig`` and nothing
else: the model classes need transformers' ``PreTrainedModel``, which takes seconds to
import. They are imported, and registered with ``AutoModel``, ``AutoModelForCausalLM``,
``AutoModelForSequenceClassification`` and ``AutoModelForTokenClassification``, on first use: when one of them is looked up here or in ``goom_ssm``, or when the first
``GoomSSMConfig`` is made (``AutoModel*.from_pretrained`` and ``from_config`` make the
config before they look up its model class).
"""

import functools
import importlib

from transformers import AutoConfig

from .configuration_goom_ssm import GoomSSMConfig

AutoConfig.register(GoomSSMConfig.model_type, GoomSSMConfig, exist_ok=True)

# Imported on first use: name -> module of this package.
_LAZY = {
    "GoomSSMCache": "cache_goom_ssm",
    "GoomSSMModel": "modeling_goom_ssm",
    "GoomSSMForCausalLM": "modeling_goom_ssm",
    "GoomSSMForSequenceClassification": "modeling_goom_ssm",
    "GoomSSMForTokenClassification": "modeling_goom_ssm",
    "GoomSSMPreTrainedModel": "modeling_goom_ssm",
}

__all__ = ["GoomSSMConfig", *_LAZY, "register_model_classes"]


@functools.cache
def register_model_classes() -> None:
    """Import the model classes and register them with the Auto classes (once)."""
    from transformers import (
        AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
    )

    from . import modeling_goom_ssm as models

    AutoModel.register(GoomSSMConfig, models.GoomSSMModel, exist_ok=True)
    AutoModelForCausalLM.register(GoomSSMConfig, models.GoomSSMForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(GoomSSMConfig, models.GoomSSMForSequenceClassification, exist_ok=True)
    AutoModelForTokenClassification.register(GoomSSMConfig, models.GoomSSMForTokenClassification, exist_ok=True)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_model_classes()
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
