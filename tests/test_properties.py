"""Property-based tests (hypothesis) over shapes, lengths, chunk boundaries, dtypes and masks."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from goom_ssm import GoomSSMForCausalLM
from goom_ssm.naive import naive_scan
from goom_ssm.scan import ScaledRows, chunked_scan, normalize_rows, scan_step

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def scan_cases(draw, max_length=300):
    batch, n, d = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    length = draw(st.integers(1, max_length))
    chunk = draw(st.integers(1, 70))
    radius = draw(st.sampled_from([0.05, 0.7, 1.0, 1.3, 8.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = A / torch.linalg.eigvals(A).abs().max() * radius
    u = torch.randn(batch, length, n, d, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    initial = normalize_rows(torch.randn(batch, n, d, generator=g, dtype=torch.float64))
    return u, A, initial, chunk


@PROPERTY_SETTINGS
@given(scan_cases())
def test_chunked_scan_equals_the_recurrence_at_any_chunking(case):
    u, A, initial, chunk = case
    log_scale, rows = naive_scan(u, A, initial)
    out = chunked_scan(u, A, initial, chunk_size=chunk)
    assert torch.allclose(out.rows, rows, atol=1e-8)
    assert torch.allclose(out.log_scale, log_scale, rtol=1e-10, atol=1e-8)


@PROPERTY_SETTINGS
@given(scan_cases(max_length=40), st.data())
def test_splitting_a_sequence_anywhere_and_carrying_the_state_changes_nothing(case, data):
    u, A, initial, chunk = case
    whole = chunked_scan(u, A, initial, chunk_size=chunk)
    cut = data.draw(st.integers(0, u.shape[1] - 1))
    state = initial
    if cut:
        first = chunked_scan(u[:, :cut], A, initial, chunk_size=chunk)
        state = ScaledRows(first.log_scale[:, -1], first.rows[:, -1])
    step = scan_step(u[:, cut], A, state)
    assert torch.allclose(step.rows, whole.rows[:, cut], atol=1e-9)
    assert torch.allclose(step.log_scale, whole.log_scale[:, cut], rtol=1e-10, atol=1e-9)


@PROPERTY_SETTINGS
@given(scan_cases(max_length=200))
def test_float32_scan_stays_finite_and_close_to_float64(case):
    """Each state is compared in units of the largest state of its row so far, ``e^M``, to
    ``1e-3 + 1e-4 |M|`` (the float32 rounding of log-scales near ``M``). Not in units of the
    state itself: a float32 sum is exact only to its largest term, so where a state passes
    near zero its own log-scale is off by far more in any float32 evaluation (hypothesis
    found a random walk, ``A = 1``, whose state fell to 0.2 from steps of 1e3)."""
    u, A, initial, chunk = case
    out32 = chunked_scan(u.float(), A.float(), ScaledRows(*(t.float() for t in initial)), chunk_size=chunk)
    out64 = chunked_scan(u, A, initial, chunk_size=chunk)
    assert torch.isfinite(out32.rows).all() and torch.isfinite(out32.log_scale).all()
    largest = out64.log_scale.cummax(dim=1).values
    in_units = [out.rows.double() * (out.log_scale.double() - largest).exp() for out in (out32, out64)]
    assert ((in_units[0] - in_units[1]).abs() <= 1e-3 + 1e-4 * largest.abs()).all()


MODEL = GoomSSMForCausalLM(tiny_config(scan_chunk_size=8)).eval()


@st.composite
def padded_batches(draw):
    lengths = draw(st.lists(st.integers(1, 30), min_size=1, max_size=4))
    total = max(lengths) + draw(st.integers(0, 5))
    left = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, total - n:] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


@PROPERTY_SETTINGS
@given(padded_batches())
def test_padded_batches_give_each_sequence_its_own_logits(batch):
    ids, mask = batch
    with torch.no_grad():
        together = MODEL(ids, attention_mask=mask).logits
        for i in range(ids.shape[0]):
            real = mask[i].bool()
            alone = MODEL(ids[i : i + 1, real]).logits[0]
            assert torch.allclose(together[i, real], alone, atol=1e-5)
