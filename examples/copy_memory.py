"""Copy-memory task: remember K symbols across a delay of T blank steps, then recall them.

One of the original GOOM-SSM paper's tasks. Each sequence is K random symbols (from an
alphabet of ``--alphabet``), T blanks, a cue, and K - 1 more blanks: ``T + 2K`` tokens. At
the cue and the K - 1 steps after it the model must output the K symbols in order (no
symbol is fed back: each is recalled from the state alone). Accuracy is over the recalled
symbols; chance is 1 / alphabet.

For every delay, a small ``GoomSSMForCausalLM`` is trained from scratch for ``--steps``
steps with the original's recipe (AdamW, one-cycle LR; ``goom-ssm train``'s defaults but
the peak LR), on fresh random sequences each step, and scored on held-out ones. Two
settings differ from the package's defaults, as is usual for state-space models on long
delays: the transition matrices ``A`` start orthogonal (``--transition-init-gain`` 1; the
default 0.99 shrinks what the state holds of the symbols by 0.99^T, to e^-160 at T = 16000),
and learn at a fraction of the learning rate, ``min(1, 50 / T)`` unless
``--transition-lr-scale`` says (a change of ``A`` turns ``A^T`` about T times as much; at the
full rate, training at T = 500 stays at chance). A GPT-2
(``transformers.GPT2LMHeadModel``, as many layers, its width chosen for about the same
parameter count, not counting its position table) is trained the same way for the delays
whose sequences fit its context (``--gpt2-context`` positions).

    python examples/copy_memory.py                      # on a GPU: delays 1000 4000 16000
    python examples/copy_memory.py --device cpu         # smaller: delays 50 500

Prints a Markdown table and writes the raw numbers (settings, losses per step) to ``--out``.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from example_utils import (add_run_arguments, count_parameters, goom_ssm_config, markdown_table, parse, train,
                           write_results)
from goom_ssm import GoomSSMForCausalLM

BLANK = 0  # then the symbols 1..alphabet, then the cue
MODEL = {"hidden_size": 64, "num_layers": 2, "state_heads": 4, "state_size": 16}
PRESETS = {
    "cuda": {"delays": [1000, 4000, 16000], "steps": 1000, "batch_size": 16, "lr": 3e-3, "eval_size": 1024, **MODEL},
    "cpu": {"delays": [50, 500], "steps": 200, "batch_size": 16, "lr": 3e-3, "eval_size": 256, **MODEL},
}
GPT2_HEADS = 4


def copy_batch(batch_size: int, delay: int, num_symbols: int, alphabet: int, generator: torch.Generator):
    """Token ids ``[batch, delay + 2 * num_symbols]`` and the symbols to recall ``[batch, num_symbols]``
    (values 1..alphabet; blank 0, cue alphabet + 1), drawn with ``generator`` on its device."""
    device = generator.device
    symbols = torch.randint(1, alphabet + 1, (batch_size, num_symbols), generator=generator, device=device)
    ids = torch.full((batch_size, delay + 2 * num_symbols), BLANK, dtype=torch.long, device=device)
    ids[:, :num_symbols] = symbols
    ids[:, num_symbols + delay] = alphabet + 1
    return ids, symbols


def recall_logits(model: torch.nn.Module, ids: torch.Tensor, num_symbols: int) -> torch.Tensor:
    """The logits ``[batch, num_symbols, vocab]`` at the cue and the steps after it."""
    return model(input_ids=ids, logits_to_keep=num_symbols, use_cache=False).logits.float()


@torch.no_grad()
def recall_accuracy(model, ids: torch.Tensor, symbols: torch.Tensor, batch_size: int, bf16: bool) -> float:
    """Fraction of the symbols ``[n, K]`` that ``model`` recalls (argmax) from ``ids [n, T + 2K]``."""
    correct = 0
    for start in range(0, len(ids), batch_size):
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = recall_logits(model, ids[start:start + batch_size], symbols.shape[1])
        correct += (logits.argmax(-1) == symbols[start:start + batch_size]).sum().item()
    return correct / symbols.numel()


def gpt2_config(vocab_size: int, num_layers: int, context: int, target_parameters: int) -> GPT2Config:
    """A GPT-2 of ``num_layers`` layers (4 heads, no dropout, SDPA attention) whose width gives
    the parameter count closest to ``target_parameters``, not counting the position table:
    ``num_layers * (12 d^2 + 13 d) + (vocab_size + 2) d`` for width ``d`` (tied head)."""

    def size(width: int) -> int:
        return num_layers * (12 * width * width + 13 * width) + (vocab_size + 2) * width

    width = min(range(GPT2_HEADS, 4096, GPT2_HEADS), key=lambda w: abs(size(w) - target_parameters))
    return GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=num_layers, n_head=GPT2_HEADS,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                      attn_implementation="sdpa")


def run_one(name: str, model: torch.nn.Module, delay: int, args: argparse.Namespace, held_out) -> dict:
    """Train ``model`` on the copy task at ``delay`` and score it on ``held_out`` (ids, symbols)."""
    generator = torch.Generator(args.device).manual_seed(args.seed)

    def batch_loss() -> torch.Tensor:
        ids, symbols = copy_batch(args.batch_size, delay, args.num_symbols, args.alphabet, generator)
        logits = recall_logits(model, ids, args.num_symbols)
        return F.cross_entropy(logits.flatten(0, 1), symbols.flatten())

    lr_scale = min(1.0, 50 / delay) if args.transition_lr_scale is None else args.transition_lr_scale
    trained = train(model, batch_loss, args.steps, args.lr, args.bf16, f"{name}, delay {delay}", lr_scale)
    accuracy = recall_accuracy(model, *held_out, args.batch_size, args.bf16)
    print(f"{name}, delay {delay}: accuracy {accuracy:.3f}", flush=True)
    positions = model.transformer.wpe.weight.numel() if isinstance(model, GPT2LMHeadModel) else 0
    last = trained["losses"][-10:]
    return {"model": name, "delay": delay, "parameters": count_parameters(model) - positions,
            "position_parameters": positions, "accuracy": accuracy,
            "transition_lr_scale": lr_scale if isinstance(model, GoomSSMForCausalLM) else None,
            "final_loss": sum(last) / len(last) if last else None,
            "train_seconds": trained["seconds"], "losses": trained["losses"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", type=int, nargs="+", default=None,
                        help=f"blank steps between the symbols and the cue (default: {PRESETS['cuda']['delays']} "
                             f"on a GPU, {PRESETS['cpu']['delays']} on CPU)")
    parser.add_argument("--num-symbols", type=int, default=10, help="symbols to remember, K (default: 10)")
    parser.add_argument("--alphabet", type=int, default=8, help="distinct symbols (default: 8; chance 1/8)")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out sequences per delay "
                        f"(default: {PRESETS['cuda']['eval_size']} on a GPU, {PRESETS['cpu']['eval_size']} on CPU)")
    parser.add_argument("--transition-init-gain", type=float, default=1.0,
                        help="gain of the GOOM-SSM's orthogonal initial A (default: 1.0; the package's: 0.99)")
    parser.add_argument("--transition-lr-scale", type=float, default=None,
                        help="the GOOM-SSM's A learns at this times the learning rate (default: min(1, 50 / delay))")
    parser.add_argument("--gpt2-context", type=int, default=1024,
                        help="GPT-2's positions (n_positions, default: 1024); 0: no GPT-2")
    add_run_arguments(parser, PRESETS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the sweep from the command line ``argv``; returns the results written to ``--out``."""
    parser = build_parser()
    args = parse(parser, argv, PRESETS)
    if args.num_symbols < 1:
        parser.error(f"--num-symbols must be positive, got {args.num_symbols}")
    if args.alphabet < 2:
        parser.error(f"--alphabet must be at least 2, got {args.alphabet}")
    for name in ("transition_init_gain", "transition_lr_scale"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.gpt2_context < 0:
        parser.error(f"--gpt2-context must be 0 (no GPT-2) or positive, got {args.gpt2_context}")

    runs = []
    for delay in args.delays:
        held_out = copy_batch(args.eval_size, delay, args.num_symbols, args.alphabet,
                              torch.Generator(args.device).manual_seed(args.seed + 1))
        torch.manual_seed(args.seed)
        config = goom_ssm_config(args, args.alphabet + 2, transition_init_gain=args.transition_init_gain)
        goom = GoomSSMForCausalLM(config).to(args.device)
        runs.append(run_one("GOOM-SSM", goom, delay, args, held_out))
        if delay + 2 * args.num_symbols <= args.gpt2_context:
            torch.manual_seed(args.seed)
            config = gpt2_config(args.alphabet + 2, args.num_layers, args.gpt2_context, count_parameters(goom))
            runs.append(run_one("GPT-2", GPT2LMHeadModel(config).to(args.device), delay, args, held_out))

    chance = 1 / args.alphabet
    rows = []
    for r in runs:
        parameters = f"{r['parameters']:,}"
        if r["position_parameters"]:
            parameters += f" + {r['position_parameters']:,} positions"
        final_loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        rows.append([r["model"], r["delay"], parameters, f"{r['accuracy']:.3f}", final_loss,
                     f"{r['train_seconds']:.0f}"])
    table = markdown_table(["model", "delay", "parameters", "recall accuracy", "train loss (last 10 steps)",
                            "train seconds"], rows)
    note = (f"K = {args.num_symbols} symbols, alphabet {args.alphabet} (chance {chance:.3f}, loss at chance "
            f"{math.log(args.alphabet):.3f}), {args.steps} steps of {args.batch_size} sequences, {args.eval_size} "
            f"held-out sequences per delay, device {args.device}{', bf16' if args.bf16 else ''}.")
    print(f"\n{table}\n\n{note}")
    results = {"task": "copy_memory", "settings": vars(args), "chance": chance, "runs": runs, "table": table,
               "note": note}
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
