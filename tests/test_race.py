"""The learning-efficiency race script (benchmarks/race.py) in its tiny CPU mode, its
held-out scoring, and the corpus extractors on small made-up inputs."""

import gzip
import importlib.util
import io
import json
import math
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_benchmark
from goom_ssm import corpus
from goom_ssm.constants import ENDOFTEXT_ID

race = load_benchmark("race")

TEXT = Path(__file__).parent / "data" / "english.txt"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two sources of GPT-2 ids: the English fixture's paragraphs, and The Tempest's
    (large enough for 1% of it to fill held-out blocks of 32 tokens)."""
    from goom_ssm.conversion.tokenizer import gpt2_tiktoken_encoding

    encoding = gpt2_tiktoken_encoding()
    sources = []
    for name, path in (("english", TEXT), ("tempest", corpus.HELD_OUT_TEXT)):
        paragraphs = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        sources.append(({"name": name}, encoding.encode_ordinary_batch(paragraphs)))
    out = tmp_path_factory.mktemp("race_data")
    race.write_data(out, sources)
    return out


def test_split_and_archive_round_trip(data_dir):
    """Documents end with <|endoftext|>; the last 1% of each source is held out; the ids read
    back are those written (sha256-checked)."""
    train, valid = race.split_tokens([[1, 2, 3]] * 50)
    assert train + valid == [1, 2, 3, ENDOFTEXT_ID] * 50 and len(valid) == 2
    train_ids, valid_ids, manifest = race.load_data(data_dir)
    assert [s["name"] for s in manifest["sources"]] == ["english", "tempest"]
    assert len(train_ids) == manifest["train_tokens"] == sum(s["train_tokens"] for s in manifest["sources"])
    assert len(valid_ids) == manifest["valid_tokens"] and train_ids.max() <= ENDOFTEXT_ID
    (data_dir / "corrupt").mkdir()
    race.write_ids(data_dir / "corrupt" / "ids.xz", np.arange(5))
    with pytest.raises(ValueError, match="sha256"):
        race.read_ids(data_dir / "corrupt" / "ids.xz", "0" * 64)


def test_tiny_race_on_cpu(data_dir, tmp_path, capsys):
    """GOOM-SSM and GPT-2 train on the same blocks for the same tokens; the fla rows are
    skipped with the reason where fla or CUDA is missing; the models come back as float32
    folders (the float16 copies) with their step logs and tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    race.main(["run", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--tokens", "512",
               "--batch-size", "4", "--block-size", "32", "--warmup-steps", "2", "--lr", "3e-3", "--evals", "2",
               "--eval-batch-size", "8", "--heldout-tokens", "200", "--device", "cpu"])
    results = json.loads((out / "race.json").read_text())
    expected = ["goom-ssm", "gpt2"] + ([] if race.fla_available() else ["gla", "gated-deltanet"])
    assert list(results["models"]) == expected and not results["failed"]
    from importlib.metadata import version

    modules = {"triton": "triton", "flash-linear-attention": "fla"}  # the optional packages the run names
    installed = {p: version(p) for p, module in modules.items() if importlib.util.find_spec(module) is not None}
    assert results["versions"] == {"torch": torch.__version__, "transformers": version("transformers"), **installed}
    if race.fla_available():
        assert set(results["skipped"]) == {"gla", "gated-deltanet"}
        assert race.fla_available() in capsys.readouterr().out
    for record in results["models"].values():
        curve = record["curve"]
        assert record["steps"] == 4 and record["tokens"] == 512 and not record["stopped_early"]
        assert [p["tokens"] for p in curve] == [0, 256, 512]
        assert curve[-1]["loss"] < curve[0]["loss"]
        assert set(record["heldout_perplexity"]) == {"the-tempest", "sotu-2016"}
    assert set(results["unigram_perplexity"]) == {"the-tempest", "sotu-2016"}
    assert (out / "race.png").is_file() or importlib.util.find_spec("matplotlib") is None

    race.main(["unpack", str(out), "--dest", str(tmp_path / "models")])
    for name in ("goom-ssm", "gpt2"):
        folder = tmp_path / "models" / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert all(p.dtype == torch.float32 and torch.equal(p, p.half().float()) for p in model.parameters())
        log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, 5))
        assert AutoTokenizer.from_pretrained(folder).encode("Hello world") == [15496, 995]
    with pytest.raises(ValueError, match="warm-up"):
        race.main(["run", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--tokens", "256",
                   "--batch-size", "4", "--block-size", "32", "--warmup-steps", "2", "--device", "cpu"])
    with pytest.raises(FileExistsError):
        race.main(["unpack", str(out), "--dest", str(tmp_path / "models")])
    race.main(["evaluate", "--data", str(data_dir), "--block-size", "32", "--heldout-tokens", "200", str(tmp_path / "models" / "gpt2")])
    assert "| gpt2 (" in capsys.readouterr().out


