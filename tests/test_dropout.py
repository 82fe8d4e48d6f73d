"""pyfused's dropout (C++ backend and the Python layer) against torch and an independent Philox.

The reference mask and the case table come from pyfused/check/dropout_cases.py (shared with
pyfused-check): `philox_draws`, a plain numpy Philox-4x32-10 written from Triton's
language/random.py (tests/triton/test_dropout.py checks it against the real tl.rand4x), never from
the kernels under test. Every comparison is exact: dropout multiplies by one rounded scale, so
there is no tolerance to state.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import pyfused
from pyfused import _cpp
from pyfused.check.dropout_cases import (DTYPES, FRACTION_N, FRACTION_PS, FRACTION_SEEDS, MASK_PS, SIZES,
                                        assert_same_bits, bits, drawn_seed, expected, fraction_bound, generator,
                                        reference_draws)
from pyfused.nn import functional as F


@pytest.fixture(autouse=True)
def _cpp_backend():
    with pyfused.use_backend("cpp"):
        yield


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p", MASK_PS)
def test_mask_and_values_match_the_reference(dtype, n, p):
    x = torch.randn(n, dtype=torch.float64).to(dtype)
    x[0] = float("inf")  # torch's input * noise: a dropped inf is NaN, a kept one inf
    assert_same_bits(F.dropout(x, p, generator=generator()), expected(x, p, drawn_seed()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_keep_test_is_exact_at_the_threshold(dtype):
    """The kernel compares each word with an integer threshold found once per call, not each
    draw's float with p: with p equal to a drawn float itself that draw is dropped (its float is
    not > p), with p the float just below it kept. Below 2^-7 every word has a float of its own,
    so there a threshold one word off fails too."""
    n, seed = 4096, drawn_seed()
    draws = reference_draws(seed, n)
    x = torch.ones(n, dtype=dtype)
    for i in list(range(0, n, 512)) + list(np.flatnonzero(draws < 2**-7)[:4]):
        f = np.float32(draws[i])
        for p, kept in ((float(f), False), (float(np.nextafter(f, np.float32(0))), True)):
            out = F.dropout(x, p, generator=generator())
            assert (out[i] != 0).item() == kept
            assert_same_bits(out, expected(x, p, seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.15, 0.3, 0.45, 0.7])
def test_kept_elements_equal_torchs_own_dropout(dtype, p):
    """The scale is torch's, bit for bit: where both keep an element, the values agree."""
    x = torch.randn(4096, dtype=torch.float64).to(dtype)
    ours, theirs = F.dropout(x, p), torch.nn.functional.dropout(x, p)
    both = (ours != 0) & (theirs != 0)
    assert both.sum() > 100
    assert_same_bits(ours[both], theirs[both])


@pytest.mark.parametrize("p", FRACTION_PS)
def test_dropped_fraction_within_5_sigma(p):
    n = FRACTION_N
    for seed in FRACTION_SEEDS:
        dropped = (F.dropout(torch.ones(n), p, generator=generator(seed)) == 0).sum().item()
        assert abs(dropped - n * p) < fraction_bound(n, p)


def test_backward_is_grad_times_mask_and_scale():
    x = torch.randn(3001, 5, requires_grad=True)
    y = F.dropout(x, 0.3, generator=generator())
    grad = torch.randn_like(y)
    y.backward(grad)
    mask_scale = expected(torch.ones(3001, 5), 0.3, drawn_seed())
    assert_same_bits(x.grad, grad * mask_scale)
    assert_same_bits(y.detach(), x.detach() * mask_scale)


def test_gradcheck_fp64():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    # A fresh generator per call: the finite differences need the same mask every time.
    assert torch.autograd.gradcheck(lambda t: F.dropout(t, 0.4, generator=generator()), (x,))
    assert torch.autograd.gradgradcheck(lambda t: F.dropout(t, 0.4, generator=generator()), (x,))
    assert torch.autograd.gradcheck(lambda t, u, v: F.dropout_add(t, u, 0.4, bias=v, generator=generator()), (x, r, b))
    c = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(0), F.dropout1d(t, 0.5))[1], (c,))


def test_saves_one_seed_and_nothing_per_element():
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x = torch.randn(1000, 100, requires_grad=True)
        F.dropout(x, 0.5).sum().backward()
        F.dropout_add(x, torch.randn(1000, 100), 0.5, bias=torch.randn(100)).sum().backward()
        F.dropout2d(torch.randn(4, 8, 5, 5, requires_grad=True), 0.5).sum().backward()
    assert [t.numel() for t in saved] == [1, 1, 1] and all(t.dtype == torch.int64 for t in saved)


