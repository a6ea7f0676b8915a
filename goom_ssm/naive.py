"""The definition of the recurrence every scan computes: one step after another.

:func:`naive_scan` takes the arguments of the scans (:func:`goom_ssm.scan.chunked_scan`,
:func:`goom_ssm.scan.goom_prefix_scan`, :func:`goom_ssm.triton_scan.triton_scan`) with the
same meaning, and gives the states of ``x_t = x_{t-1} A + u_t`` by the obvious loop, in
float64. The tests hold every scan to it, states and gradients. It is slow (a Python loop
over the sequence) and not used by the package.
"""

from typing import Optional, Union

import torch

from .scan import ScaledRows, drop_states, initial_rows


def naive_scan(u: torch.Tensor, A: torch.Tensor, initial: Union[ScaledRows, torch.Tensor], *,
               resets: Optional[torch.Tensor] = None, reset_state: Optional[torch.Tensor] = None) -> ScaledRows:
    """States of ``x_t = x_{t-1} A + u_t`` for every ``t``, one step at a time, in float64.

    Args:
        u: ``[batch, seq_len, n, d]`` inputs, any float dtype.
        A: ``[d, d]`` transition matrix (row-vector convention), shared by all rows and steps.
        initial: the state before the first step: ``ScaledRows`` (log-scale ``[batch, n, 1]``,
            rows ``[batch, n, d]``), or a plain ``[n, d]`` tensor of rows shared by every sequence.
        resets: ``[batch, seq_len]`` bool, or None: the steps before which the state is
            replaced by ``reset_state``.
        reset_state: ``[n, d]`` plain rows the state restarts from at a reset (``x_t =
            reset_state A + u_t``), or None: no state (``x_t = u_t``).

    Returns:
        ``ScaledRows`` in float64, whatever the inputs' dtype: log-scales ``[batch, seq_len, n, 1]``
        and rows ``[batch, seq_len, n, d]`` whose largest magnitude is 1. Differentiable in
        ``u``, ``A``, the initial rows and ``reset_state``; the log-scales are constants (detached), as in every scan.

    Each step sums the carried state and the input in units of ``exp(max(s, 0))``, ``s`` the
    state's log-scale, then rescales the row by its largest magnitude. (So a carried state
    below about ``e^-745`` underflows to zero: the tests' states stay far above it.)
    """
    batch, seq_len = u.shape[:2]
    log_scale, rows = initial_rows(initial, batch, torch.float64)
    log_scale, u, A = log_scale.detach(), u.double(), A.double()
    tiny = torch.finfo(torch.float64).tiny  # an all-zero row keeps zeros, as in every scan
    if resets is not None and reset_state is not None:
        restart = initial_rows(reset_state, batch, torch.float64)
    all_log_scales, all_rows = [], []
    for t in range(seq_len):
        if resets is not None and reset_state is None:
            log_scale, rows = drop_states(ScaledRows(log_scale, rows), resets[:, t, None, None])
        elif resets is not None:
            flags = resets[:, t, None, None]
            log_scale = torch.where(flags, restart.log_scale.detach(), log_scale)
            rows = torch.where(flags, restart.rows, rows)
        common = torch.clamp(log_scale, min=0.0)
        x = torch.exp(log_scale - common) * (rows @ A) + torch.exp(-common) * u[:, t]
        peak = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=tiny)
        rows, log_scale = x / peak, common + peak.log()
        all_log_scales.append(log_scale)
        all_rows.append(rows)
    return ScaledRows(torch.stack(all_log_scales, dim=1), torch.stack(all_rows, dim=1))
