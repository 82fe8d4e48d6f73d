"""The averaging kernel (kernels/averaging.py) compiles for a CUDA sm_90 target in every dtype and
weight type it is launched with (no GPU needed): one fma per element (lerp's), in opmath, and
128-bit words for aligned fp32."""

import re

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pyfused import _triton
from pyfused.kernels import averaging

TARGET = GPUTarget("cuda", 90, 32)
NUM_WARPS = 4  # Triton's default, which pyfused/_triton.py launches with
STORAGE = {"fp32": (tl.float32, tl.float32), "fp64": (tl.float64, tl.float64),
           "fp16": (tl.float16, tl.float32), "bf16": (tl.uint16, tl.float32)}


def compile_variant(dtype, aligned):
    storage, op = STORAGE[dtype]
    constants = dict(STORAGE=storage, BF16=dtype == "bf16", OP=op, CHUNK=_triton._COMPILED_CHUNK,
                     BLOCK=_triton._COMPILED_BLOCK, ALIGNED=aligned)
    signature = {"tables": "*i64", "weight": "*fp64", "n_tensors": "i32", "first_chunk": "i32"}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=averaging.lerp_kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=TARGET, options={"enable_fp_fusion": False, "num_warps": NUM_WARPS}).asm["ptx"]


@pytest.mark.parametrize("dtype", list(STORAGE))
def test_every_dtype_compiles_for_sm90(dtype):
    ptx = compile_variant(dtype, aligned=True)
    assert ".entry lerp_kernel" in ptx
    wanted = "f64" if dtype == "fp64" else "f32"
    per_thread = _triton._COMPILED_BLOCK // (32 * NUM_WARPS)
    # lerp's one fma per element, emitted for the unmasked blocks and for the masked tail block
    assert len(re.findall(rf"\bfma\.rn\.{wanted}\b", ptx)) == per_thread * 2
    other = "f32" if wanted == "f64" else "f64"
    assert not re.search(rf"\bfma\.rn\.{other}\b", ptx)


def test_aligned_fp32_moves_128_bit_words():
    aligned = compile_variant("fp32", aligned=True)
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", aligned) and re.search(r"st\.global(\.\w+)*\.v4\.b32", aligned)
    assert not re.search(r"ld\.global(\.\w+)*\.v4", compile_variant("fp32", aligned=False))
