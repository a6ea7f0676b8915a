"""Packed documents: several documents in one row, each computed as if it were alone.

Scans: ``resets`` (the state before a flagged step dropped, or replaced by ``reset_state``)
against the step-by-step definition, states and gradients. Models: ``position_ids`` that restart at 0 per document
(transformers' ``DataCollatorWithFlattening``) give every document the hidden states, logits
and parameter gradients it gets alone, with every scan implementation, with documents of
one token and documents that cross chunk boundaries. Without a GPU the Triton kernels run in
Triton's interpreter (see conftest); tests/test_cuda.py repeats the model case on the GPU.
"""

import functools

import pytest
import torch

from conftest import TRITON_DEVICE, random_scan_case, relative_error, tiny_config
from goom_ssm import GoomSSMForCausalLM
from goom_ssm.modeling.modeling_goom_ssm import CACHE_NAME
from goom_ssm.naive import naive_scan
from goom_ssm.scan import ScaledRows, chunked_scan, goom_prefix_scan, stepwise_scan

# Lengths of packed documents: ones of one token, and ones longer than a chunk of 4 steps.
DOCUMENTS = [[5, 1, 9, 3, 6], [1, 1, 11, 2, 1, 8]]


def resets_of(lengths_per_row) -> torch.Tensor:
    """``[batch, seq_len]`` flags at every document's first token but the row's first."""
    rows = []
    for lengths in lengths_per_row:
        flags = torch.zeros(sum(lengths), dtype=torch.bool)
        flags[torch.tensor(lengths[:-1]).cumsum(0)] = True
        rows.append(flags)
    return torch.stack(rows)


def position_ids_of(lengths) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def scan_states_and_gradients(scan, u, A, initial, weights, resets, reset_state=None):
    """States and the gradients of ``u``, ``A``, the initial rows and ``reset_state`` (if given)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (u, A, initial.rows)]
    restart = None if reset_state is None else reset_state.detach().clone().requires_grad_(True)
    u, A, init_rows = leaves
    out = scan(u, A, ScaledRows(initial.log_scale, init_rows), resets=resets, reset_state=restart)
    states = out.rows * out.log_scale.exp()
    (states * weights).sum().backward()
    return [states, *(t.grad for t in leaves), *([] if restart is None else [restart.grad])]


SCANS = {
    "chunked L=1": functools.partial(chunked_scan, chunk_size=1),
    "chunked L=4": functools.partial(chunked_scan, chunk_size=4),
    "chunked L=32": functools.partial(chunked_scan, chunk_size=32),
    "stepwise": stepwise_scan,
}


def _triton_scan(*args, **kwargs):
    from goom_ssm.triton_scan import triton_scan

    return triton_scan(*args, steps_per_program=4, **kwargs)


@pytest.mark.parametrize("restart", [False, True], ids=["no reset state", "reset state"])
@pytest.mark.parametrize("name", [*SCANS, "triton", "goom_prefix"])
def test_every_scan_with_resets_equals_the_step_by_step_definition(name, restart):
    if name == "triton":
        pytest.importorskip("triton")
    lengths = [[3, 4, 1, 1, 7, 10], [12, 1, 13]]  # 26 steps: resets on, before and after chunk boundaries
    u, A, initial = random_scan_case(2, 26, 2, 3, radius=1.2, seed=1)
    resets = resets_of(lengths)
    resets[1, 0] = True  # a reset at the first step drops the initial state too
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(u.shape, dtype=u.dtype, generator=g)
    # Drawn as the case's initial rows are: a state to start from.
    reset_state = torch.rand(2, 3, dtype=u.dtype, generator=g) * 0.2 - 0.1 if restart else None
    expected = scan_states_and_gradients(naive_scan, u, A, initial, weights, resets, reset_state)
    if name == "goom_prefix":  # float32 GOOMs: agreement to float32 rounding
        got = scan_states_and_gradients(goom_prefix_scan, u, A, initial, weights, resets, reset_state)
        bound = 1e-5
    else:
        scan = _triton_scan if name == "triton" else SCANS[name]
        device = TRITON_DEVICE if name == "triton" else "cpu"
        moved = [t.to(device) for t in (u, A, *initial, weights, resets)]
        got = scan_states_and_gradients(scan, moved[0], moved[1], ScaledRows(*moved[2:4]), moved[4], moved[5],
                                        None if reset_state is None else reset_state.to(device))
        bound = 1e-13
    assert len(got) == len(expected) == (5 if restart else 4)
    for what, g, e in zip(["states", "u.grad", "A.grad", "initial.grad", "reset_state.grad"], got, expected):
        assert relative_error(g, e) < bound, what


@pytest.mark.parametrize("restart", [False, True], ids=["no reset state", "reset state"])
def test_the_definition_restarts_at_each_reset(restart):
    """The reference itself: after a reset, the states are those of the rest alone from a zero
    state, or from ``reset_state``."""
    u, A, initial = random_scan_case(1, 12, 2, 3, radius=0.9, seed=3)
    resets = torch.zeros(1, 12, dtype=torch.bool)
    resets[0, 5] = True
    reset_state = torch.randn(2, 3, dtype=u.dtype, generator=torch.Generator().manual_seed(4)) if restart else None
    together = naive_scan(u, A, initial, resets=resets, reset_state=reset_state)
    alone = naive_scan(u[:, 5:], A, torch.zeros(2, 3, dtype=u.dtype) if reset_state is None else reset_state)
    assert torch.allclose(together.rows[:, 5:], alone.rows, atol=1e-15)
    assert torch.allclose(together.log_scale[:, 5:], alone.log_scale, atol=1e-12)
    head = naive_scan(u[:, :5], A, initial)
    assert torch.equal(together.rows[:, :5], head.rows)


def packed_and_alone(model, lengths, seed):
    """Hidden states and parameter gradients of a packed row and of its documents one by one."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lengths]
    weights = torch.randn(sum(lengths), model.config.hidden_size, generator=g, dtype=torch.float64)
    device = model.device
    ids, position_ids = torch.cat(docs)[None].to(device), position_ids_of(lengths).to(device)
    weights = weights.to(device, model.dtype)

    model.zero_grad()
    packed = model.backbone(ids, position_ids=position_ids).last_hidden_state[0]
    (packed * weights).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    alone, start = [], 0
    for doc in docs:
        hidden = model.backbone(doc[None].to(device)).last_hidden_state[0]
        (hidden * weights[start : start + len(doc)]).sum().backward()
        alone.append(hidden)
        start += len(doc)
    alone_grads = {name: p.grad for name, p in model.named_parameters()}
    return packed, torch.cat(alone), packed_grads, alone_grads


