"""Pieces shared by the example scripts: the command line's common options (with defaults per
device), the original's training recipe, and the report (a Markdown table and a JSON file).

The scripts import this module by name: ``python examples/<script>.py`` puts ``examples/`` on
``sys.path``, and the tests put it there themselves.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch

from goom_ssm import GoomSSM, GoomSSMConfig
from goom_ssm.cli import build_parser
from goom_ssm.train import build_optimizer_and_schedule


def add_run_arguments(parser: argparse.ArgumentParser, presets: dict) -> None:
    """The options every script takes: the run's, and the GOOM-SSM's sizes. ``presets["cuda"]``
    and ``presets["cpu"]`` give the defaults of the options named in them (each preset names the
    same ones: these and the script's own), chosen by the device (see :func:`parse`)."""

    def default(name: str) -> str:
        return f"(default: {presets['cuda'][name]} on a GPU, {presets['cpu'][name]} on CPU)"

    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast for the float parts (GOOM states stay float32)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per model, 0: evaluate untrained models {default('steps')}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"sequences per step {default('batch_size')}")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak learning rate of the one-cycle schedule {default('lr')}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data order and sampling")
    parser.add_argument("--out", default="results.json", help="JSON file for the raw numbers (default: results.json)")
    model = parser.add_argument_group("GOOM-SSM size")
    model.add_argument("--hidden-size", type=int, default=None, help=f"width {default('hidden_size')}")
    model.add_argument("--num-layers", type=int, default=None, help=f"residual layers {default('num_layers')}")
    model.add_argument("--state-heads", type=int, default=None, help=f"state rows per token {default('state_heads')}")
    model.add_argument("--state-size", type=int, default=None, help=f"features per state row {default('state_size')}")


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], presets: dict) -> argparse.Namespace:
    """Parse ``argv`` and fill the options left unset from the device's preset. Checks every
    preset option (counts positive, ``--steps`` 0 or at least 4, ``--lr`` positive) and the
    device; a bad value exits through ``parser.error`` with a message naming it."""
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    for name, value in presets["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        value = getattr(args, name)
        option = "--" + name.replace("_", "-")
        if name == "steps":
            if value < 0 or 0 < value < 4:
                parser.error(f"--steps must be 0 (evaluate untrained models) or at least 4 (the one-cycle schedule), "
                             f"got {value}")
        elif name == "lr":
            if not value > 0:
                parser.error(f"--lr must be positive, got {value}")
        elif min(value if isinstance(value, list) else [value]) < 1:
            parser.error(f"{option} must be positive, got {value}")
    return args


def goom_ssm_config(args: argparse.Namespace, vocab_size: int, **fields) -> GoomSSMConfig:
    """A GOOM-SSM config of the sizes in ``args`` over ``vocab_size`` tokens (and other ``fields``)."""
    return GoomSSMConfig(vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                         num_state_heads=args.state_heads, state_size=args.state_size, **fields)


def recipe(lr: float) -> argparse.Namespace:
    """``goom-ssm train``'s optimisation settings (the original's recipe: AdamW, weight decay 0.1
    except on LayerNorm, one-cycle LR with a 10-step warm-up down to 1e-5, beta1 cycled 0.99 ->
    0.85 -> 0.99, clipping at 1.0), with the peak learning rate ``lr``."""
    settings = build_parser().parse_args(["train", "--data", "unused", "--output-dir", "unused"])
    settings.lr = lr
    return settings


def parameter_groups(model: torch.nn.Module, weight_decay: float, transition_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on every matrix (embeddings, weights, and all of a GOOM-SSM's parameters), none
    on biases and LayerNorm parameters: for a GOOM-SSM, the groups of its ``get_param_groups``
    (the original's), and for GPT-2 the same rule. The GOOM-SSM transition matrices ``A`` go in a
    group of their own, whose learning rate :func:`train` scales by ``transition_lr_scale``."""
    transitions = {id(module.A) for module in model.modules() if isinstance(module, GoomSSM)}
    params = list(model.parameters())  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.ndim >= 2 and id(p) not in transitions], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in transitions], "weight_decay": weight_decay,
         "lr_scale": transition_lr_scale},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def train(model: torch.nn.Module, batch_loss: Callable[[], torch.Tensor], steps: int, lr: float, bf16: bool,
          label: str, transition_lr_scale: float = 1.0) -> dict:
    """Train ``model`` for ``steps`` optimizer steps with :func:`recipe`; ``batch_loss()`` draws a
    batch and returns its mean loss (run under bf16 autocast if ``bf16``). The GOOM-SSM transition
    matrices follow the schedule scaled by ``transition_lr_scale`` (see :func:`parameter_groups`).
    Prints the loss ten times along the way, prefixed by ``label``.

    Returns ``{"losses": [per step], "seconds": wall time}``.
    """
    settings = recipe(lr)
    device_type = next(model.parameters()).device.type
    model.train()
    losses = []
    start = time.perf_counter()
    if steps:
        groups = SimpleNamespace(
            get_param_groups=lambda weight_decay: parameter_groups(model, weight_decay, transition_lr_scale))
        optimizer, scheduler = build_optimizer_and_schedule(groups, settings, steps)
        for group in optimizer.param_groups:  # OneCycleLR keeps a group's schedule in it: scale all of it
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                group[key] *= group.get("lr_scale", 1.0)
        for step in range(1, steps + 1):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss = batch_loss()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if step % max(1, steps // 10) == 0 or step == steps:
                print(f"{label}: step {step}/{steps}, loss {loss.item():.4f}", flush=True)
        losses = torch.stack(losses).tolist()
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start}


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of ``model``, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table of ``rows`` (each as many cells as ``header``) under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(path, results: dict) -> None:
    """Write ``results`` as indented JSON to ``path`` (folders created as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
