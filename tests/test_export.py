"""Deployment export of the plain forward pass (input ids and padding mask -> logits, no cache):
``torch.export`` and ONNX (the dynamo exporter, run in onnxruntime), with a dynamic batch and
sequence length, checked at other batches and lengths than the example inputs'."""

import numpy as np
import pytest
import torch

from conftest import random_scan_case, tiny_config
from goom_ssm import GoomSSMForCausalLM
from goom_ssm.naive import naive_scan
from goom_ssm.scan import ScaledRows, chunk_plan, normalize_rows, scaled_powers, stepwise_scan

# (batch, length) pairs other than the example inputs' (2, 20): lengths below, between and at
# multiples of the CPU chunk size (8), so that no chunking the export might have fixed can hold.
SHAPES = [(1, 1), (3, 7), (2, 37), (1, 64)]
# float32: the exported graphs step through the sequence (the eager model runs chunks), so they
# round differently; both are this close to the float64 logits (about 2 in magnitude).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GoomSSMForCausalLM(tiny_config(use_cache=False)).eval()


def padded_inputs(batch: int, length: int, seed: int = 0) -> dict:
    """Token ids and a padding mask: the first sequence left-padded, the second right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, : length // 3] = 0
    if batch > 1:
        mask[1, length - length // 4 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def eager_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits


def test_chunk_levels_hold_the_running_maximum_of_the_power_scales():
    """``within_log_scale`` (built without ``torch.cummax``, which has no ONNX export) is
    ``torch.cummax`` of the powers' log-scales, bit for bit."""
    A = torch.stack([random_scan_case(1, 1, 1, 5, radius, seed=i)[1] for i, radius in enumerate((0.2, 1.0, 30.0))])
    level = chunk_plan(A, 100, chunk_size=8)[0]
    powers = scaled_powers(normalize_rows(A, dims=(-2, -1)), 8)
    assert torch.equal(level.within_log_scale, torch.cummax(powers.log_scale[..., :8], dim=-1).values)


@pytest.mark.parametrize("length", [1, 7, 37])
def test_stepwise_scan_equals_the_naive_recurrence(length):
    """The scan that exported graphs run, eagerly, against the float64 recurrence; a masked
    position is an identity step."""
    u, A, initial = random_scan_case(3, length, 2, 5, 1.2, seed=length)
    mask = padded_inputs(3, length, seed=length)["attention_mask"].bool()
    mask[2, length // 2] = False  # a gap inside a sequence too
    log_scale, rows = initial
    expected_scales, expected_rows = [], []
    for t in range(length):
        step_scale, step_rows = (x[:, 0] for x in naive_scan(u[:, t : t + 1], A, ScaledRows(log_scale, rows)))
        keep = mask[:, t, None, None]
        log_scale, rows = torch.where(keep, step_scale, log_scale), torch.where(keep, step_rows, rows)
        expected_scales.append(log_scale)
        expected_rows.append(rows)
    for given_mask in (mask, None):
        out = stepwise_scan(u, A, initial, mask=given_mask)
        if given_mask is None:
            expected = naive_scan(u, A, initial)
        else:
            expected = torch.stack(expected_scales, dim=1), torch.stack(expected_rows, dim=1)
        torch.testing.assert_close(out.log_scale, expected[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.rows, expected[1], rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def exported(model):
    """``torch.export`` of the forward with input ids alone (the ONNX export below takes a
    padding mask too), batch and length dynamic."""
    ids = padded_inputs(2, 20)["input_ids"]
    return torch.export.export(model, (ids,), dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},))


@pytest.mark.parametrize("batch, length", SHAPES)
def test_torch_export_with_a_dynamic_length_gives_the_eager_logits(model, exported, batch, length):
    ids = padded_inputs(batch, length, seed=length)["input_ids"]
    logits = exported.module()(ids).logits
    assert logits.shape == (batch, length, model.config.vocab_size)
    torch.testing.assert_close(logits, eager_logits(model, {"input_ids": ids}), **TOLERANCE)


@pytest.fixture(scope="module")
def onnx_session(model, tmp_path_factory):
    """The README's export: ``torch.onnx.export(..., dynamo=True)``, loaded in onnxruntime."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path_factory.mktemp("onnx") / "goom-ssm.onnx"
    axes = {0: "batch", 1: "sequence"}
    program = torch.onnx.export(
        model, (), kwargs=padded_inputs(2, 20), dynamo=True, verbose=False,
        dynamic_shapes={"input_ids": axes, "attention_mask": axes},
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
    )
    program.save(path)
    return onnxruntime.InferenceSession(path)


def test_onnx_graph_has_dynamic_batch_and_sequence(onnx_session):
    assert [(i.name, i.shape) for i in onnx_session.get_inputs()] == [
        ("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"])]
    assert [(o.name, o.shape) for o in onnx_session.get_outputs()] == [("logits", ["batch", "sequence", 97])]


@pytest.mark.parametrize("batch, length", SHAPES)
def test_onnx_export_run_in_onnxruntime_gives_the_eager_logits(model, onnx_session, batch, length):
    inputs = {k: v.numpy() for k, v in padded_inputs(batch, length, seed=length).items()}
    for mask in (inputs["attention_mask"], np.ones_like(inputs["attention_mask"])):
        inputs["attention_mask"] = mask
        (logits,) = onnx_session.run(["logits"], inputs)
        torch.testing.assert_close(torch.from_numpy(logits), eager_logits(model, inputs), **TOLERANCE)
