"""Pretraining of GOOM-SSM language models with ``accelerate``.

    accelerate launch -m goom_ssm train --data corpus.txt --output-dir runs/small \\
        --hidden-size 512 --num-hidden-layers 8 --num-state-heads 16 --state-size 32 --max-steps 2000
    goom-ssm train ...            (one process, no launcher)

The options are defined in :mod:`goom_ssm.cli`. Defaults follow the original recipe:
AdamW over ``model.get_param_groups(0.1)``; ``OneCycleLR`` from ``--initial-lr`` up to
``--lr`` 3e-4 in ``--warmup-steps`` 10 optimizer steps (at most half the run) and down to
``--final-lr`` 1e-5, cycling beta1 between 0.99 and 0.85;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .constants import GPT2_VOCAB_SIZE
from .folders import move_into_place

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_TOKENIZER_DIR = "tokenizer"  # the tokenizer's files in a checkpoint
FINAL_DIR = "final"
LOG_FILE = "train_log.jsonl"
TRACKER_PROJECT = "goom-ssm"  # accelerate's trackers log under OUTPUT_DIR/goom-ssm
# Settings that must not change when a run is resumed (they define the data order and schedule).
RESUME_INVARIANTS = ("seed", "block_size", "micro_batch_size", "num_processes", "gradient_accumulation_steps",
                     "max_steps", "streaming", "documents_apart")


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
        if tokenizer.eos_token_id < config.get("vocab_size", GPT2_VOCAB_SIZE):
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


def build_optimizer_and_schedule(model, args, total_steps: int, param_groups: Optional[list[dict]] = None,
                                 capturable: bool = False):
    """AdamW over ``param_groups`` (default: the model's two groups, ``get_param_groups``;
    ``capturable`` for a CUDA-graph step) and the one-cycle LR/beta1 schedule."""
    initial_lr, warmup = one_cycle_start(args, total_steps)
    if warmup < 2:
        raise ValueError(f"the one-cycle schedule needs at least 2 warm-up steps and as many after; "
                         f"got --warmup-steps {args.warmup_steps} and {total_steps} steps in all")
    if param_groups is None:
        param_groups = model.get_param_groups(weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(args.max_momentum, args.beta2), eps=args.adam_eps,
                                  capturable=capturable)
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


def _atomic_save_state(accelerator, output_dir: Path, step: int, keep: Optional[int], model_config=None,
                       tokenizer=None) -> Path:
    """``save_state`` (tied weights stored once) into a temporary folder, with the model's
    ``config.json`` and the tokenizer's files in ``tokenizer/`` (so that :func:`export_checkpoint`
    converts it on its own), then rename it to ``checkpoint-{step}``."""
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
        if model_config is not None:
            model_config.save_pretrained(tmp)
        if tokenizer is not None:
            (tmp / CHECKPOINT_TOKENIZER_DIR).mkdir()
            tokenizer.save_pretrained(tmp / CHECKPOINT_TOKENIZER_DIR)
        move_into_place(tmp, final)  # an older run's checkpoint of this step is replaced only now
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_run(output_dir: Path) -> None:
    """Delete what a run wrote into ``output_dir`` (checkpoints, final model, step log, tracker
    logs), and nothing else."""
    written = [*output_dir.glob(f"{CHECKPOINT_PREFIX}*"), *output_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"),
               output_dir / FINAL_DIR, output_dir / LOG_FILE, output_dir / TRACKER_PROJECT]
    for path in written:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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


def micro_batch_loss(model, batch: dict, sequence_group=None) -> torch.Tensor:
    """The loss of one micro-batch on this process: the model's mean loss, or with sequence
    parallelism (``sequence_group``) this process's scaled share of its group's
    (:func:`goom_ssm.distributed.sequence_parallel_loss`); averaged over the processes, either
    gives the mean loss of the processes' micro-batches."""
    if sequence_group is not None:
        from .distributed import sequence_parallel_loss

        return sequence_parallel_loss(model, batch["input_ids"], batch["labels"], sequence_group,
                                      position_ids=batch.get("position_ids"))
    return model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                 use_cache=False).loss


