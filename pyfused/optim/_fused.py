"""What every pyfused optimizer shares: one kernel call per (param group, device, dtype).

A pyfused optimizer is a subclass of torch's optimizer of the same name with this mixin in front.
Construction, argument checks, param groups, state_dict and schedulers are therefore torch's own;
only step() differs. A subclass says three things (see adam.py):
  _state_keys(group)           the state tensors the kernel reads and writes, in its role order;
  _init_state(p, group, state) creates missing state the way torch does, returns per-tensor flags;
  _hyper(group)                the kernel's scalars, in the order of its Hyper in csrc/optimizers.h.

step() caches, per param group, a plan: the tensors grouped by (device, dtype) into buckets with
their address tables. Each step then only reads the grads, checks them, and writes their
addresses into the table. The plan is rebuilt when a param gains or loses its grad, a param's
storage moves, the state is replaced (load_state_dict) or a group option adds or removes a
state tensor.
"""

import array
import functools
import operator

import torch
from torch.optim.optimizer import _get_scalar_dtype

from pyfused import _backend, _cpp

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_REAL_DTYPES = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")
_device_of = operator.attrgetter("device")
_stride_of = torch.Tensor.stride
_data_ptr = torch.Tensor.data_ptr


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill numel() consecutive slots, in some order."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _addresses_overlap(regions) -> bool:
    """Whether any two of the (start, end) byte ranges overlap."""
    regions = sorted(r for r in regions if r[0] != r[1])
    return any(b[0] < a[1] for a, b in zip(regions, regions[1:]))


class _Bucket:
    """The tensors of one param group that share a device and dtype: one kernel call per step."""

    def __init__(self, optimizer, where, device, dtype, positions, params, states, keys):
        self.device = device
        self.dtype = dtype
        self.dtype_code = _DTYPE_CODES[_REAL_DTYPES.get(dtype, dtype)]
        self.positions = positions
        self.n = len(positions)
        self.where = where  # a function naming a param for error messages
        self.shapes = [p.shape for p in params]
        self.strides = [p.stride() for p in params]
        self.dtypes = [dtype] * self.n
        self.devices = [device] * self.n
        # Picks this bucket's grads out of the group's grad list.
        if len(positions) == 1:
            self.select = lambda grads, i=positions[0]: [grads[i]]
        else:
            self.select = operator.itemgetter(*positions) if positions else (lambda grads: [])
        # A complex tensor is updated as its real view, as torch does.
        scale = 2 if dtype.is_complex else 1
        self.numels = array.array("q", [p.numel() * scale for p in params])
        rows = [list(map(_data_ptr, params)), [0] * self.n]
        for key in keys:
            tensors = [s[key] for s in states]
            for p, t, position in zip(params, tensors, positions):
                if t.dtype != dtype or t.shape != p.shape or t.stride() != p.stride() or t.device != p.device:
                    raise RuntimeError(
                        f"{where(position)}: its state {key!r} ({tuple(t.shape)}, {t.dtype}, "
                        f"strides {t.stride()}, {t.device}) does not match the param "
                        f"({tuple(p.shape)}, {p.dtype}, strides {p.stride()}, {p.device})"
                    )
            rows.append(list(map(_data_ptr, tensors)))
        self.addresses = array.array("q", [a for row in rows for a in row])
        element = params[0].element_size() if params else 0
        written = [row for i, row in enumerate(rows) if i != 1]
        regions = [(a, a + e * element) for row in written for a, e in zip(row, [p.numel() for p in params])]
        if _addresses_overlap(regions):
            raise RuntimeError(
                f"{where(positions[0])}: params or state tensors of this param group share memory; "
                "pyfused updates each tensor in place and needs them apart"
            )
        self.steps = None
        self.steps_are_double = False
        self.step_tensors = None
        if optimizer._counts_steps:
            self.step_tensors = [s["step"] for s in states]
            self.steps_are_double = bool(self.step_tensors) and self.step_tensors[0].dtype == torch.float64
            self.steps = array.array("q", map(_data_ptr, self.step_tensors))
        self.flags = None

    def load_grads(self, grads):
        """Checks this bucket's grads and writes their addresses. Returns copies to keep alive."""
        grads = self.select(grads)
        # Metadata is read with map() (C loops); the per-tensor Python loop runs only on a mismatch.
        try:
            strides = list(map(_stride_of, grads))
        except RuntimeError:  # sparse tensors have no strides
            strides = None
        copies = []
        if (
            strides != self.strides
            or list(map(_dtype_of, grads)) != self.dtypes
            or list(map(_shape_of, grads)) != self.shapes
            or list(map(_device_of, grads)) != self.devices
        ):
            grads, copies = self._conform(grads)
        self.addresses[self.n : 2 * self.n] = array.array("q", map(_data_ptr, grads))
        return copies

    def _conform(self, grads):
        """The slow path: names a bad grad, or copies a grad laid out unlike its param."""
        conformed, copies = [], []
        for position, g, shape, stride in zip(self.positions, grads, self.shapes, self.strides):
            if g.layout is not torch.strided:
                raise RuntimeError(f"{self.where(position)}: sparse gradients are not supported")
            if g.dtype != self.dtype or g.shape != shape or g.device != self.device:
                raise RuntimeError(
                    f"{self.where(position)}: its grad ({tuple(g.shape)}, {g.dtype}, {g.device}) "
                    f"does not match the param ({tuple(shape)}, {self.dtype}, {self.device})"
                )
            if g.stride() != stride:
                # Grads are only read, so a copy in the param's layout gives the right result.
                g = torch.empty_strided(shape, stride, dtype=g.dtype, device=g.device).copy_(g)
                copies.append(g)
            conformed.append(g)
        return conformed, copies


