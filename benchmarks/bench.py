"""Speed and memory of GOOM-SSM against GPT-2 124M and fla's GLA and Gated DeltaNet, measured
in one run on one GPU.

Prints a Markdown table per section; every row of a section uses the same settings.

    python benchmarks/bench.py --sections train --models goom:triton goom:chunked goom:goom_prefix gpt2
    python benchmarks/bench.py --sections prefill decode --decode-models goom:triton goom:chunked gpt2
    python benchmarks/bench.py --sections train decode --models goom:triton gpt2 gla gdn \
        --batches 8 16 32 --json results.json --png results.png  # the README's table and plot: one command
    python benchmarks/bench.py --plot results.json           # the plot again, from the JSON (results.png)
    python benchmarks/bench.py --plot a.json b.json          # rows of runs split over calls, in one plot (a.png)

Models: ``gpt2[:compile]`` (transformers' GPT-2 124M, SDPA),
``goom:<scan>[:<chunk>][:compile][:hfloss]`` (the 124M GOOM-SSM with scan_implementation
``triton`` (the CUDA fast path), ``chunked`` (pure PyTorch) or ``goom_prefix`` (the original
design); ``<chunk>``: scan_chunk_size, which only the chunked scan reads), ``gla[:compile]`` and
``gdn[:compile]`` (fla's GLA and Gated DeltaNet at GPT-2's width and depth, head tied to the
embedding as GPT-2's: ~124M and ~131M parameters; need the ``fla`` package and CUDA: their rows
are skipped, with the reason, elsewhere); ``compile``: training through
``torch.compile(model, fullgraph=True)`` (GPT-2 without ``fullgraph``); ``compile-graphs``: the
same with ``mode="reduce-overhead"`` (CUDA graphs of the compiled forward and backward, as the
HF ``Trainer``'s ``torch_compile_mode="reduce-overhead"``; the optimizer runs eagerly), in place
of ``compile`` wherever that is allowed; an unknown option is refused; ``hfloss``: GOOM-SSM with transformers' loss function
instead of its Triton cross-entropy (``fuse_cross_entropy=False``); ``graph`` (train section, CUDA): the whole step
captured as CUDA graphs (:class:`goom_ssm.graphed_step.GraphedTrainingStep`, AdamW with
``capturable=True``; the other rows use the fused AdamW). ``--tiny`` builds every model at a tiny size (the
CPU test of this script).

Sections:
    train    fwd + bwd + AdamW step, tokens/s, MFU and peak memory, at --seq-len over --batches;
             with --repeats N, N runs of each row (each a new model): the median and the spread
             (max - min) / median.
             MFU: 6 x parameters x tokens/s over the bf16 matmul peak (--peak-flops; on CUDA by
             default that of an 8192^3 bf16 product, measured at the start of the run; parameters
             counted once where tied, so the tied head's product is in; GPT-2's position table has
             its 1024 rows, more only for longer sequences)
    prefill  forward over one long sequence (batch 1), tokens/s and peak memory
    decode   new tokens/s after a 512-token prompt, through generate() (greedy, no EOS: every
             call makes --new-tokens tokens) and a raw step loop, and
             the bound of a step that only reads the weights once: batch x memory bandwidth
             (--bandwidth; on CUDA by default that of a device-to-device copy, measured at the start
             of the run) / bytes of the weights, with each measurement as a fraction of it
"""

import argparse
import gc
import json
import statistics
import textwrap
import time
import traceback
from typing import Optional

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import goom_ssm
from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM
from goom_ssm.constants import SCAN_IMPLEMENTATIONS
from goom_ssm.extras import versions
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME


FLA_MODELS = ("gla", "gdn")
TRAINING_OPTIONS = ("compile", "compile-graphs", "graph")  # how the train section runs a model
TINY = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2)  # --tiny: every model at this size


def unavailable(name: str, device: str) -> Optional[str]:
    """Why model ``name`` cannot run on ``device`` (fla's layers are Triton kernels without a CPU
    path), or None."""
    if name.split(":")[0] not in FLA_MODELS:
        return None
    if device != "cuda":
        return f"skipped: fla's {name} needs CUDA (its layers have no CPU path)"
    try:
        import fla  # noqa: F401
    except ImportError:
        return f"skipped: {name} needs the fla package (pip install flash-linear-attention)"
    return None