@torch.no_grad()
def evaluate(model, loader, accelerator, max_batches: int, sequence_group=None) -> float:
    """Mean loss over up to ``max_batches`` micro-batches of each process, averaged over processes
    (``sequence_group``: see :func:`micro_batch_loss`)."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        total += micro_batch_loss(model, batch, sequence_group).float()
        count += 1
    model.train()
    mean = accelerator.reduce(total / max(count, 1), reduction="mean")
    return float(mean)


# --------------------------------------------------------------------------- training


@dataclass
class Run:
    """What the stages of one training run (:func:`train`) share."""

    args: argparse.Namespace
    accelerator: "accelerate.Accelerator"
    report_to: list[str]
    num_processes: int
    accumulation: int  # micro-batches per optimizer step and process
    checkpoints: list[Path]  # complete checkpoints in the output folder at the start
    sequence_group: object = None  # with --sequence-parallel: this process's group (torch.distributed)
    tokenizer: object = None
    documents_apart: bool = False  # blocks carry position_ids that restart at each document
    train_loader: object = None
    sampler: Optional[EpochSampler] = None
    val_loader: object = None
    max_steps: int = 0
    model: object = None
    optimizer: object = None
    scheduler: object = None
    state: Optional[TrainState] = None
    last_saved: int = 0  # step of the newest checkpoint
    graphed_step: object = None  # with --cuda-graph: the captured step (goom_ssm.graphed_step)

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def save_checkpoint(self) -> None:
        _atomic_save_state(self.accelerator, self.output_dir, self.state.step, self.args.keep_checkpoints,
                           self.accelerator.unwrap_model(self.model).config, self.tokenizer)
        self.last_saved = self.state.step

    def evaluate(self) -> float:
        return evaluate(self.model, self.val_loader, self.accelerator, self.args.eval_batches, self.sequence_group)

    def log(self, values: dict) -> None:
        if self.report_to:
            self.accelerator.log(values, step=self.state.step)


def train(args: argparse.Namespace) -> dict:
    """Run the training that ``args`` (``goom_ssm.cli.parse_args(["train", ...])``) describe:
    set up the accelerator, the data, the model and its optimizer, run the loop, save.

    Returns ``{"steps", "losses" (per optimizer step of this call), "tokens_per_second",
    "final_dir", "eval_loss"}`` on every process.
    """
    run = _set_up(args)
    _load_data(run)
    _build_model_and_optimizer(run)
    losses, eval_loss, tokens_per_second = _loop(run)
    final_dir, eval_loss = _finish(run, tokens_per_second, eval_loss)
    return {"steps": run.state.step, "losses": losses, "tokens_per_second": tokens_per_second,
            "final_dir": str(final_dir) if final_dir else None, "eval_loss": eval_loss}


def _set_up(args: argparse.Namespace) -> Run:
    """The accelerator (processes, mixed precision, gradient accumulation, trackers), after
    refusing to mix a new run into an old one (or clearing the old one with ``--overwrite``)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import AutocastKwargs, DistributedType, GradientAccumulationPlugin, set_seed

    output_dir = Path(args.output_dir)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by accelerate launch / config
        default = "bf16" if args.cuda_graph else "fp16"  # a captured step takes no gradient scaler
        mixed_precision = launcher or (default if torch.cuda.is_available() else "no")
    report_to = [] if args.report_to in ("none", "") else args.report_to.split(",")
    if "tensorboard" in report_to:
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            print("goom-ssm train: tensorboard is not installed; not logging to it", file=sys.stderr)
            report_to.remove("tensorboard")

    # Gradient accumulation: global batch = micro batch x processes x accumulation steps.
    # accelerate only runs several processes on a host without GPUs when told to use the CPU.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
    cpu = args.cpu or (multi_process and not torch.cuda.is_available())
    num_processes = PartialState(cpu=cpu).num_processes
    accumulation = args.gradient_accumulation_steps
    if accumulation is None:
        per_step = args.micro_batch_size * num_processes
        if args.batch_size % per_step:
            raise ValueError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size x processes "
                             f"= {args.micro_batch_size} x {num_processes}")
        accumulation = args.batch_size // per_step
    fsdp_plugin = _fsdp_plugin()
    if args.cuda_graph:
        _check_cuda_graph(args, cpu, num_processes, mixed_precision, fsdp_plugin)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, fsdp_plugin=fsdp_plugin, log_with=report_to or None,
        project_dir=str(output_dir),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False, dynamo_backend="inductor" if args.compile else None,
        # A captured step's casts are recorded in the graph, none cached outside it.
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)] if args.cuda_graph else None,
    )
    if fsdp_plugin is not None and accelerator.distributed_type != DistributedType.FSDP:
        raise ValueError(f"accelerate runs FSDP on GPUs only; here ({accelerator.distributed_type.value}) this FSDP "
                         f"configuration would train without sharding: on CPU, launch without it (accelerate launch "
                         f"--multi_gpu --num_processes N ... --cpu) for data parallelism")
    set_seed(args.seed)
    sequence_group = _sequence_group(args, num_processes)

    if args.overwrite and args.resume is not None:
        raise ValueError("--overwrite (start afresh) and --resume (continue) exclude each other")
    checkpoints = list_checkpoints(output_dir) if output_dir.exists() else []
    if args.resume is None and (checkpoints or (output_dir / FINAL_DIR).exists()):
        if not args.overwrite:
            raise FileExistsError(f"{output_dir} already holds a run; pass --resume to continue it, --overwrite to "
                                  f"start afresh (deleting its checkpoints, final model and logs), or use another folder")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            remove_run(output_dir)
        accelerator.wait_for_everyone()
        checkpoints = []
    return Run(args=args, accelerator=accelerator, report_to=report_to, num_processes=num_processes,
               accumulation=accumulation, checkpoints=checkpoints, sequence_group=sequence_group)


