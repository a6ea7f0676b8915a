"""The ``goom-ssm`` command line as a user meets it: its exit status and its one-line messages
(no tracebacks, no warnings), and what it leaves on disk. The real entry point runs in a
subprocess where the process matters (what it imports, a package hidden from it, the
installed console script, one failing model load end to end); other commands run
``main`` in this process, with the warnings and log records a terminal would show."""

import logging
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE_DIR
from goom_ssm.cli import DEFAULT_MODEL_DIR, main

GOOM_SSM = shutil.which("goom-ssm", path=str(Path(sys.executable).parent))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def run(*args, cwd=None, python_prelude=None):
    """Run ``goom-ssm ARGS`` (or, with ``python_prelude``, the same entry point after that Python
    code, e.g. to hide an installed package); returns the completed process."""
    if python_prelude is None:
        command = [GOOM_SSM, *map(str, args)]
    else:
        code = f"import sys\n{python_prelude}\nfrom goom_ssm.cli import main\nsys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def call(capfd, *args):
    """``main(ARGS)`` in this process, as :func:`run` reports it: the exit status, stdout, and
    stderr followed by the warnings and log records (warning and above) that a fresh Python
    would have printed there; ``capfd``: the test's fixture."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(), logging.getLogger("transformers")]  # transformers' does not propagate
    for logger in loggers:
        logger.addHandler(handler)
    capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # Python's default filters: shown once, these four ignored
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            returncode = main(list(map(str, args)))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    out, err = capfd.readouterr()
    err += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    err += "".join(f"{record.getMessage()}\n" for record in records)
    return subprocess.CompletedProcess(["goom-ssm", *map(str, args)], returncode, out, err)


def assert_user_error(result, *fragments):
    """Exit status 2 and, after any progress bars, one line on stderr naming the problem."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    *before, last = [line for line in result.stderr.splitlines() if line.strip()]
    assert all(line.endswith("it/s]") for line in before), result.stderr
    assert last.startswith("goom-ssm "), result.stderr
    for fragment in fragments:
        assert fragment in last, last
    assert "weights_only=False" not in result.stderr


def test_help_imports_neither_optional_packages_nor_the_model():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "goom_ssm", "--help"], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "convert-original" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    for heavy in ("triton", "datasets", "lm_eval", "peft", "accelerate", "onnx", "transformers.modeling_utils",
                  "goom_ssm.modeling.modeling_goom_ssm", "goom_ssm.layers"):
        assert heavy not in imported, heavy
    assert "goom_ssm.cli" in imported  # the check reads the right output


def test_import_defers_the_model_classes_until_a_config_is_made():
    code = (
        "import sys, goom_ssm\n"
        "assert 'transformers.modeling_utils' not in sys.modules and 'goom_ssm.layers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        "config = goom_ssm.GoomSSMConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_state_heads=2,"
        " state_size=4)\n"
        "print(type(AutoModelForCausalLM.from_config(config)).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "GoomSSMForCausalLM"


def test_subcommand_help_names_the_command():
    result = run("perplexity", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: goom-ssm perplexity")


def test_missing_model_folders_and_files_are_named(tmp_path, capfd):
    missing = tmp_path / "no-such-model"
    assert_user_error(call(capfd, "demo", "--model", missing), "no model folder at", str(missing))
    assert_user_error(call(capfd, "export-original", missing, tmp_path / "x.pt"), "no model folder at", str(missing))
    assert_user_error(call(capfd, "perplexity", missing, DEFAULT_MODEL_DIR / "README.md"), "no model folder at")
    assert_user_error(call(capfd, "perplexity", DEFAULT_MODEL_DIR, tmp_path / "missing.txt"), "text file not found",
                      "missing.txt")
    assert_user_error(call(capfd, "perplexity", tmp_path, DEFAULT_MODEL_DIR / "README.md"), "has no config.json")


def test_bad_model_files_and_checkpoints_are_named(tmp_path, converted_tiny_dir, capfd):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(converted_tiny_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_user_error(call(capfd, "export-original", corrupt, tmp_path / "x.pt"), "model.safetensors")
    text = tmp_path / "notes.txt"
    text.write_text("KING HENRY.\nMy lords,\n")
    assert_user_error(call(capfd, "convert-original", text, tmp_path / "out"),
                      "not a readable PyTorch checkpoint of tensors")
    # A folder without tokenizer files: named, with the way out (not "install sentencepiece").
    assert_user_error(call(capfd, "perplexity", converted_tiny_dir, text), "has no tokenizer files", "--tokenizer")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    # The installed console script, end to end: it loads the shipped model and tokenizer, then stops.
    assert_user_error(run("perplexity", DEFAULT_MODEL_DIR, empty), "nothing to score")


def test_missing_extras_name_the_extra_to_install(tmp_path):
    hide = "sys.modules['{}'] = None  # as if it were not installed"
    result = run("train", "--data", DEFAULT_MODEL_DIR / "README.md", "--output-dir", tmp_path / "run",
                 python_prelude=hide.format("datasets"))
    assert_user_error(result, "datasets", "pip install 'goom-ssm[data]'")
    result = run("lm-eval", "--tasks", "x", python_prelude=hide.format("lm_eval"))
    assert_user_error(result, "lm_eval", "pip install 'goom-ssm[eval]'")


def test_outputs_get_the_usual_permissions_and_no_stray_files(tmp_path, capfd):
    old_umask = os.umask(0o022)
    try:
        assert main(["convert-original", str(REFERENCE_DIR / "original_tiny.pt"), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "hf" / "model.safetensors").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging folder left

    (tmp_path / "out").mkdir()
    assert_user_error(call(capfd, "export-original", tmp_path / "hf", tmp_path / "out", "--overwrite"), "is a folder")
    assert list((tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]

    # --overwrite of a folder says that it deletes everything in it.
    result = call(capfd, "convert-original", REFERENCE_DIR / "original_tiny.pt", tmp_path / "hf")
    assert_user_error(result, "not empty", "deleting every file in it")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-original", "--help"])
    assert exit_info.value.code == 0 and "deleting every file" in " ".join(capfd.readouterr().out.split())


def test_push_leaves_the_local_folder_as_it_was(tmp_path, monkeypatch, converted_tiny_dir):
    import huggingface_hub

    uploaded = {}

    class FakeHubApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, folder_path, repo_id, commit_message):
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
            return "https://huggingface.co/user/model/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    folder = tmp_path / "model"
    shutil.copytree(converted_tiny_dir, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["push", str(folder), "user/model"]) == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert "modeling_goom_ssm.py" in uploaded and b"auto_map" in uploaded["config.json"]


def test_generate_refuses_badly_shaped_prompts_and_masks(tiny_model):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"input_ids must have shape \[batch, seq_len\], got \(3,\)"):
        tiny_model.generate(ids[0], max_new_tokens=2)
    for shape in ((1, 2), (1, 5), (2, 3)):
        with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
            tiny_model.generate(ids, attention_mask=torch.ones(shape, dtype=torch.long), max_new_tokens=2)
        with pytest.raises(ValueError, match="attention_mask must have shape"):
            tiny_model(ids, attention_mask=torch.ones(shape, dtype=torch.long))
