"""GPU time of one single-token decoding step of the 124M model, replayed from a CUDA graph.

Rows (bf16 weights, float32 states, at each --batches): the 24 layers' fused kernels alone,
as the package launches them (with programmatic dependent launch, PDL, on Hopper and later;
for one sequence, each program's weights read before the wait for the previous kernel, and
sums of products), without PDL (``goom_ssm.triton_decode._dependent_launch`` patched to
False), and for one sequence with the tensor-core blocks that more sequences use, the weights
read after the wait (``PREFETCH_MAX_ROWS`` patched to 0); and the
whole step of ``generate()``'s decoder (embedding, layers, final LayerNorm, head). Each
figure is the fastest of five timings of --replays replays.

``--variant`` (repeatable) compares launch settings in the same run: each is one or more
``NAME=VALUE`` (separated by ``;``) of the module constants of ``goom_ssm.triton_decode``
(``PREFETCH_LAUNCH``, ``BLOCK_LAUNCH``, ``PREFETCH_MAX_ROWS``, ...), values as Python literals;
a second table gives the layers and the whole step with the package's settings and with
each variant's, at each batch.

    python benchmarks/decode_step.py                # on a CUDA GPU
    python benchmarks/decode_step.py --batches 1 --variant 'PREFETCH_LAUNCH={"input": (32, 8), "output": (8, 4), "head": (16, 4)}'
"""

import argparse
import ast
import time
from unittest import mock

import torch

from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM
from goom_ssm import triton_decode
from goom_ssm.modeling.cuda_graph_goom_ssm import CUDAGraphDecoder, capture_graph
from goom_ssm.scan import ScaledRows


def replay_microseconds(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        timings.append((time.perf_counter() - start) / replays * 1e6)
    return min(timings)


def layers_graph(model, batch: int) -> torch.cuda.CUDAGraph:
    """A graph of the layers' fused step (:func:`goom_ssm.triton_decode.decode_step` per layer)."""
    config = model.config
    hidden = torch.randn(batch, 1, config.hidden_size, device="cuda", dtype=model.dtype)
    states = [ScaledRows(torch.zeros(batch, config.num_state_heads, 1, device="cuda"),
                         torch.full((batch, config.num_state_heads, config.state_size), 0.1, device="cuda"))
              for _ in model.backbone.layers]

    def step():
        h = hidden
        for layer, state in zip(model.backbone.layers, states):
            h, _ = layer.fused_decode_step(h, state)
        return h

    return capture_graph(step)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--replays", type=int, default=300)
    parser.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME=VALUE[;...]",
                        help="launch settings to compare (module constants of goom_ssm.triton_decode); repeatable")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_step.py needs a CUDA GPU")
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(GoomSSMConfig()).cuda().eval().to(torch.bfloat16)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, 124M, bf16\n")
    print("| batch | layers | layers, no PDL | layers, tensor-core blocks for one sequence | whole step (decoder) |\n"
          "|---|---|---|---|---|")
    for batch in args.batches:
        with torch.no_grad():
            default = replay_microseconds(layers_graph(model, batch), args.replays)
            with mock.patch.object(triton_decode, "_dependent_launch", lambda device: False):
                no_pdl = replay_microseconds(layers_graph(model, batch), args.replays)
            blocks = "-"  # the weights are read before the wait for one sequence only
            if batch <= triton_decode.PREFETCH_MAX_ROWS:
                with mock.patch.object(triton_decode, "PREFETCH_MAX_ROWS", 0):
                    blocks = f"{replay_microseconds(layers_graph(model, batch), args.replays):,.1f} us"
            decoder = CUDAGraphDecoder(model, batch)
            whole = replay_microseconds(decoder.graph, args.replays)
        print(f"| {batch} | {default:,.1f} us | {no_pdl:,.1f} us | {blocks} | {whole:,.1f} us |", flush=True)
    if args.variant:
        print("\n| batch | settings | layers | whole step (decoder) |\n|---|---|---|---|")
        for batch in args.batches:
            for name, settings in [("the package's", {})] + [(describe(v), v) for v in args.variant]:
                with mock.patch.multiple(triton_decode, **settings), torch.no_grad():
                    layers = replay_microseconds(layers_graph(model, batch), args.replays)
                    whole = replay_microseconds(CUDAGraphDecoder(model, batch).graph, args.replays)
                print(f"| {batch} | {name} | {layers:,.1f} us | {whole:,.1f} us |", flush=True)


def parse_variant(text: str) -> dict:
    """``"NAME=VALUE;NAME=VALUE"`` -> ``{NAME: value}``: constants of ``goom_ssm.triton_decode``
    (upper-case names it defines), values as Python literals."""
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name.isupper() or not hasattr(triton_decode, name):
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=VALUE for a constant of goom_ssm.triton_decode")
        try:
            settings[name] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"{item!r}: the value is not a Python literal") from None
    if not settings:
        raise argparse.ArgumentTypeError("an empty variant")
    return settings


def describe(settings: dict) -> str:
    return "; ".join(f"`{name} = {value!r}`" for name, value in settings.items())


if __name__ == "__main__":
    main()
