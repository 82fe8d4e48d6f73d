"""flat=True: the params, grads and state of an optimizer in contiguous arenas; a step is a few
long spans.

Layout. At construction (and at each later add_param_group, for the new group), the params of each
(device, dtype) are copied into one new buffer, group after group, and each param becomes a view of
it (p.data = view, its strides kept), as with DDP's gradient_as_bucket_view. Their grads are views of
a second buffer laid out alike (p.grad is set at construction, a grad already there copied in), so
autograd accumulates into it in place. Once a step has created the state, the state tensors of each
segment (one param group's params of one buffer) move into buffers of their own, laid out alike, and
the step counters into one float buffer: each state["step"] is a 0-d view of it. The state keeps
torch's per-param format, so state_dict() and load_state_dict() are torch's own; a loaded state is
copied into the arena by the step after it.

Step counters. torch keeps one per param; in an arena the params of a segment advance together. A
step hands the kernel one span per run of adjacent params whose counters are equal (normally a whole
segment), with the first counter's address: the kernel advances it, and one index_select copies each
run's counter onto its other params. state_dict() thus gives per-param values torch loads, and a
param once skipped (its grad None) only starts a run of its own.

The fast step checks, with C-level passes, that the param groups, params, grads (the views
themselves), the params' and grads' addresses, each group's state keys and the per-param state dicts
are those the spans were built from; anything else takes the general step (_Plan), which is always
correct. After a general step the spans are rebuilt once every grad is its view again (zero_grad()
restores them). Not seen: a tensor assigned into a param's state dict (opt.state[p]["exp_avg"] = t);
replace state with load_state_dict() or a whole dict (opt.state[p] = {...}).

Clipping. The grad views tile their buffers end to end, with no gaps (params are dense), so a grad
buffer holds exactly its views' elements: clip_grad_norm_ handed all of an arena's grads (in any
order) takes the norm of, and scales, the buffers instead (grad_buffers_of).
"""

import array
import itertools
import operator
import weakref

import torch

from pyfused import _backend
from pyfused.optim import _fused
from pyfused.optim._fused import (_DTYPE_CODES, _REAL_DTYPES, _Bucket, _check_param, _data_ptr, _grad_of,
                                  _is_dtensor, _overlapping_pair, _same)


def check_flat_group(optimizer, group, index):
    """Refuses what an arena cannot hold, before anything changes."""
    name = f"pyfused.optim.{type(optimizer).__name__}"
    if group.get("capturable"):
        raise RuntimeError(f"{name}: flat=True does not support capturable=True")
    regions = []
    for position, p in enumerate(group["params"]):
        where = f"{name}: param {position} of param group {index}"
        if _is_dtensor(p) or getattr(p, "_is_flat_param", False):
            raise RuntimeError(
                f"{where} is a {'DTensor' if _is_dtensor(p) else 'FSDP FlatParameter'}; flat=True needs plain "
                "params (FSDP's are already flat shards): use flat=False"
            )
        _check_param(p, where)
        regions.append((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), position))
    pair = _overlapping_pair(regions)
    if pair is not None:
        raise RuntimeError(
            f"{name}: params {pair[0][2]} and {pair[1][2]} of param group {index} share memory; flat=True "
            "would copy them apart"
        )


class _Segment:
    """One param group's params of one arena buffer: offsets[i] is params[i]'s first element."""

    def __init__(self, group_index, params, data, grads, start):
        self.group_index = group_index
        self.params = params
        self.device, self.dtype = data.device, data.dtype
        self.offsets = list(itertools.accumulate((p.numel() for p in params), initial=start))[:-1]
        self.start = start
        self.numel = sum(p.numel() for p in params)
        self.data, self.grads = data, grads
        self.grad_views = []
        with torch.no_grad():
            for p, offset in zip(params, self.offsets):
                view = data.as_strided(p.shape, p.stride(), offset)
                view.copy_(p)
                p.data = view
                grad = grads.as_strided(p.shape, p.stride(), offset)
                if p.grad is not None:
                    grad.copy_(p.grad)
                p.grad = grad
                self.grad_views.append(grad)
        self.addresses = [p.data_ptr() for p in params]
        self.states = {}  # state key -> (buffer, views)

    def state_views(self, key):
        if key not in self.states:
            buffer = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            self.states[key] = (buffer, [buffer.as_strided(p.shape, p.stride(), offset - self.start)
                                         for p, offset in zip(self.params, self.offsets)])
        return self.states[key][1]


