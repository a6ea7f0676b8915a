"""The ``goom-ssm`` command line: one parser, one subcommand per job, one error handler.

    goom-ssm demo                                 generate text and measure perplexity with the shipped model
    goom-ssm convert-original CKPT.pt OUT_DIR     original checkpoint -> Hugging Face folder
    goom-ssm export-original MODEL_DIR OUT.pt     Hugging Face folder -> original checkpoint
    goom-ssm push MODEL_DIR REPO_ID               upload a folder (with its remote code) to the Hub
    goom-ssm train --data FILES --output-dir DIR  pretrain (several GPUs: accelerate launch -m goom_ssm train ...)
    goom-ssm perplexity MODEL FILES               exact perplexity of text files (recurrent cache)
    goom-ssm lm-eval LM_EVAL_ARGS                 lm-evaluation-harness with goom_ssm registered

Errors a user can fix (a missing file or folder, bad values, a missing optional package)
are printed as one line naming the problem, and the command exits with status 2. Only
argparse is imported to parse the command line; each command imports what it needs.
"""

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import SHIPPED_MODEL_DIR

DEFAULT_MODEL_DIR = SHIPPED_MODEL_DIR
DEFAULT_PROMPT = "KING HENRY.\nMy lords,"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


# --------------------------------------------------------------------------- loading


def _model_source(name: str) -> str:
    """``name`` as ``from_pretrained`` should get it: an existing model folder, or a Hub repo id.
    Anything else (a missing path, a file, a folder without config.json) is an error naming it."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name} is not a model folder (it has no config.json)")
        return str(path)
    if path.exists():
        raise ValueError(f"{name} is a file; give a model folder (config.json, model.safetensors)")
    if re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", name) is None:
        raise FileNotFoundError(f"no model folder at {name}")
    return name


def _from_hub_or_folder(load, name: str, what: str):
    """``load(source)`` for a model folder or Hub repo id; a Hub failure becomes one line."""
    source = _model_source(name)
    try:
        return load(source)
    except OSError as error:
        if Path(source).is_dir():
            raise
        first_line = str(error).strip().splitlines()[0]
        raise FileNotFoundError(f"no {what} folder at {name}, and it could not be loaded from the Hugging Face Hub "
                                f"as a repository id: {first_line}") from None


def load_model(name: str, dtype: str = "float32", device: Optional[str] = None):
    """A causal LM from a folder or Hub repo id, in ``dtype``, on ``device``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    import goom_ssm  # noqa: F401  (registers the model with the Auto classes)

    model = _from_hub_or_folder(lambda s: AutoModelForCausalLM.from_pretrained(s, dtype=getattr(torch, dtype)),
                                name, "model")
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def load_tokenizer(name: str):
    """``"gpt2"``: the GPT-2 tokenizer shipped with the package; else a folder with tokenizer files
    (checked, so that a folder without them is named as such) or a Hub repo id."""
    if name == "gpt2":
        from .conversion.tokenizer import gpt2_hf_tokenizer

        return gpt2_hf_tokenizer()
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                f"give --tokenizer FOLDER, or --tokenizer gpt2 for the GPT-2 tokenizer")
    return _from_hub_or_folder(AutoTokenizer.from_pretrained, name, "tokenizer")


def _text_files(names: Sequence[str]) -> list[Path]:
    paths = [Path(n) for n in names]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    return paths


# --------------------------------------------------------------------------- commands


def _demo(args: argparse.Namespace) -> None:
    import time

    import torch

    from .corpus import HELD_OUT_TEXT
    from .evaluation import perplexity

    start = time.perf_counter()
    _model_source(args.model)  # a bad --model is named before the tokenizer is looked for
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device="cpu")
    torch.manual_seed(args.seed)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=args.max_new_tokens)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters)\n")
    print(tokenizer.decode(out[0], skip_special_tokens=True) + "\n", flush=True)
    result = perplexity(model, tokenizer, HELD_OUT_TEXT, progress=None)
    print(f"perplexity on {HELD_OUT_TEXT.name} (held out from training): {result.perplexity:.1f} "
          f"over {result.num_tokens:,} tokens ({time.perf_counter() - start:.1f} s in all)")


def _perplexity(args: argparse.Namespace) -> None:
    import json

    from .evaluation import perplexity

    files = _text_files(args.files)
    _model_source(args.model)  # a bad model argument is named before the tokenizer is looked for
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    result = perplexity(model, tokenizer, files, block_size=args.block_size, batch_size=args.batch_size,
                        add_start_token=not args.no_start_token, progress=None)
    print(json.dumps(result.as_dict(), indent=2))


def _convert_original(args: argparse.Namespace) -> None:
    from .conversion.original import convert_original_checkpoint

    out = convert_original_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out} (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}))")


