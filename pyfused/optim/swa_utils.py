"""Weight averaging: drop-ins for torch.optim.swa_utils' AveragedModel, get_ema_multi_avg_fn and
get_swa_multi_avg_fn, whose update_parameters makes one fused pass per (device, dtype) over all
averaged tensors: the C++ kernels on CPU (csrc/averaging.h), Triton on CUDA (kernels/averaging.py).

AveragedModel is a subclass of torch's: construction, forward, n_averaged, use_buffers and the
state_dict are torch's own, so a state_dict moves between the two in both directions. Only
update_parameters differs, and only in how it computes; its results are torch's, rounded as
torch's code rounds them on that device:
  get_ema_multi_avg_fn(decay)   torch._foreach_lerp_(avg, model, 1 - decay);
  get_swa_multi_avg_fn()        torch._foreach_lerp_(avg, model, 1 / (n_averaged + 1)), a float32
                                weight, as torch's division of the long counter makes it;
  neither (the default)         on CUDA the same lerp (torch's foreach path); on CPU, which has no
                                foreach kernels, torch's get_swa_avg_fn per tensor,
                                avg + (model - avg) / (n_averaged + 1), each op rounded.
A custom avg_fn or multi_avg_fn runs exactly as torch runs it. The first update (n_averaged 0)
copies, and pairs the kernels cannot take (integer buffers, dtypes or devices that differ between
the average and the model, tensors that are not dense, devices without pyfused kernels) go through
torch's code for their group, so they too end as torch leaves them.

Fused into the step: pyfused.optim.X(params, ..., average=averaged_model) lerps each average
towards its new param inside the step's kernel pass (csrc/multi_tensor.h, kernels/multi_tensor.py),
as update_parameters(model) after the step would (_StepAverage below): same results, same
n_averaged, nothing moved by a step GradScaler skips. Where the kernels cannot do what
update_parameters would (see _StepAverage.fused_weight), the step calls update_parameters itself.

SWALR, update_bn, get_ema_avg_fn and get_swa_avg_fn are torch's own, re-exported so that code can
import everything it used from torch.optim.swa_utils from here.
"""

from __future__ import annotations

import array
import itertools
import operator
import struct
import weakref

import torch
from torch.optim import swa_utils as _torch_swa
from torch.optim.swa_utils import SWALR, get_ema_avg_fn, get_swa_avg_fn, update_bn
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices, _group_tensors_by_device_and_dtype

from pyfused import _backend, _cpp
from pyfused.optim._fused import _REAL_DTYPES, _dict_version, _is_dense, _metadata_guard, _overlapping_pair, _same, _unaddressable

__all__ = ["AveragedModel", "SWALR", "get_ema_avg_fn", "get_ema_multi_avg_fn", "get_swa_avg_fn",
           "get_swa_multi_avg_fn", "update_bn"]

_data_ptr = torch.Tensor.data_ptr
_size = torch.Tensor.size
_stride = torch.Tensor.stride
_is_contiguous = torch.Tensor.is_contiguous
_dtype_of = operator.attrgetter("dtype")
_PLAIN = (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer)


def _float32(x: float) -> float:
    """x rounded to float32. From a double quotient this is the float32 quotient itself: double
    rounding is harmless for division when the wider format has 2p + 2 bits (53 >= 50)."""
    return struct.unpack("f", struct.pack("f", x))[0]


_Module = torch.nn.Module


_METHODS = {"_parameters": "parameters", "_buffers": "buffers"}


def _tree(module, kind):
    """The modules whose `kind` dicts ("_parameters" or "_buffers") module.parameters() or
    module.buffers() reads, in named_modules' order (depth first, each module once), or None where
    a class overrides how torch walks them."""
    method = _METHODS[kind]
    root = type(module)
    if (getattr(root, method) is not getattr(_Module, method)
            or getattr(root, "named_" + method) is not getattr(_Module, "named_" + method)
            or root._named_members is not _Module._named_members):
        return None
    modules, seen, stack = [], set(), [module]
    while stack:
        m = stack.pop()
        if type(m).named_modules is not _Module.named_modules or type(m).__hash__ is not _Module.__hash__:
            return None
        if id(m) not in seen:
            seen.add(id(m))
            modules.append(m)
            stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return modules