class _Spans:
    """A kernel table (what _cpp.optimizer_step and _triton.optimizer_step read from a _Bucket) of
    long spans: one per run of a bucket's segments."""

    capturable = False
    flags = None
    hypers = _Bucket.hypers
    _hypers_of = None

    def __init__(self, device, dtype, runs, n_keys, steps):
        # runs: (group index, numel, [param, grad, state...] addresses, step address), group by group
        self.device, self.dtype = device, dtype
        self.dtype_code = _DTYPE_CODES[_REAL_DTYPES.get(dtype, dtype)]
        self.n = len(runs)
        scale = 2 if dtype.is_complex else 1  # a complex tensor is updated as its real view
        self.numels = array.array("q", [numel * scale for _, numel, _, _ in runs])
        self.addresses = array.array("q", [r[2][role] for role in range(2 + n_keys) for r in runs])
        groups = [index for index, _, _, _ in runs]
        self.groups = list(dict.fromkeys(groups))
        self.group_ends = array.array("q", itertools.accumulate(map(groups.count, self.groups)))
        self.steps = array.array("q", [r[3] for r in runs]) if steps is not None else None
        self.steps_are_double = steps is not None and steps.dtype == torch.float64


# id(grad buffer) -> its Arena. An entry lives as long as its Arena, which holds the buffer: an id
# found here is never a freed buffer's.
_ARENA_OF_GRAD_BUFFER = weakref.WeakValueDictionary()


def grad_buffers_of(grads):
    """The grad buffers of the arena whose grad views `grads` are, if they are all of its views,
    each once, in any order, each still at the address it was given; else None. Identity and
    address comparisons only, as the fast step's check."""
    base = grads[0]._base if grads else None
    arena = _ARENA_OF_GRAD_BUFFER.get(id(base)) if base is not None else None
    if arena is None:
        return None
    if _same(grads, arena.grad_views):  # the optimizer's own order: the usual case
        addresses = arena.grad_view_addresses
    elif len(grads) == len(arena.grad_views) and len(set(map(id, grads))) == len(grads):
        addresses = list(map(arena.grad_view_address_of.get, map(id, grads)))  # None: not a view
    else:
        return None
    return arena.grad_buffers if list(map(_data_ptr, grads)) == addresses else None


