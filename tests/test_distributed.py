"""Multi-process tests on CPU: two processes over gloo, started with torchrun.

One launch of tests/distributed_worker.py checks both:

- Sequence parallelism (goom_ssm.distributed; the checks of tests/sequence_parallel_worker.py):
  a tiny model's logits, loss and every gradient against the single-process run, padded rows included.
- FSDP2: torch's ``fully_shard`` per ``GoomSSMBlock`` on CPU (accelerate runs FSDP on GPUs
  only), training, a sharded checkpoint's resume, and the export of accelerate's sharded
  checkpoint layout to a ``save_pretrained`` folder.

(``goom-ssm train --sequence-parallel`` through ``accelerate launch``: tests/test_train.py.)
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


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """One launch of tests/distributed_worker.py (about 40 s): its output and output folder."""
    out = tmp_path_factory.mktemp("distributed")
    return torchrun(TESTS / "distributed_worker.py", str(out)).stdout, out


def test_sequence_parallel_equals_one_process(workers):
    """float64 states and gradients to float64 rounding, float32 ones as accurate as the
    single-process float32 run, the language model's split batch, shifted labels and loss."""
    assert "sequence parallel: logits, loss and gradients equal the single-process run" in workers[0]


def test_fsdp2_training_resume_and_export(workers):
    """Losses and parameters after 3 AdamW steps equal the single-process run's to float32
    rounding; the last step resumed from a sharded checkpoint is bit for bit the same; the
    exported folder holds the trained weights."""
    output, out = workers
    assert "resume and export exact" in output
    assert (out / "exported" / "config.json").is_file()


@pytest.mark.parametrize("name, parameters", [("goom-ssm-350m", 353.7e6), ("goom-ssm-1.3b", 1311.2e6)])
def test_preset_configurations_have_their_documented_sizes(name, parameters):
    """The presets for `goom-ssm train --config` (GPT-2 vocabulary, tied head): sizes as the README states."""
    import json

    import torch

    from goom_ssm.modeling import GoomSSMConfig, GoomSSMForCausalLM

    config = json.loads((TESTS.parent / "examples" / "accelerate" / f"{name}.json").read_text())
    with torch.device("meta"):
        model = GoomSSMForCausalLM(GoomSSMConfig(**config))
    assert config["num_state_heads"] * config["state_size"] == config["hidden_size"]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=1e-3)