def _walk(module, kind, modules):
    """module.parameters() (kind "_parameters") or module.buffers() ("_buffers") in order, from
    _tree's modules, but a tensor reachable twice (a shared module, a tied param) is listed each
    time (_first_each keeps its first place, as torch's memo does), and without the names torch's
    generators build (half the cost of a call on many small tensors). Without modules (a class
    that walks its own way), torch's method."""
    if modules is None:
        return list(getattr(module, _METHODS[kind])())
    return [v for m in modules for v in getattr(m, kind).values() if v is not None]


_children_of = operator.attrgetter("_modules")


class _Walked:
    """_walk(root, kind), kept while nothing it read has changed: the same modules, of the same
    types, holding the same _modules and `kind` dicts, none of them written since (dict_version:
    an insertion, replacement or deletion moves it). That costs a few C-level passes over the
    modules instead of a walk. Not noticed: a module class whose walking methods are replaced
    after the walk. Without dict_version, with a class that walks its own way, or with dicts of
    other types (an OrderedDict reorders without moving its version), it walks every time.

    Which tensors pair is all this decides: whoever uses them still checks their addresses and
    metadata. The root is held weakly (average= holds the model only through AveragedModel's
    weak reference); the modules below it are held."""

    def __init__(self, root, kind):
        self.kind = kind
        self._dicts_of = operator.attrgetter(kind)
        self._read(root, _tree(root, kind))

    def _read(self, root, modules, tensors=None):
        self.tensors = _walk(root, self.kind, modules) if tensors is None else tensors
        self.each = _first_each(self.tensors)
        self.root = weakref.ref(root)
        self.versions = None
        if _dict_version is None or modules is None:
            return
        self.below = modules[1:]
        self.types = list(map(type, modules))
        self.dicts = list(map(_children_of, modules)) + list(map(self._dicts_of, modules))
        if all(map(operator.is_, map(type, self.dicts), itertools.repeat(dict))):
            self.versions = list(map(_dict_version, self.dicts))

    def same(self, root) -> bool:
        """Whether _walk(root, kind) lists the same tensors, by identity; afterwards this holds
        root's walk either way."""
        if self.versions is not None and self.root() is root:
            modules = [root, *self.below]
            if (_same(list(map(type, modules)), self.types)
                    and _same(list(map(_children_of, modules)) + list(map(self._dicts_of, modules)), self.dicts)
                    and list(map(_dict_version, self.dicts)) == self.versions):
                return True
        modules = _tree(root, self.kind)
        tensors = _walk(root, self.kind, modules)
        same = _same(tensors, self.tensors)
        self._read(root, modules, self.tensors if same else tensors)
        return same

    def each_of(self, root):
        """root's tensors each once, as torch's parameters() or buffers() lists them."""
        self.same(root)
        return self.each


def _first_each(tensors):
    """Each tensor once, at its first place (a dict keeps a key's first position); dict(zip(map(...)))
    runs in C."""
    return list(dict(zip(map(id, tensors), tensors)).values())


class _MultiAvgFn:
    """A multi_avg_fn AveragedModel fuses. Called directly it is torch's function (so torch's own
    AveragedModel can take it too)."""

    def __call__(self, averaged_param_list, current_param_list, num_averaged) -> None:
        self._torch(averaged_param_list, current_param_list, num_averaged)


class _Ema(_MultiAvgFn):
    def __init__(self, decay):
        self._torch = _torch_swa.get_ema_multi_avg_fn(decay)  # checks decay, with torch's message
        self.decay = decay

    def __reduce__(self):  # torch's closure does not pickle; rebuilt from decay
        return _Ema, (self.decay,)

    def weight(self, n_averaged: int) -> float:
        return 1 - self.decay


class _Swa(_MultiAvgFn):
    def __init__(self):
        self._torch = _torch_swa.get_swa_multi_avg_fn()

    def __reduce__(self):
        return _Swa, ()

    def weight(self, n_averaged: int) -> float:
        # torch: 1 / (n_averaged + 1) on the long counter, which divides in the default dtype.
        if torch.get_default_dtype() == torch.float64:
            return 1 / (n_averaged + 1)
        return _float32(1 / _float32(n_averaged + 1))


