"""Original-format checkpoints (``torch.save(GenerativeRNN.state_dict())``) to and from
Hugging Face folders.

The original stores no configuration: sizes are read from tensor shapes (vocab and
hidden size from ``embed.weight``, layers from the layer indices, state size from ``A``,
state heads from ``init_states``). Its constant complex buffers (``log_I``,
``lmde.log_0s_atop_I``) are checked against the values the sizes imply and dropped.
"""

import hashlib
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..folders import make_staging_folder, move_into_place
from ..gooms import goom_log
from ..model_card import write_model_card
from ..modeling import GoomSSMConfig, GoomSSMForCausalLM
from .tokenizer import GPT2_VOCAB_SIZE, save_gpt2_tokenizer

_LAYER_KEY = re.compile(r"res_layers\.(\d+)\.(.+)")
# original name inside a layer -> name inside ``backbone.layers.{i}``
_LAYER_NAMES = {
    "lnorm.weight": "norm.weight",
    "lnorm.bias": "norm.bias",
    "ssm_over_gooms.init_states": "ssm.init_states",
    "ssm_over_gooms.A": "ssm.A",
    "ssm_over_gooms.B": "ssm.B",
    "ssm_over_gooms.C": "ssm.C",
    "ssm_over_gooms.D": "ssm.D",
    "feedfwd.1.weight": "out_proj.weight",
}
_LAYER_BUFFERS = ("ssm_over_gooms.log_I", "ssm_over_gooms.lmde.log_0s_atop_I")
_TOP_NAMES = {
    "embed.weight": "backbone.embeddings.weight",
    "lnorm.weight": "backbone.norm_f.weight",
    "lnorm.bias": "backbone.norm_f.bias",
}
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DistributedDataParallel


class CheckpointError(ValueError):
    """An original-format checkpoint that cannot be converted; the message names the problem."""


def load_original_state_dict(path: os.PathLike) -> dict[str, torch.Tensor]:
    """Read an original-format checkpoint file (safely: tensors only), without
    wrapper prefixes left by ``torch.compile`` or DDP."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: never do that for a checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint of tensors (it holds something else, or "
                              f"is not a checkpoint at all; only tensors are loaded)") from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got {type(state_dict).__name__}")
    state_dict = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _expect_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} from the other tensors")


def original_to_hf(state_dict: Mapping[str, torch.Tensor]) -> tuple[GoomSSMConfig, dict[str, torch.Tensor]]:
    """Config and HF state dict (``GoomSSMForCausalLM`` names) of an original state dict.

    Raises :class:`CheckpointError` on unknown or missing keys and inconsistent shapes.
    """
    for key in ("embed.weight", "res_layers.0.ssm_over_gooms.A", "res_layers.0.ssm_over_gooms.init_states"):
        if key not in state_dict:
            raise CheckpointError(f"not an original GOOM-SSM checkpoint: key {key!r} is missing")
    vocab_size, hidden = state_dict["embed.weight"].shape
    state_size = state_dict["res_layers.0.ssm_over_gooms.A"].shape[0]
    heads = state_dict["res_layers.0.ssm_over_gooms.init_states"].shape[0]
    layer_ids = {int(m.group(1)) for k in state_dict if (m := _LAYER_KEY.fullmatch(k))}
    num_layers = max(layer_ids) + 1

    expected = {"embed.weight": (vocab_size, hidden), "head.weight": (vocab_size, hidden),
                "lnorm.weight": (hidden,), "lnorm.bias": (hidden,)}
    for i in range(num_layers):
        p = f"res_layers.{i}."
        expected.update({
            p + "lnorm.weight": (hidden,), p + "lnorm.bias": (hidden,),
            p + "ssm_over_gooms.init_states": (heads, state_size),
            p + "ssm_over_gooms.A": (state_size, state_size),
            p + "ssm_over_gooms.B": (hidden, heads * state_size),
            p + "ssm_over_gooms.C": (heads * state_size, 2 * hidden),
            p + "ssm_over_gooms.D": (hidden, 2 * hidden),
            p + "ssm_over_gooms.log_I": (heads, heads),
            p + "ssm_over_gooms.lmde.log_0s_atop_I": (state_size + heads, heads),
            p + "feedfwd.1.weight": (hidden, hidden),
        })
    unknown = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    if unknown:
        raise CheckpointError(f"unknown keys in checkpoint: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    if missing:
        raise CheckpointError(f"missing keys in checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for name, shape in expected.items():
        _expect_shape(name, state_dict[name], shape)
        if not torch.isfinite(state_dict[name]).all():
            raise CheckpointError(f"{name} contains inf or NaN")
    if not torch.equal(state_dict["head.weight"], state_dict["embed.weight"]):
        raise CheckpointError("head.weight differs from embed.weight, but the original ties them")
    buffers = original_buffers(heads, state_size)
    for i in range(num_layers):
        for name in _LAYER_BUFFERS:
            if not torch.allclose(state_dict[f"res_layers.{i}.{name}"], buffers[name]):
                raise CheckpointError(f"res_layers.{i}.{name} differs from the constant the sizes imply")

    config = GoomSSMConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
                           num_state_heads=heads, state_size=state_size)
    hf = {new: state_dict[old].float() for old, new in _TOP_NAMES.items()}
    hf["lm_head.weight"] = hf["backbone.embeddings.weight"]
    for i in range(num_layers):
        for old, new in _LAYER_NAMES.items():
            hf[f"backbone.layers.{i}.{new}"] = state_dict[f"res_layers.{i}.{old}"].float()
    return config, hf


def original_buffers(heads: int, state_size: int) -> dict[str, torch.Tensor]:
    """The original's constant complex buffers for the given sizes."""
    eye = torch.eye(heads)
    return {
        "ssm_over_gooms.log_I": goom_log(eye),
        "ssm_over_gooms.lmde.log_0s_atop_I": goom_log(torch.cat([torch.zeros(state_size, heads), eye])),
    }


