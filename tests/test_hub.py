"""Published folders: remote code that loads without goom-ssm, and the upload command."""

import ast
import importlib
import inspect
import json
import site
import subprocess
import sys
import venv
from importlib.util import find_spec, resolve_name
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

from conftest import tiny_config
from goom_ssm import GoomSSMForCausalLM
from goom_ssm.cli import main
from goom_ssm.hub import AUTO_MAP, add_remote_code, flat_source, remote_code_modules

# What remote code may import besides the standard library: goom-ssm's own model dependencies.
REMOTE_CODE_PACKAGES = {"torch", "transformers", "safetensors"}


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


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory):
    """The Python of a new virtual environment that sees this one's torch and transformers
    (through a path file) but not goom-ssm."""
    env_dir = tmp_path_factory.mktemp("fresh-venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    fresh_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    # Plain path entries: the editable-install hook of goom-ssm in those folders is not run.
    (Path(fresh_site) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def run_remote(python, folder, tmp_path, body, block_triton=False, auto_class="AutoModelForCausalLM"):
    """Run ``body`` in ``python`` after loading ``folder`` as ``model`` with transformers' ``auto_class``
    and trust_remote_code=True (checking that goom_ssm is not importable there); returns its standard output."""
    script = "\n".join([
        "import importlib.util, json, sys, torch",
        'sys.modules["triton"] = None  # as if Triton were not installed' if block_triton else "",
        f"from transformers import {auto_class}",
        'assert importlib.util.find_spec("goom_ssm") is None, "goom_ssm is importable"',
        f"model = {auto_class}.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()",
        'assert type(model).__module__.startswith("transformers_modules"), type(model).__module__',
        body,
    ])
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("block_triton", [False, True], ids=["with-triton", "without-triton"])
def test_remote_code_loads_in_a_fresh_venv_without_goom_ssm(published, fresh_python, tmp_path, block_triton):
    """The remote model gives the installed model's logits and greedy continuation, with Triton
    and, through the remote modules' CPU-only imports, without it."""
    body = f"""
expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"])
    assert torch.equal(model.generate(expected["ids"], max_new_tokens=6, do_sample=False), expected["greedy"])
package = type(model).__module__.rpartition(".")[0]
print("remote code OK, HAS_TRITON", sys.modules[package + ".triton_scan"].HAS_TRITON)
"""
    has_triton = find_spec("triton") is not None and not block_triton
    output = run_remote(fresh_python, published, tmp_path, body, block_triton)
    assert f"remote code OK, HAS_TRITON {has_triton}" in output


def module_constants(module) -> dict:
    """``{name: repr(value)}`` of a module's global names bound to numbers, strings or tuples of them."""
    def literal(value):
        return isinstance(value, (int, float, str)) or isinstance(value, tuple) and all(map(literal, value))

    return {name: repr(value) for name, value in vars(module).items() if not name.startswith("__") and literal(value)}


def test_remote_modules_bind_the_installed_modules_constants(published, fresh_python, tmp_path):
    """Each remote module holds the launch settings and other constants of the installed module it
    was made from (one file for all modules let a later ``NUM_WARPS`` replace an earlier one)."""
    body = inspect.getsource(module_constants) + """
package = type(model).__module__.rpartition(".")[0]
print(json.dumps({name.rpartition(".")[2]: module_constants(module)
                  for name, module in sys.modules.items() if name.startswith(package + ".")}))
"""
    remote = json.loads(run_remote(fresh_python, published, tmp_path, body))
    assert set(remote) == {path.stem for path in published.glob("*.py")}
    for name, module in remote_code_modules().items():
        assert remote[name[:-3]] == module_constants(importlib.import_module(module)), name


def test_the_folder_holds_one_file_per_module_reachable_by_relative_imports(published):
    """Exactly the files that transformers' loader reaches from the auto_map files, each the
    installed module of its name, and every module a bundled module imports is bundled."""
    modules = remote_code_modules()
    auto_map_files = {reference.split(".")[0] + ".py" for reference in AUTO_MAP.values()}
    reachable = auto_map_files | {Path(file).name for name in auto_map_files
                                  for file in get_relative_import_files(published / name)}
    assert {path.name for path in published.glob("*.py")} == reachable == set(modules)
    for name, module in modules.items():
        assert name == module.rpartition(".")[2] + ".py"
        for node in ast.walk(ast.parse(Path(find_spec(module).origin).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = resolve_name("." * node.level + node.module, module.rpartition(".")[0])
                assert modules.get(target.rpartition(".")[2] + ".py") == target, (module, target)


def test_relative_imports_in_the_folder_name_files_in_it(published):
    for path in published.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and (published / f"{node.module}.py").is_file(), (path.name, node.lineno)


def test_remote_files_need_no_package_but_torch_transformers_and_safetensors(published):
    """transformers' check_imports refuses a remote file importing a missing package outside
    try blocks: Triton must stay optional."""
    for path in published.glob("*.py"):
        extra = set(get_imports(path)) - set(sys.stdlib_module_names) - REMOTE_CODE_PACKAGES
        assert not extra, (path.name, extra)


def test_flat_source_changes_only_the_relative_imports():
    for module in remote_code_modules().values():
        original = ast.parse(Path(find_spec(module).origin).read_text())
        for node in ast.walk(original):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = resolve_name("." * node.level + node.module, module.rpartition(".")[0])
                node.level, node.module = 1, target.rpartition(".")[2]
        assert ast.dump(ast.parse(flat_source(module))) == ast.dump(original), module


def write_package(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_flat_source_rewrites_every_form_of_relative_import(tmp_path, monkeypatch):
    source = ('s = "é"; from ..a import X\n'
              "from . c import (Y,  # the one\n"
              "    Z)\n"
              "if X:\n"
              "    from ..a import X as W\n")
    write_package(tmp_path, {"flatpkg/__init__.py": "", "flatpkg/a.py": "X = 1\n", "flatpkg/deep/__init__.py": "",
                             "flatpkg/deep/b.py": source, "flatpkg/deep/c.py": "Y = Z = 2\n",
                             "flatpkg/deep/d.py": "from . import c\n"})
    monkeypatch.syspath_prepend(tmp_path)
    rewritten = flat_source("flatpkg.deep.b")
    assert rewritten.startswith("# Generated by goom_ssm.hub from flatpkg.deep.b")
    assert rewritten.endswith('s = "é"; from .a import X\n'
                              "from .c import (Y,  # the one\n"
                              "    Z)\n"
                              "if X:\n"
                              "    from .a import X as W\n")
    assert remote_code_modules(["flatpkg.deep.b"]) == {
        "b.py": "flatpkg.deep.b", "a.py": "flatpkg.a", "c.py": "flatpkg.deep.c"}
    with pytest.raises(ValueError, match="from . import"):
        remote_code_modules(["flatpkg.deep.d"])


def test_two_modules_for_one_file_name_are_refused(tmp_path, monkeypatch):
    write_package(tmp_path, {"clashpkg/__init__.py": "", "clashpkg/util.py": "", "clashpkg/sub/__init__.py": "",
                             "clashpkg/sub/util.py": "",
                             "clashpkg/root.py": "from .util import x\nfrom .sub.util import y\n"})
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(ValueError, match="would both be written to util.py"):
        remote_code_modules(["clashpkg.root"])


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
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, files))
        return "https://huggingface.co/user/model/commit/abc"


def test_push_uploads_a_complete_folder_with_its_remote_code(published, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    FakeHubApi.calls.clear()
    assert main(["push", str(published), "user/model"]) == 0
    assert ("create_repo", "user/model", {"private": False, "exist_ok": True, "repo_type": "model"}) in FakeHubApi.calls
    uploaded = next(c for c in FakeHubApi.calls if c[0] == "upload_folder")[2]
    assert {"config.json", "model.safetensors", *remote_code_modules()} <= set(uploaded)
    assert "commit" in capsys.readouterr().out


def test_push_refuses_an_incomplete_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "user/model"]) == 2
    assert "missing model.safetensors" in capsys.readouterr().err
