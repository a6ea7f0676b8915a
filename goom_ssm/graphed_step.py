"""A whole training step (forward, backward, gradient clipping, optimizer step) as CUDA graphs.

At the batch sizes people train a 124M model with on one GPU, a step of GOOM-SSM's CUDA
path is bound by the host: the GPU waits while Python and the dispatcher issue some
thousand launches. :class:`GraphedTrainingStep` records every launch of a step once, as two
CUDA graphs (``torch.cuda.CUDAGraph``): the forward and backward of a micro-batch, which adds
its gradients to the parameters' ``grad``, and the update (clipping, optimizer step, zeroing
the gradients). It replays the first for each micro-batch and the second after every
``accumulation_steps`` of them: two launches per step without gradient accumulation. It
computes what the eager step computes, with the same kernels, on batches of the shape it was
captured with::

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, capturable=True)
    step = GraphedTrainingStep(model, optimizer, max_grad_norm=1.0, autocast_dtype=torch.bfloat16,
                               accumulation_steps=4)
    for batch in loader:  # every micro-batch [batch, seq_len] as the first
        loss, grad_norm = step(batch["input_ids"], batch["labels"], batch.get("position_ids"))
        if step.pending == 0:  # this call made an optimizer step
            scheduler.step()  # the groups' learning rates are read at every optimizer step

``goom-ssm train --cuda-graph`` trains this way. With the HF ``Trainer``, CUDA graphs come
from ``torch.compile`` (``TrainingArguments(torch_compile=True,
torch_compile_mode="reduce-overhead")``: the compiled forward and backward replayed as graphs,
the Triton scan's kernels launched from the compiled code, the optimizer eager).

Rules of a captured step, checked where they can be: CUDA; an ``Adam``/``AdamW`` with
``capturable=True`` whose hyperparameters other than ``lr`` stay fixed (torch's Adam reads a
``beta1`` tensor on the host, which a graph cannot: no momentum schedule); no
gradient scaler (bf16 or float32, not fp16); every batch of the captured shape, with
``position_ids`` (packed documents) at every call or at none; no host synchronisation inside
the model's step (the GOOM-SSM CUDA path has none: the value checks of ``position_ids`` run
in the eager warm-up, on the first batch, and not in the replays).
"""

from typing import Optional

import torch

FIXED_HYPERPARAMETERS = ("betas", "eps", "weight_decay", "amsgrad", "maximize")