def get_ema_multi_avg_fn(decay=0.999):
    """torch.optim.swa_utils.get_ema_multi_avg_fn(decay) (the same checks and results), which
    AveragedModel.update_parameters runs as one fused lerp per (device, dtype)."""
    return _Ema(decay)


def get_swa_multi_avg_fn():
    """torch.optim.swa_utils.get_swa_multi_avg_fn() (the same results), which
    AveragedModel.update_parameters runs as one fused lerp per (device, dtype)."""
    return _Swa()


class _Group:
    """The fused pairs of one (device, dtype): their positions, address table and, for Triton,
    the device's copy of it and the weight last uploaded."""

    def __init__(self, device, dtype, indices, pairs):
        self.device, self.dtype, self.indices = device, dtype, indices
        self.code = _cpp.DTYPE_CODES[dtype]
        self.numels = array.array("q", [a.numel() for a, _ in pairs])
        self.addresses = array.array("q", [a.data_ptr() for a, _ in pairs] + [m.data_ptr() for _, m in pairs])
        written = [(a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()) for a, _ in pairs]
        read = [(m.data_ptr(), m.data_ptr() + m.numel() * m.element_size()) for _, m in pairs]
        self.overlap = _overlap(written, read)
        self.triton_tables = None
        self.weight = None  # (value, 0-d float64 device tensor)


def _overlap(written, read) -> bool:
    """Whether an average shares memory with another average or with any model tensor (the
    model's own tensors may share memory with each other: they are only read)."""
    if _overlapping_pair(written) is not None:
        return True
    union = []
    for lo, hi in sorted(r for r in read if r[0] != r[1]):
        if union and lo < union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], hi))
        else:
            union.append((lo, hi))
    return _overlapping_pair(written + union) is not None


def _fusable(a, m) -> bool:
    """Whether a kernel can average a towards m element by element, in memory order."""
    return (type(a) in _PLAIN and type(m) in _PLAIN and a.dtype == m.dtype and a.dtype in _cpp.DTYPE_CODES
            and a.device == m.device and a.device.type in ("cpu", "cuda") and a.layout == torch.strided
            and a.shape == m.shape and a.stride() == m.stride() and _is_dense(a)
            and _unaddressable(a) is None and _unaddressable(m) is None)


class _Plan:
    """Which pairs update_parameters fuses, in which groups, and which torch's code averages;
    valid while the AveragedModel and the model walk the same tensors (_Walked) and every one of
    them is at the same address, with the same dtype, sizes and strides (_Layout)."""

    def __init__(self, averaged, model):
        # As torch reads them: with use_buffers, the module's params then buffers against the
        # model's; without, the AveragedModel's params against the model's, and the module's
        # buffers copied from the model's (walks 1 and 3). Repeats dropped side by side, as
        # torch's parameters() and buffers() drop them.
        self.use_buffers = averaged.use_buffers
        self.walks = list(map(_Walked, self._roots(averaged, model), ("_parameters", "_buffers") * 2))
        averaged, buffers, current, model_buffers = (w.each for w in self.walks)
        if self.use_buffers:
            averaged, current = averaged + buffers, current + model_buffers
        pairs = min(len(averaged), len(current))  # torch zips them, strict=False
        self.averaged, self.current = averaged[:pairs], current[:pairs]
        averaged, current = self.averaged, self.current
        self.layout = _Layout(averaged + current, guard=True)
        fused = {}
        self.rest = []  # positions of the pairs torch's code averages
        for i, (a, m) in enumerate(zip(averaged, current)):
            if _fusable(a, m):
                fused.setdefault((a.device, a.dtype), []).append(i)
            else:
                self.rest.append(i)
        self.groups = [_Group(device, dtype, indices, [(averaged[i], current[i]) for i in indices])
                       for (device, dtype), indices in fused.items()]
        # An average sharing memory with another tensor: torch's tensor-by-tensor order decides.
        self.overlap = any(g.overlap for g in self.groups)

    def _roots(self, averaged, model):
        return (averaged.module if self.use_buffers else averaged, averaged.module, model, model)

    def buffers(self):
        """The module's buffers and the model's, which update_parameters copies without use_buffers."""
        return self.walks[1].each, self.walks[3].each

    def unchanged(self, averaged, model) -> bool:
        return (averaged.use_buffers == self.use_buffers
                and all(map(_Walked.same, self.walks, self._roots(averaged, model)))
                and self.layout.unchanged())


