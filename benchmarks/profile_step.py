"""Where the time of a training step or a decoding step goes, from a torch.profiler trace.

Per step: the wall time, the time the GPU was busy (the union of its kernels' intervals),
the GPU's idle share of the wall time (gaps between kernels: the host, or launch latency,
holding the GPU back), and the kernels launched; then the kernels that take the most GPU
time. On the CPU (no kernels) the same figures are over the top-level operators: the idle
share is then the host's time outside them (Python).

    python benchmarks/profile_step.py --section train --model goom:triton --batch 8    # on a CUDA GPU
    python benchmarks/profile_step.py --section decode --batch 1 --trace decode.json  # + a Chrome trace
    python benchmarks/profile_step.py --tiny --device cpu --model goom:chunked        # the CPU check

Models are ``bench.py``'s specs (``goom:triton``, ``goom:triton:graph``, ``gpt2``, ...); a
training step is ``bench.py``'s (fwd + bwd + AdamW, bf16 autocast), a decoding step one
token through the model with its cache after a --prompt-len prompt (through the CUDA-graph
decoder where the model has one).
"""

import argparse
import time
from collections import defaultdict
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile

from bench import build, check_specs, synchronize, training_step
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME


class Interval(NamedTuple):
    name: str
    start: float  # microseconds
    end: float


class Summary(NamedTuple):
    wall_us: float  # per step
    busy_us: float  # per step: the union of the intervals
    idle_share: float  # 1 - busy / wall
    launches: float  # intervals per step
    top: list  # (name, total microseconds per step, calls per step), most time first


def summarise(intervals: list, steps: int, wall_us: float, top: int = 15) -> Summary:
    """Per-step figures of ``intervals`` (kernels, or operators) traced over ``steps`` steps
    that took ``wall_us`` microseconds in all."""
    busy, reach = 0.0, float("-inf")
    for interval in sorted(intervals, key=lambda i: i.start):
        if interval.end > reach:
            busy += interval.end - max(interval.start, reach)
            reach = interval.end
    per_name = defaultdict(lambda: [0.0, 0])
    for interval in intervals:
        per_name[interval.name][0] += interval.end - interval.start
        per_name[interval.name][1] += 1
    ranked = sorted(per_name.items(), key=lambda item: -item[1][0])[:top]
    return Summary(wall_us / steps, busy / steps, 1 - busy / wall_us, len(intervals) / steps,
                   [(name, total / steps, calls / steps) for name, (total, calls) in ranked])


def traced_intervals(prof, device: str) -> list:
    """The GPU kernels of the trace on CUDA (not the spans that ``record_function`` marks on
    the GPU's timeline, such as the optimizer's step); elsewhere its top-level operators."""
    if device == "cuda":
        return [Interval(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    return host_intervals(prof)


def host_intervals(prof) -> list:
    """The trace's top-level operators on the host (their time includes their callees')."""
    return [Interval(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]


def decoding_step(name, batch, prompt_len, dtype, device, tiny):
    """``(model, step)``: a function that feeds the next token of every sequence to model
    ``name`` (eval, in ``dtype``) with its cache, after a random prompt ``[batch, prompt_len]``."""
    model = build(name, device, tiny, positions=prompt_len + 1024).eval().to(dtype)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step():
        nonlocal cache, token
        out = model(input_ids=token, use_cache=True, **{CACHE_NAME: cache})
        cache, token = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)

    return model, step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["train", "decode"], default="train")
    parser.add_argument("--model", default="goom:triton", help="a bench.py model spec")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024, help="training sequence length")
    parser.add_argument("--prompt-len", type=int, default=512, help="decoding: the prompt before the steps")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after three untraced ones)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (a quick check, e.g. on CPU)")
    parser.add_argument("--trace", help="also write the Chrome trace here")
    parser.add_argument("--operators", type=int, default=0, metavar="N",
                        help="also list the N operators (by input shapes) whose own kernels take the most GPU time")
    parser.add_argument("--host-operators", type=int, default=0, metavar="N",
                        help="also the host's time in top-level operators (the rest of the wall time is "
                             "Python between them) and the N operators that take the most host time of their own")
    args = parser.parse_args()
    check_specs(parser, [args.model])
    device, dtype = args.device, getattr(torch, args.dtype)
    if args.section == "train":
        _, step = training_step(args.model, args.batch, args.seq_len, dtype, device, args.tiny)
        what = f"training step, batch {args.batch} x {args.seq_len}"
    else:
        _, step = decoding_step(args.model, args.batch, args.prompt_len, dtype, device, args.tiny)
        what = f"decoding step, batch {args.batch}, after {args.prompt_len} tokens"
    for _ in range(3):  # kernels built, graphs captured, allocations made
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=args.operators > 0 or args.host_operators > 0) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    if args.trace:
        prof.export_chrome_trace(args.trace)
    summary = summarise(traced_intervals(prof, device), args.steps, wall_us)
    units = "kernels" if device == "cuda" else "top-level operators"
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"{args.model}, {what}, {args.dtype}{', tiny' if args.tiny else ''}, on {name} "
          f"({args.steps} steps, profiler on)\n")
    print(f"| per step | wall | {units} busy | idle share | {units} |\n|---|---|---|---|---|")
    print(f"| | {summary.wall_us:,.0f} us | {summary.busy_us:,.0f} us | {summary.idle_share:.1%} | "
          f"{summary.launches:,.0f} |\n")
    print(f"| {units[:-1]} | us per step | calls per step |\n|---|---|---|")
    for kernel, us, calls in summary.top:
        print(f"| {kernel[:90]} | {us:,.1f} | {calls:g} |")
    if args.operators:
        own = "own kernels' us" if device == "cuda" else "own us"
        print(f"\n| operator | input shapes | {own} per step | calls per step |\n|---|---|---|---|")
        for operator, shapes, us, calls in top_operators(prof, device == "cuda", args.steps, args.operators):
            print(f"| {operator} | {shapes[:120]} | {us:,.1f} | {calls:g} |")
    if args.host_operators:
        host = summarise(host_intervals(prof), args.steps, wall_us)
        print(f"\nHost: {host.busy_us:,.0f} us per step in {host.launches:,.0f} top-level operators, "
              f"{host.idle_share:.1%} of the wall time outside them")
        print("\n| operator | input shapes | own host us per step | calls per step |\n|---|---|---|---|")
        for operator, shapes, us, calls in top_operators(prof, False, args.steps, args.host_operators):
            print(f"| {operator} | {shapes[:120]} | {us:,.1f} | {calls:g} |")


def top_operators(prof, gpu: bool, steps: int, count: int) -> list:
    """``(name, input shapes, microseconds per step, calls per step)`` of the ``count`` operators,
    told apart by their inputs' shapes, that take the most time of their own (not their
    callees'): their kernels' GPU time with ``gpu``, else their host time."""
    def own(average):
        return average.self_device_time_total if gpu else average.self_cpu_time_total

    averages = sorted((a for a in prof.key_averages(group_by_input_shape=True) if own(a) > 0), key=lambda a: -own(a))
    return [(a.key, str(a.input_shapes), own(a) / steps, a.count / steps) for a in averages[:count]]


if __name__ == "__main__":
    main()
