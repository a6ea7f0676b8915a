"""The README's main job: the shipped model generates text and beats a unigram model on held-out text."""

import json
import re

from goom_ssm.cli import DEFAULT_MODEL_DIR, main

UNIGRAM_PERPLEXITY = 1343.4  # add-one unigram of the training tokens on the held-out play (see the model card)


def test_demo_generates_and_reports_held_out_perplexity(capsys):
    assert main(["demo", "--max-new-tokens", "30"]) == 0
    out = capsys.readouterr().out
    generated = out.split("\n\n")[1]
    assert generated.startswith("KING HENRY.\nMy lords,") and len(generated) > len("KING HENRY.\nMy lords,") + 10
    perplexity = float(re.search(r"held out from training\): ([\d.]+)", out).group(1))
    assert perplexity < UNIGRAM_PERPLEXITY / 3


def test_shipped_model_folder_is_complete_and_small():
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "goom_ssm" and config["vocab_size"] == 50257
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 60e6  # float32: 4 bytes x 14.8M parameters
    card = (DEFAULT_MODEL_DIR / "README.md").read_text()
    assert "140.4" in card and "1343.4" in card and "tokens seen" in card


def test_readme_quick_start_runs_as_written_from_another_directory(tmp_path):
    """The README's Quick start, run from a directory that is not the repository."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("KING HENRY.\nMy lords,") and "<|endoftext|>" not in result.stdout
    assert len(result.stdout) > len("KING HENRY.\nMy lords,") + 20
