"""Every batch norm kernel variant compiles for a CUDA sm_90 target (no GPU needed), with IEEE
division and square root and no FMA, and the reductions accumulate in float64."""

import re

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pyfused import _triton
from pyfused.kernels import batchnorm

TARGET = GPUTarget("cuda", 90, 32)
STORAGE = {"fp32": ("*fp32", False, tl.float32), "fp64": ("*fp64", False, tl.float64),
           "fp16": ("*fp16", False, tl.float32), "bf16": ("*i16", True, tl.float32)}
BLOCK = _triton._BN_BLOCK


def compile_kernel(fn, signature, constants):
    signature = dict(signature, **{name: "constexpr" for name in constants})
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    ptx = triton.compile(source, target=TARGET, options={"enable_fp_fusion": False, "num_warps": 4}).asm["ptx"]
    assert f".entry {fn.__name__}" in ptx
    assert "div.approx" not in ptx and "div.full" not in ptx and "sqrt.approx" not in ptx
    assert not re.search(r"\bfma\.rn\.f(32|64)", ptx)
    return ptx


def ints(*names):
    return {n: "i64" for n in names}


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("planar", [True, False], ids=["planar", "rows"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_reductions_compile(dtype, planar, relu):
    ptr, bf16, op = STORAGE[dtype]
    shape = ints("outer", "C", "inner", "n_b", "rows_per_a", "cols_per_b")
    if not relu:
        ptx = compile_kernel(batchnorm.stats_partials_kernel, {"x": ptr, "s1": "*fp64", "s2": "*fp64", **shape},
                             dict(BF16=bf16, OP=op, PLANAR=planar, BLOCK=BLOCK))
        assert "add.rn.f64" in ptx or "add.f64" in ptx
    compile_kernel(batchnorm.grad_partials_kernel,
                   {"dy": ptr, "x": ptr, "mean": "*fp64", "scale": "*fp64", "shift": "*fp64", "s1": "*fp64",
                    "s2": "*fp64", **shape}, dict(BF16=bf16, OP=op, PLANAR=planar, RELU=relu, BLOCK=BLOCK))


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_elementwise_compile(dtype, relu, training):
    ptr, bf16, op = STORAGE[dtype]
    sizes = ints("numel", "C", "inner")
    if not training:
        compile_kernel(batchnorm.normalize_kernel, {"x": ptr, "y": ptr, "scale": "*fp64", "shift": "*fp64", **sizes},
                       dict(BF16=bf16, OP=op, RELU=relu, BLOCK=BLOCK))
    compile_kernel(batchnorm.grad_input_kernel, {"dy": ptr, "x": ptr, "dx": ptr, "coefficients": "*fp64", **sizes},
                   dict(BF16=bf16, OP=op, RELU=relu, TRAINING=training, BLOCK=BLOCK))


@pytest.mark.parametrize("param", ["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_per_channel_kernels_compile(param, training):
    ptr, pbf16, _ = STORAGE[param]
    compile_kernel(batchnorm.merge_kernel, {"s1": "*fp64", "s2": "*fp64", "out": "*fp64",
                                            **ints("outer", "C", "inner", "n_a", "n_b", "rows_per_a", "cols_per_b")},
                   dict(STATS=training, BLOCK=_triton._BN_CHANNELS))
    compile_kernel(batchnorm.finalize_kernel,
                   {"counts": "*fp64", "stats": "*fp64", "weight": ptr, "bias": ptr, "running_mean": ptr,
                    "running_var": ptr, "out": "*fp64", "C": "i64", "groups": "i64", "momentum": "fp64", "eps": "fp64"},
                   dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_RUNNING=True, TRAINING=training, PBF16=pbf16,
                        BLOCK=_triton._BN_CHANNELS))
    compile_kernel(batchnorm.backward_finalize_kernel,
                   {"sums": "*fp64", "saved": "*fp64", "weight": ptr, "bias": ptr, "dweight": ptr, "dbias": ptr,
                    "out": "*fp64", "C": "i64", "count": "fp64"},
                   dict(HAS_WEIGHT=True, HAS_BIAS=True, WANT_DW=True, WANT_DB=True, TRAINING=training, PBF16=pbf16,
                        BLOCK=_triton._BN_CHANNELS))