def _check_cuda_graph(args, cpu: bool, num_processes: int, mixed_precision: str, fsdp_plugin) -> None:
    """Refuse ``--cuda-graph`` where a captured step cannot run: see :mod:`goom_ssm.graphed_step`."""
    problems = []
    if cpu or not torch.cuda.is_available():
        problems.append("it needs CUDA")
    if num_processes != 1 or fsdp_plugin is not None or args.sequence_parallel > 1:
        problems.append(f"it runs one process (here {num_processes}, without FSDP or --sequence-parallel)")
    if mixed_precision == "fp16":
        problems.append("it takes no gradient scaler: --mixed-precision bf16 or no, not fp16")
    if args.compile:
        problems.append("it and --compile exclude each other")
    if args.base_momentum != args.max_momentum:
        problems.append("it keeps beta1 fixed (torch's AdamW cannot take a changing beta1 inside a CUDA graph): give "
                        "--base-momentum equal to --max-momentum")
    if problems:
        raise ValueError("--cuda-graph: " + "; ".join(problems))


def _fsdp_plugin():
    """Under an accelerate FSDP configuration (``accelerate launch --config_file
    examples/accelerate/fsdp2.yaml``), its plugin with the parameters gathered and the
    gradients reduced in float32: with ``--mixed-precision`` bf16 or fp16, autocast runs the
    projections in half precision as without FSDP, and the transition matrix ``A`` and the
    GOOM states stay float32 (accelerate's default policy would gather every parameter in
    half precision). The rest of the plugin (version, wrapping, state dict type) is the
    configuration's. None without FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    return plugin


def _sequence_group(args, num_processes: int):
    """With ``--sequence-parallel N`` (N > 1), this process's group of N consecutive ranks
    (``torch.distributed.new_subgroups``), which split each sequence of their micro-batches
    between them; else None."""
    size = args.sequence_parallel
    if size < 1:
        raise ValueError(f"--sequence-parallel must be at least 1, got {size}")
    if size == 1:
        return None
    if num_processes % size:
        raise ValueError(f"--sequence-parallel {size} does not divide the {num_processes} processes")
    if args.block_size % size:
        raise ValueError(f"--block-size {args.block_size} does not split into {size} equal segments "
                         f"(--sequence-parallel)")
    group, _ = torch.distributed.new_subgroups(group_size=size)
    return group


def _load_data(run: Run) -> None:
    """The tokenizer, the training and held-out loaders, and the number of optimizer steps.
    The data are tokenized once, by the main process; the others then read the datasets cache."""
    from .data import build_datasets, resolve_tokenizer

    args = run.args
    run.tokenizer = resolve_tokenizer(args.tokenizer)
    load_kwargs = dict(name=args.data_config, split=args.data_split, sample_by=args.sample_by, cache_dir=args.cache_dir)
    with run.accelerator.main_process_first():
        train_data, val_data = build_datasets(
            args.data if len(args.data) > 1 else args.data[0], run.tokenizer, args.block_size,
            streaming=args.streaming, validation_fraction=args.validation_split,
            validation_source=args.validation_data, text_column=args.text_column, num_proc=args.num_proc,
            seed=args.seed, shuffle_buffer=0 if args.no_shuffle else args.shuffle_buffer, pack_documents=args.pack,
            **load_kwargs,
        )
    run.documents_apart = train_data.eos_token_id is not None
    if run.is_main:
        how = "given" if args.pack is not None else "documents shorter than a block" if run.documents_apart else \
            "documents longer than a block"
        print(f"documents {'packed apart (each starts afresh)' if run.documents_apart else 'run together'} in "
              f"blocks of {args.block_size} tokens ({how})", file=sys.stderr)
    loader_kwargs = dict(batch_size=args.micro_batch_size, drop_last=True, num_workers=args.num_workers)
    if args.streaming:
        run.train_loader = torch.utils.data.DataLoader(train_data, **loader_kwargs)
    else:
        if len(train_data) < args.micro_batch_size * run.num_processes:
            raise ValueError(f"only {len(train_data)} blocks of {args.block_size} tokens: fewer than one micro-batch "
                             f"per process; use less --block-size or --micro-batch-size, or more data")
        run.sampler = EpochSampler(len(train_data), args.seed, shuffle=not args.no_shuffle)
        run.train_loader = torch.utils.data.DataLoader(train_data, sampler=run.sampler, **loader_kwargs)
    if val_data is not None:
        run.val_loader = torch.utils.data.DataLoader(val_data, batch_size=args.micro_batch_size, drop_last=False,
                                                     num_workers=args.num_workers)

    run.max_steps = args.max_steps
    if run.max_steps is None:
        if args.streaming:
            raise ValueError("--max-steps is required with --streaming")
        run.max_steps = math.floor(len(run.train_loader) // run.num_processes * args.num_epochs / run.accumulation)
        if run.max_steps < 1:
            raise ValueError(f"{len(run.train_loader)} micro-batches make no optimizer step of {run.accumulation} "
                             f"micro-batches x {run.num_processes} processes; lower --batch-size")


def _build_model_and_optimizer(run: Run) -> None:
    """The model, optimizer and schedule, prepared by the accelerator; the progress state,
    restored from a checkpoint with ``--resume``."""
    args, accelerator = run.args, run.accelerator
    model = build_model(args, run.tokenizer)
    if run.sequence_group is not None:
        from .distributed import set_sequence_group

        set_sequence_group(model, run.sequence_group)
    optimizer, scheduler = build_optimizer_and_schedule(model, args, run.max_steps, capturable=args.cuda_graph)
    run.model, run.optimizer, run.train_loader, run.scheduler = accelerator.prepare(
        model, optimizer, run.train_loader, scheduler)
    if args.cuda_graph:  # captured at the first batch, after a resumed state is loaded
        from .graphed_step import GraphedTrainingStep

        run.graphed_step = GraphedTrainingStep(run.model, run.optimizer.optimizer, max_grad_norm=args.max_grad_norm,
                                               accumulation_steps=run.accumulation)
    if run.val_loader is not None:
        run.val_loader = accelerator.prepare(run.val_loader)

    settings = {"seed": args.seed, "block_size": args.block_size, "micro_batch_size": args.micro_batch_size,
                "num_processes": run.num_processes, "gradient_accumulation_steps": run.accumulation,
                "max_steps": run.max_steps, "streaming": args.streaming, "tokenizer": run.tokenizer.name,
                "documents_apart": run.documents_apart}
    run.state = TrainState(settings)
    accelerator.register_for_checkpointing(run.state)
    if args.resume is not None:
        path = Path(args.resume) if args.resume != "latest" else (run.checkpoints[-1] if run.checkpoints else None)
        if path is not None:
            accelerator.load_state(str(path))
            if run.is_main:
                print(f"resumed from {path} at step {run.state.step} (epoch {run.state.epoch}, "
                      f"batch {run.state.batches_in_epoch})", file=sys.stderr)
    if accelerator.step != run.state.step * run.accumulation:  # accumulate()'s counter must agree with ours
        accelerator.step = run.state.step * run.accumulation
    run.last_saved = run.state.step


def _loop(run: Run) -> tuple[list[float], Optional[float], float]:
    """Optimizer steps up to ``--max-steps`` (or ``--stop-at-step``), logging every step,
    evaluating and checkpointing as asked. Returns the step losses, the last held-out loss
    and this session's tokens/s."""
    from tqdm.auto import tqdm

    args, accelerator, state = run.args, run.accelerator, run.state
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    run.output_dir.mkdir(parents=True, exist_ok=True)
    if run.report_to:
        accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(args))
    log_file = _open_log(run.output_dir / LOG_FILE, state.step) if run.is_main else None

    tokens_per_micro = args.micro_batch_size * args.block_size * run.num_processes
    stop_at = min(run.max_steps, args.stop_at_step) if args.stop_at_step else run.max_steps
    progress = tqdm(total=run.max_steps, initial=state.step, disable=not run.is_main or args.no_progress,
                    desc="training", dynamic_ncols=True)
    losses, eval_loss = [], None
    step_loss = torch.zeros((), device=accelerator.device)
    start_time, start_tokens = time.perf_counter(), state.tokens
    model.train()

    done = state.step >= stop_at
    while not done:
        if run.sampler is not None:
            run.sampler.set_epoch(state.epoch)
        run.train_loader.set_epoch(state.epoch)  # accelerate passes the epoch on at each iteration
        loader = (accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
                  if state.batches_in_epoch else run.train_loader)
        for batch in loader:
            with accelerator.accumulate(model):
                if run.graphed_step is not None:  # it steps at the micro-batches where sync_gradients is set
                    loss, grad_norm = run.graphed_step(batch["input_ids"], batch["labels"], batch.get("position_ids"))
                    step_loss += loss
                else:
                    loss = micro_batch_loss(model, batch, run.sequence_group)
                    accelerator.backward(loss)
                    step_loss += loss.detach().float()
                    grad_norm = None
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                if accelerator.sync_gradients:
                    lr, beta1 = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]
                    if state.step + 1 < run.max_steps:  # the schedule has max_steps values, the last one is in use
                        scheduler.step()
                if run.graphed_step is None:
                    optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            state.tokens += tokens_per_micro
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            mean_loss = float(accelerator.reduce(step_loss, reduction="mean")) / run.accumulation
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
            if state.step % args.log_every == 0 or state.step == stop_at:
                run.log({f"train/{k}": v for k, v in record.items() if k != "step"})
            if run.val_loader is not None and args.eval_every and state.step % args.eval_every == 0:
                eval_loss = run.evaluate()
                run.log({"eval/loss": eval_loss})
            if args.save_every and state.step % args.save_every == 0:
                run.save_checkpoint()
            if state.step >= stop_at:
                done = True
                break
        else:  # the pass over the data is complete
            state.epoch += 1
            state.batches_in_epoch = 0
            if args.streaming and state.step == 0 and state.tokens == 0:
                raise ValueError("the data gave no block of --block-size tokens")

    elapsed = time.perf_counter() - start_time
    progress.close()
    if log_file is not None:
        log_file.close()
    if state.step != run.last_saved and (stop_at < run.max_steps or args.save_every):
        run.save_checkpoint()
    return losses, eval_loss, (state.tokens - start_tokens) / max(elapsed, 1e-9)


