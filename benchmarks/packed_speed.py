"""Training speed with packed documents (position_ids that restart at 0 per document) against
the same rows unpacked, in one run on one GPU: the 124M GOOM-SSM on its default CUDA path
(the fused training layer), bf16 autocast, fwd + bwd + AdamW.

    python benchmarks/packed_speed.py --batch 8 --seq-len 1024 --mean-document 300 --rounds 3
    python benchmarks/packed_speed.py --cuda-graph   # both settings as captured steps (goom_ssm.graphed_step)

Each round times both settings one after the other (unpacked first, then packed), so drifts of
the host hit both; the table gives every round and the ratio of the medians.
"""

import argparse
import statistics
import time

import torch

from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM


def document_positions(batch: int, seq_len: int, mean_document: float) -> torch.Tensor:
    """``position_ids [batch, seq_len]`` of rows packed with documents of geometric lengths
    (mean ``mean_document``; the last one of a row cut at its end), from torch's global generator."""
    lengths = torch.distributions.Geometric(probs=torch.tensor(1 / mean_document))
    rows = []
    for _ in range(batch):
        positions, filled = [], 0
        while filled < seq_len:
            length = min(int(lengths.sample()) + 1, seq_len - filled)
            positions.append(torch.arange(length))
            filled += length
        rows.append(torch.cat(positions))
    return torch.stack(rows)


def tokens_per_second(model, optimizer, ids, position_ids, steps: int, graphed: bool = False) -> float:
    """Training tokens/s over ``steps`` steps after two (the first captures, with ``graphed``)."""
    if graphed:
        from goom_ssm.graphed_step import GraphedTrainingStep

        captured = GraphedTrainingStep(model, optimizer, autocast_dtype=torch.bfloat16)

        def step():
            captured(ids, ids, position_ids)
    else:
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, position_ids=position_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return ids.numel() * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--mean-document", type=float, default=300.0, help="mean packed document length in tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cuda-graph", action="store_true", help="time captured steps (AdamW capturable=True)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(GoomSSMConfig()).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5,
                                  **({"capturable": True} if args.cuda_graph else {"fused": True}))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device="cuda")
    position_ids = document_positions(args.batch, args.seq_len, args.mean_document).cuda()
    documents = int((position_ids == 0).sum())
    rounds = []
    for _ in range(args.rounds):
        rounds.append((tokens_per_second(model, optimizer, ids, None, args.steps, args.cuda_graph),
                       tokens_per_second(model, optimizer, ids, position_ids, args.steps, args.cuda_graph)))
    path = "captured steps (CUDA graphs)" if args.cuda_graph else "default CUDA path"
    print(f"GOOM-SSM 124M, {path}, bf16, batch {args.batch} x {args.seq_len}, "
          f"{documents} packed documents (mean {args.batch * args.seq_len / documents:.0f} tokens), "
          f"{args.steps} steps per setting and round, {torch.cuda.get_device_name()}")
    print("| round | unpacked tok/s | packed tok/s | packed / unpacked |")
    print("|---|---|---|---|")
    for i, (plain, packed) in enumerate(rounds, 1):
        print(f"| {i} | {plain:,.0f} | {packed:,.0f} | {packed / plain:.3f} |")
    plain, packed = (statistics.median(r[k] for r in rounds) for k in (0, 1))
    print(f"| median | {plain:,.0f} | {packed:,.0f} | {packed / plain:.3f} |")


if __name__ == "__main__":
    main()