def spec_options(name: str) -> list:
    """The options of model spec ``name`` (see the module docstring) after its kind (and
    GOOM-SSM's scan); ValueError for an unknown model or option, so that a misspelt spec is
    refused instead of run as another."""
    kind, *options = name.split(":")
    if kind not in ("gpt2", "goom") + FLA_MODELS:
        raise ValueError(f"unknown model {kind!r}: see --help for the specs")
    known = TRAINING_OPTIONS
    if kind == "goom":
        if not options or options[0] not in SCAN_IMPLEMENTATIONS:
            raise ValueError(f"model {name!r}: GOOM-SSM's spec names its scan, one of {SCAN_IMPLEMENTATIONS} "
                             "(e.g. goom:triton)")
        options = options[1:]
        known += ("hfloss",) + tuple(options[:1] if options and options[0].isdigit() else ())
    unknown = [option for option in options if option not in known]
    if unknown:
        raise ValueError(f"model {name!r}: unknown option(s) {', '.join(unknown)} (see --help for the specs)")
    return options


def check_specs(parser: argparse.ArgumentParser, names: list) -> None:
    """Every model spec in ``names`` checked (:func:`spec_options`) before anything runs; a
    misspelt one ends the command with ``parser``'s usage and the reason."""
    for name in names:
        try:
            spec_options(name)
        except ValueError as error:
            parser.error(str(error))


def build(name: str, device: str, tiny: bool = False, positions: int = 1024) -> torch.nn.Module:
    """The model of spec ``name`` (see the module docstring), at 124M or (``tiny``) :data:`TINY`'s sizes;
    GPT-2's position table has ``positions`` rows (at least its own 1024)."""
    options = spec_options(name)
    kind = name.split(":")[0]
    size = TINY if tiny else dict(vocab_size=50257, hidden_size=768, num_hidden_layers=12)
    if kind == "gpt2":
        gpt2_size = {} if not tiny else dict(vocab_size=size["vocab_size"], n_embd=size["hidden_size"],
                                             n_layer=size["num_hidden_layers"], n_head=2)
        model = GPT2LMHeadModel(GPT2Config(n_positions=max(positions, 1024), attn_implementation="sdpa", **gpt2_size))
    elif kind == "goom":
        scan = name.split(":")[1]
        chunk = int(options[0]) if options and options[0].isdigit() else None
        goom_size = {} if not tiny else dict(size, num_state_heads=2, state_size=8)
        model = GoomSSMForCausalLM(GoomSSMConfig(scan_implementation=scan, scan_chunk_size=chunk,
                                                 fuse_cross_entropy="hfloss" not in options, **goom_size))
    elif kind == "gla":
        from fla.models import GLAConfig, GLAForCausalLM

        model = GLAForCausalLM(GLAConfig(num_heads=2 if tiny else 4, tie_word_embeddings=True, **size))
    elif kind == "gdn":
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

        config = GatedDeltaNetConfig(num_heads=2 if tiny else 6, head_dim=16 if tiny else 128, expand_v=1,
                                     tie_word_embeddings=True, **size)
        model = GatedDeltaNetForCausalLM(config)
    return model.to(device)


def num_parameters(model: torch.nn.Module) -> int:
    """Parameters, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


def cleanup(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def matmul_peak_flops(device: str, size: int = 8192) -> float:
    """FLOP/s of a ``size``^3 bf16 matrix product on ``device``: the peak that MFU is taken against."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * size**3 / time_it(lambda: a @ b, warmup=5, steps=50, device=device)


