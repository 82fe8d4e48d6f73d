"""What every pyfused optimizer shares: one kernel call per (device, dtype, state layout).

A pyfused optimizer is a subclass of torch's optimizer of the same name with this mixin in front.
Construction, argument checks, param groups, state_dict and schedulers are therefore torch's own;
only step() differs. A subclass says three things (see adam.py):
  _state_keys(group)           the state tensors the kernel reads and writes, in its role order
                               (the group's state layout: groups with the same one share a call);
  _new_state(p, group, state)  the state torch would create for p that `state` lacks (default: a step
                               count and zeros for each state key), and p's per-tensor flags for the kernel;
  _hyper(group)                the kernel's scalars, in the order of its Hyper in csrc/optimizers.h.

step() caches a plan: every param group's tensors bucketed by (device, dtype, state layout), with
their address tables. Groups that differ only in scalar hyperparameters (lr, weight decay, betas,
...) share a bucket, and so a kernel call; each group's Hyper travels with it, read anew every
step (a scheduler's lr takes effect at the next step, and never recompiles a Triton kernel). Each
step then only reads the grads, checks them, and writes their addresses into the tables. The plan
is rebuilt when a param group is added, a param is replaced or gains or loses its grad, a param's
storage moves, or a state dict or state tensor is replaced (load_state_dict, a state reset, a
group option that adds or removes one); these checks are C-level passes over the flat lists of
params, grads and state objects. New state enters optimizer.state only once a step has run, so a
step refused for bad input, or skipped by GradScaler, changes nothing.

DTensor params (FSDP2's fully_shard, tensor parallelism): the kernels see each DTensor's local
shard (its pointer, numel, shape and strides), never the DTensor itself, whose data_ptr() is not
an address. State stays in optimizer.state as DTensors with the param's mesh and placements, as
torch's optimizers leave it, so torch.distributed.checkpoint and get_/set_optimizer_state_dict
work unchanged. An empty local shard (uneven sharding) is kept: its step counter still advances.
Any other tensor whose memory pyfused cannot address (a wrapper subclass, a meta tensor, freed
storage) is refused before anything changes.
"""

import array
import functools
import itertools
import operator
import os
import sys

import torch
from torch.optim.optimizer import _get_scalar_dtype

from pyfused import _backend, _cpp
from pyfused.optim.stats import StepStats


_DTYPE_CODES = _cpp.DTYPE_CODES
_REAL_DTYPES = _cpp.REAL_DTYPES
_grad_of = operator.attrgetter("grad")
_params_of = operator.itemgetter("params")
_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")
_device_of = operator.attrgetter("device")
_stride_of = torch.Tensor.stride
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_capturable = operator.methodcaller("get", "capturable")
_first = operator.itemgetter(0)
_PLAIN_NUMBERS = frozenset((float, int, bool))  # what array("d") takes as it is
_IMMUTABLE = frozenset((float, int, bool, str, type(None)))


def _same(objects, expected) -> bool:
    """Whether two sequences hold the same objects, by identity (a C-level pass, no hashing)."""
    return len(objects) == len(expected) and all(map(operator.is_, objects, expected))


def _frozen_options(group) -> bool:
    """Whether a param group's options (all but torch's params and param_names lists) are
    immutable values: only assigning a new value (which moves the group's dict_version) changes one."""
    return all(type(v) in _IMMUTABLE or type(v) is tuple and _IMMUTABLE.issuperset(map(type, v))
               for k, v in group.items() if k != "params" and k != "param_names")


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


def _dtensor_type():
    """torch's DTensor class, or None while torch.distributed.tensor is not imported (then no
    DTensor exists: importing it here would cost every user its import time)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _is_dtensor(t) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _local(t):
    """What a kernel may see of t: a DTensor's local shard (to_local() without autograd), else t."""
    return t._local_tensor if _is_dtensor(t) else t


def _unaddressable(t):
    """Why a kernel cannot be handed t's memory, or None if it can (t is not a DTensor)."""
    if t.device.type == "meta":
        return "is a meta tensor (it has no data)"
    try:
        storage = t.untyped_storage()
        base = storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return f"is a {type(t).__name__}, a tensor subclass without memory of its own"
    if t.numel() == 0:
        return None  # nothing to read or write
    if base == 0:
        return "has no memory (its storage was freed or never allocated)"
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    if start < base or start + extent * t.element_size() > base + storage.nbytes():
        return "lies outside its storage"
    return None


def _check_addressable(t, where, what):
    reason = _unaddressable(t)
    if reason is not None:
        raise RuntimeError(f"{where}: {what} {reason}; pyfused's kernels need a tensor's memory")


def _dtensor_layout(t):
    return (t.device_mesh, tuple(t.placements))