class _GroupPlan:
    """A param group's buckets, and what must stay unchanged for them to stay valid."""

    def __init__(self, optimizer, group, group_index, params, grads):
        name = type(optimizer).__name__

        def where(position):
            return f"pyfused.optim.{name}: param {position} of param group {group_index}"

        self.group = group
        self.state_container = optimizer.state
        self.keys = optimizer._state_keys(group)
        self.has_grad = [g is not None for g in grads]
        self.param_addresses = list(map(_data_ptr, params))
        positions = [i for i, g in enumerate(grads) if g is not None]

        # Check everything before creating any state.
        for i in positions:
            p = params[i]
            real = _REAL_DTYPES.get(p.dtype, p.dtype)
            if real not in _DTYPE_CODES:
                raise TypeError(
                    f"{where(i)} is {p.dtype}; pyfused supports float32, float64, float16 and "
                    "bfloat16 params (and complex64, complex128 as their real view)"
                )
            if not _is_dense(p):
                raise RuntimeError(
                    f"{where(i)} is not contiguous (shape {tuple(p.shape)}, strides {p.stride()}); "
                    "pyfused updates params in place and needs them dense"
                )
            _backend.backend_for(p.device)  # rejects a device no backend runs on
        self.active = [params[i] for i in positions]
        self.flags_pending = False
        state = optimizer.state
        flags = {}
        for i, p in zip(positions, self.active):
            flags[i] = optimizer._init_state(p, group, state[p])
            if optimizer._counts_steps:
                _normalize_step(state[p])
        self.state_dicts = [state[p] for p in self.active]
        self.state_ids = list(map(id, self.state_dicts))

        by_kind = {}
        for i, p, s in zip(positions, self.active, self.state_dicts):
            by_kind.setdefault((p.device, p.dtype), []).append((i, p, s))
        self.buckets = []
        for (device, dtype), members in by_kind.items():
            positions_, params_, states_ = map(list, zip(*members))
            bucket = _Bucket(optimizer, where, device, dtype, positions_, params_, states_, self.keys)
            _uniform_step_dtype(bucket)
            if any(flags[i] for i in positions_):
                bucket.flags = array.array("q", [flags[i] for i in positions_])
                self.flags_pending = True
            self.buckets.append(bucket)

    def still_valid(self, optimizer, group, params, grads) -> bool:
        return (
            optimizer.state is self.state_container
            and [g is not None for g in grads] == self.has_grad
            and list(map(_data_ptr, params)) == self.param_addresses
            and self.keys == optimizer._state_keys(group)
            and list(map(id, map(optimizer.state.get, self.active))) == self.state_ids
        )


def _normalize_step(state):
    """Keeps `step` a host float scalar the kernel can count in (a loaded one may live elsewhere)."""
    step = state["step"]
    if not (isinstance(step, torch.Tensor) and step.device.type == "cpu" and step.dtype in (torch.float32, torch.float64) and step.numel() == 1):
        state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())


def _uniform_step_dtype(bucket):
    """One call counts all steps in one float type; a mix (the default dtype changed between two
    params' first steps) is refused rather than silently converted."""
    if bucket.step_tensors is None:
        return
    want = torch.float64 if bucket.steps_are_double else torch.float32
    if any(t.dtype != want for t in bucket.step_tensors):
        raise RuntimeError("pyfused: the `step` tensors of one param group mix float32 and float64")


def _unhooked(step):
    """torch's step without the profiling/hook wrapper torch adds to every optimizer class."""
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


class GradFactor:
    """What the kernels apply to every grad before the update.

    scale: torch.amp.GradScaler's scale (fused-optimizer protocol): grads are divided by it and
        the unscaled grads are stored back, as torch's fused optimizers do;
    multiplier: a clip coefficient deferred by pyfused.nn.utils.clip_grad_norm_(optimizer=...):
        multiplied in, grads left as they are (that is the read and write it saves).
    Both are 0-d tensors or None; on CUDA the Triton kernels read them on the device.
    """

    def __init__(self, scale=None, multiplier=None):
        self.scale = scale
        self.multiplier = multiplier
        self.store_grads = scale is not None

    @functools.cached_property
    def divisor_value(self) -> float:
        return float(self.scale) if self.scale is not None else 1.0

    @functools.cached_property
    def multiplier_value(self) -> float:
        return float(self.multiplier) if self.multiplier is not None else 1.0

    @property
    def active(self) -> bool:
        return self.scale is not None or self.multiplier is not None

    def on_device(self, device) -> torch.Tensor:
        """[divisor, multiplier] as float64 on the device, without a host sync."""
        one = torch.ones((), dtype=torch.float64, device=device)
        parts = [t.to(device=device, dtype=torch.float64, non_blocking=True) if t is not None else one
                 for t in (self.scale, self.multiplier)]
        return torch.stack(parts)