@pytest.mark.parametrize("scan", ["chunked", "goom_prefix", "triton"])
@pytest.mark.parametrize("lengths", DOCUMENTS)
def test_a_packed_row_gives_every_document_what_it_gets_alone(scan, lengths):
    if scan == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    config = tiny_config(scan_implementation=scan, scan_chunk_size=4)
    model = GoomSSMForCausalLM(config).double().to(TRITON_DEVICE if scan == "triton" else "cpu")
    packed, alone, packed_grads, alone_grads = packed_and_alone(model, lengths, seed=len(lengths))
    bound = 1e-5 if scan == "goom_prefix" else 1e-12  # the original design computes in float32 GOOMs
    assert relative_error(packed, alone) < bound
    for name, grad in alone_grads.items():
        assert relative_error(packed_grads[name], grad) < 10 * bound, name
    # Without position_ids the documents see one another: the check above can fail.
    ids = torch.randint(0, 97, (1, sum(lengths)), device=model.device)
    unpacked = model.backbone(ids).last_hidden_state
    repacked = model.backbone(ids, position_ids=position_ids_of(lengths).to(model.device)).last_hidden_state
    assert relative_error(unpacked[:, lengths[0]:], repacked[:, lengths[0]:]) > 1e-3


def test_packed_rows_with_padding_and_in_a_batch():
    """Two packed rows of different layouts in one batch, the shorter one right-padded."""
    torch.manual_seed(1)
    model = GoomSSMForCausalLM(tiny_config(scan_chunk_size=4)).double().eval()
    first, second = [4, 1, 6], [2, 3]
    ids = torch.randint(0, 97, (2, 11))
    position_ids = torch.stack([position_ids_of(first)[0], torch.cat([position_ids_of(second)[0], torch.arange(6)])])
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 5:] = 0
    hidden = model.backbone(ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    for row, lengths in ((0, first), (1, second)):
        start = 0
        for n in lengths:
            alone = model.backbone(ids[row : row + 1, start : start + n]).last_hidden_state
            assert relative_error(hidden[row : row + 1, start : start + n], alone) < 1e-12
            start += n


def test_position_ids_that_count_from_zero_change_nothing():
    torch.manual_seed(2)
    model = GoomSSMForCausalLM(tiny_config()).double().eval()
    ids = torch.randint(0, 97, (2, 9))
    plain = model(ids).logits
    assert torch.equal(model(ids, position_ids=torch.arange(9)[None]).logits, plain)
    assert torch.equal(model(ids, position_ids=torch.arange(9).expand(2, 9)).logits, plain)
    # Left padding, positions as transformers' generation computes them: the same too.
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    position_ids = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    assert torch.equal(model(ids, attention_mask=mask, position_ids=position_ids).logits,
                       model(ids, attention_mask=mask).logits)


def test_a_document_start_after_a_cache_starts_afresh():
    torch.manual_seed(3)
    model = GoomSSMForCausalLM(tiny_config()).double().eval()
    prompt, doc = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    cache = getattr(model(prompt, use_cache=True), CACHE_NAME)
    continued = model(doc, position_ids=torch.arange(5)[None], **{CACHE_NAME: cache}).logits
    assert relative_error(continued, model(doc).logits) < 1e-6  # logits are float32


@pytest.mark.parametrize("position_ids, error, message", [
    (torch.arange(6.0)[None], TypeError, "integer tensor"),
    (torch.arange(5)[None], ValueError, "shape"),
    (torch.arange(6), ValueError, "shape"),
    (torch.tensor([[0, 1, 2, -1, 0, 1]]), ValueError, "non-negative"),
    (torch.tensor([[0, 1, 2, 4, 5, 6]]), ValueError, "count up by 1"),
    (torch.tensor([[0, 1, 1, 2, 0, 1]]), ValueError, "count up by 1"),
])
def test_bad_position_ids_are_refused_with_a_clear_error(position_ids, error, message):
    model = GoomSSMForCausalLM(tiny_config()).eval()
    with pytest.raises(error, match=message):
        model(torch.zeros(1, 6, dtype=torch.long), position_ids=position_ids)


def test_the_padding_free_collator_of_transformers_trains_documents_apart():
    """``DataCollatorWithFlattening``'s batch (one row, position_ids, -100 at each document's
    first label) gives the loss of the documents alone, token for token."""
    from transformers import DataCollatorWithFlattening

    torch.manual_seed(4)
    model = GoomSSMForCausalLM(tiny_config()).double().eval()
    docs = [torch.randint(0, 97, (n,)).tolist() for n in (6, 1, 9)]
    batch = DataCollatorWithFlattening()([{"input_ids": doc} for doc in docs])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    packed = model(**batch)
    losses, counts = [], []
    for doc in docs:
        ids = torch.tensor([doc])
        if len(doc) > 1:
            losses.append(model(ids, labels=ids).loss * (len(doc) - 1))
            counts.append(len(doc) - 1)
    assert torch.allclose(packed.loss, sum(losses) / sum(counts), rtol=1e-6)


def test_the_trainer_trains_packed_batches(tmp_path, monkeypatch):
    """The README's recipe: the ``Trainer`` with ``DataCollatorWithFlattening`` passes
    position_ids through to the model (whose forward would refuse anything it did not read)."""
    Dataset = pytest.importorskip("datasets").Dataset
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from goom_ssm.modeling import modeling_goom_ssm

    torch.manual_seed(5)
    model = GoomSSMForCausalLM(tiny_config())
    rows = Dataset.from_dict({"input_ids": [torch.randint(0, 97, (n,)).tolist() for n in (5, 9, 3, 7, 4, 6, 8, 2)]})
    seen, document_starts = [], modeling_goom_ssm._document_starts
    monkeypatch.setattr(modeling_goom_ssm, "_document_starts",
                        lambda position_ids, *args: seen.append(position_ids.shape) or document_starts(position_ids, *args))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1)
    result = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithFlattening()).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert [shape[0] for shape in seen] == [1, 1]  # one packed row per batch