def _check_same_sharding(p, t, where, what):
    """t (a grad or state of the DTensor or plain param p) must be sharded exactly as p is."""
    p_is, t_is = _is_dtensor(p), _is_dtensor(t)
    if p_is != t_is:
        raise RuntimeError(
            f"{where}: {what} is {'a DTensor' if t_is else 'not a DTensor'} and the param "
            f"{'is' if p_is else 'is not'}; pyfused needs both sharded alike"
        )
    if p_is and _dtensor_layout(t) != _dtensor_layout(p):
        raise RuntimeError(
            f"{where}: {what} is a DTensor on {t.device_mesh} with placements {tuple(t.placements)}, "
            f"the param on {p.device_mesh} with {tuple(p.placements)}; pyfused updates local shards "
            "and needs them to match"
        )


def _new_guard(guards_class, tensors):
    return guards_class(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                        dynamic_dims_strides=[list(t.stride()) for t in tensors])


def _usable_tensor_guards():
    """dynamo's TensorGuards (a private API), if this torch has one that builds as _new_guard
    builds it, passes an unchanged tensor and fails a resized one; else None."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        t = torch.zeros(4)
        guard = _new_guard(TensorGuards, [t])
        passed = guard.check(t)
        t.resize_(5)
        return TensorGuards if passed and not guard.check(t) else None
    except Exception:  # absent, or its signature or behaviour changed: the per-attribute passes alone
        return None


_TensorGuards = _usable_tensor_guards()


def _metadata_guard(tensors):
    """A check that tensors still have their current type, dtype, device, shape and strides (and
    requires_grad and dispatch keys, whose change only sends a step to the full check), made in
    one C++ pass: dynamo's TensorGuards, which keeps no reference to them. Built only for grads
    that persist across steps: building it costs more than one step's passes. None without it."""
    return None if _TensorGuards is None else _new_guard(_TensorGuards, tensors)


def _any_lazy(tensors) -> bool:
    """Whether a tensor carries a conjugate or negative bit (g.conj(), torch._neg_view): its
    memory holds other values than it reads as."""
    return any(map(torch.Tensor.is_conj, tensors)) or any(map(torch.Tensor.is_neg, tensors))


def _layout_of(tensors):
    """What _metadata_guard checks, where it is absent: types, shapes, strides, dtypes, devices."""
    return (list(map(type, tensors)), list(map(_shape_of, tensors)), list(map(_stride_of, tensors)),
            list(map(_dtype_of, tensors)), list(map(_device_of, tensors)))


def _overlapping_pair(regions):
    """Two of the (start, end, owner) byte ranges that overlap, or None."""
    regions = sorted(r for r in regions if r[0] != r[1])
    return next(((a, b) for a, b in zip(regions, regions[1:]) if b[0] < a[1]), None)


