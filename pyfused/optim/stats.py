"""Step statistics: what `pyfused.optim.X(..., track_stats=True)` leaves in `optimizer.stats`.

The rule of thumb for watching training is each layer's ratio of update magnitude to weight
magnitude (about 1e-3), and its gradient norm. The fused step already holds the grad, the old and
the new param of every element, so it sums their squares in the same pass (csrc/multi_tensor.h,
kernels/multi_tensor.py) and no extra pass over memory is made. For every param it stepped:

  grad_norm     ||grad||, the grad the update saw: after GradScaler's unscale and a deferred clip
                coefficient (clip_grad_norm_(optimizer=...)), before weight decay and maximize;
  update_norm   ||new - old||, the new param as stored (rounded to its dtype) minus the old one;
  param_norm    ||old||, the param the update was applied to;
  update_ratio  update_norm / param_norm (NaN for an empty param, inf for an all-zero one).

Each is a float64 0-d tensor on the param's device, read without a host sync: one [4, n] table
per kernel call, which the step writes and never touches again (the next step makes new ones).
Sums are taken over fixed chunks and combined in a fixed order, so they do not depend on the
thread count or the GPU's scheduling. A complex param counts as its real view (the same norm); a
DTensor param reports its local shard. A step GradScaler skipped on the host, and a step that
runs on torch's own implementation (PYFUSED_BACKEND=torch, a device pyfused has no kernels for),
leave `stats` empty; a capturable step skipped on the device leaves NaN in its table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import torch

FIELDS = ("grad_norm", "update_norm", "param_norm", "update_ratio")  # the table's rows, in order


class ParamStats(NamedTuple):
    """One param's statistics, 0-d float64 tensors on its device."""

    grad_norm: torch.Tensor
    update_norm: torch.Tensor
    param_norm: torch.Tensor
    update_ratio: torch.Tensor


class StepStats(Mapping):
    """The last step's statistics, keyed by param (by identity, like optimizer.state)."""

    def __init__(self):
        self._tables = []  # (params, [4, len(params)] float64 table), one per kernel call
        self._index = None  # id(param) -> (table, column), built on the first lookup

    def new_table(self, params, device) -> torch.Tensor:
        """The [4, len(params)] table a kernel call fills for `params`: NaN until it does (a step
        skipped on the device never does)."""
        table = torch.full((len(FIELDS), len(params)), float("nan"), dtype=torch.float64, device=device)
        self._tables.append((params, table))
        self._index = None
        return table

    def _columns(self):
        if self._index is None:
            self._index = {id(p): (table, i) for params, table in self._tables for i, p in enumerate(params)}
        return self._index

    def __getitem__(self, param) -> ParamStats:
        try:
            table, i = self._columns()[id(param)]
        except KeyError:
            raise KeyError("this param was not stepped by the last step") from None
        return ParamStats(*table[:, i])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for params, _ in self._tables for p in params)

    def __len__(self) -> int:
        return sum(len(params) for params, _ in self._tables)

    def __contains__(self, param) -> bool:
        return id(param) in self._columns()

    def per_layer(self, named_parameters: Iterable[tuple[str, torch.Tensor]], floats: bool = False) -> dict:
        """{name: {"grad_norm": ..., "update_norm": ..., "param_norm": ..., "update_ratio": ...}}
        for each (name, param) of `named_parameters` (e.g. model.named_parameters()) that the last
        step stepped, in that order. Values are 0-d tensors; with floats=True, Python floats, for
        which each table is copied to the host once (one sync per kernel call, not per value)."""
        columns = self._columns()
        if floats:
            rows = {id(table): table.tolist() for _, table in self._tables}
        out = {}
        for name, param in named_parameters:
            found = columns.get(id(param))
            if found is None:
                continue
            table, i = found
            if floats:
                values = [row[i] for row in rows[id(table)]]
            else:
                values = table[:, i]
            out[name] = dict(zip(FIELDS, values))
        return out
