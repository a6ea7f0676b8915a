"""Pretraining of GOOM-SSM language models with ``accelerate``.

    accelerate launch -m goom_ssm.train --data corpus.txt --output-dir runs/small \\
        --hidden-size 512 --num-hidden-layers 8 --num-state-heads 16 --state-size 32 --max-steps 2000
    python -m goom_ssm.train ...            (one process, no launcher)

Defaults follow the original recipe (SPEC.md): AdamW over ``model.get_param_groups(0.1)``;
``OneCycleLR`` from ``--initial-lr`` up to ``--lr`` 3e-4 in ``--warmup-steps`` 10
optimizer steps and down to ``--final-lr`` 1e-5, cycling beta1 between 0.99 and 0.85;
global batches of ``--batch-size`` 960 sequences of ``--block-size`` 1024 tokens, made
of micro-batches that accumulate gradients; gradient clipping at 1.0; fp16 autocast on
GPUs (the model keeps its GOOM states in float32 itself). The original ran
``--max-steps 10240`` (about 10B tokens) with the default 124M-parameter model.

Checkpoints (``--save-every``) are ``accelerator.save_state`` folders
``OUTPUT_DIR/checkpoint-{step}``, written under a temporary name and renamed when complete.
``--resume`` continues from the latest one exactly: weights, optimizer, LR/momentum
schedule, RNG states, and the data position (the data order is a deterministic function
of ``--seed`` and the epoch; consumed batches are skipped). The final model is written
with ``save_pretrained`` to ``OUTPUT_DIR/final`` (plus the tokenizer files where the
tokenizer has them); step losses go to ``OUTPUT_DIR/train_log.jsonl`` and to the
trackers of ``--report-to`` (TensorBoard by default, under ``OUTPUT_DIR/goom-ssm``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .folders import move_into_place

CHECKPOINT_PREFIX = "checkpoint-"
FINAL_DIR = "final"
LOG_FILE = "train_log.jsonl"
# Settings that must not change when a run is resumed (they define the data order and schedule).
RESUME_INVARIANTS = ("seed", "block_size", "micro_batch_size", "num_processes", "gradient_accumulation_steps",
                     "max_steps", "streaming")


# --------------------------------------------------------------------------- arguments


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to ``parser`` (for ``goom-ssm train`` and ``python -m goom_ssm.train``)."""
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
    opt.add_argument("--warmup-steps", type=int, default=10, help="optimizer steps up to the peak (10)")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--max-momentum", type=float, default=0.99, help="beta1 at the start and the end (0.99)")
    opt.add_argument("--base-momentum", type=float, default=0.85, help="beta1 at the peak learning rate (0.85)")
    opt.add_argument("--beta2", type=float, default=0.999)
    opt.add_argument("--adam-eps", type=float, default=1e-8)
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    opt.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                     help="'auto': the launcher's setting if any, else fp16 on CUDA and none on CPU")
    opt.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")

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
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="goom_ssm.train", description="Pretrain a GOOM-SSM language model.")
    return add_train_arguments(parser)


# --------------------------------------------------------------------------- pieces


class TrainState:
    """Progress saved in every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    def __init__(self, settings: dict):
        self.step = 0  # optimizer steps done
        self.epoch = 0  # passes over the data started
        self.batches_in_epoch = 0  # micro-batches of this epoch consumed by each process
        self.tokens = 0  # tokens trained on, all processes
        self.settings = settings

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        changed = {k: (state["settings"].get(k), v) for k, v in self.settings.items()
                   if k in RESUME_INVARIANTS and state["settings"].get(k) != v}
        if changed:
            details = ", ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"cannot resume: settings differ from the checkpoint's ({details})")
        self.__dict__.update(state)


class EpochSampler(torch.utils.data.Sampler):
    """Indices ``0..n-1`` in a random order that depends only on ``(seed, epoch)``
    (or in order, ``shuffle=False``); every process draws the same order."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def checkpoint_step(path: Path) -> Optional[int]:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    found = [(checkpoint_step(p), p) for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")]
    return [p for step, p in sorted(f for f in found if f[0] is not None)]


