"""Absolute paths of the data files beside this file, for the task YAMLs.

lm-eval hands ``dataset_kwargs`` to ``datasets.load_dataset`` unchanged, and ``datasets``
resolves a relative ``data_files`` path against the current working directory, not against
the YAML file. The YAMLs therefore name their files as ``!function _files.CLOZE``: lm-eval's
YAML loader imports this module (found beside the YAML) and takes the attribute, so the
tasks work from any working directory and wherever the package is installed.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent

CLOZE = str(HERE / "cloze.jsonl")
DOCUMENTS = str(HERE / "documents.jsonl")
