"""Replacing folders atomically: a model or checkpoint folder is written under a temporary
name beside its target and moved into place only when complete."""

import os
import shutil
import uuid
from pathlib import Path


def make_staging_folder(target: os.PathLike) -> Path:
    """A new empty folder beside ``target`` (created with its parents) to write into before
    :func:`move_into_place`. Made with ``os.mkdir``, so it gets the usual permissions (the
    umask's), as the folder ``save_pretrained`` would make, not ``tempfile``'s owner-only ones."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial")
    staging.mkdir()
    return staging


def _give_usual_permissions(folder: Path) -> None:
    """Make ``folder`` and everything in it readable as the umask allows (some writers, e.g.
    transformers' ``save_pretrained`` of weights, create owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def move_into_place(staging: os.PathLike, target: os.PathLike) -> Path:
    """Rename the complete folder ``staging`` to ``target`` (same parent folder), with the
    usual permissions. An existing ``target`` is moved aside first and deleted only after the
    rename, so that at every moment either the old or the new folder is complete."""
    staging, target = Path(staging), Path(target)
    _give_usual_permissions(staging)
    old = target.with_name(f".old-{target.name}")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