class _Bucket:
    """The tensors that share a device, a dtype and a state layout, across param groups: one
    kernel call per step. The table lists them group by group; group_ends says where each ends."""

    def __init__(self, optimizer, where, device, dtype, members, keys, capturable=False):
        # members: (flat position, group index, param, state as the step will leave it, flag), in
        # group order; params are DTensors or plain, the tables hold local shards only.
        positions, groups, params, states, flags = map(list, zip(*members))
        self.device = device
        self.dtype = dtype
        self.capturable = capturable  # step counters on the device; see pyfused/_triton.py
        self.dtype_code = _DTYPE_CODES[_REAL_DTYPES.get(dtype, dtype)]
        self.positions = positions
        self.n = len(positions)
        self.groups = list(dict.fromkeys(groups))  # the param groups, each once, in order
        ends = itertools.accumulate(map(groups.count, self.groups))
        self.group_ends = array.array("q", ends)
        self.where = where  # a function naming a param (by flat position) for error messages
        self.params = params
        shards = list(map(_local, params))
        self.shapes = [p.shape for p in shards]
        self.strides = [p.stride() for p in shards]
        # Every param contiguous: a grad that is contiguous with the param's shape then has the
        # param's memory layout (is_contiguous() costs less than stride() and its comparison).
        self.contiguous = all(p.is_contiguous() for p in shards)
        self.dtypes = [dtype] * self.n
        self.devices = [device] * self.n
        is_dtensor = [_is_dtensor(p) for p in params]
        # For DTensor params, what each step's grads must be beyond their types (which the plan
        # checks): their meshes and placements.
        self.layouts = [_dtensor_layout(p) for p in params] if any(is_dtensor) else None
        self.is_dtensor = is_dtensor
        # Picks this bucket's grads out of the step's grad list; the usual single bucket, which
        # holds every param in order, takes the list as it is.
        self.whole = positions == list(range(len(positions)))
        if len(positions) == 1:
            self.select = lambda grads, i=positions[0]: [grads[i]]
        else:
            self.select = operator.itemgetter(*positions)
        # A complex tensor is updated as its real view, as torch does.
        scale = 2 if dtype.is_complex else 1
        self.refuses_conj = dtype.is_complex and optimizer._views_complex_grads
        self.numels = array.array("q", [p.numel() * scale for p in shards])
        rows = [list(map(_data_ptr, shards)), [0] * self.n]
        for key in keys:
            rows.append([_local(s[key]).data_ptr() for s in states])
        self.addresses = array.array("q", [a for row in rows for a in row])
        element = shards[0].element_size()
        written = [row for i, row in enumerate(rows) if i != 1]
        pair = _overlapping_pair([(a, a + e * element, k) for row in written
                                  for k, (a, e) in enumerate(zip(row, [p.numel() for p in shards]))])
        if pair is not None:
            first, second = (groups[r[2]] for r in pair)
            if first == second:
                raise RuntimeError(
                    f"{where(positions[groups.index(first)])}: params or state tensors of this param group "
                    "share memory; pyfused updates each tensor in place and needs them apart"
                )
            raise RuntimeError(
                f"pyfused.optim.{type(optimizer).__name__}: params or state tensors of param groups "
                f"{min(first, second)} and {max(first, second)} share memory; pyfused updates each "
                "tensor in place and needs them apart"
            )
        self.steps = None
        self.steps_are_double = False
        self.step_tensors = None
        if optimizer._counts_steps:
            self.step_tensors = [s["step"] for s in states]
            self.steps_are_double = self.step_tensors[0].dtype == torch.float64
            self.steps = array.array("q", map(_data_ptr, self.step_tensors))
        # The grads' addresses where load_grads() last found them good (None: look at them all),
        # and their metadata, once a step found them unchanged (_metadata_guard).
        self.grad_addresses = None
        self.guard = None
        # Flags mark a tensor's first step only: cleared by the plan's commit().
        self.flags = array.array("q", flags) if any(flags) else None

    _hypers_of = None  # the list hypers() last read (kept, so its id stays its own)

    def hypers(self, hypers):
        """This bucket's hyperparameters (array('d')) from every group's: its groups' in turn;
        the last array while step() hands the same list (no group changed)."""
        if hypers is not self._hypers_of:
            self._hyper_array = array.array("d", list(itertools.chain.from_iterable(map(hypers.__getitem__, self.groups))))
            self._hypers_of = hypers
        return self._hyper_array

    def load_grads(self, grads):
        """Checks this bucket's grads and writes their addresses. Returns copies to keep alive, or
        None where the plan no longer fits the params (_conform). Their types the plan has checked."""
        if not self.whole or len(grads) != self.n:
            grads = self.select(grads)
        # Grads at the addresses the last step found good, with the layout, shape, dtype and
        # device found then, need no other check: those addresses are in the table already.
        # Whether they are the same tensor objects does not matter (zero_grad(set_to_none=True)
        # and backward often give new grads the old memory). A grad resized, transposed or
        # re-viewed in place (`.data =`) keeps its object, not its metadata. Layout: the param's
        # strides, or (every param contiguous) contiguity, which with the shape fixes the same
        # strides up to those of size-1 dims, which move nothing. From the second unchanged step
        # on, one guard call checks types, shapes, strides, dtypes and devices.
        if self.grad_addresses is not None and self._at_known_addresses(grads):
            if self.guard is not None:
                if self.guard.check(*grads):
                    return []
            elif (
                list(map(_shape_of, grads)) == self.shapes
                and (all(map(_is_contiguous, grads)) if self.contiguous else list(map(_stride_of, grads)) == self.strides)
                and list(map(_dtype_of, grads)) == self.dtypes
                and list(map(_device_of, grads)) == self.devices
                and not _any_lazy(grads)
            ):
                self.guard = _metadata_guard(grads)
                return []
        self.grad_addresses = self.guard = None
        copies = self._check_grads(grads)
        if copies == [] and self.layouts is None:
            self.grad_addresses = self.addresses[self.n : 2 * self.n].tolist()
        return copies

    def _at_known_addresses(self, grads) -> bool:
        try:
            return list(map(_data_ptr, grads)) == self.grad_addresses
        except (RuntimeError, NotImplementedError, TypeError):  # no storage (a sparse grad): the full check names it
            return False

    def _check_grads(self, grads):
        # Metadata is read with map() (C loops); the per-tensor Python loop runs only on a mismatch.
        if self.layouts is not None and list(map(_dtensor_layout, grads)) != self.layouts:
            return self._conform(grads)
        selected = grads
        if self.layouts is not None:
            grads = [g._local_tensor if d else g for g, d in zip(grads, self.is_dtensor)]
        try:
            strides = list(map(_stride_of, grads))
        except RuntimeError:  # sparse tensors have no strides
            strides = None
        if (
            strides != self.strides
            or list(map(_dtype_of, grads)) != self.dtypes
            or list(map(_shape_of, grads)) != self.shapes
            or list(map(_device_of, grads)) != self.devices
            or _any_lazy(grads)
        ):
            return self._conform(selected)
        addresses = list(map(_data_ptr, grads))
        if 0 in addresses:  # freed storage: only an empty grad may have no address
            return self._conform(selected)
        self.addresses[self.n : 2 * self.n] = array.array("q", addresses)
        return []

    def _conform(self, grads):
        """The slow path: names a bad grad, or copies a grad laid out unlike its param. None if a
        param has another shape or strides than the table's: re-viewed in place (set_, at the same
        address), it needs a new plan (the table's sizes would reach past its grad)."""
        shards, copies = [], []
        for position, p, g, shape, stride in zip(self.positions, self.params, grads, self.shapes, self.strides):
            if _local(p).shape != shape or _local(p).stride() != stride:
                return None
            _check_grad(p, g, self.where(position))
            g = _local(g)
            if self.refuses_conj and g.is_conj():
                raise RuntimeError(
                    f"{self.where(position)}: view_as_real doesn't work on unresolved conjugated tensors.  To "
                    "resolve the conjugate tensor so you can view it as real, use self.resolve_conj(); however, "
                    "be warned that the resulting tensor will NOT alias the original."
                )
            if g.stride() != stride or g.is_conj() or g.is_neg():
                # Grads are only read, so a copy in the param's layout (conjugation and negation
                # applied: the kernels read the memory as it is) gives the right result.
                g = torch.empty_strided(shape, stride, dtype=g.dtype, device=g.device).copy_(g)
                copies.append(g)
            shards.append(g)
        self.addresses[self.n : 2 * self.n] = array.array("q", map(_data_ptr, shards))
        return copies


