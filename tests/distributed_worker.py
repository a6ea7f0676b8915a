"""Run by tests/test_distributed.py in each of two processes (``torchrun --nproc_per_node 2``,
gloo, CPU), one launch for both checks: sequence parallelism (the checks of
tests/sequence_parallel_worker.py), then a tiny language model trained with FSDP2 (torch's ``fully_shard``, one shard
unit per ``GoomSSMBlock`` and the root, as accelerate's FSDP2 plugin wraps it) against the same
model trained in one process; a sharded checkpoint (torch.distributed.checkpoint) that resumes
exactly; and accelerate's sharded model checkpoint layout converted by
``goom_ssm.train.export_checkpoint``. accelerate itself runs FSDP on GPUs only (on CPU it
falls back to plain multi-process data parallelism), so accelerate's ``Accelerator`` is not
used here. Exits non-zero (an assertion's traceback) on any difference.

Usage: distributed_worker.py OUTPUT_DIR
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from goom_ssm.modeling import GoomSSMConfig, GoomSSMForCausalLM

CONFIG = dict(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_state_heads=2, state_size=4,
              scan_implementation="chunked")
BATCH, SEQ_LEN, STEPS = 4, 16, 3
BATCHES = torch.randint(0, CONFIG["vocab_size"], (STEPS, BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
# Sharded gradients are averaged over the two halves of each batch where one process takes the
# mean over the whole batch: float32 rounding (torch's float32 tolerances).
FLOAT32 = dict(rtol=1.3e-6, atol=1e-5)


def new_model():
    torch.manual_seed(0)
    return GoomSSMForCausalLM(GoomSSMConfig(**CONFIG))


def new_optimizer(model):
    return torch.optim.AdamW(model.get_param_groups(0.1), lr=1e-2)


def sharded(model, mesh):
    for block in model.backbone.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def step(model, optimizer, ids) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def full_state(model) -> dict:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def check_fsdp2(state, out: Path):
    """FSDP2 against one process, resume and export (``state``: accelerate's ``PartialState``)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (size,))
    rows = slice(rank * BATCH // size, (rank + 1) * BATCH // size)

    # One process, whole batches (every process computes it).
    model = new_model()
    optimizer = new_optimizer(model)
    losses = [step(model, optimizer, ids) for ids in BATCHES]
    expected = model.state_dict()

    # FSDP2: each process half of each batch; its loss the mean over its half.
    model = sharded(new_model(), mesh)
    optimizer = new_optimizer(model)
    for i, ids in enumerate(BATCHES):
        loss = step(model, optimizer, ids[rows])
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / size, losses[i], **FLOAT32)
        if i == STEPS - 2:  # a sharded checkpoint of model and optimizer, each process writing its shards
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=out / "dcp")
    trained = full_state(model)
    assert trained.keys() == expected.keys()
    for name, value in trained.items():
        torch.testing.assert_close(value, expected[name], **FLOAT32, msg=lambda m: f"{name}: {m}")

    # Resume from the sharded checkpoint: the last step again, bit for bit.
    resumed = sharded(new_model(), mesh)
    resumed_optimizer = new_optimizer(resumed)
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    saved = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(saved, checkpoint_id=out / "dcp")
    set_state_dict(resumed, resumed_optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])
    step(resumed, resumed_optimizer, BATCHES[-1][rows])
    again = full_state(resumed)
    assert all(torch.equal(again[name], value) for name, value in trained.items()), "the resumed run differs"

    # accelerate's sharded model checkpoint (what save_state writes under SHARDED_STATE_DICT), plus the
    # config.json that goom-ssm train adds, converts to a save_pretrained folder with the trained weights.
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import save_fsdp_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    checkpoint = out / "checkpoint-3"
    save_fsdp_model(plugin, state, model, checkpoint)
    dist.barrier()
    if rank == 0:
        from safetensors.torch import load_file

        from goom_ssm.train import export_checkpoint

        model.config.save_pretrained(checkpoint)
        folder = export_checkpoint(checkpoint, out / "exported")
        weights = load_file(str(folder / "model.safetensors"))
        assert weights.keys() == trained.keys() - {"lm_head.weight"}  # tied to the embedding, stored once
        assert all(torch.equal(weights[name], trained[name]) for name in weights), "the exported weights differ"
        print("fsdp2: losses and parameters equal the single-process run; resume and export exact")
    state.wait_for_everyone()


def main(out: Path):
    from accelerate import PartialState

    from sequence_parallel_worker import check_language_model, check_layers

    state = PartialState(cpu=True)  # the gloo process group (accelerate's checkpoint writer needs its state)
    group = dist.new_group(list(range(dist.get_world_size())))
    check_layers(group)
    check_language_model(group, padded=True)
    check_language_model(group, padded=False)
    if dist.get_rank() == 0:
        print("sequence parallel: logits, loss and gradients equal the single-process run", flush=True)
    check_fsdp2(state, out)
    state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
