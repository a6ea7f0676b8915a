"""GOOM-SSM language models: deep RNNs whose layers run a non-diagonal linear state-space
recurrence over generalized orders of magnitude (GOOMs), for Hugging Face transformers.

Importing ``goom_ssm`` registers the model with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``, ``AutoModelForSequenceClassification`` and
``AutoModelForTokenClassification`` (model_type ``"goom_ssm"``). It is quick: the model classes and
layers are imported on first use (see :mod:`goom_ssm.modeling`).
"""

import importlib
from pathlib import Path

from .modeling import GoomSSMConfig

__version__ = "0.1.0"

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "pretrained" / "goom-ssm-english-15m"
"""The model folder shipped with the package (14M parameters, trained on Shakespeare, with its
GPT-2 tokenizer files): ``AutoModelForCausalLM.from_pretrained(goom_ssm.SHIPPED_MODEL_DIR)``."""

# Imported on first use: name -> module of this package.
_LAZY = {
    "GoomSSM": ".layers",
    "GoomSSMBlock": ".layers",
    "GoomSSMCache": ".modeling",
    "GoomSSMForCausalLM": ".modeling",
    "GoomSSMForSequenceClassification": ".modeling",
    "GoomSSMForTokenClassification": ".modeling",
    "GoomSSMModel": ".modeling",
    "GoomSSMPreTrainedModel": ".modeling",
}

__all__ = ["SHIPPED_MODEL_DIR", "GoomSSMConfig", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