def _usable_dict_version():
    """dynamo's dict_version (CPython's per-dict version tag, which every insertion, replacement
    and deletion moves to a value no dict had), if this torch and Python have one that moves on
    every change; else None. On Python 3.12+ it counts dict-watcher events, and torch skips the
    one an empty dict's update() from another dict sends (PyDict_EVENT_CLONED): the probe's last
    change is that one, so there the checks fall back to identities."""
    try:
        from torch._C._dynamo.guards import dict_version

        d = {"a": 0}
        seen = [dict_version(d)]
        for change in (lambda: d.__setitem__("a", 1), lambda: d.__setitem__("b", 2), lambda: d.pop("b"),
                       d.clear, lambda: d.update({"c": 3})):
            change()
            seen.append(dict_version(d))
    except Exception:  # absent, or it cannot watch dicts here (Python 3.12+ registers a watcher)
        return None
    return dict_version if len(set(seen)) == len(seen) else None


_dict_version = _usable_dict_version()


class _StateSnapshot:
    """The optimizer's per-param state dicts, which the plan's tables were built from, and what
    was in them: a dict replaced, added or removed moves the version of optimizer.state (one C
    call), a tensor assigned into one or a key deleted moves that dict's version (one C call per
    dict). Without versions, the dicts and their values are compared by identity instead."""

    def __init__(self, state):
        self.dicts = dicts = list(state.values())
        self.container_version = None if _dict_version is None else _dict_version(state)
        self.versions = None if _dict_version is None else list(map(_dict_version, dicts))
        # Where every dict has the same keys (the common case), the values are read key by key:
        # one itemgetter pass and one identity pass per key, with no tuple per dict. A key that
        # appears later is not one the tables use; one deleted raises KeyError.
        layouts = set(map(tuple, dicts))
        keys = layouts.pop() if len(layouts) == 1 else None
        self.getters = None if keys is None else list(map(operator.itemgetter, keys))
        self.values = None if self.versions is not None else self._values()

    def _values(self):
        if self.getters is None:
            return list(itertools.chain.from_iterable(map(dict.values, self.dicts)))
        return [list(map(getter, self.dicts)) for getter in self.getters]

    def unchanged(self, state) -> bool:
        """Whether state (the container the snapshot was taken of) still holds what it held."""
        if self.versions is not None:
            return _dict_version(state) == self.container_version and list(map(_dict_version, self.dicts)) == self.versions
        if not _same(state.values(), self.dicts):
            return False
        try:
            if self.getters is None:
                return _same(self._values(), self.values)
            return all(_same(list(map(getter, self.dicts)), values)
                       for getter, values in zip(self.getters, self.values))
        except KeyError:  # a key deleted
            return False