def _export_original(args: argparse.Namespace) -> None:
    from .conversion.original import export_original_checkpoint

    out = export_original_checkpoint(_model_source(args.model_dir), args.out_file, overwrite=args.overwrite)
    print(f"wrote {out}")


def _export_checkpoint(args: argparse.Namespace) -> None:
    from .train import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out} (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}))")


def _push(args: argparse.Namespace) -> None:
    from .hub import push_folder

    url = push_folder(args.model_dir, args.repo_id, private=args.private, token=args.token)
    print(f"uploaded {args.model_dir} to {args.repo_id}: {url}")


def _train(args: argparse.Namespace) -> None:
    from .train import train

    train(args)


def _lm_eval(args: argparse.Namespace) -> None:
    from .lm_eval_adapter import run_lm_eval

    run_lm_eval(args.lm_eval_args)


# --------------------------------------------------------------------------- parser


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``goom-ssm train`` (read by :func:`goom_ssm.train.train`)."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", required=True, metavar="SOURCE",
                      help="local text/json/jsonl/csv/parquet file(s) or folder(s), or a datasets name")
    data.add_argument("--data-config", default=None, help="configuration name of a datasets dataset")
    data.add_argument("--data-split", default="train", help="split of a datasets dataset (default: train)")
    data.add_argument("--text-column", default="text", help="column holding the documents (default: text)")
    data.add_argument("--sample-by", default="paragraph", choices=["line", "paragraph", "document"],
                      help="what is one document in plain text files (default: paragraph)")
    data.add_argument("--tokenizer", default="gpt2",
                      help="'gpt2' (default), 'bytes' (UTF-8 bytes, vocabulary 257) or a Hugging Face tokenizer")
    data.add_argument("--block-size", type=int, default=1024, help="tokens per training sequence (default: 1024)")
    data.add_argument("--streaming", action="store_true", help="read and tokenize the data lazily (large corpora)")
    data.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                      help="pack documents apart: each block's position_ids restart at every document, where each "
                           "layer's state restarts (default: where the median document is shorter than a block)")
    data.add_argument("--shuffle-buffer", type=int, default=10_000,
                      help="documents in the shuffle buffer with --streaming (0: keep the order)")
    data.add_argument("--no-shuffle", action="store_true", help="train on the blocks in corpus order")
    data.add_argument("--validation-split", type=float, default=0.0,
                      help="hold out this fraction of the documents (the last ones) for evaluation")
    data.add_argument("--validation-data", nargs="+", default=None, metavar="SOURCE", help="separate held-out data")
    data.add_argument("--num-proc", type=int, default=min(8, os.cpu_count() or 1),
                      help="tokenizing processes (default: min(8, CPUs))")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    data.add_argument("--cache-dir", default=None, help="datasets cache folder")

    model = parser.add_argument_group("model (default: the published 124M configuration)")
    model.add_argument("--model-dir", default=None, help="start from the weights of this save_pretrained folder")
    model.add_argument("--config", default=None, help="config.json path or JSON text of a GoomSSMConfig")
    for name in ("vocab-size", "hidden-size", "num-hidden-layers", "num-state-heads", "state-size", "scan-chunk-size"):
        model.add_argument(f"--{name}", type=int, default=None)

    opt = parser.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=int, default=960, help="sequences per optimizer step, all processes (960)")
    opt.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass and process (8)")
    opt.add_argument("--gradient-accumulation-steps", type=int, default=None,
                     help="micro-batches per optimizer step (default: from --batch-size)")
    opt.add_argument("--max-steps", type=int, default=None,
                     help="optimizer steps (default: --num-epochs passes over the data; required with --streaming)")
    opt.add_argument("--num-epochs", type=float, default=1.0, help="passes over the data if no --max-steps (1)")
    opt.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (3e-4)")
    opt.add_argument("--final-lr", type=float, default=1e-5, help="learning rate at the end (1e-5)")
    opt.add_argument("--initial-lr", type=float, default=None, help="learning rate at step 0 (default: --final-lr)")
    opt.add_argument("--warmup-steps", type=int, default=10,
                     help="optimizer steps up to the peak (10; at most half the run)")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--max-momentum", type=float, default=0.99, help="beta1 at the start and the end (0.99)")
    opt.add_argument("--base-momentum", type=float, default=0.85, help="beta1 at the peak learning rate (0.85)")
    opt.add_argument("--beta2", type=float, default=0.999)
    opt.add_argument("--adam-eps", type=float, default=1e-8)
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    opt.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                     help="'auto': the launcher's setting if any, else fp16 on CUDA and none on CPU")
    opt.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    opt.add_argument("--cuda-graph", action="store_true",
                     help="capture the training step (a micro-batch's forward and backward; clipping and AdamW) as CUDA "
                          "graphs and replay them: one process, bf16 or no mixed precision, a constant beta1 "
                          "(--base-momentum = --max-momentum) (goom_ssm.graphed_step)")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", required=True, help="checkpoints, logs and the final model")
    run.add_argument("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps (0: never)")
    run.add_argument("--keep-checkpoints", type=int, default=None, help="keep only the newest N checkpoints")
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                     help="continue from the latest checkpoint in --output-dir (or this one); starts fresh if none")
    run.add_argument("--stop-at-step", type=int, default=None,
                     help="save a checkpoint and stop at this step (a time-limited job; --resume later)")
    run.add_argument("--log-every", type=int, default=10, help="log to the trackers every N steps")
    run.add_argument("--eval-every", type=int, default=0, help="evaluate on the held-out data every N steps (0: end)")
    run.add_argument("--eval-batches", type=int, default=50, help="micro-batches per evaluation")
    run.add_argument("--report-to", default="tensorboard", help="accelerate trackers, comma-separated, or 'none'")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is available")
    run.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                     help="split each sequence over N processes (consecutive ranks; they gather their micro-batches "
                          "and each takes 1/N of every sequence; --block-size a multiple of N)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in an --output-dir that holds a run: delete that run's checkpoints, final "
                          "model, step log and TensorBoard logs (other files are kept)")


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
    convert.add_argument("--overwrite", action="store_true",
                         help="replace a non-empty out_dir: the whole folder, deleting every file in it")
    convert.set_defaults(run=_convert_original)

    export = commands.add_parser("export-original", help="write a Hugging Face folder as an original-format checkpoint")
    export.add_argument("model_dir", help="folder written by save_pretrained or convert-original")
    export.add_argument("out_file", help="checkpoint file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing out_file")
    export.set_defaults(run=_export_original)

    export_ckpt = commands.add_parser("export-checkpoint",
                                      help="write a training checkpoint (data parallel or FSDP-sharded) as a model folder")
    export_ckpt.add_argument("checkpoint", help="a checkpoint-N folder written by goom-ssm train")
    export_ckpt.add_argument("out_dir", help="folder to write (save_pretrained; must be empty or absent unless --overwrite)")
    export_ckpt.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    export_ckpt.set_defaults(run=_export_checkpoint)

    push = commands.add_parser("push", help="upload a model folder to the Hugging Face Hub, with self-contained remote code")
    push.add_argument("model_dir", help="folder with config.json, model.safetensors, generation_config.json (tokenizer, README)")
    push.add_argument("repo_id", help="Hub repository, e.g. user/goom-ssm-small")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one, or HF_TOKEN)")
    push.set_defaults(run=_push)

    train = commands.add_parser("train", help="pretrain a model (the original's recipe by default)",
                                description="Pretrain a GOOM-SSM language model (on several GPUs: "
                                            "accelerate launch -m goom_ssm train ...).")
    _add_train_arguments(train)
    train.set_defaults(run=_train)

    ppl = commands.add_parser("perplexity", help="exact perplexity of text files (recurrent cache)")
    ppl.add_argument("model", help="model folder or Hub repository id")
    ppl.add_argument("files", nargs="+", help="UTF-8 text files, one document each")
    ppl.add_argument("--tokenizer", help="tokenizer folder, Hub id, or 'gpt2' (default: the model's folder)")
    ppl.add_argument("--block-size", type=int, default=1024, help="tokens per forward pass (default 1024)")
    ppl.add_argument("--batch-size", type=int, default=1, help="documents run side by side (default 1)")
    ppl.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    ppl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="dtype of the float weights (GOOM states stay float32)")
    ppl.add_argument("--no-start-token", action="store_true",
                     help="do not put <|endoftext|> before each document (its first token is then not scored)")
    ppl.set_defaults(run=_perplexity)

    # Listed for --help; its arguments are lm-eval's own and reach lm-eval unparsed (see parse_args).
    commands.add_parser("lm-eval", help="lm-evaluation-harness with goom_ssm registered "
                                        "(lm-eval's own arguments follow; needs goom-ssm[eval])", add_help=False)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The parsed command line (``argv`` without the program name; default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        return argparse.Namespace(command="lm-eval", run=_lm_eval, lm_eval_args=argv[1:])
    return build_parser().parse_args(argv)


# Errors a user can fix: the message names the problem, so no traceback is shown.
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; errors a user can fix are printed as one line, with exit status 2."""
    args = parse_args(argv)
    try:
        args.run(args)
    except _USER_ERRORS as error:
        print(f"goom-ssm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
