"""The ``goom-ssm`` command line: one subcommand per common job.

    goom-ssm demo                                 generate text and measure perplexity with the shipped model
    goom-ssm convert-original CKPT.pt OUT_DIR     original checkpoint -> Hugging Face folder
    goom-ssm export-original MODEL_DIR OUT.pt     Hugging Face folder -> original checkpoint
    goom-ssm push MODEL_DIR REPO_ID               upload a folder (with its remote code) to the Hub
    goom-ssm train --data FILES --output-dir DIR  pretrain (also: accelerate launch -m goom_ssm.train)
    goom-ssm perplexity MODEL_DIR FILES           exact perplexity of text files (recurrent cache)
    goom-ssm lm-eval LM_EVAL_ARGS                 lm-evaluation-harness with goom_ssm registered
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_MODEL_DIR = Path(__file__).parent / "pretrained" / "goom-ssm-shakespeare-14m"
DEFAULT_PROMPT = "KING HENRY.\nMy lords,"


def _demo(args: argparse.Namespace) -> None:
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from .conversion.tokenizer import gpt2_hf_tokenizer
    from .corpus import HELD_OUT_TEXT
    from .evaluation import perplexity

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = gpt2_hf_tokenizer()
    torch.manual_seed(args.seed)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=args.max_new_tokens)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters)\n")
    print(tokenizer.decode(out[0], skip_special_tokens=True) + "\n")
    result = perplexity(model, tokenizer, HELD_OUT_TEXT)
    print(f"perplexity on {HELD_OUT_TEXT.name} (held out from training): {result.perplexity:.1f} "
          f"over {result.num_tokens:,} tokens ({time.perf_counter() - start:.1f} s in all)")


def _convert_original(args: argparse.Namespace) -> None:
    from .conversion.original import convert_original_checkpoint

    out = convert_original_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out} (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}))")


def _export_original(args: argparse.Namespace) -> None:
    from .conversion.original import export_original_checkpoint

    out = export_original_checkpoint(args.model_dir, args.out_file, overwrite=args.overwrite)
    print(f"wrote {out}")


def _push(args: argparse.Namespace) -> None:
    from .hub import push_folder

    url = push_folder(args.model_dir, args.repo_id, private=args.private, token=args.token)
    print(f"uploaded {args.model_dir} to {args.repo_id}: {url}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="goom-ssm", description="GOOM-SSM language models for Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="generate text and measure held-out perplexity with the shipped model")
    demo.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model folder (default: the shipped model)")
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    demo.add_argument("--max-new-tokens", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0, help="sampling seed")
    demo.set_defaults(run=_demo)

    convert = commands.add_parser("convert-original", help="convert an original-format checkpoint to a Hugging Face folder")
    convert.add_argument("checkpoint", help="file written by torch.save(GenerativeRNN.state_dict())")
    convert.add_argument("out_dir", help="folder to write (must be empty or absent unless --overwrite)")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    convert.set_defaults(run=_convert_original)

    export = commands.add_parser("export-original", help="write a Hugging Face folder as an original-format checkpoint")
    export.add_argument("model_dir", help="folder written by save_pretrained or convert-original")
    export.add_argument("out_file", help="checkpoint file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing out_file")
    export.set_defaults(run=_export_original)

    push = commands.add_parser("push", help="upload a model folder to the Hugging Face Hub, with self-contained remote code")
    push.add_argument("model_dir", help="folder with config.json, model.safetensors, generation_config.json (tokenizer, README)")
    push.add_argument("repo_id", help="Hub repository, e.g. user/goom-ssm-small")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one, or HF_TOKEN)")
    push.set_defaults(run=_push)

    from .train import add_train_arguments, run_train

    add_train_arguments(commands.add_parser("train", help="pretrain a model (the original's recipe by default)"))
    commands.choices["train"].set_defaults(run=run_train)
    for name, help_text in _DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


# Subcommands whose arguments are parsed by the module that runs them.
_DELEGATED = {
    "perplexity": "exact perplexity of text files under a model (recurrent cache); see --help",
    "lm-eval": "run lm-evaluation-harness with goom_ssm registered (lm-eval's own arguments follow)",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; errors a user can fix are printed without a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        from . import evaluation

        return evaluation.main(argv)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as error:
        print(f"goom-ssm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
