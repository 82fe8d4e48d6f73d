"""Every variant of the dropout kernel compiles for a CUDA sm_90 target (no GPU needed), without
fused multiply-adds, with tl.rand's float32 constant, and with 128-bit words for aligned fp32."""

import itertools
import re

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pyfused import _triton
from pyfused.kernels import dropout

TARGET = GPUTarget("cuda", 90, 32)
STORAGE = {"fp32": (tl.float32, tl.float32, "*fp32"), "fp64": (tl.float64, tl.float64, "*fp64"),
           "fp16": (tl.float16, tl.float32, "*fp16"), "bf16": (tl.uint16, tl.float32, "*u16")}
# (GROUPED, ADD_RESIDUAL, BIAS) as pyfused/_triton.py launches them
MODES = [(False, False, False), (True, False, False), (False, True, False), (False, True, True)]


def compile_variant(dtype, grouped, add_residual, bias):
    storage, op, pointer = STORAGE[dtype]
    constants = dict(STORAGE=storage, BF16=dtype == "bf16", OP=op, GROUPED=grouped, ADD_RESIDUAL=add_residual,
                     BIAS=bias, BLOCK=1024)  # pyfused/_triton.py's compiled _DROPOUT_BLOCK
    signature = {"x_ptr": pointer, "out_ptr": pointer, "residual_ptr": pointer, "bias_ptr": pointer,
                 "seed_ptr": "*i64", "params_ptr": "*fp64", "numel": "i64", "group": "i64", "bias_numel": "i64"}
    signature.update({name: "constexpr" for name in constants})
    # Pointers 16-byte aligned and numel a multiple of 16, as Triton specializes them at launch.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}
    source = ASTSource(fn=dropout.dropout_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"enable_fp_fusion": False, "num_warps": 4}).asm["ptx"]


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("mode", MODES, ids=["dropout", "channels", "add", "add-bias"])
def test_every_variant_compiles_for_sm90(dtype, mode):
    ptx = compile_variant(dtype, *mode)
    assert ".entry dropout_kernel" in ptx
    assert not re.search(r"\bfma\.rn\.f(32|64)", ptx)
    assert "div.approx" not in ptx and "div.full" not in ptx
    # tl.rand's 4.6566127342e-10, rounded to float32: 0x2FFFFFFF, just below 2^-31.
    assert "0f2FFFFFFF" in ptx.upper().replace("0F", "0f")


def test_aligned_fp32_moves_128_bit_words():
    ptx = compile_variant("fp32", False, False, False)
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), "the loads are not 128-bit"
    assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx), "the stores are not 128-bit"
