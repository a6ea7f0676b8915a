"""A whole training step (forward, backward, gradient clipping, optimizer step) as one CUDA graph.

At the batch sizes people train a 124M model with on one GPU, a step of GOOM-SSM's CUDA
path is bound by the host: the GPU waits while Python and the dispatcher issue some
thousand launches. :class:`GraphedTrainingStep` records every launch of one step once, as a
CUDA graph (``torch.cuda.CUDAGraph``), and replays it for each batch: one launch per step.
It computes what the eager step computes, with the same kernels, on batches of the shape it
was captured with::

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, capturable=True)
    step = GraphedTrainingStep(model, optimizer, max_grad_norm=1.0, autocast_dtype=torch.bfloat16)
    for batch in loader:  # every batch [batch, seq_len] as the first
        loss, grad_norm = step(batch["input_ids"], batch["labels"], batch.get("position_ids"))
        scheduler.step()  # the groups' learning rates are read at every call

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
    """``step(input_ids, labels, position_ids=None)`` -> ``(loss, grad_norm)``: one optimizer
    step of ``model`` on the batch (``[batch, seq_len]`` token ids, labels (-100 ignored) and,
    for packed documents, position ids), replayed from a CUDA graph captured at the first call.

    Args:
        model: a causal LM on CUDA, in train mode, whose ``forward(input_ids=, labels=,
            position_ids=, use_cache=False)`` returns the mean loss.
        optimizer: ``torch.optim.Adam`` or ``AdamW`` over the model's parameters, with
            ``capturable=True``. Its groups' ``lr`` may change between calls (a scheduler);
            the other hyperparameters are fixed at capture.
        max_grad_norm: clip the gradients' global norm to this (0: no clipping).
        autocast_dtype: run the forward under CUDA autocast in this dtype (``torch.bfloat16``),
            or None: as the model runs (e.g. a model ``accelerate`` prepared with its own autocast).
        warmup: eager steps before the capture (they compile kernels and pick algorithms);
            their updates are undone, so the first call makes exactly one step.

    The returned tensors are the graph's outputs, overwritten by the next call: ``loss`` (the
    batch's mean loss, float32) and ``grad_norm`` (before clipping; None without clipping).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: float = 0.0,
                 autocast_dtype: Optional[torch.dtype] = None, warmup: int = 3):
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
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        # The groups' learning rates as device tensors the graph reads.
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]
        self.fixed = [{k: group[k] for k in FIXED_HYPERPARAMETERS} for group in optimizer.param_groups]

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.graph is None:
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
        self._read_hyperparameters()
        for name, tensor in batch.items():
            if tensor is not None:
                self.batch[name].copy_(tensor, non_blocking=True)
        self.graph.replay()
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

    def _step(self):
        """The eager step the graph records: the loss and the global gradient norm (or None)."""
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            loss = self.model(**self.batch, use_cache=False).loss
        loss.backward()
        grad_norm = None
        if self.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach().float(), grad_norm

    def _capture(self, batch: dict) -> None:
        """Warm up (undone afterwards), then record one step into ``self.graph``."""
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
            """The parameters and the optimizer's state as they were, in place (the graph will hold
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
                for _ in range(self.warmup):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._step()
            undo_warm_up()
            self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients and writes them
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.loss, self.grad_norm = self._step()
            self.graph = graph
        except BaseException:  # nothing of a failed warm-up or capture stays in the model
            undo_warm_up()
            self.optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            for group, lr in zip(groups, floats):  # the groups hold floats again, for the scheduler
                group["lr"] = lr
