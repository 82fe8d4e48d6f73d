"""Every kernel variant pyfused launches compiles for a CUDA sm_90 target: no GPU needed.

This catches what only compiled mode sees (type rules, constexpr branches the interpreter takes
leniently), and the PTX shows whether the hot loop moves 128-bit words.
"""

import itertools
import re

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pyfused import _cpp, _triton
from pyfused.kernels import multi_tensor, optimizers

TARGET = GPUTarget("cuda", 90, 32)
NUM_WARPS = 4  # Triton's default, which pyfused/_triton.py launches with
STORAGE = {  # csrc dtype code -> (storage, opmath), as pyfused/_triton.py launches them
    "fp32": (tl.float32, tl.float32), "fp64": (tl.float64, tl.float64),
    "fp16": (tl.float16, tl.float32), "bf16": (tl.uint16, tl.float32),
}
# Every flag combination each optimizer's mode() can produce, from its Hyper values.
HYPERS = {
    "sgd": [(0.1, m, 0.0, wd, n, 0.0) for m, wd, n in itertools.product((0.0, 0.9), (0.0, 0.1), (0.0, 1.0))],
    "adagrad": [(0.1, 0.0, wd, 1e-10, 0.0) for wd in (0.0, 0.1)],
    "rmsprop": [(0.01, 0.99, 1e-8, wd, m, c, 0.0) for wd, m, c in itertools.product((0.0, 0.1), (0.0, 0.9), (0.0, 1.0))],
    "adam": [(1e-3, 0.9, 0.999, 1e-8, wd, a, 0.0, d) for wd, a, d in itertools.product((0.0, 0.1), (0.0, 1.0), (0.0, 1.0))],
    "adadelta": [(1.0, 0.9, 1e-6, wd, 0.0) for wd in (0.0, 0.1)],
}
STATES = {"sgd": lambda m: int(m["MOMENTUM"]), "adagrad": lambda m: 1,
          "rmsprop": lambda m: 1 + int(m["MOMENTUM"]) + int(m["CENTERED"]),
          "adam": lambda m: 3 if m["AMSGRAD"] else 2, "adadelta": lambda m: 2}


def variants():
    seen = set()
    for kernel, hypers in HYPERS.items():
        for hyper in hypers:
            mode = {"AMSGRAD": False, "MOMENTUM": False, "CENTERED": False, **optimizers.mode(kernel, hyper)}
            key = (kernel, tuple(sorted(mode.items())))
            if key not in seen:
                seen.add(key)
                yield kernel, hyper, mode


def compile_variant(kernel, hyper, mode, dtype, aligned, factored=False, stats=False, average=False):
    storage, op = STORAGE[dtype]
    optimizer = _triton._OPTIMIZERS[kernel]
    constants = dict(
        OPTIMIZER=optimizer, STORAGE=storage, BF16=dtype == "bf16", OP=op,
        STATES=STATES[kernel](mode), N_HYPER=len(hyper), K=_cpp._C.scalars_per_tensor(optimizer),
        **mode, FACTORED=factored, STORE_GRAD=factored, SKIP=factored, STATS=stats, AVERAGE=average, CHUNK=_triton._COMPILED_CHUNK, BLOCK=_triton._COMPILED_BLOCK, ALIGNED=aligned,
    )
    signature = {"tables": "*i64", "uploads": "*i64", "factors": "*fp64", "skip": "*fp32", "partials": "*fp64",
                 "averages": "*i64", "average_weight": "*fp64", "n_tensors": "i32", "n_groups": "i32", "first_chunk": "i32"}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=multi_tensor.optimizer_kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=TARGET, options={"enable_fp_fusion": False, "num_warps": NUM_WARPS})


VARIANTS = list(variants())