def copy_bandwidth(device: str, gib: int = 2) -> float:
    """Bytes/s a device-to-device copy of ``gib`` GiB reads and writes on ``device``: the memory
    bandwidth of the decode bound."""
    source = torch.empty(gib * 2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() / time_it(lambda: target.copy_(source), warmup=3, steps=20, device=device)


def time_it(fn, warmup: int, steps: int, device: str) -> float:
    """Seconds per call of ``fn`` (synchronised with the device)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def training_step(name, batch, seq_len, dtype, device, tiny):
    """``(model, step)``: model ``name`` and a function that runs one training step (fwd + bwd
    + AdamW) of it on a fixed batch of random ids ``[batch, seq_len]``."""
    model = build(name, device, tiny, positions=seq_len).train()
    options = spec_options(name)
    graphed = "graph" in options
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                  **({"capturable": True} if graphed else {"fused": device == "cuda"}))
    # GPT-2's loss in transformers logs (a graph break), so only GOOM-SSM is compiled whole.
    compiled = None
    if "compile" in options or "compile-graphs" in options:
        compiled = torch.compile(model, fullgraph=name.startswith("goom"),
                                 mode="reduce-overhead" if "compile-graphs" in options else None)
    step_model = model if compiled is None else compiled
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)

    if graphed:
        from goom_ssm.graphed_step import GraphedTrainingStep

        graphed_step = GraphedTrainingStep(model, optimizer, autocast_dtype=dtype)

        def step():
            graphed_step(ids, ids)
    else:
        def step():
            with torch.autocast(device, dtype=dtype):
                loss = step_model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return model, step


def bench_train(name, batch, seq_len, dtype, steps, device, tiny):
    """(tokens/s, parameters, peak GiB) of training steps, or (None, None, None) out of memory."""
    cleanup(device)
    model, step = training_step(name, batch, seq_len, dtype, device, tiny)
    try:
        seconds = time_it(step, warmup=2, steps=steps, device=device)
        return batch * seq_len / seconds, num_parameters(model), peak_gib(device)
    except torch.OutOfMemoryError:
        return None, None, None
    finally:
        del model, step
        cleanup(device)


@torch.no_grad()
def bench_prefill(name, seq_len, dtype, device, tiny):
    cleanup(device)
    model = build(name, device, tiny, positions=seq_len).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)

    def run():
        with torch.autocast(device, dtype=dtype):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    try:
        seconds = time_it(run, warmup=1, steps=3, device=device)
        return seq_len / seconds, peak_gib(device)
    except torch.OutOfMemoryError:
        return None, None
    finally:
        del model
        cleanup(device)


@torch.no_grad()
def bench_decode(name, batch, new_tokens, dtype, device, tiny, prompt_len=512):
    """(generate() tokens/s, raw-step tokens/s, bytes of the weights, peak GiB) after a
    ``prompt_len``-token prompt. generate(): its time less that of the prompt's forward; raw: a
    loop of single-token steps, timed alone."""
    cleanup(device)
    model = build(name, device, tiny, positions=prompt_len + new_tokens).eval().to(dtype)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    # fla's models take the cache under transformers' former name, whatever the release
    cache_kwarg = "past_key_values" if name.split(":")[0] in FLA_MODELS else CACHE_NAME

    # exactly new_tokens through a plain greedy call: no EOS (min_new_tokens would add a logits processor)
    model.generation_config.eos_token_id = None

    def via_generate():
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompt_len + new_tokens

    def raw_step_seconds():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, token = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{cache_kwarg: cache})
            cache, token = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)
        synchronize(device)
        return (time.perf_counter() - start) / new_tokens

    try:
        prefill = time_it(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1), 1, 2, device)
        gen = time_it(via_generate, warmup=1, steps=2, device=device) - prefill
        raw_step_seconds()  # warm-up (GOOM-SSM captures its CUDA graph)
        raw = (raw_step_seconds() + raw_step_seconds()) / 2
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return batch * new_tokens / gen, batch / raw, weight_bytes, peak_gib(device)
    finally:
        del model
        cleanup(device)


def fmt(value, spec=",.0f", missing="OOM"):
    return missing if value is None else format(value, spec)


def plot(json_paths: list, png_path: str) -> None:
    """Tokens/s against batch, one line per model: training (left) and decoding through
    generate() (right, log scales), from the records of one or more ``--json`` files (runs
    split over several calls; their headers are all shown). A section with no measured rows
    gets no panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {"header": [], "rows": []}
    for path in json_paths:
        with open(path) as f:
            run = json.load(f)
        results["header"] += [run["header"]] if run["header"] not in results["header"] else []
        results["rows"] += run["rows"]
    panels = []
    for section, key, title in (("train", "tokens_per_s", "Training (fwd + bwd + AdamW)"),
                                ("decode", "generate_tokens_per_s", "Decoding through generate()")):
        rows = [r for r in results["rows"] if r["section"] == section and r.get(key) is not None]
        if rows:
            panels.append((section, key, title, rows))
    if not panels:
        raise SystemExit(f"nothing to plot: no measured training or decoding rows in {', '.join(json_paths)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (section, key, title, rows) in zip(axes[0], panels):
        for model in dict.fromkeys(r["model"] for r in rows):
            points = sorted((r["batch"], r[key]) for r in rows if r["model"] == model)
            ax.plot(*zip(*points), marker="o", label=model)
        batches = sorted({r["batch"] for r in rows})
        ax.set(title=title, xlabel="batch", ylabel="tokens/s", xscale="log", yscale="log" if section == "decode" else "linear")
        ax.minorticks_off()
        ax.set_xticks(batches, labels=batches)
        ax.grid(alpha=0.3)
        ax.legend()
    # each header line wrapped to the figure's width (about 80 characters a panel at this size)
    fig.suptitle("\n".join(textwrap.fill(line, 80 * len(panels)) for header in results["header"]
                           for line in header.splitlines()), fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["train", "prefill", "decode"])
    parser.add_argument("--decode-models", nargs="+", default=None, help="models of the prefill and decode sections (default: --models)")
    parser.add_argument("--models", nargs="+", default=["goom:triton", "goom:chunked", "gpt2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--prefill-lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--decode-batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1,
                        help="train section: runs of each row (a new model each); tokens/s is their median, the "
                             "spread (max - min) / median")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="bf16 matmul peak (FLOP/s), for MFU; default on CUDA: measured at the start of a run with "
                             "the train section (an 8192^3 bf16 product), elsewhere no MFU")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="memory bandwidth (bytes/s), for the decode bound; default on CUDA: measured at the start "
                             "of a run with the decode section (a 2 GiB device-to-device copy, read and write), "
                             "elsewhere no bound")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="every model at a tiny size (a quick check, e.g. on CPU)")
    parser.add_argument("--json", help="also write every row, with the settings, to this JSON file")
    parser.add_argument("--png", help="with --json: also plot this run's rows here (tokens/s against batch)")
    parser.add_argument("--plot", metavar="JSON", nargs="+",
                        help="only plot the results of --json files (to the first one's name, .png)")
    args = parser.parse_args()
    if args.png and not args.json:
        parser.error("--png needs --json: the plot is drawn from its rows")
    check_specs(parser, args.models + (args.decode_models or []))
    if args.plot:
        plot(args.plot, args.plot[0].removesuffix(".json") + ".png")
        return
    device, dtype = args.device, getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    peak_source = bandwidth_source = "given"
    if device == "cuda" and args.peak_flops is None and "train" in args.sections:  # only MFU reads it
        args.peak_flops, peak_source = matmul_peak_flops(device), "measured"
    if device == "cuda" and args.bandwidth is None and "decode" in args.sections:  # only the decode bound reads it
        args.bandwidth, bandwidth_source = copy_bandwidth(device), "measured"
    packages = {**versions(), "goom_ssm": goom_ssm.__version__}
    header = (f"device: {name}, " + ", ".join(f"{package} {version}" for package, version in packages.items())
              + f", dtype {args.dtype}" + (", tiny models" if args.tiny else ""))
    measures = []
    if args.peak_flops:
        measures.append(f"bf16 matmul peak {args.peak_flops / 1e12:,.1f} TFLOP/s ({peak_source})")
    if args.bandwidth:
        measures.append(f"bandwidth {args.bandwidth / 1e12:,.3f} TB/s ({bandwidth_source})")
    if measures:
        header += "\n" + "; ".join(measures)
    print(header + "\n")
    rows = []

    def record(**row):
        """Keep ``row``; with --json, rewrite the file (a run cut short keeps the rows so far)."""
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(header=header, settings=vars(args), rows=rows), f, indent=1)

    failures = []

    def attempt(section, model_name, fn, *fn_args):
        """``fn(*fn_args)``; if it raises, the traceback, a row saying so and None: the other rows
        still run, and the script exits with an error at the end."""
        try:
            return fn(*fn_args)
        except Exception as error:  # noqa: BLE001 - reported, recorded and turned into the exit status
            traceback.print_exc()
            reason = f"failed: {type(error).__name__}: {error}".splitlines()[0]
            print(f"| {model_name} | {reason} |", flush=True)
            record(section=section, model=model_name, failed=reason)
            failures.append(f"{section} {model_name}")
            return None

    def skipped(model_name, section):
        reason = unavailable(model_name, device)
        if reason:
            print(f"| {model_name} | {reason} |", flush=True)
            record(section=section, model=model_name, skipped=reason)
        return reason

    if "train" in args.sections:
        print(f"### Training (fwd + bwd + AdamW), seq {args.seq_len}\n")
        print(f"| model | parameters | batch | tokens/s | MFU | peak GiB | spread of {args.repeats} runs |\n"
              "|---|---|---|---|---|---|---|")
        for model_name in args.models:
            if skipped(model_name, "train"):
                continue
            for batch in args.batches:
                results = []
                for _ in range(args.repeats):  # each run a new model and optimizer
                    results.append(attempt("train", model_name, bench_train, model_name, batch, args.seq_len, dtype,
                                           args.steps, device, args.tiny))
                    if results[-1] is None or results[-1][0] is None:
                        break
                if results[-1] is None:
                    break
                runs = [result[0] for result in results]
                _, params, mem = results[-1]
                tps = None if None in runs else statistics.median(runs)
                spread = None if tps is None else (max(runs) - min(runs)) / tps
                mfu = None if tps is None or not args.peak_flops else 6 * params * tps / args.peak_flops
                record(section="train", model=model_name, batch=batch, parameters=params, tokens_per_s=tps,
                       runs_tokens_per_s=runs, spread=spread, mfu=mfu, peak_gib=mem)
                print(f"| {model_name} | {fmt(params and params / 1e6, '.1f')}M | {batch} | {fmt(tps)} | "
                      f"{fmt(mfu, '.1%', '-' if tps else 'OOM')} | {fmt(mem, '.1f', '-')} | {fmt(spread, '.1%', '-')} |", flush=True)
                if tps is None:
                    break
        print()
    if "prefill" in args.sections:
        print("### Prefill (forward, batch 1)\n")
        print("| model | seq | tokens/s | peak GiB |\n|---|---|---|---|")
        for model_name in args.decode_models or args.models:
            if skipped(model_name, "prefill"):
                continue
            for seq_len in args.prefill_lengths:
                result = attempt("prefill", model_name, bench_prefill, model_name, seq_len, dtype, device, args.tiny)
                if result is None:
                    break
                tps, mem = result
                record(section="prefill", model=model_name, seq_len=seq_len, tokens_per_s=tps, peak_gib=mem)
                print(f"| {model_name} | {seq_len} | {fmt(tps)} | {fmt(mem, '.1f', '-')} |", flush=True)
        print()
    if "decode" in args.sections:
        print(f"### Decode after a {args.prompt_len}-token prompt, {args.new_tokens} new tokens\n")
        print("| model | batch | generate() tokens/s | raw step tokens/s | weight-read bound tokens/s "
              "| generate() / bound | raw / bound | peak GiB |\n|---|---|---|---|---|---|---|---|")
        for model_name in args.decode_models or args.models:
            if skipped(model_name, "decode"):
                continue
            for batch in args.decode_batches:
                result = attempt("decode", model_name, bench_decode, model_name, batch, args.new_tokens, dtype, device,
                                 args.tiny, args.prompt_len)
                if result is None:
                    break
                gen, raw, weight_bytes, mem = result
                bound = batch * args.bandwidth / weight_bytes if args.bandwidth else None
                record(section="decode", model=model_name, batch=batch, generate_tokens_per_s=gen,
                       raw_tokens_per_s=raw, weight_bytes=weight_bytes, bound_tokens_per_s=bound, peak_gib=mem)
                print(f"| {model_name} | {batch} | {fmt(gen)} | {fmt(raw)} | {fmt(bound, missing='-')} "
                      f"| {fmt(bound and gen / bound, '.1%', '-')} | {fmt(bound and raw / bound, '.1%', '-')} "
                      f"| {fmt(mem, '.1f', '-')} |", flush=True)
        print()
    if args.json:
        print(f"wrote {args.json}")
    if args.png:
        plot([args.json], args.png)
    if failures:
        raise SystemExit(f"failed: {', '.join(failures)} (tracebacks above)")


if __name__ == "__main__":
    main()
