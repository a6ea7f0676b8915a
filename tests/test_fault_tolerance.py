"""Training killed with SIGKILL at a random moment and resumed ends exactly like an
uninterrupted run (deterministic mode); a kill never leaves a checkpoint that loads wrong."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("datasets")

TEXT = Path(__file__).parent / "data" / "english.txt"
STEPS = 40


def command(output_dir, cache_dir, *extra):
    return [sys.executable, "-m", "goom_ssm", "train", "--data", str(TEXT), "--tokenizer", "bytes", "--block-size", "64",
            "--hidden-size", "32", "--num-hidden-layers", "2", "--num-state-heads", "2", "--state-size", "8",
            "--batch-size", "6", "--micro-batch-size", "3", "--lr", "3e-3", "--num-proc", "1", "--cache-dir",
            str(cache_dir), "--output-dir", str(output_dir), "--no-progress", "--report-to", "none", "--deterministic",
            "--max-steps", str(STEPS), "--save-every", "2", "--seed", "0", "--cpu", *extra]


ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def losses(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run re-logs the steps after its checkpoint


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    subprocess.run(command(straight, cache), env=ENV, check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    kill_after = random.Random(os.getpid()).randint(3, STEPS - 12)  # a random step: mid-step or mid-save
    process = subprocess.Popen(command(killed, cache), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = killed / "train_log.jsonl", time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"

    subprocess.run(command(killed, cache, "--resume"), env=ENV, check=True, capture_output=True, timeout=300)
    assert losses(killed) == losses(straight)
    a, b = load_file(str(straight / "final" / "model.safetensors")), load_file(str(killed / "final" / "model.safetensors"))
    max_difference = max((a[k] - b[k]).abs().max().item() for k in a)
    assert max_difference == 0.0
    for checkpoint in killed.glob("checkpoint-*"):  # every complete checkpoint is loadable
        assert torch.isfinite(load_file(str(checkpoint / "model.safetensors"))["backbone.norm_f.weight"]).all()
