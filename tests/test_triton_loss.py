"""The Triton cross-entropy of the head's logits (goom_ssm.triton_loss) against its plain
reference, ``F.cross_entropy`` of the float32 logits, and the model's loss through it against
transformers' own. On CPU the kernels run in Triton's interpreter (float32); bfloat16 on a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import TRITON_DEVICE, norm_relative_error  # noqa: E402
from goom_ssm import GoomSSMConfig, GoomSSMForCausalLM  # noqa: E402
from goom_ssm.triton_loss import HeadCrossEntropy  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB, WIDTH = 97, 128  # a padded head's product: 31 columns of padding


def make_case(rows, dtype, device=TRITON_DEVICE, seed=0):
    """Logits ``[rows, WIDTH]`` (padding columns nonzero: they must not count); from 4 rows on,
    the targets have an ignored row (row 1: -100) and each end of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, WIDTH, generator=generator) * 3).to(device=device, dtype=dtype)
    targets = torch.randint(0, VOCAB, (rows,), generator=generator)
    if rows >= 4:
        targets[1], targets[2], targets[-1] = -100, 0, VOCAB - 1
    return logits, targets.to(device)


def reference(logits, targets, ignore_index=-100):
    """The float32 logits and the rows' losses as transformers' loss computes them."""
    flat = logits[:, :VOCAB].float()
    return flat, F.cross_entropy(flat, targets, ignore_index=ignore_index, reduction="none")


def gradients(fn, logits, targets, row_weights, logit_weights):
    """The gradient of ``logits`` for a weighted sum of the rows' losses (and of the float32
    logits, where ``logit_weights`` is given)."""
    logits = logits.detach().requires_grad_()
    out, losses = fn(logits, targets)
    total = (losses * row_weights).sum()
    if logit_weights is not None:
        total = total + (out * logit_weights).sum()
    total.backward()
    return logits.grad


@pytest.mark.parametrize("rows", [1, 7])
def test_forward_equals_the_reference(rows):
    logits, targets = make_case(rows, torch.float32)
    out, losses = HeadCrossEntropy.apply(logits, VOCAB, targets, -100)
    expected_out, expected = reference(logits, targets)
    assert out.dtype == losses.dtype == torch.float32 and out.shape == (rows, VOCAB)
    assert torch.equal(out, expected_out)
    torch.testing.assert_close(losses, expected, rtol=2e-6, atol=2e-6)
    if rows > 1:
        assert losses[1] == 0  # the ignored row


@pytest.mark.parametrize("with_logit_gradient", [False, True])
def test_backward_equals_the_reference(with_logit_gradient):
    """The gradient flows from the rows' losses and, where the float32 logits are used too,
    from them; the padding columns get zeros."""
    logits, targets = make_case(7, torch.float32)
    row_weights = torch.rand(7, generator=torch.Generator().manual_seed(1)).to(logits.device)
    logit_weights = torch.randn(7, VOCAB).to(logits.device) if with_logit_gradient else None
    ours = gradients(lambda x, t: HeadCrossEntropy.apply(x, VOCAB, t, -100), logits, targets, row_weights,
                     logit_weights)
    theirs = gradients(reference, logits, targets, row_weights, logit_weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[:, VOCAB:], torch.zeros_like(ours[:, VOCAB:]))
    if not with_logit_gradient:  # the ignored row: no gradient
        assert torch.equal(ours[1], torch.zeros_like(ours[1]))


def test_only_the_logits_used_give_their_gradient_cast_and_padded():
    logits, targets = make_case(5, torch.float32)
    logits.requires_grad_()
    out, _ = HeadCrossEntropy.apply(logits, VOCAB, targets, -100)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(logits.grad, F.pad(weights, (0, WIDTH - VOCAB)))


def test_a_target_outside_the_vocabulary_gives_nan_and_the_ignore_index_is_respected():
    logits, targets = make_case(4, torch.float32)
    targets[0], targets[3] = VOCAB, -1  # past the end; with ignore_index -1, ignored (and -100 is a bad target)
    _, losses = HeadCrossEntropy.apply(logits, VOCAB, targets, -1)
    assert torch.isnan(losses[0]) and torch.isnan(losses[1]) and losses[3] == 0 and torch.isfinite(losses[2])


@needs_cuda
def test_bfloat16_logits_and_gradients_are_as_accurate_as_the_reference():
    """bfloat16 logits of 600 rows: against float64, the losses and the (bfloat16) gradient
    are at most 1.5x as far as transformers' path (float32 log_softmax, gradient cast back)."""
    logits, targets = make_case(600, torch.bfloat16, device="cuda")
    row_weights = torch.rand(600, device="cuda")
    exact_losses = F.cross_entropy(logits[:, :VOCAB].double(), targets, reduction="none")
    exact = gradients(lambda x, t: (x[:, :VOCAB], F.cross_entropy(x[:, :VOCAB], t, reduction="none")),
                      logits.double(), targets, row_weights.double(), None)
    ours_losses = HeadCrossEntropy.apply(logits, VOCAB, targets, -100)[1]
    theirs_losses = reference(logits, targets)[1]
    ours = gradients(lambda x, t: HeadCrossEntropy.apply(x, VOCAB, t, -100), logits, targets, row_weights, None)
    theirs = gradients(reference, logits, targets, row_weights, None)
    assert ours.dtype == torch.bfloat16
    for a, b, want in ((ours_losses, theirs_losses, exact_losses), (ours, theirs, exact)):
        assert norm_relative_error(a, want) <= 1.5 * norm_relative_error(b, want) + 1e-7


