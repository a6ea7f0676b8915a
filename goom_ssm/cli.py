"""The ``goom-ssm`` command line: one subcommand per common job.

    goom-ssm convert-original CKPT.pt OUT_DIR     original checkpoint -> Hugging Face folder
    goom-ssm export-original MODEL_DIR OUT.pt     Hugging Face folder -> original checkpoint
    goom-ssm push MODEL_DIR REPO_ID               upload a folder (with its remote code) to the Hub
    goom-ssm train --data FILES --output-dir DIR  pretrain (also: accelerate launch -m goom_ssm.train)
"""

import argparse
import sys
from typing import Optional, Sequence


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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; errors a user can fix are printed without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as error:
        print(f"goom-ssm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