class _Plan:
    """The step's kernel calls, and what must stay unchanged for them to stay valid.

    Every param group's tensors are bucketed by (device, dtype, state layout): groups that differ
    only in scalar hyperparameters share one call, each group's values travelling with it."""

    def __init__(self, optimizer, groups, params, grads, keys):
        name = type(optimizer).__name__
        locations = [(index, position) for index, group in enumerate(groups) for position in range(len(group["params"]))]

        def where(flat):
            index, position = locations[flat]
            return f"pyfused.optim.{name}: param {position} of param group {index}"

        # The groups, params and state objects still_valid() compares by identity.
        self.groups = list(groups)
        self.params = params
        self.grad_types = list(map(type, grads))  # NoneType where a param has no grad
        self.keys = keys
        self.state_container = optimizer.state
        self.has_dtensors = any(map(_is_dtensor, params))
        self.state_tensors = []
        self.buckets = []
        self.pending = []
        self.state = None
        active = [i for i, g in enumerate(grads) if g is not None]
        self.uses_torch = any(_backend.backend_for(params[i].device) == "torch" for i in active)
        if self.uses_torch:
            self._watch(params)
            return  # devices without pyfused kernels: the whole step is torch's own
        for i in active:
            _check_param(params[i], where(i))
            _check_grad(params[i], grads[i], where(i))

        # Each param's state as the step will leave it. What is new (torch's lazy state, a step
        # counter moved to the host, a tensor copied into the param's layout) waits in
        # self.pending until a step has run.
        group_of = [index for index, _ in locations]
        members = {}
        host_steps, device_steps = ([], []), {}
        for i in active:
            p, index = params[i], group_of[i]
            group = groups[index]
            existing = optimizer.state.get(p, {})
            new, flag = optimizer._new_state(p, group, existing)
            view = {**existing, **new}
            new.update(_conformed_state(p, view, keys[index], where(i)))
            view.update(new)
            if new:
                self.pending.append((p, new))
            capturable = bool(group.get("capturable"))
            steps = device_steps.setdefault(index, ([], [])) if capturable else host_steps
            steps[0].append(p)
            steps[1].append(view)
            # Capturable groups keep a call each: their lr is read on the device.
            key = (p.device, p.dtype, keys[index], index if capturable else None)
            members.setdefault(key, []).append((i, index, p, view, flag))
        # The step counters of one call must share a float type: all host ones do, and each
        # capturable group's do.
        if optimizer._counts_steps:
            _conform_steps(*host_steps, self.pending)
            for steps in device_steps.values():
                _conform_steps(*steps, self.pending, on_device=True)
        for (device, dtype, state_keys, capturable), bucket_members in members.items():
            self.buckets.append(_Bucket(optimizer, where, device, dtype, bucket_members, state_keys,
                                        capturable=capturable is not None))
        # The state tensors the tables point into (the step's, pending ones included: commit()
        # puts those very objects into the state dicts).
        self.state_tensors = [view[key] for _, index, _, view, _ in itertools.chain.from_iterable(members.values())
                              for key in keys[index]]
        if optimizer._counts_steps:
            self.state_tensors += [view["step"] for _, _, _, view, _ in itertools.chain.from_iterable(members.values())]
        self._watch(params)
        if not self.pending:
            self._snapshot(optimizer)

    def _watched(self, params):
        """The tensors whose memory the tables hold, as local shards (a DTensor's own data_ptr()
        does not move with its shard): the params, then the state tensors."""
        if self.has_dtensors:
            return list(map(_local, itertools.chain(params, self.state_tensors)))
        return [*params, *self.state_tensors]

    def _watch(self, params):
        # A tensor rebound in place (.data =, set_, resize_) keeps its object and may keep its
        # address (a freed block reused) while its size changes: the tables' sizes would then
        # reach past it. Addresses and metadata are compared each step (_unmoved).
        tensors = self._watched(params)
        self.addresses_seen = list(map(_data_ptr, tensors))
        self.guard = _metadata_guard(tensors)
        self.layout_seen = None if self.guard is not None else _layout_of(tensors)

    def _unmoved(self, params) -> bool:
        tensors = self._watched(params)
        try:
            if list(map(_data_ptr, tensors)) != self.addresses_seen:
                return False
        except (RuntimeError, NotImplementedError, TypeError):  # no storage now: the full check names it
            return False
        if self.guard is not None:
            return self.guard.check(*tensors)
        return _layout_of(tensors) == self.layout_seen

    def _snapshot(self, optimizer):
        # A state entry that is not a dict: the plan is rebuilt every step.
        dicts = optimizer.state.values()
        self.state = _StateSnapshot(optimizer.state) if all(map(isinstance, dicts, itertools.repeat(dict))) else None

    def still_valid(self, optimizer, groups, params, grads, keys) -> bool:
        # A replaced param (or p.data) moves its address or id; a grad gained, lost or of another
        # type changes the grad types; a replaced state dict or state tensor is another object.
        # A param swapped for a DTensor, or back, moves its address too (a DTensor's data_ptr()
        # is near 0, a shard's a heap address). A param or state tensor rebound in place moves
        # its address or its metadata (_unmoved).
        if self.state is None or optimizer.state is not self.state_container:
            return False
        if keys != self.keys or not _same(groups, self.groups):
            return False
        if not _same(params, self.params) or list(map(type, grads)) != self.grad_types:
            return False
        return self.state.unchanged(optimizer.state) and self._unmoved(params)

    def load_grads(self, grads):
        """Every bucket's grads checked and their addresses written (_Bucket.load_grads): copies
        to keep alive during the step, or None if the plan no longer fits the params."""
        copies = []
        for bucket in self.buckets:
            own = bucket.load_grads(grads)
            if own is None:
                return None
            copies += own
        return copies

    def commit(self, optimizer):
        """After the step ran: the new state becomes the optimizer's."""
        if self.pending:
            for param, new in self.pending:
                optimizer.state[param].update(new)
            self.pending = []
            self._snapshot(optimizer)
        for bucket in self.buckets:
            bucket.flags = None


