"""Tests of pretraining (goom_ssm.train) on CPU with tiny models and the English fixture."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from goom_ssm import train as train_mod  # noqa: E402
from goom_ssm.cli import parse_args  # noqa: E402

TEXT = Path(__file__).parent / "data" / "english.txt"
TINY = ["--hidden-size", "32", "--num-hidden-layers", "2", "--num-state-heads", "2", "--state-size", "8"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run gets its own accelerate state, and --deterministic does not leak into other tests."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    reset_accelerate()
    torch.use_deterministic_algorithms(deterministic)


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def args_for(output_dir, cache_dir, *extra):
    """Byte-level tokens, blocks of 64, 6 sequences per step in micro-batches of 3 (so that
    accumulation spans the end of an epoch: 81 blocks = 27 micro-batches per epoch)."""
    argv = ["--data", str(TEXT), "--tokenizer", "bytes", "--block-size", "64", *TINY,
            "--batch-size", "6", "--micro-batch-size", "3", "--lr", "3e-3", "--num-proc", "1",
            "--cache-dir", cache_dir, "--output-dir", str(output_dir), "--no-progress", "--report-to", "none",
            "--save-every", "0", "--deterministic", *extra]
    return parse_args(["train", *argv])


def log_of(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / train_mod.LOG_FILE).read_text().splitlines()]


def final_state(output_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def test_defaults_are_the_original_recipe():
    args = parse_args(["train", "--data", "x.txt", "--output-dir", "out"])
    assert (args.lr, args.final_lr, args.warmup_steps, args.weight_decay) == (3e-4, 1e-5, 10, 0.1)
    assert (args.base_momentum, args.max_momentum, args.max_grad_norm) == (0.85, 0.99, 1.0)
    assert (args.batch_size, args.block_size, args.tokenizer, args.mixed_precision) == (960, 1024, "gpt2", "auto")


def test_optimizer_groups_and_one_cycle_schedule():
    from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM

    model = GoomSSMForCausalLM(GoomSSMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_state_heads=2, state_size=4))
    args = parse_args(["train", "--data", "x", "--output-dir", "o"])
    optimizer, scheduler = train_mod.build_optimizer_and_schedule(model, args, total_steps=100)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    lrs, betas = [], []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        if len(lrs) < 100:
            scheduler.step()
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(3e-4) and max(lrs) == pytest.approx(3e-4)
    assert lrs[-1] == pytest.approx(1e-5) and betas[0] == pytest.approx(0.99) and betas[9] == pytest.approx(0.85)
    with pytest.raises(ValueError, match="warm-up"):
        train_mod.build_optimizer_and_schedule(model, args, total_steps=3)


def test_loss_decreases_and_final_model_is_saved(tmp_path, cache_dir):
    out = tmp_path / "run"
    args = args_for(out, cache_dir, "--max-steps", "30", "--validation-split", "0.15", "--report-to", "tensorboard")
    result = train_mod.train(args)
    assert result["steps"] == 30 and len(result["losses"]) == 30 and result["tokens_per_second"] > 0
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    # step 1's loss is the untrained model's (about ln 257 = 5.55 for bytes)
    assert abs(result["losses"][0] - math.log(257)) < 0.5
    assert sum(result["losses"][-5:]) / 5 < result["losses"][0] - 0.8
    assert result["eval_loss"] < math.log(257) - 0.5  # held-out paragraphs improve too
    # one-cycle: 1e-5 -> 3e-3 at step 10 -> 1e-5 at the end; beta1 0.99 -> 0.85 -> 0.99
    assert log[0]["lr"] == pytest.approx(1e-5) and log[9]["lr"] == pytest.approx(3e-3)
    assert log[-1]["lr"] == pytest.approx(1e-5) and log[9]["beta1"] == pytest.approx(0.85)
    assert log[-1]["beta1"] == pytest.approx(0.99) and all(r["grad_norm"] > 0 for r in log)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == 257 and model.config.eos_token_id == 256
    ids = torch.tensor([list(b"It was the best of times, it was the worst of times")])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < math.log(257) - 0.5
    assert list((out / "goom-ssm").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    card = (out / "final" / "README.md").read_text()
    assert "| optimizer steps | 30 |" in card and f"cross-entropy {result['eval_loss']:.4f}" in card
    with pytest.raises(FileExistsError, match="--resume"):  # never mixes a new run into an old one
        train_mod.train(args_for(out, cache_dir, "--max-steps", "30"))


@pytest.mark.parametrize("pack", [None, "--pack", "--no-pack"])
def test_documents_are_trained_apart_where_they_are_shorter_than_a_block(tmp_path, cache_dir, capfd, monkeypatch, pack):
    """Blocks of 512 bytes hold several of the fixture's paragraphs: by default (or with
    --pack) every forward gets position_ids that restart at each paragraph; --no-pack runs
    them together. The choice is printed and written into the card."""
    from goom_ssm.modeling import modeling_goom_ssm

    seen = []
    document_starts = modeling_goom_ssm._document_starts
    monkeypatch.setattr(modeling_goom_ssm, "_document_starts",
                        lambda position_ids, *a: seen.append(position_ids is not None) or document_starts(position_ids, *a))
    argv = ["--block-size", "512", "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "4", "--warmup-steps", "2"]
    out = tmp_path / "run"
    train_mod.train(args_for(out, cache_dir, *argv, *([pack] if pack else [])))
    apart = pack != "--no-pack"
    assert seen and all(s == apart for s in seen)
    assert ("packed apart" if apart else "run together") in capfd.readouterr().err
    card = (out / "final" / "README.md").read_text()
    assert ("| documents | packed apart" if apart else "| documents | run together") in card


def test_overwrite_starts_afresh_deleting_only_what_a_run_writes(tmp_path, cache_dir):
    out = tmp_path / "run"
    train_mod.train(args_for(out, cache_dir, "--max-steps", "6", "--save-every", "3"))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exclude each other"):
        train_mod.train(args_for(out, cache_dir, "--max-steps", "4", "--overwrite", "--resume"))
    train_mod.train(args_for(out, cache_dir, "--max-steps", "4", "--overwrite"))
    assert (out / "notes.txt").read_text() == "mine"
    assert [row["step"] for row in log_of(out)] == [1, 2, 3, 4]
    assert train_mod.list_checkpoints(out) == []  # the first run's checkpoint-3 and -6 are gone
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_gives_the_same_losses_and_parameters(tmp_path, cache_dir):
    n = 8  # 2n steps = 32 micro-batches: crosses the end of the first epoch (27) mid-accumulation
    straight = train_mod.train(args_for(tmp_path / "straight", cache_dir, "--max-steps", str(2 * n)))
    out = tmp_path / "resumed"
    first = train_mod.train(args_for(out, cache_dir, "--max-steps", str(2 * n), "--stop-at-step", str(n)))
    assert first["final_dir"] is None and first["losses"] == straight["losses"][:n]
    assert [p.name for p in train_mod.list_checkpoints(out)] == [f"checkpoint-{n}"]
    second = train_mod.train(args_for(out, cache_dir, "--max-steps", str(2 * n), "--resume"))
    assert len(second["losses"]) == n
    assert first["losses"] + second["losses"] == straight["losses"]
    a, b = log_of(tmp_path / "straight"), log_of(out)
    assert [(r["loss"], r["lr"], r["beta1"], r["tokens"]) for r in a] == [(r["loss"], r["lr"], r["beta1"], r["tokens"])
                                                                         for r in b]
    pa, pb = final_state(tmp_path / "straight"), final_state(out)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    # a resumed run must keep the settings that define the data order and the schedule
    with pytest.raises(ValueError, match="max_steps"):
        train_mod.train(args_for(out, cache_dir, "--max-steps", str(3 * n), "--resume", str(out / f"checkpoint-{n}")))


def test_checkpoints_are_written_atomically(tmp_path, cache_dir, monkeypatch):
    from accelerate import Accelerator

    out = tmp_path / "run"
    train_mod.train(args_for(out, cache_dir, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "2"))
    assert [p.name for p in train_mod.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    for ckpt in train_mod.list_checkpoints(out):
        names = {p.name for p in ckpt.iterdir()}
        assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", "config.json"} <= names
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # a checkpoint converts on its own to a save_pretrained folder: the last one is the final model
    exported = train_mod.export_checkpoint(out / "checkpoint-6", tmp_path / "exported")
    weights = final_state(out)
    from safetensors.torch import load_file

    assert load_file(str(exported / "model.safetensors")).keys() == weights.keys()
    assert all(torch.equal(load_file(str(exported / "model.safetensors"))[k], v) for k, v in weights.items())
    with pytest.raises(FileExistsError, match="not empty"):
        train_mod.export_checkpoint(out / "checkpoint-6", tmp_path / "exported")

    # A save that dies half-way leaves no folder named checkpoint-*.
    real_save_state = Accelerator.save_state

    def dying_save_state(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed while saving")

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(Accelerator, "save_state", dying_save_state)
    with pytest.raises(RuntimeError, match="killed"):
        train_mod.train(args_for(crashed, cache_dir, "--max-steps", "6", "--save-every", "3"))
    assert not list(crashed.glob("checkpoint-*")) and (crashed / ".tmp-checkpoint-3").is_dir()
    assert train_mod.list_checkpoints(crashed) == []
    # --resume with no complete checkpoint starts afresh, and replaces the partial folder
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    reset_accelerate()
    result = train_mod.train(args_for(crashed, cache_dir, "--max-steps", "6", "--save-every", "3", "--resume"))
    assert result["steps"] == 6 and [p.name for p in train_mod.list_checkpoints(crashed)] == ["checkpoint-3",
                                                                                             "checkpoint-6"]
    assert not (crashed / ".tmp-checkpoint-3").exists()


def test_saves_leave_the_tied_head_out_silently(tmp_path, cache_dir, caplog, capfd):
    """Checkpoints and the final folder are written with no "Removed shared tensor" notice:
    the head, tied to the embedding, is left out of the weights file (as save_pretrained
    does) rather than removed by accelerate; both load back tied, with the trained values."""
    import logging

    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        train_mod.train(args_for(out, cache_dir, "--max-steps", "6", "--save-every", "3"))
    printed = capfd.readouterr()
    notices = [line for text in (caplog.text, printed.out, printed.err) for line in text.splitlines()
               if "shared tensor" in line]
    assert not notices, notices
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.lm_head.weight.data_ptr() == final.backbone.embeddings.weight.data_ptr()
    expected = {name for name in final.state_dict() if name != "lm_head.weight"}
    for checkpoint in ("checkpoint-3", "checkpoint-6", "final"):
        with safe_open(str(out / checkpoint / "model.safetensors"), "pt") as weights:
            assert set(weights.keys()) == expected, checkpoint
    model = AutoModelForCausalLM.from_config(final.config)
    load_model(model, str(out / "checkpoint-6" / "model.safetensors"))  # as accelerate's load_state does
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    assert all(torch.equal(value, final.state_dict()[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("options, peak_step", [(["--warmup-steps", "4", "--max-steps", "8"], 4),
                                                (["--max-steps", "6"], 3)])  # 10 warm-up steps: at most half
def test_card_states_the_schedule_that_ran(tmp_path, cache_dir, options, peak_step):
    """The card's schedule and batch are those of the run: the step log's learning rates
    start, peak and end where the card says."""
    out = tmp_path / "run"
    train_mod.train(args_for(out, cache_dir, *options))
    log = log_of(out)
    lrs = [record["lr"] for record in log]
    assert max(range(len(lrs)), key=lrs.__getitem__) + 1 == peak_step
    assert lrs[0] == pytest.approx(1e-5) and lrs[peak_step - 1] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(1e-5)
    card = (out / "final" / "README.md").read_text()
    assert (f"| schedule | one-cycle (cosine) over {len(log)} steps: LR 1e-05 at step 1, up to 0.003 at step "
            f"{peak_step}, down to 1e-05 at step {len(log)}; beta1 0.99 -> 0.85 (step {peak_step}) -> 0.99 |") in card
    assert "| global batch | 6 sequences of 64 tokens (micro-batches of 3, 2 accumulated per step) |" in card
    assert "| mixed precision | no (GOOM states in float32) |" in card


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multiprocess_launch_writes_the_final_model(tmp_path, cache_dir):
    """Two CPU processes (DDP over gloo) through ``accelerate launch``; about 10-20 s.

    accelerate's ``--cpu`` launcher starts one process unless MPI is set up, so two CPU
    processes are launched with ``--multi_gpu`` (torchrun); the trainer then selects the
    CPU backend by itself on a host without GPUs.
    """
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    cmd = [*launcher, "-m", "goom_ssm", "train", "--data", str(TEXT), "--tokenizer", "bytes", "--block-size", "64", *TINY,
           "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "6", "--save-every", "3", "--num-proc", "1",
           "--cache-dir", cache_dir, "--output-dir", str(out), "--no-progress", "--report-to", "none", "--cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shared tensor" not in proc.stdout + proc.stderr  # the DDP-wrapped head is left out of checkpoints too
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "config.json").is_file()
    # each process saved its RNG states: two processes really ran
    assert {p.name for p in (out / "checkpoint-6").glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                                     "random_states_1.pkl"}
    log = log_of(out)
    assert len(log) == 6 and log[-1]["tokens"] == 6 * 8 * 64


def test_sequence_parallel_training_equals_one_process(tmp_path, cache_dir):
    """``--sequence-parallel 2``: two CPU processes (gloo) split every sequence of their gathered
    micro-batches of 2 (each a 32-token half of 4 sequences of 64); one process trains on the same
    micro-batches of 4 whole. Losses and final parameters agree to float32 rounding. About 20 s."""
    out = tmp_path / "sp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    common = ["--data", str(TEXT), "--tokenizer", "bytes", "--block-size", "64", *TINY, "--batch-size", "8",
              "--max-steps", "4", "--warmup-steps", "2", "--lr", "3e-3", "--save-every", "0", "--num-proc", "1",
              "--cache-dir", cache_dir, "--no-progress", "--report-to", "none", "--deterministic"]
    cmd = [*launcher, "-m", "goom_ssm", "train", *common, "--micro-batch-size", "2", "--output-dir", str(out), "--cpu",
           "--sequence-parallel", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train_mod.train(parse_args(["train", *common, "--micro-batch-size", "4", "--output-dir", str(tmp_path / "one")]))

    split, whole = log_of(out), log_of(tmp_path / "one")
    assert [r["tokens"] for r in split] == [r["tokens"] for r in whole]
    for a, b in zip(split, whole):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    pa, pb = final_state(out), final_state(tmp_path / "one")
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], msg=lambda m: f"{name}: {m}")


def test_fsdp_configuration_gathers_parameters_in_float32(monkeypatch, tmp_path, cache_dir):
    """Under accelerate's FSDP2 configuration (its environment, as accelerate launch sets it from
    examples/accelerate/fsdp2.yaml) the plugin keeps the configuration's settings, and gathers
    parameters and reduces gradients in float32 (A and the GOOM states stay float32; autocast
    runs the projections in half precision), also after accelerate applies --mixed-precision.
    accelerate runs FSDP on GPUs only: on CPU the trainer refuses the configuration."""
    assert train_mod._fsdp_plugin() is None
    for key, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                       "FSDP_TRANSFORMER_CLS_TO_WRAP": "GoomSSMBlock", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}.items():
        monkeypatch.setenv(key, value)
    plugin = train_mod._fsdp_plugin()
    plugin.set_mixed_precision("bf16")  # what accelerate's state does with --mixed-precision bf16
    policy = plugin.mixed_precision_policy
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["GoomSSMBlock"]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert policy.param_dtype == torch.float32 and policy.reduce_dtype == torch.float32
    if not torch.cuda.is_available():  # where accelerate would fall back to training unsharded, the trainer refuses
        with pytest.raises(ValueError, match="FSDP on GPUs only"):
            train_mod.train(args_for(tmp_path / "run", cache_dir, "--max-steps", "4"))


def test_cuda_graph_is_refused_where_a_step_cannot_be_captured(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="--cuda-graph: it needs CUDA; it takes no gradient scaler.*"
                                         "--base-momentum equal to --max-momentum"):
        train_mod.train(args_for(tmp_path / "run", cache_dir, "--max-steps", "4", "--cpu", "--cuda-graph",
                                 "--mixed-precision", "fp16"))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pack, batch_size", [("--pack", "3"), ("--no-pack", "3"), ("--pack", "6")],
                         ids=["packed", "rows", "packed, two micro-batches a step"])
def test_cuda_graph_training_follows_the_eager_run(tmp_path, cache_dir, pack, batch_size):
    """bf16 on the GPU: the captured steps (whose AdamW reads the schedule as float32 tensors)
    follow the eager run's losses to bf16 rounding, with gradient accumulation too (micro-batches
    of 3), evaluate alike and log the same schedule."""
    common = ["--max-steps", "12", "--batch-size", batch_size, "--mixed-precision", "bf16", "--validation-split",
              "0.15", "--base-momentum", "0.9", "--max-momentum", "0.9", pack]
    eager = train_mod.train(args_for(tmp_path / "eager", cache_dir, *common))
    reset_accelerate()
    graphed = train_mod.train(args_for(tmp_path / "graphed", cache_dir, *common, "--cuda-graph"))
    assert graphed["steps"] == 12 and all(math.isfinite(x) for x in graphed["losses"])
    assert graphed["losses"][0] == eager["losses"][0]  # the warm-up is undone: step 1 sees the initial weights
    assert max(abs(a - b) for a, b in zip(eager["losses"], graphed["losses"])) < 0.05
    assert abs(graphed["eval_loss"] - eager["eval_loss"]) < 0.05
    assert [r["lr"] for r in log_of(tmp_path / "graphed")] == [r["lr"] for r in log_of(tmp_path / "eager")]
