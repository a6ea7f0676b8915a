"""The captured training step (goom_ssm.graphed_step): what it refuses (anywhere), and on a GPU
that its replays compute the eager steps exactly, with a schedule, clipping and packed documents."""

import pytest
import torch

from conftest import tiny_config
from goom_ssm import GoomSSMForCausalLM
from goom_ssm.graphed_step import GraphedTrainingStep

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_model(device="cpu"):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_state_heads=4, state_size=16)
    return GoomSSMForCausalLM(config).to(device).train()


def test_an_optimizer_that_cannot_be_captured_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainingStep(model, torch.optim.AdamW(model.parameters()))
    for bad in (dict(accumulation_steps=0), dict(warmup=0)):
        with pytest.raises(ValueError, match="accumulation_steps and warmup must be at least 1"):
            GraphedTrainingStep(model, torch.optim.AdamW(model.parameters(), capturable=True), **bad)
    with pytest.raises(TypeError, match="Adam or AdamW, got SGD"):
        GraphedTrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_model_off_cuda_or_float16_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="runs on CUDA; the model is on cpu"):
        GraphedTrainingStep(model, torch.optim.AdamW(model.parameters(), capturable=True))
    if torch.cuda.is_available():
        model = model.cuda()
        with pytest.raises(ValueError, match="no gradient scaler"):
            GraphedTrainingStep(model, torch.optim.AdamW(model.parameters(), capturable=True),
                                autocast_dtype=torch.float16)


def _batches(steps, batch, seq_len, packed):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 300, (batch, seq_len), generator=g)
        labels = ids.clone()
        labels[0, :3] = -100
        position_ids = None
        if packed:  # documents of 5, 1, 27 and the rest of the row
            position_ids = torch.cat([torch.arange(5), torch.arange(1), torch.arange(27),
                                      torch.arange(seq_len - 33)]).expand(batch, -1).contiguous()
        out.append((ids.cuda(), labels.cuda(), None if position_ids is None else position_ids.cuda()))
    return out


def _train(graphed: bool, autocast_dtype, packed: bool, accumulation: int):
    """Losses (per micro-batch), gradient norms and final parameters of four steps of
    ``accumulation`` micro-batches each under a one-cycle schedule (the learning rate changes
    every step), clipped at 0.5; eager, each micro-batch's loss divided by ``accumulation``
    before the backward pass, as accelerate's ``backward`` does."""
    model = make_model("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.95, 0.99), weight_decay=0.1, capturable=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=5, pct_start=0.5,
                                                   cycle_momentum=False)
    step = (GraphedTrainingStep(model, optimizer, max_grad_norm=0.5, autocast_dtype=autocast_dtype,
                                accumulation_steps=accumulation) if graphed else None)
    losses, norms = [], []
    for i, (ids, labels, position_ids) in enumerate(_batches(4 * accumulation, 3, 70, packed)):
        last = (i + 1) % accumulation == 0  # the step's last micro-batch
        if graphed:
            loss, norm = step(ids, labels, position_ids)
            assert (norm is not None) == last and step.pending == (i + 1) % accumulation
        else:
            with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                                cache_enabled=False):
                loss = model(input_ids=ids, labels=labels, position_ids=position_ids, use_cache=False).loss
            (loss / accumulation).backward()
        losses.append(loss.detach().float().clone())
        if not last:
            continue
        if not graphed:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=True)
            # As the captured step reads them: the schedule's learning rates in float32 tensors.
            floats = [group["lr"] for group in optimizer.param_groups]
            for group, lr in zip(optimizer.param_groups, floats):
                group["lr"] = torch.tensor(lr, dtype=torch.float32, device="cuda")
            optimizer.step()
            for group, lr in zip(optimizer.param_groups, floats):
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
        norms.append(norm.clone())
        schedule.step()
    return torch.stack(losses), torch.stack(norms), [p.detach().clone() for p in model.parameters()]


@needs_cuda
@pytest.mark.parametrize("accumulation", [1, 3], ids=["one micro-batch", "three micro-batches"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed documents"])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bf16 autocast"])
def test_replays_compute_the_eager_steps(autocast_dtype, packed, accumulation):
    """Same kernels, same order: the replayed steps give the eager steps' losses, norms and
    parameters bit for bit (the warm-up undone, the gradients summed over the micro-batches,
    the schedule's learning rate read at every optimizer step; the eager AdamW reads it as a
    float32 tensor too, as a captured one must: from a Python float it rounds differently)."""
    eager = _train(False, autocast_dtype, packed, accumulation)
    graphed = _train(True, autocast_dtype, packed, accumulation)
    for what, a, b in zip(["losses", "gradient norms"], eager[:2], graphed[:2]):
        assert torch.equal(a, b), (what, a, b)
    for a, b in zip(eager[2], graphed[2]):
        assert torch.equal(a, b), (a - b).abs().max()


@needs_cuda
def test_a_batch_of_another_shape_or_without_position_ids_is_refused():
    """Each refused call changes nothing: the micro-batches accumulated stay as they were."""
    model = make_model("cuda")
    step = GraphedTrainingStep(model, torch.optim.AdamW(model.parameters(), capturable=True), accumulation_steps=2)
    ids = torch.randint(0, 300, (2, 16), device="cuda")
    step(ids, ids)
    assert step.pending == 1
    with pytest.raises(ValueError, match=r"captured for batches of shape \(2, 16\).*drop the last"):
        step(ids[:1], ids[:1])
    with pytest.raises(ValueError, match="captured without position_ids"):
        step(ids, ids, torch.arange(16, device="cuda").expand(2, -1))
    with pytest.raises(ValueError, match="token id 300, outside the vocabulary"):
        bad = ids.clone()
        bad[1, 3] = 300
        step(bad, ids)
    optimizer = step.optimizer
    betas = optimizer.param_groups[0]["betas"]
    optimizer.param_groups[0]["betas"] = (0.8, 0.999)  # a momentum schedule
    with pytest.raises(ValueError, match="betas changed after the capture; only lr may change"):
        step(ids, ids)
    assert step.pending == 1
    optimizer.param_groups[0]["betas"] = betas
    loss, grad_norm = step(ids, ids)
    assert step.pending == 0 and loss.isfinite()