def _check_param(p, where):
    if _REAL_DTYPES.get(p.dtype, p.dtype) not in _DTYPE_CODES:
        raise TypeError(
            f"{where} is {p.dtype}; pyfused supports float32, float64, float16 and bfloat16 params "
            "(and complex64, complex128 as their real view)"
        )
    shard = _local(p)
    _check_addressable(shard, where, "its local shard" if shard is not p else "it")
    if not _is_dense(shard):
        what = f"{where}'s local shard" if shard is not p else where
        raise RuntimeError(
            f"{what} is not contiguous (shape {tuple(shard.shape)}, strides {shard.stride()}); "
            "pyfused updates params in place and needs them dense"
        )


def _check_grad(p, g, where):
    if g.layout is not torch.strided:
        raise RuntimeError(f"{where}: sparse gradients are not supported")
    _check_same_sharding(p, g, where, "its grad")
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device or _local(g).shape != _local(p).shape:
        raise RuntimeError(
            f"{where}: its grad ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match the param "
            f"({tuple(p.shape)}, {p.dtype}, {p.device})"
        )
    _check_addressable(_local(g), where, "its grad's local shard" if _is_dtensor(g) else "its grad")


def _conformed_state(p, state, keys, where):
    """State tensors laid out unlike their param (a checkpoint from another layout), copied into
    the param's layout; a state of another shape, dtype, device or sharding is refused."""
    conformed = {}
    for key in keys:
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise RuntimeError(f"{where}: its state {key!r} is a {type(t).__name__}, not a tensor")
        _check_same_sharding(p, t, where, f"its state {key!r}")
        if t.dtype != p.dtype or t.shape != p.shape or t.device != p.device or _local(t).shape != _local(p).shape:
            raise RuntimeError(
                f"{where}: its state {key!r} ({tuple(t.shape)}, {t.dtype}, {t.device}) does not "
                f"match the param ({tuple(p.shape)}, {p.dtype}, {p.device})"
            )
        _check_addressable(_local(t), where, f"its state {key!r}")
        if _local(t).stride() != _local(p).stride():
            conformed[key] = torch.empty_like(p).copy_(t)  # empty_like keeps a dense param's strides
    return conformed