def _finish(run: Run, tokens_per_second: float, eval_loss: Optional[float]) -> tuple[Optional[Path], Optional[float]]:
    """At the last step: the held-out loss and the final folder (``save_pretrained``, the
    tokenizer files, the model card), moved into place when complete. Returns the folder
    (``None`` for a run stopped early) and the held-out loss."""
    accelerator, state, main = run.accelerator, run.state, run.is_main
    final_dir = None
    if state.step >= run.max_steps:
        if run.val_loader is not None:
            eval_loss = run.evaluate()
            run.log({"eval/loss": eval_loss})
        final_dir = run.output_dir / FINAL_DIR
        tmp = run.output_dir / f".tmp-{FINAL_DIR}"
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(run.model)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped = accelerator.unwrap_model(run.model)
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            run.tokenizer.save_pretrained(tmp)
            write_training_card(tmp, unwrapped, run.args, state, accelerator.mixed_precision, tokens_per_second,
                                eval_loss)
            move_into_place(tmp, final_dir)
        accelerator.wait_for_everyone()
    if main:
        message = f"{state.step} steps; {tokens_per_second:,.0f} tokens/s over this session"
        if eval_loss is not None:
            message += f"; held-out loss {eval_loss:.4f}"
        print(message + (f"; wrote {final_dir}" if final_dir else f"; stopped at step {state.step}"), file=sys.stderr)
    accelerator.end_training()
    return final_dir, eval_loss


