"""What one dependency between phases of GPU work costs (for the decoding kernels' design):
``python benchmarks/phase_latency.py`` prints a table (needs a CUDA GPU; PDL needs Hopper or later).

(a) a chain of launches, each waiting for the previous (PDL: griddepcontrol), replayed from a CUDA graph;
(b) the same without PDL;
(c) one launch whose programs pass a grid-wide barrier (atomic counter; spin on volatile loads) between phases.
Each phase: every program reads a vector, adds, writes it back (trivial work). P programs, N phases.
"""
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _hop(x_ptr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


@triton.jit
def _barriers(x_ptr, counter_ptr, phases, BLOCK: tl.constexpr):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    for phase in range(phases):
        # read a neighbour's block written in the previous phase
        other = ((pid + 1) % programs) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + other, volatile=True)
        tl.store(x_ptr + offs, v + 1.0)
        tl.debug_barrier()
        target = (phase + 1) * programs
        tl.atomic_add(counter_ptr, 1, sem="release")
        seen = tl.load(counter_ptr, volatile=True)
        while seen < target:
            seen = tl.load(counter_ptr, volatile=True)
        tl.atomic_add(counter_ptr, 0, sem="acquire")
        tl.debug_barrier()


def replay_us(graph, n=200):
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main():
    if not torch.cuda.is_available():
        raise SystemExit("phase_latency.py times kernels on a CUDA GPU; none is available")
    BLOCK, N = 256, 72
    print("| programs | PDL chain us/hop | plain chain us/hop | grid barrier us/phase |\n|---|---|---|---|")
    for P in (24, 72, 96, 132):
        x = torch.zeros(P * BLOCK, device="cuda")
        rows = []
        for pdl in (True, False):
            _hop[(P,)](x, BLOCK=BLOCK, PDL=pdl, launch_pdl=pdl)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(N):
                    _hop[(P,)](x, BLOCK=BLOCK, PDL=pdl, launch_pdl=pdl)
            rows.append(replay_us(g) / N)
        counter = torch.zeros(1, dtype=torch.int32, device="cuda")

        def barrier_run():
            counter.zero_()
            _barriers[(P,)](x, counter, N, BLOCK=BLOCK, num_warps=4)

        barrier_run()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            barrier_run()
        rows.append(replay_us(g) / N)
        print(f"| {P} | {rows[0]:.2f} | {rows[1]:.2f} | {rows[2]:.2f} |")


if __name__ == "__main__":
    main()