class FusedOptimizer:
    """Mixin in front of a torch.optim class; see the module docstring."""

    _kernel: str
    _torch_class: type
    _counts_steps = True
    # torch.amp.GradScaler then hands its scale and found_inf to step() (as optimizer.grad_scale
    # and optimizer.found_inf) instead of unscaling the grads in a pass of its own.
    _step_supports_amp_scaling = True

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = f"pyfused.optim.{type(self).__name__}"
        if group.get("differentiable"):
            raise RuntimeError(f"{name} does not support `differentiable`; use torch.optim for that")
        if group.get("capturable"):
            raise RuntimeError(
                f"{name} does not support capturable=True (a step captured in a CUDA graph) yet; "
                "use torch.optim for that"
            )

    def step(self, closure=None):
        """Performs a single optimization step, one kernel call per (param group, dtype).

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        factor = GradFactor(getattr(self, "grad_scale", None), self.__dict__.pop("_pyfused_grad_multiplier", None))
        found_inf = getattr(self, "found_inf", None)
        if _backend.forced_backend() == "torch":
            self._torch_step(factor, found_inf)
            return loss
        # Every group is checked before any tensor changes.
        work = [self._prepare(group, index) for index, group in enumerate(self.param_groups)]
        if found_inf is not None and float(found_inf) != 0:
            return loss  # GradScaler saw inf or NaN: nothing moves, steps included
        for group, plan, _grad_copies in work:
            hyper = tuple(map(float, self._hyper(group)))
            for bucket in plan.buckets:
                _run(self._kernel, bucket, hyper, factor)
            if plan.flags_pending:  # flags mark a tensor's first step only
                for bucket in plan.buckets:
                    bucket.flags = None
                plan.flags_pending = False
        return loss

    def defer_grad_multiplier(self, multiplier: torch.Tensor) -> None:
        """Multiplies every grad by `multiplier` (a 0-d tensor) inside the next step's kernels,
        without changing the grads. pyfused.nn.utils.clip_grad_norm_(optimizer=...) uses this."""
        previous = self.__dict__.get("_pyfused_grad_multiplier")
        self._pyfused_grad_multiplier = multiplier if previous is None else previous * multiplier

    def _prepare(self, group, index):
        params = group["params"]
        grads = list(map(_grad_of, params))
        plans = self.__dict__.setdefault("_pyfused_plans", {})
        plan = plans.get(index)
        if plan is None or plan.group is not group or not plan.still_valid(self, group, params, grads):
            plan = _GroupPlan(self, group, index, params, grads)
            plans[index] = plan
        copies = [bucket.load_grads(grads) for bucket in plan.buckets]
        return group, plan, copies

    def _torch_step(self, factor, found_inf):
        """torch's own for-loop implementation: the reference (PYFUSED_BACKEND=torch)."""
        if found_inf is not None and float(found_inf) != 0:
            return
        if factor.active:  # the for-loop takes no grad factor: apply it to the grads first
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if factor.scale is not None:
                torch._foreach_div_(grads, factor.divisor_value)
            if factor.multiplier is not None:
                torch._foreach_mul_(grads, factor.multiplier_value)
        saved = [(group.get("foreach"), group.get("fused")) for group in self.param_groups]
        for group in self.param_groups:
            group["foreach"] = False
            if "fused" in group:
                group["fused"] = False
        scale = self.__dict__.pop("grad_scale", None)
        found = self.__dict__.pop("found_inf", None)
        try:
            _unhooked(self._torch_class.step)(self)
        finally:
            for group, (foreach, fused) in zip(self.param_groups, saved):
                group["foreach"] = foreach
                if "fused" in group:
                    group["fused"] = fused
            if scale is not None:
                self.grad_scale = scale
            if found is not None:
                self.found_inf = found

    # Filled in by each optimizer.
    def _state_keys(self, group):
        raise NotImplementedError

    def _init_state(self, param, group, state):
        raise NotImplementedError

    def _hyper(self, group):
        raise NotImplementedError


def _run(kernel, bucket, hyper, factor):
    if bucket.n == 0:
        return
    if _backend.backend_for(bucket.device) == "cpp":
        _cpp.optimizer_step(kernel, bucket, hyper, factor)
    else:
        from pyfused import _triton  # imports triton: only once a step needs it

        _triton.optimizer_step(kernel, bucket, hyper, factor)
