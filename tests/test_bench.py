"""benchmarks/bench.py runs end to end at tiny sizes (on the CPU here): its JSON rows, the
derived columns (MFU, the weight-read bound of decoding), fla's rows skipped with the reason
off CUDA, and the plot mode."""

import json
import warnings

import pytest
import torch

import goom_ssm
from conftest import load_benchmark
from goom_ssm.extras import versions


def load_bench():
    return load_benchmark("bench")


def test_bench_tiny_cpu_run_writes_consistent_rows(tmp_path, monkeypatch):
    bench = load_bench()
    out = tmp_path / "results.json"
    monkeypatch.setattr("sys.argv", [
        "bench.py", "--tiny", "--device", "cpu", "--sections", "train", "decode", "--models", "goom:chunked", "gpt2",
        "gla", "gdn", "--batches", "2", "--seq-len", "16", "--steps", "1", "--decode-batches", "1",
        "--new-tokens", "2", "--prompt-len", "4", "--peak-flops", "1e12", "--bandwidth", "1e11", "--json", str(out),
        "--repeats", "3",
    ])
    torch.manual_seed(0)
    bench.main()
    results = json.loads(out.read_text())
    rows = results["rows"]
    measured = {(r["section"], r["model"]): r for r in rows if "skipped" not in r}
    assert set(measured) == {(s, m) for s in ("train", "decode") for m in ("goom:chunked", "gpt2")}
    assert results["header"] == ("device: cpu, " + ", ".join(f"{p} {v}" for p, v in versions().items())
                                 + f", goom_ssm {goom_ssm.__version__}, dtype bfloat16, tiny models\n"
                                 "bf16 matmul peak 1.0 TFLOP/s (given); bandwidth 0.100 TB/s (given)")
    for model in ("goom:chunked", "gpt2"):
        train, decode = measured["train", model], measured["decode", model]
        assert train["parameters"] == bench.num_parameters(bench.build(model, "cpu", tiny=True))
        assert train["tokens_per_s"] > 0 and len(train["runs_tokens_per_s"]) == 3
        assert train["tokens_per_s"] == sorted(train["runs_tokens_per_s"])[1]
        assert train["spread"] == pytest.approx((max(train["runs_tokens_per_s"]) - min(train["runs_tokens_per_s"]))
                                                / train["tokens_per_s"])
        assert train["mfu"] == pytest.approx(6 * train["parameters"] * train["tokens_per_s"] / 1e12)
        # bf16 weights: two bytes per parameter, read once per step of the whole batch
        assert decode["weight_bytes"] == 2 * train["parameters"]
        assert decode["bound_tokens_per_s"] == pytest.approx(1e11 / decode["weight_bytes"])
        assert decode["raw_tokens_per_s"] > 0
    skipped = {(r["section"], r["model"]): r["skipped"] for r in rows if "skipped" in r}
    assert set(skipped) == {(s, m) for s in ("train", "decode") for m in ("gla", "gdn")}
    assert all("needs CUDA" in reason for reason in skipped.values())


def test_bench_without_peak_or_bandwidth_off_cuda_leaves_mfu_and_bound_out(tmp_path, monkeypatch):
    """On CUDA the run measures both first; elsewhere, not given, there is nothing to take MFU or
    the decode bound against: the rows say None and the header names neither."""
    out = tmp_path / "results.json"
    monkeypatch.setattr("sys.argv", [
        "bench.py", "--tiny", "--device", "cpu", "--sections", "train", "decode", "--models", "goom:chunked",
        "--batches", "2", "--seq-len", "16", "--steps", "1", "--decode-batches", "1", "--new-tokens", "2",
        "--prompt-len", "4", "--json", str(out),
    ])
    load_bench().main()
    results = json.loads(out.read_text())
    train, decode = results["rows"]
    assert train["tokens_per_s"] > 0 and train["mfu"] is None
    assert decode["raw_tokens_per_s"] > 0 and decode["bound_tokens_per_s"] is None
    assert "\n" not in results["header"] and results["settings"]["peak_flops"] is None


def test_bench_refuses_an_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'mamba'"):
        load_bench().build("mamba", "cpu", tiny=True)


