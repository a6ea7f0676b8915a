"""The SSM-over-GOOMs layer and the residual layer built on it (plain PyTorch).

Shapes follow the original implementation: ``u`` is ``[batch, seq_len, d_inp]``; each
token has ``n_hid`` hidden state rows of ``d_hid`` features, all advanced by the same
``A``::

    x_t = x_{t-1} A + (u_t B)_row          (x_0 = init_states, or a carried state)
    y_t = scaled(x_t) C + u_t D

where ``scaled`` rescales each state row so its largest magnitude is ``e^2``. The states
are computed in float32 (never in half precision); the projections follow autocast.

Glossary of sizes, one name per quantity at each level: the model's configuration uses
transformers' names, the layers the original implementation's (constructors take them by
keyword), and the scans, kernels and shapes in docstrings the short ones.

====================================  ===================  =====================  ==========================
quantity                              configuration        layers                 scans, kernels, shapes
====================================  ===================  =====================  ==========================
features per token (hidden width)     ``hidden_size``      ``d_emb``              ``E``
an SSM's input and output features    (hidden_size, 2x)    ``d_inp``, ``d_out``   (``E``, ``2E``)
state rows per token (state heads)    ``num_state_heads``  ``n_hid``              ``n``
features per state row                ``state_size``       ``d_hid``              ``d`` (``D`` in Triton code)
sequences                             (batch)              ``batch``              ``B`` (``M`` in ``triton_decode``)
tokens per sequence                   (seq_len)            ``seq_len``            ``T``
steps per chunk; chunks                                                           ``L``; ``K``
====================================  ===================  =====================  ==========================

In a residual layer (:class:`GoomSSMBlock`) the SSM maps ``d_inp = d_emb`` to ``d_out = 2 d_emb``.
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from .constants import SCAN_IMPLEMENTATIONS, STATE_OUTPUT_LOG_SCALE
from .distributed import sequence_parallel_states
from .fused_block import FusedBlock
from .scan import (ScaledRows, chunk_plan, chunked_scan, goom_prefix_scan, initial_rows, is_dynamic_length,
                   scan_step, split_plan, stepwise_scan)
from .triton_common import HAS_TRITON, compute_dtype
from .triton_decode import decode_step
from .triton_scan import triton_scan

STATE_OUTPUT_SCALE = math.exp(STATE_OUTPUT_LOG_SCALE)  # a scaled state row's largest magnitude is e^2


class GoomSSM(nn.Module):
    """Linear time-invariant, non-diagonal state-space model over GOOMs.

    Args (keyword only; see the glossary above):
        d_inp, d_out: input and output features per token.
        n_hid: hidden state rows per token; d_hid: features per row.
        scan_implementation: ``"auto"`` (default: ``"triton"`` for CUDA inputs when Triton is
            installed, else ``"chunked"``), ``"triton"`` (:mod:`goom_ssm.triton_scan`),
            ``"chunked"`` (pure PyTorch) or ``"goom_prefix"`` (the original's complex parallel
            prefix scan); see :mod:`goom_ssm.scan`. All give the same states.
        chunk_size: steps per dense chunk of the chunked scan, its ``chunk_size`` (None: chosen
            for the device, see :func:`goom_ssm.scan.default_chunk_size`). The Triton scan
            chooses its own steps per program from the length
            (:func:`goom_ssm.triton_scan.default_steps_per_program`).
        init_state_range, transition_init_gain: initialisation (see :meth:`reset_parameters`).
    """

    def __init__(self, *, d_inp: int, d_out: int, n_hid: int, d_hid: int, scan_implementation: str = "auto",
                 chunk_size: Optional[int] = None, init_state_range: float = 0.1, transition_init_gain: float = 0.99):
        super().__init__()
        if scan_implementation not in SCAN_IMPLEMENTATIONS:
            raise ValueError(f"unknown scan implementation {scan_implementation!r}; choose one of {SCAN_IMPLEMENTATIONS}")
        self.d_inp, self.d_out, self.n_hid, self.d_hid = d_inp, d_out, n_hid, d_hid
        self.scan_implementation, self.chunk_size = scan_implementation, chunk_size
        self.init_state_range, self.transition_init_gain = init_state_range, transition_init_gain
        self.sequence_group = None  # processes holding segments of the sequences (see goom_ssm.distributed)
        self.init_states = nn.Parameter(torch.empty(n_hid, d_hid))
        self.A = nn.Parameter(torch.empty(d_hid, d_hid))
        self.B = nn.Parameter(torch.empty(d_inp, n_hid * d_hid))
        self.C = nn.Parameter(torch.empty(n_hid * d_hid, d_out))
        self.D = nn.Parameter(torch.empty(d_inp, d_out))
        self.reset_parameters()

    def reset_parameters(self):
        """The original's initialisation (with the default options): init_states ~ U(-0.1, 0.1);
        A orthogonal with gain 0.99; B, C, D ~ U(-1, 1) / sqrt(fan_in). Uses ``torch.nn.init``
        functions, so that transformers can skip weights that were loaded from a checkpoint.

        ``A`` is drawn in float32 (float64 for a float64 ``A``) and copied in, as the QR
        decomposition has no half-precision kernels; the draw is the same as
        ``nn.init.orthogonal_(A)`` for a float32 ``A``. Like transformers' guarded init
        functions, it leaves an ``A`` marked ``_is_hf_initialized`` (loaded) unchanged."""
        nn.init.uniform_(self.init_states, -self.init_state_range, self.init_state_range)
        if not getattr(self.A, "_is_hf_initialized", False):
            A = torch.empty_like(self.A, dtype=torch.promote_types(self.A.dtype, torch.float32))
            nn.init.orthogonal_(A, gain=self.transition_init_gain)
            with torch.no_grad():
                self.A.copy_(A)
        for weight in (self.B, self.C, self.D):
            bound = 1.0 / math.sqrt(weight.shape[0])
            nn.init.uniform_(weight, -bound, bound)

    @property
    def state_dtype(self) -> torch.dtype:
        """States are float32, or float64 when the parameters are (never half precision)."""
        return torch.float64 if self.A.dtype == torch.float64 else torch.float32

    def initial_state(self, batch_size: int) -> ScaledRows:
        """The state before the first token: log_scale ``[batch, n_hid, 1]``, rows ``[batch, n_hid, d_hid]``."""
        return initial_rows(self.init_states, batch_size, self.state_dtype)

    def forward(self, u: torch.Tensor, state: Optional[ScaledRows] = None, mask: Optional[torch.Tensor] = None,
                chunk_plan: Optional[list] = None, starts: Optional[torch.Tensor] = None):
        """``u [batch, seq_len, d_inp]`` -> ``(y [batch, seq_len, d_out], final state)``.

        ``state`` continues from a carried state (as returned by an earlier call) instead of
        ``init_states``. ``mask [batch, seq_len]`` (bool, True = real token) makes every
        masked position an identity step: the state is carried through unchanged and the
        masked input is not written into it. ``starts [batch, seq_len]`` (bool, real tokens
        only) marks the first token of each packed document: the state restarts there from
        ``init_states``, as if the document were alone (every scan's ``resets`` and
        ``reset_state``). ``chunk_plan``: this layer's
        :func:`~goom_ssm.scan.chunk_plan` for ``seq_len`` steps, if computed already (used by
        the chunked scan only; see :func:`shared_chunk_plans`).

        Traced by ``torch.export`` with a dynamic ``seq_len``, every implementation runs
        :func:`~goom_ssm.scan.stepwise_scan`: one graph (a loop) for every length.

        With ``sequence_group`` set (:func:`goom_ssm.distributed.set_sequence_group`), ``u`` is
        this process's segment of sequences split over that group's processes, ``state`` the
        state entering the whole sequences, and the final state the end of this segment.
        """
        batch, seq_len, _ = u.shape
        Bu = (u @ self.B).view(batch, seq_len, self.n_hid, self.d_hid)
        with torch.autocast(device_type=u.device.type, enabled=False):
            if self.sequence_group is not None:
                states = sequence_parallel_states(self, Bu, state, mask, chunk_plan, starts)
            elif is_dynamic_length(seq_len):
                state = self.initial_state(batch) if state is None else state
                states = stepwise_scan(Bu, self.A.to(self.state_dtype), state, resets=starts,
                                       reset_state=None if starts is None else self.init_states, mask=mask)
            elif mask is None:
                states = self._scan(Bu, state, chunk_plan, starts)
            else:
                state = self.initial_state(batch) if state is None else state
                if seq_len > 1:
                    states = self._masked_scan(Bu, state, mask, chunk_plan, starts)
                else:  # one token: a padded position keeps the state
                    states = self._scan(Bu, state, resets=starts)
                    keep = mask[:, :, None, None]
                    states = ScaledRows(torch.where(keep, states.log_scale, state.log_scale[:, None]),
                                        torch.where(keep, states.rows, state.rows[:, None]))
        # scaled(x_t) C = rows_t (e^2 C): the constant goes on the (smaller) weight.
        y = states.rows.flatten(-2).to(self.C.dtype) @ (STATE_OUTPUT_SCALE * self.C) + u @ self.D
        return y, ScaledRows(states.log_scale[:, -1], states.rows[:, -1])

    def _scan(self, Bu: torch.Tensor, state: Optional[ScaledRows], chunk_plan: Optional[list] = None,
              resets: Optional[torch.Tensor] = None) -> ScaledRows:
        """States after every step of ``Bu [batch, seq_len, n, d]`` (any float dtype) from
        ``state`` (None: ``init_states``), with the configured implementation, restarting from
        ``init_states`` at the steps flagged in ``resets [batch, seq_len]``; float32 (or float64) results."""
        implementation = self.resolved_scan(Bu)
        A = self.A.to(self.state_dtype)
        restart = None if resets is None else self.init_states
        if implementation == "triton":  # takes init_states as they are (fewer operations per call)
            return triton_scan(Bu, A, self.init_states if state is None else state, resets=resets, reset_state=restart)
        state = self.initial_state(Bu.shape[0]) if state is None else state
        Bu = Bu.to(self.state_dtype)
        if Bu.shape[1] == 1:  # decoding: one step, fewer operations than a scan
            new = scan_step(Bu[:, 0], A, state, resets=None if resets is None else resets[:, 0], reset_state=restart)
            return ScaledRows(new.log_scale[:, None], new.rows[:, None])
        if implementation == "chunked":
            return chunked_scan(Bu, A, state, resets=resets, reset_state=restart, chunk_size=self.chunk_size,
                                plan=chunk_plan)
        return goom_prefix_scan(Bu, A, state, resets=resets, reset_state=restart)

    def resolved_scan(self, u: torch.Tensor) -> str:
        """The scan implementation that runs for inputs ``u`` ("auto" resolved)."""
        if self.scan_implementation == "auto":
            return "triton" if u.is_cuda and HAS_TRITON else "chunked"
        return self.scan_implementation

    def _masked_scan(self, Bu: torch.Tensor, state: ScaledRows, mask: torch.Tensor,
                     chunk_plan: Optional[list] = None, resets: Optional[torch.Tensor] = None) -> ScaledRows:
        """Scan only the real tokens (moved to the front of each row, in order, with their
        ``resets``), then give every position the state after the last real token at or before it."""
        n, d = self.n_hid, self.d_hid
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # [batch, seq_len]
        resets = None if resets is None else resets.gather(1, order)
        packed = self._scan(Bu.gather(1, order[..., None, None].expand_as(Bu)), state, chunk_plan, resets)
        # Index 0 holds the state before any real token; index k the state after k real tokens.
        log_scale = torch.cat([state.log_scale[:, None], packed.log_scale], dim=1)
        rows = torch.cat([state.rows[:, None], packed.rows], dim=1)
        seen = mask.long().cumsum(dim=1)[..., None, None]  # [batch, seq_len, 1, 1]
        return ScaledRows(log_scale.gather(1, seen.expand(-1, -1, n, 1)), rows.gather(1, seen.expand(-1, -1, n, d)))

    def extra_repr(self) -> str:
        return f"d_inp={self.d_inp}, d_out={self.d_out}, n_hid={self.n_hid}, d_hid={self.d_hid}"


class GoomSSMBlock(GradientCheckpointingLayer):
    """Residual recurrent layer: ``out = inp + W_out GLU(SSM(LayerNorm(inp)))``.

    The SSM maps ``d_emb -> 2 * d_emb``; the GLU halves it (first half times the sigmoid of
    the second); ``W_out`` is a bias-free ``d_emb x d_emb`` linear map. A transformers
    ``GradientCheckpointingLayer``: transformers' ``activation_checkpointing_enable(...)``
    (``gradient_checkpointing_enable`` in older releases) checkpoints it with its options
    (reentrant or not, every n-th layer).

    Sizes (keyword only): ``d_emb`` features per token, ``n_hid`` state rows of ``d_hid``
    features; ``ssm_options``: :class:`GoomSSM`'s other options.
    """

    def __init__(self, *, d_emb: int, n_hid: int, d_hid: int, layer_norm_eps: float = 1e-5, **ssm_options):
        super().__init__()
        self.norm = nn.LayerNorm(d_emb, eps=layer_norm_eps)
        self.ssm = GoomSSM(d_inp=d_emb, d_out=2 * d_emb, n_hid=n_hid, d_hid=d_hid, **ssm_options)
        self.out_proj = nn.Linear(d_emb, d_emb, bias=False)

    def forward(self, hidden_states: torch.Tensor, state: Optional[ScaledRows] = None,
                mask: Optional[torch.Tensor] = None, chunk_plan: Optional[list] = None,
                starts: Optional[torch.Tensor] = None):
        """``hidden_states [batch, seq_len, d_emb]`` -> (same shape, final SSM state).
        ``state``, ``mask``, ``chunk_plan`` and ``starts`` as in :meth:`GoomSSM.forward`."""
        if state is None and mask is None and self._trains_fused(hidden_states):
            return self._forward_fused(hidden_states, starts)
        return self._forward_modules(hidden_states, state, mask, chunk_plan, starts)

    def fused_decode_step(self, hidden_states: torch.Tensor, state: ScaledRows, mask: Optional[torch.Tensor] = None):
        """One token through this layer's fused Triton kernels (:func:`~goom_ssm.triton_decode.decode_step`),
        ``state`` updated in place, no autograd: ``hidden_states [batch, 1, d_emb]`` -> (output,
        ``state``), what :meth:`forward` gives for a plain layer (:func:`is_plain`) whose
        ``out_proj`` has no bias. ``state``: contiguous, the SSM's ``state_dtype``."""
        ssm = self.ssm
        return decode_step(hidden_states, state, norm_weight=self.norm.weight, norm_bias=self.norm.bias,
                           norm_eps=self.norm.eps, A=ssm.A, B=ssm.B, C=ssm.C, D=ssm.D,
                           out_weight=self.out_proj.weight, mask=mask, out_state=state)

    def _forward_modules(self, hidden_states, state=None, mask=None, chunk_plan=None, starts=None):
        """The layer as its submodules' calls (one autograd node per operation)."""
        y, state = self.ssm(self.norm(hidden_states), state, mask, chunk_plan, starts)
        return hidden_states + self.out_proj(F.glu(y, dim=-1)), state

    def _forward_fused(self, hidden_states, starts=None):
        """The same as one :class:`~goom_ssm.fused_block.FusedBlock` node (from ``init_states``, no mask)."""
        ssm = self.ssm
        out, log_scale, rows = FusedBlock.apply(
            hidden_states, self.norm.weight, self.norm.bias, self.norm.eps, ssm.init_states, ssm.A, ssm.B, ssm.C, ssm.D,
            self.out_proj.weight, STATE_OUTPUT_SCALE, compute_dtype(ssm.B), starts)
        return out, ScaledRows(log_scale, rows)

    def _trains_fused(self, hidden_states: torch.Tensor) -> bool:
        """Whether this call can run as one :class:`~goom_ssm.fused_block.FusedBlock` node: a
        training step in eager mode with the Triton scan, float32 or float64 throughout, and
        plain submodules (:func:`is_plain`, which the fused node would otherwise bypass); not
        with sequence parallelism (the module path runs its segment scan and carry)."""
        params = list(self.parameters())
        return (
            torch.is_grad_enabled() and not torch.compiler.is_compiling() and is_plain(self)
            and self.ssm.sequence_group is None
            and self.norm.elementwise_affine and self.norm.bias is not None and self.out_proj.bias is None
            and self.ssm.resolved_scan(hidden_states) == "triton"
            and hidden_states.dtype in (torch.float32, torch.float64)
            and all(p.dtype == hidden_states.dtype for p in params)
            and (hidden_states.requires_grad or any(p.requires_grad for p in params))
        )


