"""transformers' own common test mixins, taken from the source distribution of the installed release.

The mixins (``ModelTesterMixin``, ``ConfigTester``) are not in the transformers wheel; its
source distribution on PyPI holds ``tests/test_modeling_common.py`` and
``tests/test_configuration_common.py`` but not three modules they import. Those are written
here as stated below, never taken from elsewhere:

- ``tests/generation/test_utils.py`` (``GenerationTesterMixin``): this project's own
  generation conformance tests, :class:`generation_conformance.GenerationConformanceMixin`.
- ``tests/exporters/test_export.py`` (``ExportTesterMixin``, a base of ``ModelTesterMixin``):
  empty; the model's ``torch.export`` is tested in ``test_hf_common.py``.
- ``tests/utils/test_configuration_utils.py`` (``config_common_kwargs``): the common
  ``PretrainedConfig`` fields with non-default values, for ``ConfigTester``.

The tree is unpacked once per release into ``.transformers_tests/<version>/`` at the
repository root (ignored by git) and imported as the package ``transformers_tests_<version>``.
"""

import importlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parent.parent / ".transformers_tests"
VERSION = transformers.__version__
PACKAGE = "transformers_tests_" + VERSION.replace(".", "_").replace("-", "_")

_WRITTEN_HERE = {
    "generation/test_utils.py": (
        '"""Written by goom-ssm\'s tests/transformers_tests.py: not in the transformers sdist."""\n'
        "from generation_conformance import GenerationConformanceMixin as GenerationTesterMixin  # noqa: F401\n"
    ),
    "exporters/test_export.py": (
        '"""Written by goom-ssm\'s tests/transformers_tests.py: not in the transformers sdist."""\n\n\n'
        "class ExportTesterMixin:\n"
        '    """Empty: goom-ssm tests torch.export of its model itself (tests/test_hf_common.py)."""\n'
    ),
    "utils/test_configuration_utils.py": (
        '"""Written by goom-ssm\'s tests/transformers_tests.py: not in the transformers sdist."""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "dtype": "float16",\n'
        '    "tie_word_embeddings": False,\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["GoomSSMForCausalLM"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        '    "bos_token_id": 2,\n'
        '    "eos_token_id": 3,\n'
        '    "pad_token_id": 4,\n'
        '    "finetuning_task": "translation",\n'
        "}\n"
    ),
}


def _download_sdist(target: Path) -> Path:
    """The sdist of the installed release, fetched with pip from the package index."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
         f"transformers=={VERSION}", "-d", str(target)],
        check=True,
    )
    (sdist,) = target.glob("transformers-*.tar.gz")
    return sdist


def _unpack_tests(sdist: Path, folder: Path) -> None:
    """``tests/`` of ``sdist`` into ``folder``, as a package (every directory gets an ``__init__.py``)."""
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 2 and parts[1] == "tests" and member.isfile():
                destination = folder.joinpath(*parts[2:])
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(archive.extractfile(member).read())
    for relative, text in _WRITTEN_HERE.items():
        path = folder / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()


def load(module: str):
    """``tests.<module>`` of the installed transformers release (downloaded and unpacked on first use)."""
    base = ROOT / VERSION
    folder = base / PACKAGE
    if not (folder / "test_modeling_common.py").exists():
        with tempfile.TemporaryDirectory() as download:
            staging = Path(download) / PACKAGE
            _unpack_tests(_download_sdist(Path(download)), staging)
            base.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.move(staging, folder)
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))
    return importlib.import_module(f"{PACKAGE}.{module}")