def _given_config(args) -> dict:
    """The fields of ``--config`` (a config.json path or JSON text), or ``{}``."""
    if args.config is None:
        return {}
    text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
    try:
        given = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config is neither a file nor valid JSON: {error}") from None
    for key in ("model_type", "transformers_version", "architectures"):
        given.pop(key, None)
    return given


def build_model(args, tokenizer):
    """A new model (``--config`` and the size options; by default the vocabulary is the
    tokenizer's and the EOS id its EOS) or the model of ``--model-dir``."""
    from transformers import AutoModelForCausalLM

    sizes = {k: getattr(args, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_state_heads",
                                            "state_size", "scan_chunk_size") if getattr(args, k) is not None}
    if args.model_dir is not None:
        if args.config is not None or sizes:
            raise ValueError("--model-dir cannot be combined with --config or size options")
        model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    else:
        from .modeling import GoomSSMConfig, GoomSSMForCausalLM

        config = {**_given_config(args), **sizes}
        if "vocab_size" not in config and tokenizer.vocab_size:
            config["vocab_size"] = tokenizer.vocab_size
        if tokenizer.eos_token_id < config.get("vocab_size", 50257):
            config.setdefault("eos_token_id", tokenizer.eos_token_id)
            config.setdefault("bos_token_id", tokenizer.eos_token_id)
        model = GoomSSMForCausalLM(GoomSSMConfig(**config))
    vocab = model.config.vocab_size
    if tokenizer.vocab_size and tokenizer.vocab_size > vocab or tokenizer.eos_token_id >= vocab:
        raise ValueError(f"the model's vocabulary ({vocab}) is smaller than the tokenizer's "
                         f"({tokenizer.vocab_size}, eos {tokenizer.eos_token_id})")
    return model