def make_model(device):
    torch.manual_seed(0)
    config = GoomSSMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_state_heads=2, state_size=4)
    return GoomSSMForCausalLM(config).to(device)


LOSS_OPTIONS = [dict(), dict(num_items_in_batch=torch.tensor(9)), dict(num_items_in_batch=7), dict(ignore_index=3),
                dict(shift_labels="given")]


def loss_and_gradients(model, ids, labels, options, fused, monkeypatch, autocast=False):
    """The model's loss, float32 logits and parameter gradients, through the Triton cross-entropy or not."""
    if fused and ids.device.type == "cpu":  # the interpreter's kernels on CPU tensors
        monkeypatch.setattr(GoomSSMForCausalLM, "_fused_loss_applies", lambda self, product: True)
    elif not fused:
        monkeypatch.setattr(GoomSSMForCausalLM, "_fused_loss_applies", lambda self, product: False)
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=labels, **options)
    out.loss.backward()
    monkeypatch.undo()
    return out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=lambda o: ",".join(o) or "mean")
def test_the_models_loss_through_the_kernels_is_transformers_loss(options, monkeypatch):
    """float32 (on CPU in the interpreter): the shifted targets, the ignored positions, the mean
    or ``num_items_in_batch``'s division, and ``shift_labels``, as transformers' ``ForCausalLMLoss``:
    the same logits, and a loss and gradients as close to the float64 model's as its path's
    (the two round ``softmax - onehot`` differently)."""
    model = make_model(TRITON_DEVICE).train()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2)).to(TRITON_DEVICE)
    labels = ids.clone()
    labels[0, :3] = options.get("ignore_index", -100)
    options = dict(options)
    if options.get("shift_labels") == "given":
        options["shift_labels"] = torch.roll(labels, -1, dims=1)
    ours = loss_and_gradients(model, ids, labels, options, True, monkeypatch)
    theirs = loss_and_gradients(model, ids, labels, options, False, monkeypatch)
    exact = loss_and_gradients(copy.deepcopy(model).double(), ids, labels, options, False, monkeypatch)
    assert torch.equal(ours[1], theirs[1])
    for a, b, want in zip([ours[0], *ours[2]], [theirs[0], *theirs[2]], [exact[0], *exact[2]]):
        assert norm_relative_error(a, want) <= 1.5 * norm_relative_error(b, want) + 1e-7


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("options", [dict(), dict(ignore_index=3)])
def test_a_label_outside_the_vocabulary_is_refused(fused, options, monkeypatch):
    model = make_model(TRITON_DEVICE)
    monkeypatch.setattr(GoomSSMForCausalLM, "_fused_loss_applies", lambda self, product: fused)
    ids = torch.randint(0, VOCAB, (2, 9)).to(TRITON_DEVICE)
    for bad in (VOCAB, -100 if options else -1):
        labels = ids.clone()
        labels[1, 4] = bad
        with pytest.raises(ValueError, match=f"labels contains token id {bad}, outside the vocabulary .* ignore_index"):
            model(input_ids=ids, labels=labels, **options)


def test_shift_labels_of_the_wrong_size_are_refused(monkeypatch):
    model = make_model(TRITON_DEVICE)
    monkeypatch.setattr(GoomSSMForCausalLM, "_fused_loss_applies", lambda self, product: True)
    ids = torch.randint(0, VOCAB, (2, 9)).to(TRITON_DEVICE)
    with pytest.raises(ValueError, match="shift_labels must have 18 labels"):
        model(input_ids=ids, labels=ids, shift_labels=ids[:, :4])


@needs_cuda
def test_bfloat16_training_takes_the_kernels_and_gives_transformers_loss(monkeypatch):
    """Under bfloat16 autocast on CUDA the model's loss runs through the kernels (spied on; not
    with ``fuse_cross_entropy=False``), and
    gives transformers' loss and, from the bfloat16 gradient of the logits, the same parameter
    gradients but for roundings of that gradient (each at most one bfloat16 step)."""
    model = make_model("cuda").train()
    ids = torch.randint(0, VOCAB, (4, 300), generator=torch.Generator().manual_seed(2)).cuda()
    calls, apply = [], HeadCrossEntropy.apply
    monkeypatch.setattr(HeadCrossEntropy, "apply", lambda *args: calls.append(1) or apply(*args))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert calls
    calls.clear()
    model.config.fuse_cross_entropy = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    assert not calls
    model.config.fuse_cross_entropy = True
    monkeypatch.undo()
    ours = loss_and_gradients(model, ids, ids, {}, True, monkeypatch, autocast=True)
    theirs = loss_and_gradients(model, ids, ids, {}, False, monkeypatch, autocast=True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[1], theirs[1])
    for a, b in zip(ours[2], theirs[2]):
        assert norm_relative_error(a, b) <= 1e-3