class GraphedTrainingStep:
    """``step(input_ids, labels, position_ids=None)`` -> ``(loss, grad_norm)``: the forward and
    backward of ``model`` on a micro-batch (``[batch, seq_len]`` token ids, labels (-100
    ignored) and, for packed documents, position ids), and at every ``accumulation_steps``-th
    call the optimizer step on the gradients summed since the last one, replayed from CUDA
    graphs captured at the first call.

    Args:
        model: a causal LM on CUDA, in train mode, whose ``forward(input_ids=, labels=,
            position_ids=, use_cache=False)`` returns the mean loss.
        optimizer: ``torch.optim.Adam`` or ``AdamW`` over the model's parameters, with
            ``capturable=True``. Its groups' ``lr`` may change between calls (a scheduler);
            the other hyperparameters are fixed at capture.
        max_grad_norm: clip the gradients' global norm to this (0: no clipping).
        autocast_dtype: run the forward under CUDA autocast in this dtype (``torch.bfloat16``),
            or None: as the model runs (e.g. a model ``accelerate`` prepared with its own autocast).
        accumulation_steps: micro-batches per optimizer step; each one's loss is divided by it
            before the backward pass, as ``accelerate``'s ``Accelerator.backward`` does.
        warmup: eager steps before the capture (at least one: they compile kernels, pick
            algorithms and allocate the gradients); their updates are undone, so the first call
            is the first micro-batch of the first step.

    The returned tensors are the graphs' outputs, overwritten by the next call: ``loss`` (the
    micro-batch's mean loss, float32) and ``grad_norm`` (before clipping; None without
    clipping, and at calls that made no optimizer step). ``pending``: the micro-batches
    accumulated since the last optimizer step.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: float = 0.0,
                 autocast_dtype: Optional[torch.dtype] = None, accumulation_steps: int = 1, warmup: int = 3):
        if accumulation_steps < 1 or warmup < 1:
            raise ValueError(f"accumulation_steps and warmup must be at least 1, got {accumulation_steps} and {warmup}")
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"a captured step takes torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
        if not all(group["capturable"] for group in optimizer.param_groups):
            raise ValueError("a captured step needs the optimizer built with capturable=True "
                             "(torch.optim.AdamW(params, ..., capturable=True))")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"a captured step runs on CUDA; the model is on {device}")
        if autocast_dtype == torch.float16:
            raise ValueError("a captured step takes no gradient scaler: use bfloat16 (or float32), not float16")
        self.model, self.optimizer, self.device = model, optimizer, device
        self.max_grad_norm, self.autocast_dtype, self.warmup = max_grad_norm, autocast_dtype, warmup
        self.accumulation_steps, self.pending = accumulation_steps, 0
        self.graphs: Optional[tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]] = None  # micro-batch, update
        # The groups' learning rates as device tensors the graph reads.
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]
        self.fixed = [{k: group[k] for k in FIXED_HYPERPARAMETERS} for group in optimizer.param_groups]

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.graphs is None:
            self._capture(batch)
        else:
            for name, tensor in batch.items():
                static = self.batch[name]
                if (tensor is None) != (static is None):
                    raise ValueError(f"the step was captured {'without' if static is None else 'with'} {name}; "
                                     "give it at every call or at none")
                if tensor is not None and tensor.shape != static.shape:
                    raise ValueError(f"the step was captured for batches of shape {tuple(static.shape)}; got {name} "
                                     f"{tuple(tensor.shape)} (drop the last, shorter batch)")
        self.check_ids(input_ids, labels)
        self._read_hyperparameters()  # before any replay: a refused call changes nothing
        for name, tensor in batch.items():
            if tensor is not None:
                self.batch[name].copy_(tensor, non_blocking=True)
        micro_batch, update = self.graphs
        micro_batch.replay()
        self.pending += 1
        if self.pending < self.accumulation_steps:
            return self.loss, None
        update.replay()
        self.pending = 0
        return self.loss, self.grad_norm

    def check_ids(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        """Refuse ids and labels (but -100) outside the vocabulary, as the eager model does (the
        replayed graph does not check them; the check waits for the previous step, where a
        training loop waits anyway)."""
        from .modeling.modeling_goom_ssm import _check_token_range

        vocab_size = self.model.get_input_embeddings().num_embeddings
        _check_token_range(input_ids, vocab_size)
        _check_token_range(labels, vocab_size, "labels", ignore_index=-100)

    def _read_hyperparameters(self) -> None:
        for group, lr, fixed in zip(self.optimizer.param_groups, self.lrs, self.fixed):
            changed = [k for k in FIXED_HYPERPARAMETERS if group[k] != fixed[k]]
            if changed:
                raise ValueError(f"the optimizer's {', '.join(changed)} changed after the capture; only lr may change")
            lr.fill_(float(group["lr"]))

    def _micro_batch(self):
        """What the first graph records: the forward and the backward (adding to the gradients); the loss."""
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            loss = self.model(**self.batch, use_cache=False).loss
        (loss / self.accumulation_steps).backward()  # as accelerate's backward, which divides by 1 too
        return loss.detach().float()

    def _update(self):
        """What the second graph records: clipping, the optimizer step, zeroing the gradients
        (in place: the first graph adds to them); the global gradient norm (or None)."""
        grad_norm = None
        if self.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        return grad_norm

    def _capture(self, batch: dict) -> None:
        """Warm up (undone afterwards), then record the two graphs into ``self.graphs``. The
        gradients the warm-up allocates stay, zeroed: the micro-batch graph adds to them (a
        parameter the loss does not reach keeps no gradient, as in eager steps)."""
        self.batch = {name: None if tensor is None else tensor.to(self.device, copy=True)
                      for name, tensor in batch.items()}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[p].items()}
                       for p in params if p in self.optimizer.state}
        groups = self.optimizer.param_groups
        floats = [group["lr"] for group in groups]
        self._read_hyperparameters()
        for group, lr in zip(groups, self.lrs):  # the graph reads these tensors
            group["lr"] = lr

        def undo_warm_up():
            """The parameters and the optimizer's state as they were, in place (the graphs will hold
            these tensors; a fresh Adam's state is all zeros)."""
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():
                for p, saved in zip(params, saved_params):
                    p.copy_(saved)
                for p in params:
                    before = saved_state.get(p, {})
                    for k, v in self.optimizer.state[p].items():
                        if torch.is_tensor(v):
                            v.copy_(before[k]) if k in before else v.zero_()

        side = torch.cuda.Stream()
        try:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                for _ in range(self.warmup):  # one micro-batch each: from the second on it adds to the gradients
                    self._micro_batch()
                    self._update()
            undo_warm_up()
            micro_batch, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(micro_batch, capture_error_mode="thread_local"):
                self.loss = self._micro_batch()
            with torch.cuda.graph(update, pool=micro_batch.pool(), capture_error_mode="thread_local"):
                self.grad_norm = self._update()
            self.graphs = micro_batch, update
        except BaseException:  # nothing of a failed warm-up or capture stays in the model
            undo_warm_up()
            self.optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            for group, lr in zip(groups, floats):  # the groups hold floats again, for the scheduler
                group["lr"] = lr