def one_cycle_start(args, total_steps: int) -> tuple[float, int]:
    """The one-cycle schedule's learning rate at step 1 (``--initial-lr``, by default
    ``--final-lr``) and its warm-up: the step of the peak, ``--warmup-steps`` but at most
    half of ``total_steps``."""
    initial_lr = args.final_lr if args.initial_lr is None else args.initial_lr
    return initial_lr, min(args.warmup_steps, total_steps // 2)


def build_optimizer_and_schedule(model, args, total_steps: int):
    """AdamW over the model's two parameter groups and the one-cycle LR/beta1 schedule."""
    initial_lr, warmup = one_cycle_start(args, total_steps)
    if warmup < 2:
        raise ValueError(f"the one-cycle schedule needs at least 2 warm-up steps and as many after; "
                         f"got --warmup-steps {args.warmup_steps} and {total_steps} steps in all")
    optimizer = torch.optim.AdamW(model.get_param_groups(weight_decay=args.weight_decay), lr=args.lr,
                                  betas=(args.max_momentum, args.beta2), eps=args.adam_eps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=warmup / total_steps,
        div_factor=args.lr / initial_lr, final_div_factor=initial_lr / args.final_lr,
        cycle_momentum=True, base_momentum=args.base_momentum, max_momentum=args.max_momentum,
    )
    return optimizer, scheduler


def _without_tied_weights(models, weights, output_dir) -> None:
    """A ``save_state`` pre-hook: leaves out of each model's weights the parameters tied to
    another one (``lm_head.weight``, the embedding's), as ``save_pretrained`` does, since
    safetensors stores no tensor twice; ``load_state`` ties them again. (Otherwise accelerate
    drops them itself, with a "Removed shared tensor" notice at every save.) ``models`` are
    the models as given to ``prepare`` (not their DDP or compiled wrappers), ``weights``
    their state dicts."""
    for model, state in zip(models, weights):
        for target, source in model.all_tied_weights_keys.items():
            if state[target].data_ptr() == state[source].data_ptr():
                del state[target]


def _atomic_save_state(accelerator, output_dir: Path, step: int, keep: Optional[int]) -> Path:
    """``save_state`` (tied weights stored once) into a temporary folder, then rename it to
    ``checkpoint-{step}``."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    handle = accelerator.register_save_state_pre_hook(_without_tied_weights)
    try:
        accelerator.save_state(str(tmp))
    finally:
        handle.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        move_into_place(tmp, final)  # an older run's checkpoint of this step is replaced only now
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _open_log(path: Path, step: int):
    """Open the step log for appending, without the records of steps after ``step`` (which a run
    that died after its last checkpoint wrote, and which the resumed run redoes)."""
    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in kept)
    return open(path, "a")


def _tracker_config(args) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
            if k != "run"}


@torch.no_grad()
def evaluate(model, loader, accelerator, max_batches: int) -> float:
    """Mean loss over up to ``max_batches`` micro-batches of each process, averaged over processes."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        total += model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.float()
        count += 1
    model.train()
    mean = accelerator.reduce(total / max(count, 1), reduction="mean")
    return float(mean)


# --------------------------------------------------------------------------- training


def train(args: argparse.Namespace) -> dict:
    """Run the training that ``args`` (from :func:`build_arg_parser`) describe.

    Returns ``{"steps", "losses" (per optimizer step of this call), "tokens_per_second",
    "final_dir", "eval_loss"}`` on every process.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed
    from tqdm.auto import tqdm

    from .data import build_datasets, resolve_tokenizer

    output_dir = Path(args.output_dir)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by accelerate launch / config
        mixed_precision = launcher or ("fp16" if torch.cuda.is_available() else "no")
    report_to = [] if args.report_to in ("none", "") else args.report_to.split(",")
    if "tensorboard" in report_to:
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            print("goom_ssm.train: tensorboard is not installed; not logging to it", file=sys.stderr)
            report_to.remove("tensorboard")

    # Gradient accumulation: global batch = micro batch x processes x accumulation steps.
    # accelerate only runs several processes on a host without GPUs when told to use the CPU.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    cpu = args.cpu or (multi_process and not torch.cuda.is_available())
    from accelerate import PartialState

    num_processes = PartialState(cpu=cpu).num_processes
    accumulation = args.gradient_accumulation_steps
    if accumulation is None:
        per_step = args.micro_batch_size * num_processes
        if args.batch_size % per_step:
            raise ValueError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size x processes "
                             f"= {args.micro_batch_size} x {num_processes}")
        accumulation = args.batch_size // per_step
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, log_with=report_to or None, project_dir=str(output_dir),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False, dynamo_backend="inductor" if args.compile else None,
    )
    main = accelerator.is_main_process
    set_seed(args.seed)

    # Refuse to mix a new run into an old one.
    checkpoints = list_checkpoints(output_dir) if output_dir.exists() else []
    if args.resume is None and (checkpoints or (output_dir / FINAL_DIR).exists()):
        raise FileExistsError(f"{output_dir} already holds a run; pass --resume to continue it or use another folder")

    # Data (tokenized once by the main process; the others then read the datasets cache).
    tokenizer = resolve_tokenizer(args.tokenizer)
    load_kwargs = dict(name=args.data_config, split=args.data_split, sample_by=args.sample_by, cache_dir=args.cache_dir)
    with accelerator.main_process_first():
        train_data, val_data = build_datasets(
            args.data if len(args.data) > 1 else args.data[0], tokenizer, args.block_size, streaming=args.streaming,
            validation_fraction=args.validation_split, validation_source=args.validation_data,
            text_column=args.text_column, num_proc=args.num_proc, seed=args.seed,
            shuffle_buffer=0 if args.no_shuffle else args.shuffle_buffer, **load_kwargs,
        )
    loader_kwargs = dict(batch_size=args.micro_batch_size, drop_last=True, num_workers=args.num_workers)
    if args.streaming:
        sampler = None
        train_loader = torch.utils.data.DataLoader(train_data, **loader_kwargs)
    else:
        if len(train_data) < args.micro_batch_size * num_processes:
            raise ValueError(f"only {len(train_data)} blocks of {args.block_size} tokens: fewer than one micro-batch "
                             f"per process; use less --block-size or --micro-batch-size, or more data")
        sampler = EpochSampler(len(train_data), args.seed, shuffle=not args.no_shuffle)
        train_loader = torch.utils.data.DataLoader(train_data, sampler=sampler, **loader_kwargs)
    val_loader = None
    if val_data is not None:
        val_loader = torch.utils.data.DataLoader(val_data, batch_size=args.micro_batch_size, drop_last=False,
                                                 num_workers=args.num_workers)

    max_steps = args.max_steps
    if max_steps is None:
        if args.streaming:
            raise ValueError("--max-steps is required with --streaming")
        max_steps = math.floor(len(train_loader) // num_processes * args.num_epochs / accumulation)
        if max_steps < 1:
            raise ValueError(f"{len(train_loader)} micro-batches make no optimizer step of {accumulation} "
                             f"micro-batches x {num_processes} processes; lower --batch-size")

    model = build_model(args, tokenizer)
    optimizer, scheduler = build_optimizer_and_schedule(model, args, max_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    settings = {"seed": args.seed, "block_size": args.block_size, "micro_batch_size": args.micro_batch_size,
                "num_processes": num_processes, "gradient_accumulation_steps": accumulation, "max_steps": max_steps,
                "streaming": args.streaming, "tokenizer": tokenizer.name}
    state = TrainState(settings)
    accelerator.register_for_checkpointing(state)

    if args.resume is not None:
        path = Path(args.resume) if args.resume != "latest" else (checkpoints[-1] if checkpoints else None)
        if path is not None:
            accelerator.load_state(str(path))
            if main:
                print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, "
                      f"batch {state.batches_in_epoch})", file=sys.stderr)
    if accelerator.step != state.step * accumulation:  # accumulate()'s counter must agree with ours
        accelerator.step = state.step * accumulation

    output_dir.mkdir(parents=True, exist_ok=True)
    if report_to:
        accelerator.init_trackers("goom-ssm", config=_tracker_config(args))
    log_file = _open_log(output_dir / LOG_FILE, state.step) if main else None

    tokens_per_micro = args.micro_batch_size * args.block_size * num_processes
    stop_at = min(max_steps, args.stop_at_step) if args.stop_at_step else max_steps
    progress = tqdm(total=max_steps, initial=state.step, disable=not main or args.no_progress, desc="training",
                    dynamic_ncols=True)
    losses, eval_loss = [], None
    step_loss = torch.zeros((), device=accelerator.device)
    start_time, start_tokens = time.perf_counter(), state.tokens
    last_saved = state.step
    model.train()

    def save():
        nonlocal last_saved
        _atomic_save_state(accelerator, output_dir, state.step, args.keep_checkpoints)
        last_saved = state.step

    done = state.step >= stop_at
    while not done:
        if sampler is not None:
            sampler.set_epoch(state.epoch)
        train_loader.set_epoch(state.epoch)  # accelerate passes the epoch on at each iteration
        loader = (accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
                  if state.batches_in_epoch else train_loader)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
                accelerator.backward(loss)
                step_loss += loss.detach().float()
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr, beta1 = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]
                    if state.step + 1 < max_steps:  # the schedule has max_steps values, the last one is in use
                        scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            state.tokens += tokens_per_micro
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            mean_loss = float(accelerator.reduce(step_loss, reduction="mean")) / accumulation
            step_loss.zero_()
            losses.append(mean_loss)
            elapsed = time.perf_counter() - start_time
            tokens_per_second = (state.tokens - start_tokens) / max(elapsed, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_second:,.0f}")
            record = {"step": state.step, "loss": mean_loss, "lr": lr, "beta1": beta1, "tokens": state.tokens,
                      "tokens_per_second": tokens_per_second}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if report_to and (state.step % args.log_every == 0 or state.step == stop_at):
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
            if val_loader is not None and args.eval_every and state.step % args.eval_every == 0:
                eval_loss = evaluate(model, val_loader, accelerator, args.eval_batches)
                if report_to:
                    accelerator.log({"eval/loss": eval_loss}, step=state.step)
            if args.save_every and state.step % args.save_every == 0:
                save()
            if state.step >= stop_at:
                done = True
                break
        else:  # the pass over the data is complete
            state.epoch += 1
            state.batches_in_epoch = 0
            if args.streaming and state.step == 0 and state.tokens == 0:
                raise ValueError("the data gave no block of --block-size tokens")

    elapsed = time.perf_counter() - start_time
    tokens_per_second = (state.tokens - start_tokens) / max(elapsed, 1e-9)
    progress.close()
    if state.step != last_saved and (stop_at < max_steps or args.save_every):
        save()

    final_dir = None
    if state.step >= max_steps:
        if val_loader is not None:
            eval_loss = evaluate(model, val_loader, accelerator, args.eval_batches)
            if report_to:
                accelerator.log({"eval/loss": eval_loss}, step=state.step)
        final_dir = output_dir / FINAL_DIR
        tmp = output_dir / f".tmp-{FINAL_DIR}"
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            write_training_card(tmp, unwrapped, args, state, accelerator.mixed_precision, tokens_per_second, eval_loss)
            move_into_place(tmp, final_dir)
        accelerator.wait_for_everyone()
    if main:
        message = f"{state.step} steps; {tokens_per_second:,.0f} tokens/s over this session"
        if eval_loss is not None:
            message += f"; held-out loss {eval_loss:.4f}"
        print(message + (f"; wrote {final_dir}" if final_dir else f"; stopped at step {state.step}"), file=sys.stderr)
    if log_file is not None:
        log_file.close()
    accelerator.end_training()
    return {"steps": state.step, "losses": losses, "tokens_per_second": tokens_per_second,
            "final_dir": str(final_dir) if final_dir else None, "eval_loss": eval_loss}


def write_training_card(folder: Path, model, args: argparse.Namespace, state: TrainState, mixed_precision: str,
                        tokens_per_second: float, eval_loss: Optional[float]) -> None:
    """README.md model card of a trained model, filled with this run's recipe and numbers:
    the schedule and batch as the run used them (``state.settings``; ``mixed_precision`` as
    the accelerator resolved it)."""
    from .model_card import write_model_card

    settings = state.settings
    total = settings["max_steps"]
    initial_lr, warmup = one_cycle_start(args, total)
    micro, accumulation = settings["micro_batch_size"], settings["gradient_accumulation_steps"]
    training = "\n".join([
        "| | |", "|---|---|",
        f"| data | {', '.join(str(d) for d in args.data)} |",
        f"| tokenizer | {args.tokenizer} |",
        f"| optimizer steps | {state.step} |",
        f"| tokens seen | {state.tokens:,} |",
        f"| global batch | {micro * accumulation * settings['num_processes']} sequences of {settings['block_size']} "
        f"tokens (micro-batches of {micro}, {accumulation} accumulated per step) |",
        f"| optimizer | AdamW, weight decay {args.weight_decay} (none on LayerNorm), beta2 {args.beta2} |",
        f"| schedule | one-cycle (cosine) over {total} steps: LR {initial_lr:g} at step 1, up to {args.lr:g} at step "
        f"{warmup}, down to {args.final_lr:g} at step {total}; beta1 {args.max_momentum:g} -> "
        f"{args.base_momentum:g} (step {warmup}) -> {args.max_momentum:g} |",
        f"| gradient clipping | {args.max_grad_norm} |",
        f"| mixed precision | {mixed_precision} (GOOM states in float32) |",
        f"| processes | {settings['num_processes']} |",
        f"| throughput | {tokens_per_second:,.0f} tokens/s |",
    ])
    if eval_loss is not None:
        evaluation = (f"Held-out data ({', '.join(str(d) for d in args.validation_data or ['validation split'])}): "
                      f"cross-entropy {eval_loss:.4f} nats/token, perplexity {math.exp(eval_loss):.1f}.")
    else:
        evaluation = "Not evaluated during training."
    write_model_card(folder, model, model_name=Path(args.output_dir).name, training=training, evaluation=evaluation)


def run_train(args: argparse.Namespace) -> None:
    """Entry point for ``goom-ssm train`` (``args`` from a parser given :func:`add_train_arguments`)."""
    train(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        train(args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"goom_ssm.train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
