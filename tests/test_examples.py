"""The example scripts of the original paper's tasks (``examples/``), at tiny sizes on CPU: each
learns its task well above what the same model scores untrained (``--steps 0``). Also their
shared training pieces (``examples/example_utils.py``) and the checks of their options."""

import importlib
import json
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_MODEL = ["--device", "cpu", "--hidden-size", "32", "--num-layers", "2", "--state-heads", "2", "--state-size", "16"]


@pytest.fixture
def examples(monkeypatch):
    """Import an example script by name (the scripts import ``example_utils`` from their folder)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module


COPY = TINY_MODEL + ["--num-symbols", "5", "--alphabet", "8", "--batch-size", "16", "--eval-size", "128"]


def test_copy_memory_recalls_after_training(examples, tmp_path):
    out = tmp_path / "copy.json"
    results = examples("copy_memory").main(COPY + ["--delays", "10", "--steps", "60", "--gpt2-context", "0",
                                                   "--out", str(out)])
    (run,) = results["runs"]
    assert (run["model"], run["delay"]) == ("GOOM-SSM", 10)
    assert run["accuracy"] > 0.6  # chance: 1/8
    assert len(run["losses"]) == 60 and run["losses"][-1] < 0.5 * run["losses"][0]
    assert json.loads(out.read_text()) == results


def test_copy_memory_untrained_is_at_chance_and_gpt2_runs_where_it_fits(examples, tmp_path):
    # The script's model sizes (GPT-2's width moves in steps of 4: the tiny model's count is 10% off).
    argv = ["--device", "cpu", "--num-symbols", "5", "--batch-size", "16", "--eval-size", "128"]
    results = examples("copy_memory").main(argv + ["--delays", "4", "30", "--steps", "0", "--gpt2-context", "32",
                                                   "--out", str(tmp_path / "copy.json")])
    runs = {(run["model"], run["delay"]): run for run in results["runs"]}
    # 4 + 2 * 5 tokens fit GPT-2's 32 positions, 30 + 2 * 5 do not.
    assert set(runs) == {("GOOM-SSM", 4), ("GPT-2", 4), ("GOOM-SSM", 30)}
    assert all(run["accuracy"] < 0.25 and run["losses"] == [] for run in runs.values())
    goom, gpt2 = runs[("GOOM-SSM", 4)], runs[("GPT-2", 4)]
    assert abs(gpt2["parameters"] - goom["parameters"]) < 0.1 * goom["parameters"]
    assert gpt2["position_parameters"] > 0 and goom["position_parameters"] == 0


DIGITS = TINY_MODEL + ["--batch-size", "32", "--samples", "16"]


def test_digits_generation_beats_the_pixel_histogram(examples, tmp_path):
    pytest.importorskip("sklearn")
    digits = examples("digits")
    trained = digits.main(DIGITS + ["--tasks", "generation", "--steps", "80", "--out", str(tmp_path / "gen.json")])
    untrained = digits.main(DIGITS + ["--tasks", "generation", "--steps", "0", "--out", str(tmp_path / "gen0.json")])
    generation = trained["generation"]
    assert generation["bits_per_pixel"] < generation["histogram_bits_per_pixel"]
    assert untrained["generation"]["bits_per_pixel"] > generation["histogram_bits_per_pixel"]
    samples = generation["samples"]
    assert len(samples) == 16 and all(0 <= value <= 16 for image in samples for row in image for value in row)
    if generation["samples_png"] is not None:
        assert Path(generation["samples_png"]) == tmp_path / "gen.png" and (tmp_path / "gen.png").stat().st_size > 0


def test_digits_classification_learns(examples, tmp_path):
    pytest.importorskip("sklearn")
    digits = examples("digits")
    trained = digits.main(DIGITS + ["--tasks", "classification", "--steps", "80", "--out", str(tmp_path / "c.json")])
    untrained = digits.main(DIGITS + ["--tasks", "classification", "--steps", "0", "--out", str(tmp_path / "c0.json")])
    assert trained["classification"]["accuracy"] > 0.5  # chance: 0.1
    assert untrained["classification"]["accuracy"] < 0.3
    assert "generation" not in trained


def tiny_goom_ssm():
    from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM

    torch.manual_seed(0)
    return GoomSSMForCausalLM(GoomSSMConfig(vocab_size=10, hidden_size=16, num_hidden_layers=2, num_state_heads=2,
                                            state_size=8))


def test_parameter_groups_decay_what_the_models_own_groups_decay(examples):
    model = tiny_goom_ssm()
    groups = examples("example_utils").parameter_groups(model, 0.1, transition_lr_scale=0.5)
    decayed = lambda groups: {id(p) for group in groups if group["weight_decay"] for p in group["params"]}  # noqa: E731
    assert decayed(groups) == decayed(model.get_param_groups(0.1))
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    (scaled,) = [group for group in groups if group.get("lr_scale", 1.0) != 1.0]
    assert {id(p) for p in scaled["params"]} == {id(layer.ssm.A) for layer in model.backbone.layers}


def test_transition_lr_scale_scales_the_whole_schedule(examples):
    """At scale 0 the transition matrices keep their values (no step, no weight decay) all through
    the one-cycle schedule, which would otherwise reset their learning rate at every step."""
    model = tiny_goom_ssm()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 10, (4, 12))
    examples("example_utils").train(model, lambda: model(input_ids=ids, labels=ids).loss, steps=6, lr=1e-2,
                                    bf16=False, label="tiny", transition_lr_scale=0.0)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == name.endswith("ssm.A"), name


@pytest.mark.parametrize("script, argv, message", [
    ("copy_memory", ["--delays", "0"], "--delays must be positive"),
    ("copy_memory", ["--steps", "2"], "--steps must be 0"),
    ("copy_memory", ["--alphabet", "1"], "--alphabet must be at least 2"),
    ("digits", ["--eval-size", "361"], "--eval-size must be between 1 and 360"),
    ("digits", ["--lr", "0"], "--lr must be positive"),
    ("digits", ["--device", "nonsense"], "is not a device"),
])
def test_bad_options_are_named(examples, tmp_path, capsys, script, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        examples(script).main(["--device", "cpu", "--out", str(tmp_path / "r.json")] + argv)  # a later option wins
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
