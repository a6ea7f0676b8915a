"""Run by tests/test_distributed.py in each of two processes (``torchrun --nproc_per_node 2``,
gloo): a tiny language model's logits, loss and every parameter gradient with its sequences
split over the two processes (goom_ssm.distributed) against the same model run whole in
one process. Exits non-zero (an assertion's traceback) on any difference.

``sequence_parallel_worker.py cuda``: the same on CUDA over NCCL, one process per GPU, with
the Triton scan (with one GPU, ``--nproc_per_node 1``: one segment, the segment scan from
the zero state and the carry from the gathered entering state against the whole run)."""

import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

from goom_ssm.distributed import sequence_parallel, sequence_parallel_loss, split_batch
from goom_ssm.modeling import GoomSSMConfig, GoomSSMForCausalLM

# 2 layers, 2 heads of 4 features; segments of 12 tokens in chunks of 4 (two levels of the chunked scan).
CUDA = sys.argv[1:] == ["cuda"]
DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if CUDA else torch.device("cpu")
CONFIG = dict(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_state_heads=2, state_size=4,
              scan_chunk_size=4, scan_implementation="triton" if DEVICE.type == "cuda" else "chunked")
BATCH, SEQ_LEN = 4, 24
# float64 rounding: the split computes each state as (states from zero) + (carried state) A^k, with
# A^k by repeated squaring, where one process scans straight through.
FLOAT64 = dict(rtol=1e-10, atol=1e-12)
# The causal LM computes its logits and loss in float32 (a float64 model's too): torch's float32 tolerances.
FLOAT32 = dict(rtol=1.3e-6, atol=1e-5)


def model_and_batch(dtype):
    torch.manual_seed(0)
    model = GoomSSMForCausalLM(GoomSSMConfig(**CONFIG)).to(DEVICE, dtype)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ_LEN)).to(DEVICE)
    mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long, device=DEVICE)
    mask[1, :15] = 0  # left padding past the first segment: that process's rows see no real token
    mask[2, [3, 4, 12, 20, 23]] = 0  # gaps in both segments, one at a segment's start
    mask[3, 12:] = 0  # right padding: the whole second segment
    return model, input_ids, mask, packed_positions(mask)


def packed_positions(mask):
    """position_ids of packed documents: counting over the real tokens, 0 at each document's first;
    row 0 has documents starting at 5 and 14, row 2 one at 13, its second segment's first real token."""
    starts = {0: (5, 14), 2: (13,)}
    position_ids = torch.zeros_like(mask)
    for row in range(mask.shape[0]):
        count = 0
        for t in range(mask.shape[1]):
            if mask[row, t]:
                count = 0 if t in starts.get(row, ()) else count
                position_ids[row, t] = count
                count += 1
    return position_ids


def gradients(model):
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def summed_over(group, tensors: dict) -> dict:
    for tensor in tensors.values():
        dist.all_reduce(tensor, group=group)  # a sum (gloo has no average)
    return tensors


def layers_run(dtype, group, split: bool):
    """The backbone's hidden states and gradients of a fixed linear function of them: the whole
    sequences in one process, or (``split``) this process's segment, gradients summed over the group."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    model, input_ids, mask, position_ids = model_and_batch(dtype)
    weights = torch.randn(BATCH, SEQ_LEN, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64).to(DEVICE, dtype)
    segment = slice(rank * SEQ_LEN // size, (rank + 1) * SEQ_LEN // size) if split else slice(None)
    with sequence_parallel(model.backbone, group) if split else nullcontext():
        hidden = model.backbone(input_ids=input_ids[:, segment], attention_mask=mask[:, segment],
                                position_ids=position_ids[:, segment]).last_hidden_state
        (hidden * weights[:, segment]).sum().backward()
    grads = gradients(model.backbone)
    return hidden.detach(), summed_over(group, grads) if split else grads


def check_layers(group):
    """Hidden states (every state and the carry) and every gradient, with padding in both segments
    and packed documents (one starting at a segment's first real token).
    float64: equal to the whole run's to float64 rounding. float32: each tensor's error against the
    float64 whole run (relative to its largest value) at most twice the largest such error of the
    float32 whole run over all the tensors, its rounding level (the split rounds in other operations:
    a tensor's errors differ, the level does not)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    segment = slice(rank * SEQ_LEN // size, (rank + 1) * SEQ_LEN // size)
    hidden, grads = layers_run(torch.float64, group, split=False)
    split_hidden, split_grads = layers_run(torch.float64, group, split=True)
    torch.testing.assert_close(split_hidden, hidden[:, segment], **FLOAT64)
    for name, grad in split_grads.items():
        torch.testing.assert_close(grad, grads[name], **FLOAT64, msg=lambda m: f"gradient of {name}: {m}")

    def error(value, truth):  # largest error relative to the largest value
        return ((value.double() - truth).abs().max() / truth.abs().max()).item()

    hidden32, grads32 = layers_run(torch.float32, group, split=False)
    split_hidden32, split_grads32 = layers_run(torch.float32, group, split=True)
    pairs = {"hidden states": (hidden32[:, segment], split_hidden32, hidden[:, segment])}
    pairs.update({f"gradient of {name}": (grads32[name], split_grads32[name], truth) for name, truth in grads.items()})
    rounding = max(error(whole, truth) for whole, _, truth in pairs.values())  # the whole float32 run's worst
    for what, (_, split, truth) in pairs.items():
        assert error(split, truth) <= 2 * rounding, f"float32 {what}: {error(split, truth):.3g} > 2 x {rounding:.3g}"


def check_language_model(group, padded: bool):
    """The causal LM's split batch (each process passes half the rows), logits, shifted labels
    across the segment boundary and loss. The model computes logits and loss in float32 (a float64
    model's too), so these agree to float32 rounding; padded: labels -100 at padding, the loss
    of each process its share of the mean; else the training loss, whose average over the
    processes (as DDP and FSDP average gradients) is the whole batch's. Padded: packed documents too."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    model, input_ids, mask, position_ids = model_and_batch(torch.float64)
    mask, position_ids = (mask, position_ids) if padded else (None, None)
    labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, -100)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, labels=labels, use_cache=False)
    out.loss.backward()
    expected = gradients(model)

    rows = slice(rank * BATCH // size, (rank + 1) * BATCH // size)
    segment = slice(rank * SEQ_LEN // size, (rank + 1) * SEQ_LEN // size)
    model.zero_grad(set_to_none=True)
    with sequence_parallel(model, group):
        local_mask = None if mask is None else mask[rows]
        if padded:
            local = model(**split_batch(input_ids[rows], labels[rows], group, attention_mask=local_mask,
                                        position_ids=position_ids[rows]), use_cache=False)
            torch.testing.assert_close(local.logits.detach(), out.logits.detach()[:, segment], **FLOAT32)
            loss, scale = local.loss, 1
        else:
            loss, scale = sequence_parallel_loss(model, input_ids[rows], labels[rows], group), size
        loss.backward()
    tol = FLOAT32
    loss = summed_over(group, {"loss": loss.detach().clone()})["loss"]
    torch.testing.assert_close(loss / scale, out.loss.detach(), **tol)
    for name, grad in summed_over(group, gradients(model)).items():
        torch.testing.assert_close(grad / scale, expected[name], **tol, msg=lambda m: f"gradient of {name}: {m}")


def main():
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    group = dist.new_group(list(range(dist.get_world_size())))
    check_layers(group)
    check_language_model(group, padded=True)
    check_language_model(group, padded=False)
    dist.barrier()
    if dist.get_rank() == 0:
        print("sequence parallel: logits, loss and gradients equal the single-process run")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