def test_bench_plot_mode_writes_a_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    bench = load_bench()
    results = tmp_path / "results.json"
    rows = [dict(section="train", model=m, batch=b, tokens_per_s=1000.0 * b) for m in ("a", "b") for b in (8, 16)]
    rows += [dict(section="decode", model="a", batch=b, generate_tokens_per_s=10.0 * b) for b in (1, 64)]
    results.write_text(json.dumps(dict(header="test", rows=rows)))
    monkeypatch.setattr("sys.argv", ["bench.py", "--plot", str(results)])
    bench.main()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_run_and_plot_in_one_command(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    bench = load_bench()
    out, png = tmp_path / "results.json", tmp_path / "plot.png"
    monkeypatch.setattr("sys.argv", ["bench.py", "--tiny", "--device", "cpu", "--sections", "train", "--models",
                                     "goom:chunked", "--batches", "1", "2", "--seq-len", "8", "--steps", "1",
                                     "--json", str(out), "--png", str(png)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an empty panel's legend: only the training panel is drawn
        bench.main()
    assert [r["batch"] for r in json.loads(out.read_text())["rows"]] == [1, 2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_to_plot_runs_with_no_measured_rows(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(dict(header="test", rows=[dict(section="train", model="gla", skipped="no CUDA")])))
    monkeypatch.setattr("sys.argv", ["bench.py", "--plot", str(results)])
    with pytest.raises(SystemExit, match="nothing to plot"):
        load_bench().main()
    assert not (tmp_path / "results.png").exists()


def test_bench_refuses_a_png_without_json(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench.py", "--tiny", "--device", "cpu", "--png", "plot.png"])
    with pytest.raises(SystemExit):
        load_bench().main()
    assert "--png needs --json" in capsys.readouterr().err


def test_bench_reports_a_failing_row_runs_the_rest_and_exits_with_an_error(tmp_path, monkeypatch):
    bench = load_bench()

    def fake_train(name, batch, *args):
        if name == "gpt2":
            raise RuntimeError("kernel exploded")
        return 1000.0 * batch, 10, None

    monkeypatch.setattr(bench, "bench_train", fake_train)
    out = tmp_path / "results.json"
    monkeypatch.setattr("sys.argv", ["bench.py", "--tiny", "--device", "cpu", "--sections", "train", "--models", "gpt2",
                                     "goom:chunked", "--batches", "1", "2", "--json", str(out)])
    with pytest.raises(SystemExit, match="failed: train gpt2"):
        bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert rows[0] == dict(section="train", model="gpt2", failed="failed: RuntimeError: kernel exploded")
    assert [(r["model"], r["batch"], r["tokens_per_s"]) for r in rows[1:]] == [("goom:chunked", 1, 1000.0),
                                                                              ("goom:chunked", 2, 2000.0)]


def test_bench_plots_the_rows_of_runs_split_over_calls(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    bench = load_bench()
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(dict(header="run 1", rows=[dict(section="train", model="a", batch=b,
                                                                tokens_per_s=1000.0 * b) for b in (8, 16)])))
    second.write_text(json.dumps(dict(header="run 2", rows=[dict(section="train", model="b", batch=b,
                                                                 tokens_per_s=500.0 * b) for b in (8, 16)])))
    lines, original = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *args, **kwargs: lines.append((kwargs["label"], args)) or original(self, *args,
                                                                                                        **kwargs))
    monkeypatch.setattr("sys.argv", ["bench.py", "--plot", str(first), str(second)])
    bench.main()
    assert lines == [("a", ((8, 16), (8000.0, 16000.0))), ("b", ((8, 16), (4000.0, 8000.0)))]
    assert (tmp_path / "first.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_wraps_a_long_header_to_the_figure(tmp_path, monkeypatch):
    """One panel is narrower than a run's header line (device, versions): the title wraps it
    to the figure's width instead of cutting it off at the edges, and keeps every word."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    header = ("device: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, transformers 5.17.0, triton 3.6.0, "
              "flash-linear-attention 0.6.0, goom_ssm 0.1.0, dtype bfloat16\nbandwidth 3.024 TB/s (measured)")
    results = tmp_path / "results.json"
    rows = [dict(section="decode", model="a", batch=b, generate_tokens_per_s=10.0 * b) for b in (1, 64)]
    results.write_text(json.dumps(dict(header=header, rows=rows)))
    titles, original = [], matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, text, **kwargs: titles.append(text) or original(self, text, **kwargs))
    monkeypatch.setattr("sys.argv", ["bench.py", "--plot", str(results)])
    load_bench().main()
    (title,) = titles
    assert max(len(line) for line in title.splitlines()) <= 80 < max(len(line) for line in header.splitlines())
    assert title.split() == header.split()


@pytest.mark.parametrize("spec, reason", [
    ("gpt2:compiled", "unknown option"),  # a misspelt option would otherwise run the eager model
    ("goom:triton:compile:fast", "unknown option"),
    ("goom:triton:hfloss:32", "unknown option"),  # the chunk size comes first
    ("gla:hfloss", "unknown option"),  # GOOM-SSM's own option
    ("goom", "names its scan"),
    ("goom:tritonn", "names its scan"),
    ("mamba", "unknown model"),
])
def test_bench_refuses_a_misspelt_model_spec_before_running(spec, reason, monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(bench, "bench_train", lambda *args: pytest.fail("ran a row"))
    monkeypatch.setattr("sys.argv", ["bench.py", "--tiny", "--device", "cpu", "--sections", "train", "--models",
                                     "goom:chunked", spec])
    with pytest.raises(SystemExit):
        bench.main()
    assert reason in capsys.readouterr().err


def test_bench_model_specs_and_their_options():
    bench = load_bench()
    assert bench.spec_options("goom:chunked:32:compile:hfloss") == ["32", "compile", "hfloss"]
    assert bench.spec_options("gpt2:compile-graphs") == ["compile-graphs"]
    assert bench.spec_options("gdn:graph") == ["graph"]


def test_bench_trains_through_compile_with_cuda_graphs_mode(monkeypatch):
    """``compile-graphs``: torch.compile with mode="reduce-overhead" (CUDA graphs; on the CPU
    Inductor runs without them), ``compile`` the default mode."""
    bench = load_bench()
    modes = []
    monkeypatch.setattr(bench.torch, "compile", lambda model, **kwargs: modes.append(kwargs["mode"]) or model)
    for spec in ("goom:chunked:compile", "goom:chunked:compile-graphs", "gpt2:compile-graphs"):
        bench.training_step(spec, 1, 8, torch.float32, "cpu", tiny=True)
    assert modes == [None, "reduce-overhead", "reduce-overhead"]
