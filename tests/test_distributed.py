"""Multi-process tests on CPU: two processes over gloo, started with torchrun.

- Sequence parallelism (goom_ssm.distributed): tests/sequence_parallel_worker.py, a tiny
  model's logits, loss and every gradient against the single-process run, padded rows included.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``script`` in two CPU processes (torchrun, gloo); fails the test with the output on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def test_sequence_parallel_equals_one_process():
    """About 15 s: float64 states and gradients to float64 rounding, float32 ones as accurate as
    the single-process float32 run, the language model's split batch, shifted labels and loss."""
    proc = torchrun(TESTS / "sequence_parallel_worker.py")
    assert "equal the single-process run" in proc.stdout