def test_torch_seed_and_generator_make_it_reproducible_and_calls_differ():
    x = torch.randn(10000)
    torch.manual_seed(7)
    a, b = F.dropout(x, 0.5), F.dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(F.dropout(x, 0.5), a) and not torch.equal(a, b)
    assert torch.equal(F.dropout(x, 0.5, generator=generator(3)), F.dropout(x, 0.5, generator=generator(3)))


def test_same_mask_for_every_dtype_and_thread_count():
    x = torch.randn(5 * 16384 + 77, dtype=torch.float64)
    masks = [F.dropout(x.to(d), 0.5, generator=generator()) != 0 for d in DTYPES]
    assert all(torch.equal(m, masks[0]) for m in masks)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(F.dropout(x, 0.5, generator=generator()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_same_bits_on_every_instruction_set():
    script = (
        "import torch, pyfused, sys\n"
        "g = torch.Generator().manual_seed(5)\n"
        "x = torch.randn(70001, dtype=torch.float64, generator=g)\n"
        "outs = [pyfused.nn.functional.dropout(x.to(d), 0.3, generator=torch.Generator().manual_seed(1)) "
        "for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]\n"
        "torch.manual_seed(0)\n"
        "outs.append(pyfused.nn.functional.dropout2d(x[:70000].view(10, 70, 10, 10), 0.3))\n"
        "torch.save(outs, sys.argv[1])\n"
    )
    available = ["baseline"] + (["avx2"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else [])
    available += ["avx512"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else []
    results = []
    for isa in available:
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pyfused_dropout_{os.getpid()}_{isa}.pt")
        subprocess.run([sys.executable, "-c", script, path], check=True,
                       env={**os.environ, "PYFUSED_CPU_ISA": isa, "PYFUSED_BACKEND": "cpp"})
        results.append(torch.load(path))
        os.remove(path)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_same_bits(a, b)


def test_identity_cases_return_torchs_objects():
    x = torch.randn(1, 5, 2)
    for call in (lambda: F.dropout(x, 0.5, training=False), lambda: F.dropout(x, 0.0),
                 lambda: F.dropout(x, 0.5, False, True), lambda: F.dropout1d(x, 0.0, inplace=True)):
        assert call() is x
    empty = torch.empty(0, 3)
    assert F.dropout(empty, 0.5) is empty and F.dropout2d(empty.view(0, 3, 1, 1), 0.5).numel() == 0


def test_p_one_gives_torchs_zeros():
    x = torch.tensor([-1.0, 2.0, float("inf"), float("nan")])
    assert_same_bits(F.dropout(x, 1.0), torch.nn.functional.dropout(x, 1.0))  # -0, 0, nan, nan
    y = x.clone()
    assert F.dropout(y, 1.0, inplace=True) is y and torch.equal(bits(y), bits(x * 0))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_invalid_p_raises_torchs_value_error(p):
    message = f"dropout probability has to be between 0 and 1, but got {p}"
    for call in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
        with pytest.raises(ValueError, match=f"^{message}$".replace(".", r"\.")):
            call(torch.randn(2, 3, 4, 5), p)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        F.dropout_add(torch.randn(3), torch.randn(3), p)
    for module in (pyfused.nn.Dropout, pyfused.nn.Dropout2d):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            module(p)


def test_nan_p_raises_torchs_runtime_error():
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.functional.dropout(torch.randn(3), float("nan"))
    with pytest.raises(RuntimeError) as ours:
        F.dropout(torch.randn(3), float("nan"))
    assert str(ours.value) == str(theirs.value)


def test_non_contiguous_input_uses_logical_order():
    base = torch.randn(300, 200)
    t = base.t()
    assert_same_bits(F.dropout(t, 0.5, generator=generator()), F.dropout(t.contiguous(), 0.5, generator=generator()))
    sliced = base[:, ::3]
    assert_same_bits(F.dropout(sliced, 0.5, generator=generator()), expected(sliced.contiguous(), 0.5, drawn_seed()))


@pytest.mark.parametrize("contiguous", [True, False])
def test_inplace(contiguous):
    base = torch.randn(200, 300)
    x = base.clone() if contiguous else base.clone().t()
    want = expected(x.contiguous(), 0.4, drawn_seed())
    assert F.dropout(x, 0.4, inplace=True, generator=generator()) is x
    assert_same_bits(x.contiguous(), want)
    # On a non-leaf that requires grad: the grad flows through the recomputed mask.
    leaf = torch.randn(1000, requires_grad=True)
    y = leaf * 2
    F.dropout(y, 0.4, inplace=True, generator=generator())
    y.sum().backward()
    assert_same_bits(leaf.grad, expected(torch.full((1000,), 2.0), 0.4, drawn_seed()))


def test_inplace_refusals_match_torch_and_change_nothing():
    leaf = torch.randn(10, requires_grad=True)
    before = leaf.detach().clone()
    for target in (leaf, leaf[2:]):
        with pytest.raises(RuntimeError) as theirs:
            torch.nn.functional.dropout(target, 0.5, inplace=True)
        with pytest.raises(RuntimeError) as ours:
            F.dropout(target, 0.5, inplace=True)
        assert str(ours.value) == str(theirs.value)
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():  # torch allows it without grad mode
        F.dropout(leaf, 0.5, inplace=True)
    # An in-place dropout of a tensor that backward needs is caught, as torch catches it.
    y = torch.randn(10, requires_grad=True).sigmoid()
    F.dropout(y, 0.5, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with torch.inference_mode():
        z = torch.randn(100)
        F.dropout(z, 0.5, inplace=True)


def test_what_has_no_kernel_runs_torchs_dropout():
    ints = torch.arange(4)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.functional.dropout(ints, 0.5)
    with pytest.raises(RuntimeError) as ours:
        F.dropout(ints, 0.5)
    assert str(ours.value) == str(theirs.value)
    with pyfused.use_backend("torch"):
        torch.manual_seed(0)
        ours = F.dropout(torch.ones(100), 0.5)
        torch.manual_seed(0)
        assert torch.equal(ours, torch.nn.functional.dropout(torch.ones(100), 0.5))


@pytest.mark.parametrize("fn,shape,channel_size", [
    (F.dropout1d, (3, 5, 7), 7), (F.dropout1d, (5, 7), 7), (F.dropout2d, (3, 5, 4, 6), 24),
    (F.dropout2d, (3, 5, 6), 6), (F.dropout3d, (2, 3, 4, 5, 6), 120), (F.dropout3d, (3, 4, 5, 6), 120),
    (F.dropout2d, (7, 9), 1),
    # Several work chunks (csrc/dropout.h's kDropoutChunk, 16,320 elements), most starting inside a
    # channel whose draw is not a counter's first word.
    (F.dropout2d, (10, 70, 10, 10), 100), (F.dropout1d, (40, 50, 37), 37),
])
def test_channel_dropout_drops_whole_channels(fn, shape, channel_size):
    x = torch.randn(shape)
    torch.manual_seed(11)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        out = fn(x, 0.5)
    seed = (torch.manual_seed(11), drawn_seed_from_default())[1]
    flat = x.reshape(-1, channel_size)
    assert_same_bits(out.reshape(-1, channel_size), expected(flat, 0.5, seed, group=channel_size))
    torch_fn = getattr(torch.nn.functional, fn.__name__)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch_fn(x, 0.5)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


def drawn_seed_from_default():
    return torch.empty(1, dtype=torch.int64).random_().item()


@pytest.mark.parametrize("fn,shape", [(F.dropout1d, (3,)), (F.dropout1d, (2, 3, 4, 5)), (F.dropout2d, (3,)), (F.dropout3d, ())])
def test_channel_dropout_errors_match_torch(fn, shape):
    torch_fn = getattr(torch.nn.functional, fn.__name__)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError) as theirs:
            torch_fn(torch.randn(shape), 0.5)
        with pytest.raises(RuntimeError) as ours:
            fn(torch.randn(shape), 0.5)
    assert str(ours.value) == str(theirs.value)


def test_channel_dropout_inplace_and_backward():
    x = torch.randn(4, 6, 10)
    y = x.clone()
    torch.manual_seed(3)
    want = F.dropout1d(x, 0.5)
    torch.manual_seed(3)
    assert F.dropout1d(y, 0.5, inplace=True) is y and torch.equal(y, want)
    unbatched = torch.randn(6, 10)  # unsqueeze_ and squeeze_ in place, as torch does
    assert F.dropout1d(unbatched, 0.5, inplace=True).shape == (6, 10) == unbatched.shape
    leaf = torch.randn(4, 6, 3, 3, requires_grad=True)
    torch.manual_seed(4)
    out = F.dropout2d(leaf, 0.5)
    out.backward(torch.ones_like(out))
    assert torch.equal(leaf.grad, out.detach() / leaf.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dropout_add_equals_the_unfused_expression(dtype, with_bias):
    shape = (513, 129)
    x, r = torch.randn(shape, dtype=dtype, requires_grad=True), torch.randn(shape, dtype=dtype, requires_grad=True)
    b = torch.randn(129, dtype=dtype, requires_grad=True) if with_bias else None
    ours = F.dropout_add(x, r, 0.3, bias=b, generator=generator())
    theirs = r + F.dropout(x if b is None else x + b, 0.3, generator=generator())
    assert_same_bits(ours, theirs)
    grad = torch.randn(shape, dtype=dtype)
    inputs = (x, r) if b is None else (x, r, b)
    for a, c in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        assert_same_bits(a, c)


def test_dropout_add_unfused_cases():
    x, r = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(F.dropout_add(x, r, 0.5, training=False, bias=torch.ones(6)), r + (x + 1))
    assert torch.equal(F.dropout_add(x, r, 0.0), r + x)
    broadcast = torch.randn(6)  # residual broadcast: the unfused expression, same mask
    assert torch.equal(F.dropout_add(x, broadcast, 0.5, generator=generator()), broadcast + F.dropout(x, 0.5, generator=generator()))
    assert F.dropout_add(x, r.double(), 0.5).dtype == torch.float64
    empty = torch.empty(0, 6)
    assert F.dropout_add(empty, empty, 0.5).shape == (0, 6)


@pytest.mark.parametrize("ours,theirs,shape", [
    (pyfused.nn.Dropout, torch.nn.Dropout, (64, 33)), (pyfused.nn.Dropout1d, torch.nn.Dropout1d, (4, 8, 9)),
    (pyfused.nn.Dropout2d, torch.nn.Dropout2d, (4, 8, 3, 3)), (pyfused.nn.Dropout3d, torch.nn.Dropout3d, (2, 8, 2, 3, 3)),
])
def test_modules_behave_like_torchs(ours, theirs, shape):
    module, reference = ours(0.3, inplace=False), theirs(0.3)
    assert isinstance(module, theirs) and repr(module) == repr(reference)
    assert module.state_dict() == reference.state_dict() == {}
    x = torch.randn(shape)
    torch.manual_seed(2)
    out = module(x)
    torch.manual_seed(2)
    fn = {torch.nn.Dropout: F.dropout, torch.nn.Dropout1d: F.dropout1d, torch.nn.Dropout2d: F.dropout2d,
          torch.nn.Dropout3d: F.dropout3d}[theirs]
    assert torch.equal(out, fn(x, 0.3))
    assert module.eval()(x) is x


def test_outputs_of_megabytes_equal_the_in_place_result():
    # Fresh outputs of 2 MiB or more are advised to be huge pages before the kernel first writes
    # them (pyfused/_cpp.py's fresh_out); in place nothing is advised.
    x = torch.randn(2**21 + 3)
    leaf = x.clone().requires_grad_()
    y = F.dropout(leaf, 0.3, generator=generator())
    in_place = x.clone()
    assert F.dropout(in_place, 0.3, inplace=True, generator=generator()) is in_place
    assert torch.equal(y.detach(), in_place)
    y.backward(torch.ones_like(y))
    assert torch.equal(leaf.grad, (y.detach() != 0) * torch.ones(()).div_(0.7))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_streamed_outputs_equal_the_in_place_result(threads):
    # Outputs of 32 MiB or more are computed into a cached block, then written with non-temporal
    # stores (csrc/dropout.h's kStreamBytes); in place they are written directly. 4099 channels of
    # 2047 (32 MiB and a little, fp32): channels end mid-block, and so does the last thread's range
    # (3 threads: uneven ranges).
    shape = (1, 4099, 2047)
    x, r, b = torch.randn(shape), torch.randn(shape), torch.randn(2047)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fn in (F.dropout, F.dropout1d):  # dropout1d takes no generator: the same torch seed
            in_place = x.clone()
            torch.manual_seed(5)
            fn(in_place, 0.3, inplace=True)
            torch.manual_seed(5)
            assert torch.equal(fn(x, 0.3), in_place)
        theirs = r + F.dropout(x + b, 0.3, inplace=True, generator=generator())
        assert torch.equal(F.dropout_add(x, r, 0.3, bias=b, generator=generator()), theirs)
    finally:
        torch.set_num_threads(saved)
