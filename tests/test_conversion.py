"""Original checkpoints to Hugging Face folders and back, and refusals of bad input."""

import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REFERENCE_DIR
from goom_ssm.cli import main
from goom_ssm.conversion.original import CheckpointError, convert_original_checkpoint, original_to_hf

ORIGINAL = REFERENCE_DIR / "original_tiny.pt"


def original_state_dict():
    return torch.load(ORIGINAL, weights_only=True)


def test_command_line_converts_and_exports_back_exactly(tmp_path, capsys):
    assert main(["convert-original", str(ORIGINAL), str(tmp_path / "hf")]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (1000, 64, 3)
    assert (config.num_state_heads, config.state_size) == (4, 8)
    assert config.bos_token_id is None and config.eos_token_id is None  # not a GPT-2 vocabulary
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "original_tiny.pt" in card and "| 3 |" in card

    assert main(["export-original", str(tmp_path / "hf"), str(tmp_path / "back.pt")]) == 0
    back, source = torch.load(tmp_path / "back.pt", weights_only=True), original_state_dict()
    assert list(back) == list(source)
    for name in source:
        assert back[name].dtype == source[name].dtype and torch.equal(back[name], source[name]), name


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "goom_ssm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert-original" in result.stdout
    script = shutil.which("goom-ssm", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script is not None


def test_compiled_and_ddp_prefixes_are_accepted(tmp_path):
    for prefix in ("_orig_mod.", "module."):
        torch.save({prefix + k: v for k, v in original_state_dict().items()}, tmp_path / "wrapped.pt")
        convert_original_checkpoint(tmp_path / "wrapped.pt", tmp_path / prefix.strip("._"))


def corrupt(kind):
    sd = original_state_dict()
    if kind == "unknown":
        sd["res_layers.0.extra.weight"] = torch.zeros(3)
    elif kind == "missing":
        del sd["res_layers.1.ssm_over_gooms.C"]
    elif kind == "shape":
        sd["res_layers.2.ssm_over_gooms.B"] = torch.zeros(64, 31)
    elif kind == "untied":
        sd["head.weight"] = sd["head.weight"] + 1
    elif kind == "buffer":
        sd["res_layers.0.ssm_over_gooms.log_I"] = torch.zeros(4, 4, dtype=torch.complex64)
    elif kind == "nan":
        sd["res_layers.0.ssm_over_gooms.A"] = sd["res_layers.0.ssm_over_gooms.A"].clone()
        sd["res_layers.0.ssm_over_gooms.A"][0, 0] = float("nan")
    return sd


@pytest.mark.parametrize("kind, match", [
    ("unknown", "unknown keys.*extra"), ("missing", "missing keys.*ssm_over_gooms.C"),
    ("shape", r"B has shape \(64, 31\), expected \(64, 32\)"), ("untied", "head.weight differs"),
    ("buffer", "log_I differs"), ("nan", "inf or NaN"),
])
def test_inconsistent_checkpoints_are_refused(kind, match):
    with pytest.raises(CheckpointError, match=match):
        original_to_hf(corrupt(kind))


def test_files_that_are_not_checkpoints_are_refused(tmp_path, capsys):
    (tmp_path / "noise.pt").write_bytes(b"\x00not a checkpoint" * 100)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ORIGINAL.read_bytes()[:100_000])
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"embed.weight": torch.zeros(3, 4)}, tmp_path / "partial.pt")
    for name, match in [("noise.pt", "not a readable"), ("truncated.pt", "not a readable"),
                        ("list.pt", "expected a state dict"), ("partial.pt", "is missing"), ("absent.pt", "no such")]:
        assert main(["convert-original", str(tmp_path / name), str(tmp_path / ("out_" + name))]) == 2
        err = capsys.readouterr().err
        assert match in err, (name, err)
        assert not (tmp_path / ("out_" + name)).exists()


def test_existing_output_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["convert-original", str(ORIGINAL), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["convert-original", str(ORIGINAL), str(out), "--overwrite"]) == 0
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    (tmp_path / "exists.pt").write_bytes(b"old")
    assert main(["export-original", str(out), str(tmp_path / "exists.pt")]) == 2
    assert (tmp_path / "exists.pt").read_bytes() == b"old"


def test_gpt2_vocabulary_checkpoints_get_tokenizer_files(tmp_path):
    """A checkpoint with the GPT-2 vocabulary converts to a folder AutoTokenizer loads."""
    from transformers import AutoTokenizer

    sd = original_state_dict()
    torch.manual_seed(0)
    embed = torch.randn(50257, 64) * 0.02
    sd["embed.weight"] = sd["head.weight"] = embed
    torch.save(sd, tmp_path / "gpt2vocab.pt")
    convert_original_checkpoint(tmp_path / "gpt2vocab.pt", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.eos_token_id == 50256