def export_checkpoint(checkpoint, out_dir, overwrite: bool = False) -> Path:
    """A ``save_pretrained`` folder (config, weights, tokenizer files) from a training
    checkpoint: a data-parallel one (``model.safetensors``) or an FSDP one with sharded state
    dicts (``pytorch_model_fsdp_0/``, torch.distributed.checkpoint files, read in this one
    process with torch's ``dcp_to_torch_save``). ``out_dir`` must be absent or empty unless
    ``overwrite``; it is written whole or not at all."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import modeling  # noqa: F401  (registers the model with the Auto classes)

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint of goom-ssm train (it has no config.json)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
    sharded = checkpoint / "pytorch_model_fsdp_0"
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if sharded.is_dir():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
            _load_sharded_weights(model, sharded, tmp / "merged.pt")
        elif (checkpoint / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_pretrained(checkpoint)
        else:
            raise FileNotFoundError(f"{checkpoint} holds no model weights (model.safetensors or pytorch_model_fsdp_0/)")
        model.save_pretrained(tmp)
        if (checkpoint / CHECKPOINT_TOKENIZER_DIR).is_dir():
            for path in (checkpoint / CHECKPOINT_TOKENIZER_DIR).iterdir():
                shutil.copy(path, tmp / path.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return move_into_place(tmp, out_dir)


def _load_sharded_weights(model, folder: Path, scratch: Path) -> None:
    """Load into ``model`` the weights that accelerate's FSDP ``save_state`` wrote to ``folder``
    (torch.distributed.checkpoint files of ``{"model": state dict}``), through the single file
    ``scratch`` (deleted after). Every parameter must be there (the tied head may be left out)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, scratch)
    try:
        state = torch.load(scratch, weights_only=True)["model"]
    finally:
        scratch.unlink()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - set(model.all_tied_weights_keys)
    if missing or unexpected:
        raise ValueError(f"{folder} does not hold this model's weights (missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)})")
    model.tie_weights()


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
        "| documents | " + ("packed apart: each starts from the initial state" if settings.get("documents_apart")
                            else "run together across blocks") + " |",
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
