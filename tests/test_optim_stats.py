"""Step statistics (track_stats=True, pyfused/optim/stats.py) on the C++ backend, against norms
torch computes from snapshots of each param and grad taken before the step and of the param after.

Tolerances. The kernels sum squares in opmath in 16 lanes per piece of a tensor inside a chunk
(32 for the 16-bit dtypes), so at most kChunk / 16 = 1,024 terms a lane, then in float64. The
relative error of a lane's sum of n non-negative terms is at most n * u, so a norm (its square
root) is within n * u / 2 of the float64 reference, and the ratio of two norms within n * u:
  fp32, fp16, bf16 (opmath float, u = 2^-24): 1,024 * 2^-24 = 6.1e-5, so rtol 1e-4;
  fp64 (u = 2^-53): 1.1e-13, so rtol 1e-12.
The values summed are exact for the 16-bit dtypes (stored values widened to float); for fp32 the
change (new - old) rounds once, and so does the square where it is not fused into the sum (the
baseline build), which adds at most 2u per term, inside the bound.
"""

import os
import subprocess
import sys

import pytest
import torch

import pyfused
from pyfused import _cpp
from pyfused.nn.utils import clip_grad_norm_
from pyfused.optim.stats import FIELDS, ParamStats, StepStats

# Realistic hyperparameters, every state tensor in use; group 1 takes 100x the lr (below), so an
# update/param ratio computed from the wrong operands is far outside the tolerance.
CONFIGS = {
    "SGD": dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adagrad": dict(lr=1e-3, lr_decay=0.01, weight_decay=0.01),
    "RMSprop": dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=0.01),
    "Adam": dict(lr=1e-3, weight_decay=0.1, amsgrad=True),
    "AdamW": dict(lr=1e-3, weight_decay=0.1),
    "Adadelta": dict(lr=1e-3, weight_decay=0.01),
}
# (dtype, rtol): see the module docstring.
DTYPES = [(torch.float32, 1e-4), (torch.float64, 1e-12), (torch.bfloat16, 1e-4), (torch.float16, 1e-4)]
SIZES = (0, 1, 7, 65536 + 3, 300, 16384)  # 64Ki+3 straddles four chunk edges, 0 is empty
STEPS = 3


def make(name, dtype, sizes=SIZES, seed=0, **options):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]
    kwargs = CONFIGS[name]
    groups = [dict(params=params[:3]), dict(params=params[3:], lr=kwargs["lr"] * 100)]
    return params, getattr(pyfused.optim, name)(groups, **kwargs, **options)


def set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def expected(old, grad, new):
    """The four statistics from snapshots, in float64."""
    norm = torch.linalg.vector_norm
    update = norm(new.double() - old.double())
    param = norm(old.double())
    return ParamStats(norm(grad.double()), update, param, update / param)


def check(stats, p, want, rtol):
    got = stats[p]
    for field, a, b in zip(FIELDS, got, want):
        assert a.dtype == torch.float64 and a.shape == () and a.device == p.device
        torch.testing.assert_close(a, b, rtol=rtol, atol=0, equal_nan=True, msg=lambda m: f"{field}: {m}")