def _conform_steps(params, views, pending, on_device=False):
    """Step counters the kernels can count in: float scalars, one float type per group, on the
    host (or on the params' device when capturable). A loaded one may live elsewhere, be an int,
    or differ in type after a default-dtype change; counts are integers below 2^24, which every
    such type holds exactly."""

    def home(p):
        return p.device if on_device else torch.device("cpu")

    steps = [v["step"] for v in views]
    def usable(s, p):  # a plain tensor holding one count, where the kernels count
        return (isinstance(s, torch.Tensor) and not _is_dtensor(s) and s.device == home(p) and s.numel() == 1
                and _unaddressable(s) is None)

    placed = all(usable(s, p) for s, p in zip(steps, params))
    dtypes = {s.dtype for s in steps} if placed else set()
    if placed and len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}:
        return
    want = dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64} else torch.float32
    new_by_param = {id(p): new for p, new in pending}
    for p, view in zip(params, views):
        step = view["step"]
        if usable(step, p) and step.dtype == want:
            continue
        view["step"] = torch.tensor(float(_local(step)), dtype=want, device=home(p))
        if id(p) in new_by_param:
            new_by_param[id(p)]["step"] = view["step"]
        else:
            new = {"step": view["step"]}
            pending.append((p, new))
            new_by_param[id(p)] = new


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
    # torch's step views complex grads as real (view_as_real, which refuses a conjugated tensor).
    _views_complex_grads = True

    def __init__(self, params, *args, flat=False, track_stats=False, average=None, **kwargs):
        """torch's constructor, and pyfused's own options (keyword-only):

        flat: moves the params into contiguous arenas, one per (device, dtype), with their grads
            and state (see pyfused/optim/_arena.py and the README): a step is then a few long
            spans. zero_grad() then always zeroes the grads in place. Create the optimizer
            before wrapping or compiling the model; DTensor and FSDP params are refused.
        track_stats: after each step, `self.stats` holds every stepped param's grad norm, update
            norm, param norm and update/param ratio, computed in the step's kernel pass (see
            pyfused/optim/stats.py). Off, nothing is computed and there is no `stats` attribute.
            With flat=True the steps then take the per-param tables (statistics are per param).
        average: a pyfused.optim.swa_utils.AveragedModel of the model whose params these are; each
            step then also updates it, as average.update_parameters(model) after the step would,
            inside the step's kernel pass where it can (pyfused/optim/swa_utils.py, _StepAverage).
            Not with capturable=True. With flat=True the steps take the per-param tables.
        """
        self._pyfused_track_stats = bool(track_stats)
        if track_stats:
            self.stats = StepStats()
        super().__init__(params, *args, **kwargs)
        self._pyfused_average = None
        if average is not None:
            from pyfused.optim.swa_utils import _StepAverage

            name = f"pyfused.optim.{type(self).__name__}"
            if any(g.get("capturable") for g in self.param_groups):
                raise ValueError(f"{name}: average= does not support capturable=True (the average's count "
                                 "and weight live on the host)")
            self._pyfused_average = _StepAverage(
                average, name, list(itertools.chain.from_iterable(map(_params_of, self.param_groups))))
        if flat:
            from pyfused.optim import _arena

            for index, group in enumerate(self.param_groups):
                _arena.check_flat_group(self, group, index)
            self._pyfused_arena = _arena.Arena()
            self._pyfused_arena.place(self, 0)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = f"pyfused.optim.{type(self).__name__}"
        refusal = None
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # runs CPU tensors as a device
        if group.get("differentiable"):
            refusal = f"{name} does not support `differentiable`; use torch.optim for that"
        elif group.get("capturable") and not interpreted and any(p.device.type != "cuda" for p in group["params"]):
            refusal = f"{name} supports capturable=True only for CUDA params"
        elif group.get("capturable") and self.__dict__.get("_pyfused_average") is not None:
            refusal = f"{name}: average= does not support capturable=True"
        if refusal:
            self.param_groups.pop()
            raise RuntimeError(refusal)
        arena = self.__dict__.get("_pyfused_arena")
        if arena is not None:  # flat=True: the new group gets buffers of its own
            from pyfused.optim import _arena

            try:
                _arena.check_flat_group(self, group, len(self.param_groups) - 1)
            except RuntimeError:
                self.param_groups.pop()
                raise
            arena.place(self, len(self.param_groups) - 1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad; with flat=True the grads are always zeroed in place, in one pass
        per arena, whatever set_to_none (they stay views of the arena)."""
        arena = self.__dict__.get("_pyfused_arena")
        if arena is None:
            return super().zero_grad(set_to_none)
        arena.zero_grad(self, set_to_none)

    def step(self, closure=None):
        """Performs a single optimization step: one kernel call per (device, dtype, state
        layout), whatever the number of param groups.

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
        stats = None
        if self.__dict__.get("_pyfused_track_stats"):  # a step that steps nothing leaves it empty
            stats = self.stats = StepStats()
        average = self.__dict__.get("_pyfused_average")
        if _backend.forced_backend() == "torch":
            self._torch_step(factor, found_inf)
            self._torch_average(average, found_inf)
            return loss
        # Everything is checked before any tensor changes.
        groups = self.param_groups
        params = list(itertools.chain.from_iterable(map(_params_of, groups)))
        grads = list(map(_grad_of, params))
        # Every group's state keys and kernel scalars: the last step's while no group dict has
        # changed (dict_version: a scheduler's new lr moves it) and its values were plain numbers.
        versions = None if _dict_version is None else list(map(_dict_version, groups))
        known = self.__dict__.get("_pyfused_group_values")
        if known is not None and versions == known[0] and _same(groups, known[1]):
            keys, hypers, values = known[2:]
        else:
            keys, hypers = list(map(self._state_keys, groups)), None
        arena = self.__dict__.get("_pyfused_arena")
        if average is not None:
            average.pair(params)  # checked before anything changes
        if arena is not None and stats is None and average is None and arena.ready(self, groups, params, grads, keys):
            plan, buckets = None, arena.spans  # flat=True, nothing changed: a few long spans
        else:
            plan = self.__dict__.get("_pyfused_plan")
            if plan is None or not plan.still_valid(self, groups, params, grads, keys):
                plan = self._new_plan(groups, params, grads, keys)
            _grad_copies = None if plan.uses_torch else plan.load_grads(grads)
            if _grad_copies is None and not plan.uses_torch:  # a param re-viewed in place since
                plan = self._new_plan(groups, params, grads, keys)
                _grad_copies = None if plan.uses_torch else plan.load_grads(grads)
            if plan.uses_torch:
                self._torch_step(factor, found_inf)
                self._torch_average(average, found_inf)
                return loss
            buckets = plan.buckets
        dtensor = _dtensor_type()
        if hypers is None:
            hypers = self._plain_scalars(groups)
            plain = hypers is not None
            if not plain:
                hypers = [self._scalars(group, index, dtensor) for index, group in enumerate(groups)]
            values = [hyper for hyper, _ in hypers]
            # Kept only where no option can change inside its group's dict (a list's or tensor's
            # element), where dict_version would not see it.
            keep = plain and versions is not None and all(map(_frozen_options, groups))
            self._pyfused_group_values = (versions, list(groups), keys, hypers, values) if keep else None
        # GradScaler saw inf or NaN: nothing moves, steps included. Capturable groups read its
        # verdict on the device; the others need it on the host.
        if found_inf is not None and not all(g.get("capturable") for g in groups):
            if float(found_inf) != 0:
                return loss
            found_inf = None
        # The kernels average only where update_parameters would lerp every param (_StepAverage).
        fused = average is not None and all(map(operator.is_not, grads, itertools.repeat(None)))
        runs = []
        for bucket in buckets:
            weight = None if average is None else average.fused_weight(bucket.device, fused)
            fused = fused and weight is not None
            runs.append((bucket, average.addresses(bucket) if fused else None, weight))
        for bucket, addresses, weight in runs:
            table = None if stats is None else stats.new_table(bucket.params, bucket.device)
            lerp = (addresses, weight) if fused else None
            _run(self._kernel, bucket, values, factor, hypers[bucket.groups[0]][1], found_inf, table, lerp)
        if average is not None:
            average.finish(fused)
        if plan is None:
            arena.advanced()
        else:
            plan.commit(self)
            if arena is not None:
                arena.rebuild(self, groups, params, grads, keys)
        return loss

    def _new_plan(self, groups, params, grads, keys):
        self._pyfused_plan = None  # a plan refused for bad input is not kept
        plan = self._pyfused_plan = _Plan(self, groups, params, grads, keys)
        return plan

    @staticmethod
    def _torch_average(average, found_inf):
        """average= after torch's step: update_parameters, unless GradScaler skipped the step."""
        if average is not None and (found_inf is None or float(found_inf) == 0):
            average.finish(False)

    def _plain_scalars(self, groups):
        """Every group's _scalars() when every value is a plain Python number and no group is
        capturable (the common case): the values as given, which the kernel tables take. Else None."""
        given = list(map(self._hyper, groups))
        if _PLAIN_NUMBERS.issuperset(map(type, itertools.chain.from_iterable(given))) and not any(
            map(_capturable, groups)
        ):
            return list(zip(given, map(_first, given)))
        return None

    def _scalars(self, group, index, dtensor):
        """The kernel's scalars, and lr as given (read on the device when capturable). A DTensor
        lr must be Replicate: every rank then holds the whole value in its local tensor.
        dtensor: torch's DTensor class, or None while there can be none."""
        hyper = self._hyper(group)
        if dtensor is not None and any(map(isinstance, hyper, itertools.repeat(dtensor))):
            hyper = [self._replicated(value, index) if isinstance(value, dtensor) else value for value in hyper]
        lr = hyper[0]
        if group.get("capturable"):  # lr is read on the device, never on the host
            return (0.0,) + tuple(map(float, hyper[1:])), lr
        return tuple(map(float, hyper)), lr

    def _replicated(self, value, index):
        if not all(placement.is_replicate() for placement in value.placements):
            raise RuntimeError(
                f"pyfused.optim.{type(self).__name__}: param group {index} has a DTensor "
                f"hyperparameter with placements {tuple(value.placements)}; only a Replicate "
                "one holds its value on every rank"
            )
        return value._local_tensor

    def _new_step(self, param, group):
        """torch's step counter: on the param's device when capturable, else on the host."""
        if group.get("capturable"):
            return torch.zeros((), dtype=_get_scalar_dtype(), device=param.device)
        return torch.tensor(0.0, dtype=_get_scalar_dtype())

    def defer_grad_multiplier(self, multiplier: torch.Tensor) -> None:
        """Multiplies every grad by `multiplier` (a 0-d tensor) inside the next step's kernels,
        without changing the grads. pyfused.nn.utils.clip_grad_norm_(optimizer=...) uses this.
        A DTensor multiplier (a norm of DTensor grads) is taken whole: full_tensor()."""
        if _is_dtensor(multiplier):
            multiplier = multiplier.full_tensor()
        previous = self.__dict__.get("_pyfused_grad_multiplier")
        self._pyfused_grad_multiplier = multiplier if previous is None else previous * multiplier

    def _torch_step(self, factor, found_inf):
        """torch's own for-loop implementation: the reference (PYFUSED_BACKEND=torch)."""
        if found_inf is not None and float(found_inf) != 0:
            return
        # The for-loop takes no grad factor. As in the kernels, grads are unscaled in place and
        # the clip coefficient reaches the update only, through temporary grads.
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if factor.scale is not None:
            torch._foreach_div_(grads, factor.divisor_value)
        if factor.multiplier is not None:
            for p, g in zip(params, torch._foreach_mul(grads, factor.multiplier_value)):
                p.grad = g
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
            for p, g in zip(params, grads):
                p.grad = g
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

    def _new_state(self, param, group, state):
        # torch's lazy init for most optimizers: a step count and zeros for each state tensor.
        new = {} if "step" in state else {"step": self._new_step(param, group)}
        for key in self._state_keys(group):
            if key not in state:
                new[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return new, 0

    def _hyper(self, group):
        raise NotImplementedError


def _run(kernel, bucket, hypers, factor, lr, found_inf, stats=None, average=None):
    """One kernel call for the bucket; hypers: every param group's scalars; lr: the bucket's own
    group's lr when it is capturable (a capturable bucket holds one group); stats: None, or the
    [4, n] table that receives the bucket's step statistics; average: None, or (addresses,
    weight), the averages lerped towards the new params (swa_utils._StepAverage)."""
    if _backend.backend_for(bucket.device) == "cpp":
        if found_inf is not None and float(found_inf) != 0:  # a host tensor: no sync
            return
        _cpp.optimizer_step(kernel, bucket, bucket.hypers(hypers), factor, stats, average)
    else:
        from pyfused import _triton  # imports triton: only once a step needs it

        if bucket.capturable:
            _triton.capturable_step(kernel, bucket, bucket.hypers(hypers), factor, lr, found_inf, stats)
        else:
            _triton.optimizer_step(kernel, bucket, bucket.hypers(hypers), factor, stats, average)