class _Layout:
    """The addresses, dtypes, sizes and strides of some tensors, and whether they still hold
    (unchanged(), with C-level passes only)."""

    def __init__(self, tensors, guard=False):
        self.tensors = tensors
        # guard: the metadata checked in one C++ pass (_metadata_guard), for a check each call.
        self.guard = _metadata_guard(tensors) if guard else None
        self.types = list(map(type, tensors))  # a subclass takes torch's code: not the plan's
        # No device: a tensor moved to another device has another address (CUDA's and the
        # host's do not meet).
        self.addresses = list(map(_data_ptr, tensors))
        self.dtypes = list(map(_dtype_of, tensors))
        self.sizes = list(map(_size, tensors))
        # Strides only where not contiguous: contiguous with the same sizes is the same memory
        # order, and is_contiguous() is a flag, where stride() builds a tuple.
        self.contiguous = list(map(_is_contiguous, tensors))
        self.strided = list(itertools.compress(range(len(tensors)), map(operator.not_, self.contiguous)))
        self.strides = self._strides()

    def _strides(self):
        return list(map(_stride, map(self.tensors.__getitem__, self.strided)))

    def unchanged(self) -> bool:
        # all(map(...)) over the same lengths: no list built (a third less than list ==); dtypes
        # and the flags compare by identity.
        tensors = self.tensors
        if not all(map(operator.eq, map(_data_ptr, tensors), self.addresses)):
            return False
        if self.guard is not None and self.guard.check(*tensors):
            return True
        if not (all(map(operator.is_, map(type, tensors), self.types))
                and all(map(operator.is_, map(_dtype_of, tensors), self.dtypes))
                and all(map(operator.is_, map(_is_contiguous, tensors), self.contiguous))
                and all(map(operator.eq, map(_size, tensors), self.sizes))
                and self._strides() == self.strides):
            return False
        if self.guard is not None:  # it also checks what the kernels do not read: requires_grad, dispatch keys
            self.guard = _metadata_guard(tensors)
        return True


