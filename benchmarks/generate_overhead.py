"""What generate() does per new token beyond the model's own decoding step (greedy, with a cache).

Counts, per token, the torch operations (each one a kernel launch on a GPU) and host
synchronisations (``_local_scalar_dense``: ``.item()``, ``bool(tensor)``) of ``generate()`` and of a
plain loop of single-token forwards with an argmax, and their CPU time; the difference is
generate()'s overhead. Per-token figures are differences between a long and a short run, so
the prompt's forward and generate()'s set-up cancel out. The counts are exact; the times need a
quiet machine.

    python benchmarks/generate_overhead.py            # a tiny model on the CPU
    python benchmarks/generate_overhead.py --device cuda --hidden-size 768 --layers 12
"""

import argparse
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM
from goom_ssm.modeling.cache_goom_ssm import CACHE_NAME


class CountOps(TorchDispatchMode):
    """Counts the aten operations run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--tokens", nargs=2, type=int, default=[16, 144], help="new tokens of the short and long runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each length (the fastest counts)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)  # the CPU time is then the time of the one thread doing the work
    config = GoomSSMConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers)
    model = GoomSSMForCausalLM(config).to(args.device).eval()
    prompt = torch.randint(0, args.vocab_size, (args.batch, 32), device=args.device)

    def generate(n):
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def step_loop(n):
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        for _ in range(n):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=out[CACHE_NAME], use_cache=True)

    def seconds(fn, n):
        fn(n)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            start = time.process_time() if args.device == "cpu" else time.perf_counter()
            fn(n)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.process_time() if args.device == "cpu" else time.perf_counter()) - start)
        return min(times)

    def per_token(fn):
        short, long = args.tokens
        fn(short)  # warm-up (on CUDA: the decoder's graph is captured)
        with CountOps() as before:
            fn(short)
        with CountOps() as after:
            fn(long)
        ops = {k: (after.counts[k] - before.counts[k]) / (long - short) for k in after.counts}
        return ops, (seconds(fn, long) - seconds(fn, short)) / (long - short)

    gen_ops, gen_s = per_token(generate)
    step_ops, step_s = per_token(step_loop)
    clock = "CPU" if args.device == "cpu" else "wall"
    print(f"per token ({args.device}, batch {args.batch}, hidden {args.hidden_size}, {args.layers} layers):")
    print("| | torch ops | host syncs | us (" + clock + ") |\n|---|---|---|---|")
    for name, ops, s in (("generate()", gen_ops, gen_s), ("step loop", step_ops, step_s)):
        print(f"| {name} | {sum(ops.values()):.0f} | {ops.get('_local_scalar_dense', 0):.0f} | {s * 1e6:.0f} |")
    extra = {k: gen_ops.get(k, 0) - step_ops.get(k, 0) for k in sorted(set(gen_ops) | set(step_ops))}
    print("generate() less the step loop, ops per token:", {k: round(v, 2) for k, v in extra.items() if v})


if __name__ == "__main__":
    main()