class Arena:
    def __init__(self):
        self.segments = []
        self.grad_buffers = []
        self.params, self.grad_views = [], []  # in the optimizer's flat param order
        self.steps = None  # every segment's step counters, segment after segment
        self.spans = None  # the kernel tables; None until rebuilt

    def place(self, optimizer, first_group):
        """Moves the params of param groups first_group... into new buffers, one per (device, dtype)."""
        groups = optimizer.param_groups[first_group:]
        kinds = {}
        for index, group in enumerate(groups, first_group):
            for p in group["params"]:
                kinds.setdefault((p.device, p.dtype), []).append((index, p))
        view_of = {}
        for (device, dtype), members in kinds.items():
            total = sum(p.numel() for _, p in members)
            data = torch.empty(total, dtype=dtype, device=device)
            grads = torch.zeros(total, dtype=dtype, device=device)
            self.grad_buffers.append(grads)
            _ARENA_OF_GRAD_BUFFER[id(grads)] = self
            start = 0
            for index, run in itertools.groupby(members, key=operator.itemgetter(0)):
                params = [p for _, p in run]
                segment = _Segment(index, params, data, grads, start)
                self.segments.append(segment)
                start += segment.numel
                view_of.update(zip(map(id, params), segment.grad_views))
        for group in groups:
            self.params += group["params"]
            self.grad_views += [view_of[id(p)] for p in group["params"]]
        self.param_addresses = list(map(_data_ptr, self.params))
        self.grad_view_addresses = list(map(_data_ptr, self.grad_views))
        self.grad_view_address_of = dict(zip(map(id, self.grad_views), self.grad_view_addresses))
        self.spans = None

    def zero_grad(self, optimizer, set_to_none):
        """Zeroes every grad buffer in place, whatever set_to_none, and gives each param its grad
        view back. A param whose data was replaced is handled as torch would."""
        for grads in self.grad_buffers:
            grads.zero_()
        params = self.params
        if all(map(operator.is_, map(_grad_of, params), self.grad_views)):
            return
        for p, view, address in zip(params, self.grad_views, self.param_addresses):
            if p.grad is view:
                continue
            if p.data_ptr() == address and p.shape == view.shape and p.dtype == view.dtype:
                p.grad = view
            elif p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()

    def ready(self, optimizer, groups, params, grads, keys) -> bool:
        """Whether the spans still describe this step (see the module docstring)."""
        return (
            self.spans is not None
            and optimizer.state is self.state_container
            and _same(grads, self.grad_views)
            and _same(params, self.params)
            and list(map(_data_ptr, params)) == self.param_addresses
            and list(map(_data_ptr, grads)) == self.grad_addresses
            and keys == self.keys
            and _same(groups, self.groups)
            and self._same_state_dicts(optimizer.state)
            and self._same_layout(params, grads)
        )

    def _same_layout(self, params, grads) -> bool:
        # A param or grad view re-viewed in place (set_) at its address with a smaller shape would
        # leave the spans covering elements it no longer has; torch's step refuses the mismatch.
        if self.guard is not None:
            return self.guard.check(*params, *grads)
        return _fused._layout_of([*params, *grads]) == self.layout

    def rebuild(self, optimizer, groups, params, grads, keys):
        """After a general step: moves new state into the arena and builds the spans, if every
        param is still in its place with its grad view."""
        self.spans = None
        if (
            not _same(params, self.params)
            or not _same(grads, self.grad_views)
            or list(map(_data_ptr, params)) != self.param_addresses
            or any(_backend.backend_for(s.device) == "torch" for s in self.segments)
        ):
            return
        state = optimizer.state
        counts = optimizer._counts_steps
        for segment in self.segments:
            for key in keys[segment.group_index]:
                for p, view in zip(segment.params, segment.state_views(key)):
                    if state[p][key] is not view:
                        view.copy_(state[p][key])
                        state[p][key] = view
            segment.states = {key: segment.states[key] for key in keys[segment.group_index]}
        members = [p for segment in self.segments for p in segment.params]
        if counts:
            dtype = state[members[0]]["step"].dtype
            if self.steps is None or self.steps.numel() != len(members) or self.steps.dtype != dtype:
                self.steps = torch.empty(len(members), dtype=dtype)
                self.step_views = list(self.steps)
            for p, view in zip(members, self.step_views):
                if state[p]["step"] is not view:
                    view.copy_(state[p]["step"])
                    state[p]["step"] = view
            values = self.steps.tolist()
        # Runs: adjacent params of a segment whose counters are equal.
        tables, first_of, k = {}, [], 0
        for segment in self.segments:
            group_keys = keys[segment.group_index]
            element = segment.data.element_size()
            bases = [segment.data.data_ptr(), segment.grads.data_ptr()]
            bases += [segment.states[key][0].data_ptr() - segment.start * element for key in group_keys]
            runs = tables.setdefault((segment.device, segment.dtype, group_keys), [])
            for i, (p, offset) in enumerate(zip(segment.params, segment.offsets)):
                if i == 0 or (counts and values[k] != values[first_of[-1]]):
                    runs.append([segment.group_index, 0, [b + offset * element for b in bases],
                                 self.step_views[k].data_ptr() if counts else 0])
                    first = k
                runs[-1][1] += p.numel()
                first_of.append(first)
                k += 1
        self.spans = [_Spans(device, dtype, sorted(runs, key=operator.itemgetter(0)), len(group_keys),
                             self.steps if counts else None)
                      for (device, dtype, group_keys), runs in tables.items()]
        self.first_of = None
        if counts and len(first_of) != sum(s.n for s in self.spans):
            self.first_of = torch.tensor(first_of)
            self.scratch = torch.empty_like(self.steps)
        self.state_container = state
        self.grad_addresses = list(map(_data_ptr, grads))
        self.guard = _fused._metadata_guard([*params, *grads])
        self.layout = None if self.guard is not None else _fused._layout_of([*params, *grads])
        self.keys = keys
        self.groups = list(groups)
        self.state_dicts = list(state.values())
        # Its version, where dict_version works (_fused._usable_dict_version): a dict replaced,
        # added or removed moves it; one C call instead of a pass over the dicts.
        self.state_version = None if _fused._dict_version is None else _fused._dict_version(state)

    def _same_state_dicts(self, state) -> bool:
        if self.state_version is not None:
            return _fused._dict_version(state) == self.state_version
        return _same(state.values(), self.state_dicts)

    def advanced(self):
        """After a fast step: each run's counter, which the kernel advanced, onto its other params."""
        if self.first_of is not None:
            torch.index_select(self.steps, 0, self.first_of, out=self.scratch)
            self.steps.copy_(self.scratch)