class AveragedModel(_torch_swa.AveragedModel):
    """torch.optim.swa_utils.AveragedModel, with update_parameters fused (module docstring).

    One addition: bias_correction=True keeps a copy of the first update's tensors, from which
    bias_corrected() reads the EMA corrected for its start, without writing it into the average.
    """

    def __init__(self, model, device=None, avg_fn=None, multi_avg_fn=None, use_buffers=False, *,
                 bias_correction=False):
        super().__init__(model, device, avg_fn, multi_avg_fn, use_buffers)
        self._source = weakref.ref(model)  # the model an optimizer's average= averages from
        self.bias_correction = bias_correction
        self._first = None  # name -> the first update's tensor, with bias_correction
        self._plan = None

    def _named_averaged(self):
        named = self.module.named_parameters()
        return itertools.chain(named, self.module.named_buffers()) if self.use_buffers else named

    def update_parameters(self, model: torch.nn.Module) -> None:
        fn = self.multi_avg_fn
        if self.avg_fn is not None or not (fn is None or isinstance(fn, _MultiAvgFn)):
            return super().update_parameters(model)  # a custom function: torch's path, exactly
        n = int(self.n_averaged)  # torch's update syncs on it too
        if n <= 0:  # the first update copies (and one with a negative count does nothing)
            super().update_parameters(model)
            if self.bias_correction and n == 0:
                self._first = {name: t.detach().clone() for name, t in self._named_averaged()}
            return
        plan = self._plan
        if plan is None or not plan.unchanged(self, model):
            plan = self._plan = _Plan(self, model)
        averaged, current = plan.averaged, plan.current
        if plan.overlap:
            return super().update_parameters(model)

        kernels, rest = [], list(plan.rest)
        for group in plan.groups:
            how = self._kernel(group, n)
            if how is None:
                rest += group.indices
            else:
                kernels.append((group, how))
        if rest:  # first: where torch's code raises, no fused group has moved yet
            rest_a = [averaged[i].detach() for i in rest]
            rest_m = [current[i].detach().to(a.device) for i, a in zip(rest, rest_a)]
            self._torch_average(rest_a, rest_m)
        for group, (backend, op, scalar) in kernels:
            if backend == "cpp":
                _cpp.average(op, group.code, group.numels, group.addresses, scalar)
            else:
                _triton_lerp(group, scalar)

        if not self.use_buffers:  # torch's: the buffers follow the model's
            _copy_buffers(*plan.buffers())
        self.n_averaged += 1

    def _kernel(self, group, n):
        """(backend, op, scalar) that averages the group as torch would, or None for torch's code."""
        backend = _backend.backend_for(group.device)
        fn = self.multi_avg_fn
        if fn is None and group.device.type not in _get_foreach_kernels_supported_devices():
            # torch's get_swa_avg_fn, tensor by tensor (the C++ kernels only)
            return (backend, _cpp.AVERAGE_DIVIDE, float(n + 1)) if backend == "cpp" else None
        weight = (fn or _SWA).weight(n)
        return (backend, _cpp.AVERAGE_LERP, weight) if backend in ("cpp", "triton") else None

    def _torch_average(self, averaged, current):
        """torch's AveragedModel.update_parameters for n_averaged > 0, on these pairs."""
        grouped = _group_tensors_by_device_and_dtype([averaged, current])
        for (device, _), ([self_params, model_params], _) in grouped.items():
            if self.multi_avg_fn:
                self.multi_avg_fn(self_params, model_params, self.n_averaged.to(device))
            elif device is not None and device.type in _get_foreach_kernels_supported_devices():
                get_swa_multi_avg_fn()(self_params, model_params, self.n_averaged.to(device))
            else:
                avg_fn = get_swa_avg_fn()
                n_averaged = self.n_averaged.to(device)
                for p_averaged, p_model in zip(self_params, model_params, strict=True):
                    p_averaged.copy_(avg_fn(p_averaged, p_model, n_averaged))

    def bias_corrected(self) -> dict[str, torch.Tensor]:
        """The EMA corrected for its start (the lecture's v / (1 - decay^t)), by the names of
        self.module's averaged tensors (its floating-point ones), without touching the average.

        v_t = decay v_{t-1} + (1 - decay) x_t from v_0 = 0 is biased towards 0, hence v_t / (1 -
        decay^t), with t = n_averaged. AveragedModel's EMA starts from the first model instead:
        w_1 = x_1, so w_t = v_t + decay^t x_1, and the corrected EMA is (w_t - decay^t x_1) /
        (1 - decay^t): each x_k weighted (1 - decay) decay^(t-k) / (1 - decay^t), the weights
        summing to 1. x_1 is the copy taken at the first update, which needs bias_correction=True
        and multi_avg_fn=get_ema_multi_avg_fn(decay). Computed in float64, rounded once.
        """
        if not isinstance(self.multi_avg_fn, _Ema):
            raise ValueError("bias_corrected() needs multi_avg_fn=pyfused.optim.swa_utils.get_ema_multi_avg_fn(decay)")
        if self._first is None:
            raise RuntimeError("bias_corrected() needs the first update's tensors: construct the AveragedModel "
                               "with bias_correction=True before its first update_parameters (load_state_dict "
                               "drops them, since they belong to the run that took them)")
        decay_t = self.multi_avg_fn.decay ** int(self.n_averaged)
        if decay_t == 1:
            raise ValueError(f"bias_corrected(): decay {self.multi_avg_fn.decay} has not moved the average "
                             "from the first update, so there is nothing to correct")
        out = {}
        for name, w in self._named_averaged():
            if w.is_floating_point() and name in self._first:
                first = self._first[name].to(w.device, torch.float64)
                out[name] = ((w.detach().double() - decay_t * first) / (1 - decay_t)).to(w.dtype)
        return out

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self._first = None
        return super().load_state_dict(state_dict, strict, assign)

    def __getstate__(self):
        # A weak reference does not pickle: a copy (pickled, torch.save'd or deep-copied) has no
        # model for average=. The plan holds the model's tensors, which are not the copy's to keep.
        state = dict(self.__dict__)
        state["_source"] = _no_model
        state["_plan"] = None
        return state


