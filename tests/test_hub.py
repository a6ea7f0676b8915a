"""Published folders: remote code that loads without goom-ssm, and the upload command."""

import json
import site
import subprocess
import sys
import venv

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from goom_ssm import GoomSSMForCausalLM
from goom_ssm.cli import main
from goom_ssm.hub import AUTO_MAP, add_remote_code


@pytest.fixture
def published(tmp_path):
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(tiny_config()).eval()
    folder = tmp_path / "published"
    model.save_pretrained(folder)
    add_remote_code(folder)
    ids = torch.tensor([[5, 17, 3, 88]])
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits,
                    "greedy": model.generate(ids, max_new_tokens=6, do_sample=False)}, tmp_path / "expected.pt")
    return folder


def test_remote_code_loads_in_a_fresh_venv_without_goom_ssm(published, tmp_path):
    """A new virtual environment that sees this one's torch and transformers (through a
    path file) but not goom-ssm loads the folder with trust_remote_code=True."""
    env_dir = tmp_path / "fresh-venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    fresh_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    # Plain path entries: the editable-install hook of goom-ssm in those folders is not run.
    (__import__("pathlib").Path(fresh_site) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    script = f"""
import importlib.util, torch
from transformers import AutoModelForCausalLM
assert importlib.util.find_spec("goom_ssm") is None, "goom_ssm is importable"
expected = torch.load({str(tmp_path / 'expected.pt')!r})
model = AutoModelForCausalLM.from_pretrained({str(published)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"])
    assert torch.equal(model.generate(expected["ids"], max_new_tokens=6, do_sample=False), expected["greedy"])
print("remote code OK")
"""
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout


def test_installed_package_is_used_without_trust_remote_code(published):
    assert json.loads((published / "config.json").read_text())["auto_map"] == AUTO_MAP
    model = AutoModelForCausalLM.from_pretrained(published)
    assert type(model) is GoomSSMForCausalLM


class FakeHubApi:
    calls = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, folder_path, repo_id, commit_message):
        files = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, files))
        return "https://huggingface.co/user/model/commit/abc"


def test_push_uploads_a_complete_folder_with_its_remote_code(published, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    FakeHubApi.calls.clear()
    assert main(["push", str(published), "user/model"]) == 0
    assert ("create_repo", "user/model", {"private": False, "exist_ok": True, "repo_type": "model"}) in FakeHubApi.calls
    uploaded = next(c for c in FakeHubApi.calls if c[0] == "upload_folder")[2]
    assert {"config.json", "model.safetensors", "modeling_goom_ssm.py", "configuration_goom_ssm.py"} <= set(uploaded)
    assert "commit" in capsys.readouterr().out


def test_push_refuses_an_incomplete_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "user/model"]) == 2
    assert "missing model.safetensors" in capsys.readouterr().err


def test_the_bundle_defines_every_name_its_modules_import_from_each_other():
    """The bundler drops imports between goom_ssm modules: each imported name must be defined
    in the one file (a name used only on the GPU paths would otherwise fail late, on CUDA)."""
    import ast
    from importlib import resources

    from goom_ssm.hub import _BUNDLED, bundled_modeling_source

    def bound(statements):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                yield node.name
            elif isinstance(node, ast.Assign):
                yield from (t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
                yield node.target.id
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                yield from ((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                yield from bound(node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", []))
            elif isinstance(node, ast.ExceptHandler):
                yield from bound(node.body)

    defined = set(bound(ast.parse(bundled_modeling_source()).body))
    imported = {
        alias.asname or alias.name
        for package, name in _BUNDLED
        for node in ast.walk(ast.parse(resources.files(package).joinpath(name).read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
        for alias in node.names
    }
    assert imported and imported <= defined, sorted(imported - defined)