PLAIN_MODULE_TYPES = (GoomSSMBlock, GoomSSM, nn.LayerNorm, nn.Linear, nn.Embedding, nn.ModuleList)


def is_plain(module: nn.Module, extra_types: tuple = ()) -> bool:
    """Whether ``module`` and all its submodules compute exactly what this package's code says,
    so that a fused path (a fused kernel or autograd node, a CUDA graph, a shared scan plan)
    that reads their parameters computes what their ``forward`` would.

    The one rule for every fast path: each module is exactly one of :data:`PLAIN_MODULE_TYPES`
    (or ``extra_types``), not a subclass or a wrapper (a PEFT adapter layer or ``ParamWrapper``,
    a quantised linear layer, a parametrization), has no hooks and no replaced ``forward``
    (accelerate's offloading hooks), and holds plain ``nn.Parameter`` tensors. Anything else
    takes the module path.
    """
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    types = PLAIN_MODULE_TYPES + extra_types
    for m in module.modules():
        if (type(m) not in types or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or "forward" in m.__dict__):
            return False
        if any(p is not None and type(p) is not nn.Parameter for p in m._parameters.values()):
            return False
    return True


def shared_chunk_plans(blocks, hidden_states: torch.Tensor) -> Optional[list]:
    """Each block's :func:`~goom_ssm.scan.chunk_plan` for ``hidden_states [batch, seq_len, d_emb]``,
    computed for all the blocks at once, where every one runs the chunked scan on it; else None.

    A plan depends on the transition matrix ``A`` alone, not on the batch: stacking the
    blocks' ``A`` computes their powers with the operations of one layer instead of one set
    per layer (a few hundred small operations per layer and step, most of a layer's time on
    a GPU bound by the host's launches). Plain blocks only (:func:`is_plain`), each ``A``
    ``[d_hid, d_hid]`` on the inputs' device: a wrapped SSM (e.g. a PEFT adapter on its parameters) or a hook may
    change ``A`` inside its own call, and a layer placed on another device, offloaded (``A``
    on the meta device until accelerate's hook loads it) or sharded (FSDP gathers ``A`` in
    the layer's own call) has no ``A`` to stack here; such layers plan in their own call.
    """
    seq_len = hidden_states.shape[1]
    if is_dynamic_length(seq_len) or seq_len == 1:  # a single step, or a loop of them, needs no plan (checked first)
        return None
    first_block = blocks[0] if len(blocks) else None
    if (type(first_block) is not GoomSSMBlock or type(first_block.ssm) is not GoomSSM
            or first_block.ssm.resolved_scan(hidden_states) != "chunked"):
        return None  # (before every block's plainness, a cost in each forward: the Triton scan takes no plan)
    if not all(type(block) is GoomSSMBlock and is_plain(block) for block in blocks):
        return None
    ssms = [block.ssm for block in blocks]
    first = ssms[0]
    if any(ssm.resolved_scan(hidden_states) != "chunked" or ssm.chunk_size != first.chunk_size
           or ssm.state_dtype != first.state_dtype
           or ssm.A.shape != (first.d_hid, first.d_hid) or ssm.A.device != hidden_states.device for ssm in ssms):
        return None
    A = torch.stack([ssm.A.to(ssm.state_dtype) for ssm in ssms])
    return split_plan(chunk_plan(A, seq_len, first.chunk_size))