def hf_to_original(model: GoomSSMForCausalLM) -> dict[str, torch.Tensor]:
    """Original-format state dict of a model, keys in the original's order, with the tied
    head (one tensor with the embedding) and the constant buffers."""
    hf = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    config = model.config
    buffers = original_buffers(config.num_state_heads, config.state_size)
    layer_order = [*list(_LAYER_NAMES)[:-1], *_LAYER_BUFFERS, "feedfwd.1.weight"]  # as GenerativeRNN registers them
    out = {"embed.weight": hf[_TOP_NAMES["embed.weight"]]}
    for i in range(config.num_hidden_layers):
        for name in layer_order:
            key = f"res_layers.{i}.{name}"
            out[key] = buffers[name].clone() if name in buffers else hf[f"backbone.layers.{i}.{_LAYER_NAMES[name]}"]
    out["lnorm.weight"] = hf[_TOP_NAMES["lnorm.weight"]]
    out["lnorm.bias"] = hf[_TOP_NAMES["lnorm.bias"]]
    out["head.weight"] = out["embed.weight"]
    return out


def prepare_output_dir(out_dir: os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty ``out_dir`` unless ``overwrite``; returns it as a Path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; refusing to overwrite it (overwrite=True / --overwrite "
                              f"replaces the whole folder, deleting every file in it)")
    return out_dir


def save_folder_atomically(model: GoomSSMForCausalLM, out_dir: os.PathLike, overwrite: bool = False,
                           extra_files: Optional[callable] = None) -> Path:
    """``model.save_pretrained`` into a temporary folder beside ``out_dir``, then move it into
    place, so that an interrupted save never leaves a half-written model at ``out_dir``.
    ``extra_files(folder)`` may add files (tokenizer, model card) before the move."""
    out_dir = prepare_output_dir(out_dir, overwrite)
    staging = make_staging_folder(out_dir)
    try:
        model.save_pretrained(staging)
        if extra_files is not None:
            extra_files(staging)
        move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def convert_original_checkpoint(checkpoint: os.PathLike, out_dir: os.PathLike, overwrite: bool = False) -> Path:
    """Convert an original-format checkpoint file into a Hugging Face folder (config.json,
    model.safetensors, generation_config.json) loadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``."""
    prepare_output_dir(out_dir, overwrite)
    config, state_dict = original_to_hf(load_original_state_dict(checkpoint))
    model = GoomSSMForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()

    def add_tokenizer_and_card(folder: Path) -> None:
        if config.vocab_size == GPT2_VOCAB_SIZE:
            save_gpt2_tokenizer(folder)
        write_model_card(folder, model, model_name=Path(out_dir).name, training=(
            f"Converted from the original-format checkpoint `{Path(checkpoint).name}` "
            f"(sha256 `{digest}`) by `goom-ssm convert-original`; the training recipe is that of its source."))

    return save_folder_atomically(model, out_dir, overwrite, extra_files=add_tokenizer_and_card)


def export_original_checkpoint(model_dir: os.PathLike, out_file: os.PathLike, overwrite: bool = False) -> Path:
    """Write the original-format checkpoint of a Hugging Face folder to ``out_file``."""
    out_file = Path(out_file)
    if out_file.is_dir():
        raise IsADirectoryError(f"{out_file} is a folder; give the checkpoint's file name")
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"{out_file} exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    model = GoomSSMForCausalLM.from_pretrained(model_dir)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")
    try:
        torch.save(hf_to_original(model), partial)
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file
