"""Replacing folders atomically: a model or checkpoint folder is written under a temporary
name beside its target and moved into place only when complete."""

import os
import shutil
from pathlib import Path


def move_into_place(staging: os.PathLike, target: os.PathLike) -> Path:
    """Rename the complete folder ``staging`` to ``target`` (same parent folder). An existing
    ``target`` is moved aside first and deleted only after the rename, so that at every
    moment either the old or the new folder is complete."""
    staging, target = Path(staging), Path(target)
    old = target.with_name(f".old-{target.name}")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