def _copy_buffers(buffers, model_buffers):
    """torch's update_parameters without use_buffers: each buffer copied from the model's."""
    for b_swa, b_model in zip(buffers, model_buffers, strict=True):
        b_swa.detach().copy_(b_model.detach().to(b_swa.device))


def _no_model():
    """The _source of an AveragedModel copied by pickle or deepcopy (a module-level function pickles)."""
    return None


def _lerp_weight(fn, device, n):
    """The lerp weight update_parameters uses at count n > 0, or None where it does not lerp."""
    if fn is None and device.type not in _get_foreach_kernels_supported_devices():
        return None  # torch's get_swa_avg_fn: a division, tensor by tensor
    return (fn or _SWA).weight(n)


class _StepAverage:
    """average= of a pyfused optimizer: the AveragedModel's parameters paired with the
    optimizer's params (through the model the AveragedModel was built from), their addresses
    for the kernels, and what update_parameters does besides averaging the params.

    The step fuses the average when update_parameters would lerp every param: multi_avg_fn is
    get_ema_multi_avg_fn or get_swa_multi_avg_fn, or None on a device with foreach kernels (CUDA);
    use_buffers=False (the buffers are then copied from the model after the step, as torch
    does); every param has a grad (a param without one is averaged all the same by
    update_parameters); past the first update, which copies; the optimizer holds
    every param of the model (a frozen one, requires_grad=False, left out is averaged all the
    same by update_parameters). Otherwise (a custom avg_fn or multi_avg_fn, the default on CPU,
    which divides, use_buffers=True, whose buffers are averaged too, frozen params outside the
    optimizer) the step calls update_parameters(model) after the update: the same result, in a
    second pass."""

    def __init__(self, averaged, name, params):
        if not isinstance(averaged, AveragedModel):
            raise TypeError(f"{name}: average= takes a pyfused.optim.swa_utils.AveragedModel, got "
                            f"{type(averaged).__module__}.{type(averaged).__qualname__}")
        self.averaged = averaged
        self.name = name
        self.layout = None  # of the paired averages and params, while pair() holds
        self.pair(params)

    @property
    def model(self):
        model = self.averaged._source()
        if model is None:
            raise RuntimeError(f"{self.name}: the model the AveragedModel of average= was built from is gone (a "
                               "pickled or deep-copied AveragedModel has none: build one from the model)")
        return model

    def pair(self, params):
        """Pairs each param (the optimizer's, group by group) with its average, checked like
        state; rechecked whenever a param or average is another object, or has moved, changed
        dtype, sizes or strides (a module's .half() or .to(), `p.data =`, flat=True's arena, a
        load_state_dict(assign=True)). Sets self.averages, or None where the step must call
        update_parameters instead: the model has frozen params the optimizer does not hold."""
        model, module = self.model, self.averaged.module
        if (self.layout is not None and _same(params, self.params) and self.walks[0].same(model)
                and self.walks[1].same(module) and self.layout.unchanged()):
            return
        self.layout = None  # until the checks below pass
        walks = _Walked(model, "_parameters"), _Walked(module, "_parameters")
        model_params, averages = walks[0].each, walks[1].each
        index = {id(p): i for i, p in enumerate(model_params)}
        if len(averages) != len(model_params) or len(params) > len(model_params) or not all(
                id(p) in index for p in params):
            raise ValueError(
                f"{self.name}: average= must average exactly the optimizer's params (and the model's frozen "
                f"ones): the optimizer has {len(params)}, the AveragedModel's model {len(model_params)} and its "
                f"copy {len(averages)}, {sum(id(p) not in index for p in params)} of the optimizer's not in the model")
        if len(params) < len(model_params):
            held = set(map(id, params))
            if any(p.requires_grad for p in model_params if id(p) not in held):
                raise ValueError(
                    f"{self.name}: average= must average exactly the optimizer's params: the model has "
                    f"{len(model_params)}, the optimizer {len(params)}, and only a frozen param "
                    "(requires_grad=False) may be left out")
            paired = None  # update_parameters averages the frozen ones too
        else:
            paired = [averages[index[id(p)]] for p in params]
            for k, (p, a) in enumerate(zip(params, paired)):
                where = f"{self.name}: average= param {k}"
                if a.dtype != p.dtype:
                    raise TypeError(f"{where}: the average is {a.dtype}, the param {p.dtype}")
                if a.shape != p.shape or a.device != p.device or a.stride() != p.stride():
                    raise ValueError(
                        f"{where}: the average ({tuple(a.shape)}, strides {a.stride()}, {a.device}) is not laid "
                        f"out as the param ({tuple(p.shape)}, strides {p.stride()}, {p.device}); the kernels need "
                        "both alike")
                reason = _unaddressable(a)
                if reason is not None or type(a) not in _PLAIN or not _is_dense(a):
                    raise ValueError(f"{where}: the average {reason or 'is not a dense plain tensor'}; pyfused's "
                                     "kernels need its memory")
        self.params, self.walks = list(params), walks
        self.buffer_walks = _Walked(module, "_buffers"), _Walked(model, "_buffers")  # for finish()
        self.averages = paired
        self.layout = _Layout([] if paired is None else paired + self.params, guard=True)

    def addresses(self, bucket):
        """The averages of the bucket's tensors, in its order (array('q')), checked apart from
        each other and from the bucket's params and state; kept on the bucket while pair()'s
        layout holds (the same averages, which pair() found unmoved this step; a bucket's rows
        never change but the grads')."""
        cached = bucket.__dict__.get("average_addresses")
        if cached is not None and cached[0] is self.layout:
            return cached[1]
        averages = [self.averages[i] for i in bucket.positions]
        now = list(map(_data_ptr, averages))
        # The bucket's rows hold its (real) dtype, numels counted in it; each average is its param's
        # dtype and size (pair() checked).
        n, element = bucket.n, _REAL_DTYPES.get(bucket.dtype, bucket.dtype).itemsize
        numels = bucket.numels.tolist()
        rows = [bucket.addresses[r * n:(r + 1) * n] for r in range(len(bucket.addresses) // max(n, 1)) if r != 1]
        regions = [(a, a + e * element, 0) for row in rows for a, e in zip(row, numels)]
        regions += [(a, a + t.numel() * t.element_size(), 1) for a, t in zip(now, averages)]
        pair = _overlapping_pair(regions)
        if pair is not None:
            raise RuntimeError(f"{self.name}: an average of average= shares memory with "
                               f"{'another average' if pair[0][2] == pair[1][2] else 'a param or state tensor'}; "
                               "pyfused updates each in place and needs them apart")
        table = array.array("q", now)
        bucket.average_addresses = (self.layout, table)
        return table

    def fused_weight(self, device, all_stepped):
        """The kernels' lerp weight for this step, or None when the step must call
        update_parameters instead (class docstring)."""
        m = self.averaged
        fn = m.multi_avg_fn
        if self.averages is None:  # frozen params the optimizer does not hold (pair())
            return None
        if m.avg_fn is not None or not (fn is None or isinstance(fn, _MultiAvgFn)) or m.use_buffers:
            return None
        if not all_stepped:
            return None
        n = int(m.n_averaged)
        # The first update copies: a lerp by 1 would not (an inf or NaN average stays NaN, and
        # -1 lerped to -0.0 gives +0.0); update_parameters copies, once.
        return None if n <= 0 else _lerp_weight(fn, device, n)

    def finish(self, fused):
        """After a step that was not skipped: what update_parameters does besides the lerp, or
        all of it if the kernels did not average (fused False)."""
        m, model = self.averaged, self.model
        if not fused:
            m.update_parameters(model)
            return
        _copy_buffers(*map(_Walked.each_of, self.buffer_walks, (m.module, model)))
        m.n_averaged += 1


_SWA = _Swa()


def _triton_lerp(group, weight):
    from pyfused import _triton

    if group.triton_tables is None:
        group.triton_tables = _triton.average_tables(group.numels, group.addresses, group.device)
    if group.weight is None or group.weight[0] != weight:  # EMA's never changes; SWA's every call
        group.weight = (weight, torch.tensor(weight, dtype=torch.float64, device=group.device))
    _triton.average_lerp(group.code, len(group.numels), group.triton_tables, group.weight[1])