def test_window_scoring_scores_each_token_once():
    """Sliding-window NLL equals the full forward pass while the text fits one window, and
    the sum of per-token NLLs with the windows' contexts otherwise."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=ENDOFTEXT_ID + 1, n_positions=16, n_embd=16, n_layer=1,
                                       n_head=2)).eval()
    ids = torch.randint(0, 1000, (40,)).tolist()
    full = [ENDOFTEXT_ID, *ids[:10]]
    with torch.no_grad():
        expected = float(model(torch.tensor([full]), labels=torch.tensor([full])).loss) * 10
    assert race.window_nll(model, ids[:10], 16) == pytest.approx(expected, rel=1e-5)
    sequence = [ENDOFTEXT_ID, *ids]
    manual = 0.0
    with torch.no_grad():
        for position in range(1, len(sequence)):
            end = min(((position - 1) // 8 + 1) * 8 + 1, len(sequence))  # the window that scores it
            begin = max(0, end - 16)
            logits = model(torch.tensor([sequence[begin:end]])).logits[0, position - 1 - begin]
            manual -= float(torch.log_softmax(logits, -1)[sequence[position]])
    assert race.window_nll(model, ids, 16) == pytest.approx(manual, rel=1e-5)


def test_unigram_perplexity():
    train = np.array([0, 0, 1])
    vocab = race.GPT2_VOCAB_SIZE
    expected = math.exp(-(math.log(3 / (3 + vocab)) + math.log(1 / (3 + vocab))) / 2)
    assert race.unigram_perplexity(train, [0, 5]) == pytest.approx(expected)


def _deb(files: dict[str, bytes]) -> bytes:
    """A Debian package (ar archive) whose data.tar.gz holds ``files``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", b"x"), ("data.tar.gz", buffer.getvalue())]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    return out


def test_deb_members_and_extractors(tmp_path):
    """Files of a .deb by pattern; SWORD zText blocks decoded in order without markup or
    notes; WordNet synset lines as "words: gloss"; the held-out texts left out."""
    verses = ['<title type="main">Genesis</title><div type="x-p"/>In the beginning<note>a note</note> God',
              ' created &amp; saw.<div type="x-p"/>']
    blocks, index = b"", b""
    for verse in verses:
        block = zlib.compress(verse.encode())
        index += struct.pack("<III", len(blocks), len(block), len(verse.encode()))
        blocks += block
    wordnet = (b"  1 This software and database is being provided\n"
               b"00001740 03 n 02 big_cat 0 cat(a) 0 000 | a feline; \"the cat sat\"  \n")
    files = {"usr/share/m/ot.bzs": index, "usr/share/m/ot.bzz": blocks, "usr/share/m/nt.bzs": index,
             "usr/share/m/nt.bzz": blocks, "usr/share/wordnet/data.noun": wordnet,
             "usr/share/doc/j/jargon.txt.gz": gzip.compress(b"hack\n"), "usr/share/other": b"x"}
    path = tmp_path / "p.deb"
    path.write_bytes(_deb(files))
    assert set(corpus._members(path, r"usr/share/m/.*")) == {f"usr/share/m/{t}.bz{x}" for t in ("ot", "nt") for x in "sz"}
    bible = corpus._sword_ztext(corpus._members(path, r"usr/share/m/.*"))
    assert bible == [("ot", "Genesis\nIn the beginning God created & saw.\n"),
                     ("nt", "Genesis\nIn the beginning God created & saw.\n")]
    assert corpus._wordnet_glosses(corpus._members(path, r".*/data\.noun")) == [
        ("data.noun", 'big cat, cat: a feline; "the cat sat"\n')]
    assert corpus._gzipped_files(corpus._members(path, r".*\.gz")) == [("jargon.txt", "hack\n")]
    texts = {"x/2016_barack_obama_d.txt": b"held out", "x/2015_barack_obama_d.txt": b" kept \r\n"}
    assert corpus._state_of_the_union(texts) == [("2015_barack_obama_d", "kept\n")]
    assert corpus.MODERN_HELD_OUT_TEXT.read_text(encoding="utf-8").startswith("Thank you. Mr. Speaker")


def _race_json(folder: Path, models: dict, **settings) -> Path:
    """A ``race.json`` of a run that raced ``models`` (name: final loss), tiny race settings."""
    base = {key: 1 for key in race.RACE_SETTINGS}
    results = {"settings": {**base, **settings}, "data": {"train_tokens": 10}, "device": "cpu", "heldout_blocks": 2,
               "versions": {"torch": "x"}, "skipped": {"gla": "no CUDA device"}, "failed": {},
               "unigram_perplexity": {"the-tempest": 9.0, "sotu-2016": 8.0},
               "models": {name: {"parameters": 100, "tokens": 64, "train_seconds": 1.0, "tokens_per_second": 64.0,
                                 "final_heldout_loss": loss, "curve": [{"tokens": 0, "seconds": 0.0, "loss": 5.0},
                                                                       {"tokens": 64, "seconds": 1.0, "loss": loss}]}
                          for name, loss in models.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "race.json").write_text(json.dumps(results))
    return folder / "race.json"


def test_report_combines_runs_of_one_race(tmp_path, capsys):
    """Models raced in separate calls make one table (and plot); a model skipped in one run and
    raced in another is not reported skipped; runs of another race or a model twice are refused."""
    first = _race_json(tmp_path / "a", {"goom-ssm": 4.5, "gpt2": 4.8})
    second = _race_json(tmp_path / "b", {"gla": 4.6})
    combined = race.combine([first, second])
    assert list(combined["models"]) == ["goom-ssm", "gpt2", "gla"] and combined["skipped"] == {}
    png = tmp_path / "race.png"
    race.main(["report", str(first), str(second)] + (["--png", str(png)] if importlib.util.find_spec("matplotlib") else []))
    out = capsys.readouterr().out
    assert "| gla | 100 |" in out and "| goom-ssm | 100 |" in out
    assert png.is_file() or importlib.util.find_spec("matplotlib") is None
    with pytest.raises(ValueError, match="--batch-size 2 differs"):
        race.combine([first, _race_json(tmp_path / "c", {"gla": 4.6}, batch_size=2)])
    with pytest.raises(ValueError, match="'gpt2' is in an earlier file"):
        race.combine([first, _race_json(tmp_path / "d", {"gpt2": 4.6})])
