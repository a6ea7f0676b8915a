"""Speed and memory of GOOM-SSM against GPT-2 124M, measured in one run on one GPU.

Prints a Markdown table per section; every row of a section uses the same settings.

    python benchmarks/bench.py --sections train --models goom:triton goom:chunked goom:goom_prefix gpt2
    python benchmarks/bench.py --sections prefill decode --decode-models goom:triton goom:chunked gpt2

Models: ``gpt2[:compile]`` (transformers' GPT-2 124M, SDPA) or
``goom:<scan>[:<chunk>][:compile]`` (the 124M GOOM-SSM with scan_implementation
``triton`` (the CUDA fast path), ``chunked`` (pure PyTorch) or ``goom_prefix`` (the original
design); ``<chunk>``: scan_chunk_size, which only the chunked scan reads); ``compile``:
training through ``torch.compile(model, fullgraph=True)``.

Sections:
    train    fwd + bwd + AdamW step, tokens/s and peak memory, at --seq-len over --batches
    prefill  forward over one long sequence (batch 1), tokens/s and peak memory
    decode   new tokens/s after a 512-token prompt, through generate() and a raw step loop
"""

import argparse
import gc
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import goom_ssm
from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME


def build(name: str, device: str) -> torch.nn.Module:
    """``gpt2[:compile]`` (124M, SDPA attention) or ``goom:<scan>[:<chunk>][:compile]``
    (124M GOOM-SSM); see the module docstring."""
    if name.split(":")[0] == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_positions=65536, attn_implementation="sdpa"))
    else:
        _, scan, *options = name.split(":")
        chunk = int(options[0]) if options and options[0].isdigit() else None
        config = GoomSSMConfig(scan_implementation=scan, scan_chunk_size=chunk)
        model = GoomSSMForCausalLM(config)
    return model.to(device)


def cleanup():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def time_it(fn, warmup: int, steps: int) -> float:
    """Seconds per call of ``fn`` (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bench_train(name, batch, seq_len, dtype, steps):
    cleanup()
    model = build(name, "cuda").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    # GPT-2's loss in transformers logs (a graph break), so only GOOM-SSM is compiled whole.
    compiled = torch.compile(model, fullgraph=name.startswith("goom")) if "compile" in name.split(":") else None
    step_model = model if compiled is None else compiled
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        seconds = time_it(step, warmup=2, steps=steps)
        return batch * seq_len / seconds, torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        return None, None
    finally:
        del model, optimizer, step_model, compiled
        cleanup()


@torch.no_grad()
def bench_prefill(name, seq_len, dtype):
    cleanup()
    model = build(name, "cuda").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device="cuda")

    def run():
        with torch.autocast("cuda", dtype=dtype):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    try:
        seconds = time_it(run, warmup=1, steps=3)
        return seq_len / seconds, torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        return None, None
    finally:
        del model
        cleanup()


@torch.no_grad()
def bench_decode(name, batch, new_tokens, dtype):
    """(generate() tokens/s, raw-step tokens/s, peak GiB) after a 512-token prompt. generate():
    its time less that of the prompt's forward; raw: a loop of single-token steps, timed alone."""
    cleanup()
    model = build(name, "cuda").eval().to(dtype)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 512), device="cuda")

    def via_generate():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def raw_step_seconds():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, token = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / new_tokens

    try:
        prefill = time_it(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1), warmup=1, steps=2)
        gen = time_it(via_generate, warmup=1, steps=2) - prefill
        raw_step_seconds()  # warm-up (GOOM-SSM captures its CUDA graph)
        raw = (raw_step_seconds() + raw_step_seconds()) / 2
        return batch * new_tokens / gen, batch / raw, torch.cuda.max_memory_allocated() / 2**30
    finally:
        del model
        cleanup()


def fmt(value, spec=".0f"):
    return "OOM" if value is None else format(value, spec)


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
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, goom_ssm {goom_ssm.__version__}, "
          f"dtype {args.dtype}\n")

    if "train" in args.sections:
        print(f"### Training (fwd + bwd + AdamW), seq {args.seq_len}\n")
        print("| model | batch | tokens/s | peak GiB |\n|---|---|---|---|")
        for name in args.models:
            for batch in args.batches:
                tps, mem = bench_train(name, batch, args.seq_len, dtype, args.steps)
                print(f"| {name} | {batch} | {fmt(tps)} | {fmt(mem, '.1f')} |", flush=True)
                if tps is None:
                    break
        print()
    if "prefill" in args.sections:
        print("### Prefill (forward, batch 1)\n")
        print("| model | seq | tokens/s | peak GiB |\n|---|---|---|---|")
        for name in args.decode_models or args.models:
            for seq_len in args.prefill_lengths:
                tps, mem = bench_prefill(name, seq_len, dtype)
                print(f"| {name} | {seq_len} | {fmt(tps)} | {fmt(mem, '.1f')} |", flush=True)
        print()
    if "decode" in args.sections:
        print(f"### Decode after a 512-token prompt, {args.new_tokens} new tokens\n")
        print("| model | batch | generate() tokens/s | raw step tokens/s | peak GiB |\n|---|---|---|---|---|")
        for name in args.decode_models or args.models:
            for batch in args.decode_batches:
                gen, raw, mem = bench_decode(name, batch, args.new_tokens, dtype)
                print(f"| {name} | {batch} | {fmt(gen)} | {fmt(raw)} | {fmt(mem, '.1f')} |", flush=True)
        print()


if __name__ == "__main__":
    main()