@pytest.mark.parametrize("dtype, rtol", DTYPES, ids=[str(d) for d, _ in DTYPES])
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_norms_of_snapshots(name, dtype, rtol):
    params, opt = make(name, dtype, track_stats=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        set_grads(params, gen)
        old = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        opt.step()
        assert len(opt.stats) == len(params)
        for p, o, g in zip(params, old, grads):
            check(opt.stats, p, expected(o, g, p.detach()), rtol)
    moved = opt.stats[params[3]].update_ratio
    assert 1e-6 < moved < 1  # a real update, measured


def test_empty_and_zero_params():
    """An empty param has NaN for its ratio (0 / 0, as in torch); an all-zero one inf."""
    params = [torch.zeros(0, requires_grad=True), torch.zeros(5, requires_grad=True)]
    opt = pyfused.optim.SGD(params, lr=0.1, track_stats=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    empty, zero = opt.stats[params[0]], opt.stats[params[1]]
    assert [float(v) for v in empty[:3]] == [0.0, 0.0, 0.0] and empty.update_ratio.isnan()
    assert float(zero.param_norm) == 0 and zero.update_ratio.isinf()


@pytest.mark.parametrize("name", CONFIGS)
def test_unchanged_by_thread_count(name):
    """Fixed pieces combined in a fixed order: one thread and two give the same bits."""
    old_threads = torch.get_num_threads()
    tables = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params, opt = make(name, torch.float32, sizes=(7, 65536 * 3 + 5, 1, 40000), track_stats=True)
            set_grads(params, torch.Generator().manual_seed(1))
            opt.step()
            tables.append(torch.stack([torch.stack(opt.stats[p]) for p in params]))
    finally:
        torch.set_num_threads(old_threads)
    assert torch.equal(tables[0], tables[1])


def stats_tables():
    """{optimizer-dtype: its [params, 4] statistics after STEPS steps}, every optimizer and dtype."""
    out = {}
    for name in CONFIGS:
        for dtype, _ in DTYPES:
            params, opt = make(name, dtype, track_stats=True)
            gen = torch.Generator().manual_seed(1)
            for _ in range(STEPS):
                set_grads(params, gen)
                opt.step()
            out[f"{name}-{dtype}"] = torch.stack([torch.stack(opt.stats[p]) for p in params])
    return out


def test_identical_in_the_avx2_and_avx512_builds(tmp_path):
    """The lanes are fixed per dtype, never per vector width, and both builds fuse each square
    into its sum: the same bits (this run's kernels against each build in a subprocess)."""
    tables = {}
    for isa in ("avx2", "avx512"):
        out = tmp_path / f"{isa}.pt"
        done = subprocess.run([sys.executable, __file__, str(out)], env={**os.environ, "PYFUSED_CPU_ISA": isa},
                              capture_output=True, text=True, timeout=600)
        if "is not available on this CPU" in done.stderr:
            pytest.skip(f"this CPU has no {isa}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == isa, "PYFUSED_CPU_ISA was not honoured"
        tables[isa] = torch.load(out)
    assert tables["avx2"].keys() == tables["avx512"].keys()
    for key, table in tables["avx2"].items():
        torch.testing.assert_close(table, tables["avx512"][key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_grad_norm_sees_the_deferred_clip_coefficient():
    """grad_norm is of the grad the update used: clip_grad_norm_(optimizer=...) defers its
    coefficient into the step, and the reported norm is the clipped one."""
    params, opt = make("Adam", torch.float32, track_stats=True)
    set_grads(params, torch.Generator().manual_seed(1))
    grads = [p.grad.clone() for p in params]
    clip_grad_norm_(params, max_norm=1.0, optimizer=opt)
    opt.step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
    for p, g in zip(params, grads):
        want = torch.linalg.vector_norm(g.double()) / total
        torch.testing.assert_close(opt.stats[p].grad_norm, want, rtol=1e-4, atol=0)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # grads left as they were


def test_grad_scaler_unscales_and_a_skipped_step_leaves_none():
    params, opt = make("AdamW", torch.float32, track_stats=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        set_grads(params, gen)
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = scaler.scale(p.grad)
        if step == 1:
            params[3].grad[5] = float("inf")
        old = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        if step == 0:
            for p, o, g in zip(params, old, grads):
                check(opt.stats, p, expected(o, g, p.detach()), 1e-4)
        else:
            assert len(opt.stats) == 0 and params[3] not in opt.stats


def test_complex_params_count_as_their_real_view():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4097, dtype=torch.complex64, generator=gen).requires_grad_()
    opt = pyfused.optim.Adam([p], lr=1e-2, track_stats=True)
    p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
    old, grad = p.detach().clone(), p.grad.clone()
    opt.step()
    check(opt.stats, p, expected(torch.view_as_real(old), torch.view_as_real(grad), torch.view_as_real(p.detach())),
          1e-4)


def test_per_layer_dict_for_a_logger():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    frozen = model[2].bias
    opt = pyfused.optim.AdamW(model.parameters(), lr=1e-3, track_stats=True)
    assert len(opt.stats) == 0  # nothing stepped yet
    model(torch.randn(4, 8)).sum().backward()
    frozen.grad = None  # a param without a grad is not stepped, and not reported
    opt.step()
    layers = opt.stats.per_layer(model.named_parameters())
    assert list(layers) == ["0.weight", "0.bias", "2.weight"]
    floats = opt.stats.per_layer(model.named_parameters(), floats=True)
    assert list(floats) == list(layers)
    named = dict(model.named_parameters())
    for name, values in layers.items():
        assert list(values) == list(FIELDS)
        assert [float(v) for v in values.values()] == list(floats[name].values())
        assert all(type(v) is float for v in floats[name].values())
        assert all(a is not None and torch.equal(a, b) for a, b in zip(values.values(), opt.stats[named[name]]))
    assert frozen not in opt.stats and len(opt.stats) == 3
    assert set(map(id, opt.stats)) == {id(named[n]) for n in layers}
    with pytest.raises(KeyError, match="not stepped"):
        opt.stats[frozen]


def test_each_step_has_its_own_tables():
    """A step writes new tables: the previous step's values, held by a logger, do not change."""
    params, opt = make("SGD", torch.float32, track_stats=True)
    gen = torch.Generator().manual_seed(1)
    set_grads(params, gen)
    opt.step()
    first = opt.stats[params[3]]
    kept = torch.stack(first).clone()
    set_grads(params, gen)
    opt.step()
    assert torch.equal(torch.stack(first), kept) and not torch.equal(torch.stack(opt.stats[params[3]]), kept)


def test_torch_backend_leaves_stats_empty():
    params, opt = make("Adam", torch.float32, track_stats=True)
    set_grads(params, torch.Generator().manual_seed(1))
    with pyfused.use_backend("torch"):
        opt.step()
    assert isinstance(opt.stats, StepStats) and len(opt.stats) == 0


def test_absent_when_off(monkeypatch):
    """track_stats=False (the default): no attribute, and no table reaches the kernel."""
    seen = []
    step = _cpp.optimizer_step

    def spy(kernel, bucket, hypers, factor, stats=None, average=None):
        seen.append(stats)
        step(kernel, bucket, hypers, factor, stats, average)

    monkeypatch.setattr(_cpp, "optimizer_step", spy)
    for name in CONFIGS:
        params, opt = make(name, torch.float32)
        set_grads(params, torch.Generator().manual_seed(1))
        opt.step()
        assert not hasattr(opt, "stats")
    assert len(seen) == len(CONFIGS) and all(stats is None for stats in seen)


def test_state_dict_unchanged_and_interchangeable_with_torch():
    """track_stats is pyfused's own option: it stays out of defaults, param groups and state_dict."""
    params, opt = make("Adam", torch.float32, track_stats=True)
    set_grads(params, torch.Generator().manual_seed(1))
    opt.step()
    assert "track_stats" not in opt.defaults and all("track_stats" not in g for g in opt.param_groups)
    ref = torch.optim.Adam([dict(params=params[:3]), dict(params=params[3:])], lr=1.0)
    ref.load_state_dict(opt.state_dict())
    assert ref.param_groups[1]["lr"] == opt.param_groups[1]["lr"]


@pytest.mark.parametrize("name", CONFIGS)
def test_flat_arena_reports_every_param(name):
    """flat=True with track_stats=True: grads written into the arena's views in place (the
    arena's fast path would otherwise run), the statistics still per param, as without flat."""
    params, opt = make(name, torch.float32, flat=True, track_stats=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        old = [p.detach().clone() for p in params]
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=gen))
        grads = [p.grad.clone() for p in params]
        opt.step()
        assert len(opt.stats) == len(params)
        for p, o, g in zip(params, old, grads):
            check(opt.stats, p, expected(o, g, p.detach()), 1e-4)


if __name__ == "__main__":  # test_identical_in_the_avx2_and_avx512_builds: the tables of one build
    torch.save(stats_tables(), sys.argv[1])
    print(_cpp.isa())