def fmas_per_element(kernel, mode):
    """The fused multiply-adds of one element's update: one per add with alpha, addcmul and lerp
    of torch's for-loop (mul_add in csrc/optimizers.h, _mul_add in kernels/optimizers.py). The
    weight decay add and Nesterov's are computed whatever their runtime switch (tl.where picks)."""
    if kernel == "sgd":  # L2 add; buf.mul_().add_(alpha); Nesterov's add; param.add_(alpha=-lr)
        return 1 + 2 * mode["MOMENTUM"] + 1
    if kernel == "adagrad":  # L2 add; state_sum.addcmul_
        return 1 + 1
    if kernel == "rmsprop":  # L2 add; square_avg addcmul_; centered: lerp_ and addcmul; momentum: param.add_
        return 1 + 1 + 2 * mode["CENTERED"] + mode["MOMENTUM"]
    if kernel == "adadelta":  # L2 add; square_avg and acc_delta addcmul_; param.add_(alpha=-lr)
        return 1 + 3
    return 1 + 2  # adam: L2 add; exp_avg.lerp_; exp_avg_sq addcmul_


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("kernel,hyper,mode", VARIANTS, ids=[f"{k}-{'-'.join(n for n, v in sorted(m.items()) if v) or 'plain'}" for k, _, m in VARIANTS])
@pytest.mark.parametrize("factored", [False, True], ids=["plain", "grad-factor-and-skip"])
def test_every_variant_compiles_for_sm90(kernel, hyper, mode, dtype, factored):
    compiled = compile_variant(kernel, hyper, mode, dtype, aligned=True, factored=factored)
    ptx = compiled.asm["ptx"]
    assert ".entry optimizer_kernel" in ptx
    # IEEE division and square root, never the approximate ones.
    assert "div.approx" not in ptx and "div.full" not in ptx and "sqrt.approx" not in ptx
    # Fused multiply-adds exactly where intended, in opmath: each thread holds BLOCK / (32 * warps)
    # elements, and the update is emitted twice (the unmasked blocks and the masked tail block).
    wanted = "f64" if dtype == "fp64" else "f32"
    per_thread = _triton._COMPILED_BLOCK // (32 * NUM_WARPS)
    assert len(re.findall(rf"\bfma\.rn\.{wanted}\b", ptx)) == fmas_per_element(kernel, mode) * per_thread * 2
    other = "f32" if wanted == "f64" else "f64"
    assert not re.search(rf"\bfma\.rn\.{other}\b", ptx)


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("kernel,hyper,mode", VARIANTS, ids=[f"{k}-{'-'.join(n for n, v in sorted(m.items()) if v) or 'plain'}" for k, _, m in VARIANTS])
def test_every_variant_compiles_with_step_statistics(kernel, hyper, mode, dtype):
    """STATS=True (track_stats): the same fused multiply-adds (the squares are summed unfused),
    and the hot loop still moves 128-bit words where aligned."""
    ptx = compile_variant(kernel, hyper, mode, dtype, aligned=True, factored=True, stats=True).asm["ptx"]
    wanted = "f64" if dtype == "fp64" else "f32"
    per_thread = _triton._COMPILED_BLOCK // (32 * NUM_WARPS)
    assert len(re.findall(rf"\bfma\.rn\.{wanted}\b", ptx)) == fmas_per_element(kernel, mode) * per_thread * 2
    if dtype == "fp32":
        assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx)


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("kernel,hyper,mode", VARIANTS, ids=[f"{k}-{'-'.join(n for n, v in sorted(m.items()) if v) or 'plain'}" for k, _, m in VARIANTS])
def test_every_variant_compiles_with_the_average(kernel, hyper, mode, dtype):
    """AVERAGE=True (average=, with step statistics and the grad factor): one more fused
    multiply-add per element, the average's lerp, and 128-bit words where aligned."""
    ptx = compile_variant(kernel, hyper, mode, dtype, aligned=True, factored=True, stats=True, average=True).asm["ptx"]
    wanted = "f64" if dtype == "fp64" else "f32"
    per_thread = _triton._COMPILED_BLOCK // (32 * NUM_WARPS)
    assert len(re.findall(rf"\bfma\.rn\.{wanted}\b", ptx)) == (fmas_per_element(kernel, mode) + 1) * per_thread * 2
    if dtype == "fp32":
        assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_stats_kernel_compiles_for_sm90(skip):
    signature = {"partials": "*fp64", "chunk_rows": "*i64", "out": "*fp64", "skip": "*fp32", "n_tensors": "i32",
                 "max_chunks": "i32", "SKIP": "constexpr", "BLOCK": "constexpr"}
    source = ASTSource(fn=multi_tensor.stats_kernel, signature=signature, constexprs=dict(SKIP=skip, BLOCK=256))
    ptx = triton.compile(source, target=TARGET, options={"enable_fp_fusion": False, "num_warps": NUM_WARPS}).asm["ptx"]
    assert "sqrt.rn.f64" in ptx and "div.rn.f64" in ptx  # IEEE in float64, as csrc's std::sqrt and /


@pytest.mark.parametrize("kernel", ["sgd", "adagrad", "rmsprop", "adam", "adadelta"])
def test_aligned_fp32_moves_128_bit_words(kernel):
    hyper, mode = next((h, m) for k, h, m in VARIANTS if k == kernel)
    aligned = compile_variant(kernel, hyper, mode, "fp32", aligned=True).asm["ptx"]
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", aligned), "the hot loop's loads are not 128-bit"
    assert re.search(r"st\.global(\.\w+)*\.v4\.b32", aligned), "the hot loop's stores are not 128-bit"
    # Unaligned addresses get the scalar variant, which must compile too.
    unaligned = compile_variant(kernel, hyper, mode, "fp32", aligned=False).asm["ptx"]
    assert not re.search(r"ld\.global(\.\w+)*\.v4", unaligned)


@pytest.mark.parametrize("kernel", ["rmsprop", "adam", "adadelta"])  # torch's capturable optimizers
@pytest.mark.parametrize("step_type", [tl.float32, tl.float64], ids=["step-fp32", "step-fp64"])
def test_capturable_prologue_compiles_for_sm90(kernel, step_type):
    optimizer = _triton._OPTIMIZERS[kernel]
    constants = dict(OPTIMIZER=optimizer, STEP=step_type, N_HYPER=len(HYPERS[kernel][0]),
                     K=_cpp._C.scalars_per_tensor(optimizer), SKIP=True, BLOCK=1024)
    signature = {"steps": "*i64", "uploads": "*i64", "lr": "*fp64", "skip": "*fp32", "n_tensors": "i32"}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=multi_tensor.capturable_prologue_kernel, signature=signature, constexprs=constants)
    ptx = triton.compile(source, target=TARGET, options={"enable_fp_fusion": False, "num_warps": 4}).asm["ptx"]
    assert ".entry capturable_prologue_kernel" in ptx
