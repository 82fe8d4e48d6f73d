"""Shared tables for global-norm clipping: the test suite (tests/test_clip_grad_norm.py,
tests/triton/test_clip_amp.py) and the checker (clip.py) import them from here.

The norms: pyfused accumulates in fp32 lanes (fp64 for fp64 grads) and sums the chunk partials in
double, rounding once at the end; torch rounds each tensor's norm to the grads' dtype and then
takes the norm of the norms, accumulating in fp32. So both are compared against a float64
reference computed from the same (already rounded) elements. Max, min and the p = 0 count are
exact in both and compared bit for bit.
"""

import math

import torch

INF = math.inf
NORM_TYPES = (INF, -INF, 0.0, 1.0, 2.0, 3.0, 0.5)
EXACT_NORM_TYPES = (INF, -INF, 0.0)  # max, min and the count: bit for bit with torch

# dtype: (pyfused's C++ norm vs the float64 reference, torch's vs the float64 reference), relative.
TOLERANCES = {
    # Double lanes of at most 1024 terms (a 16384-element chunk over 16 lanes): ~1e-13 measured.
    torch.float64: (1e-12, 1e-12),
    # fp32 lanes of at most 1024 terms, partials in double: random-walk bound ~sqrt(1024) * 2^-24 = 2e-6
    # (5e-8 measured on 1e6 elements). torch's fp32 accumulation is off by up to 1.2e-4 (p = 3, 1e6).
    torch.float32: (2e-6, 5e-4),
    # One rounding to the dtype at the end: half an ulp (eps / 2) plus the fp32 lanes' error.
    # torch rounds each tensor's norm to the dtype first, then the total: up to ~2 ulps.
    torch.bfloat16: (2.0**-8 + 2e-6, 2.0**-6),
    torch.float16: (2.0**-11 + 2e-6, 2.0**-9),
}
DTYPES = tuple(TOLERANCES)

# The Triton norm against the C++ one, relative (tests/triton/test_clip_amp.py's docstring says
# why): fp32 and fp64 times max(1, 1/p), the root scaling a relative error by 1/p.
TRITON_RTOL = {
    torch.float32: 4e-6,
    torch.float64: 1e-13,
    torch.bfloat16: 2.0**-7,  # one ulp
    torch.float16: 2.0**-10,
}
_HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def norm_rtol(backend, dtype, p):
    """pyfused's norm against the float64 reference. C++: TOLERANCES. Triton: its fp32 (fp64)
    lanes' error, TRITON_RTOL times max(1, 1/p), plus half an ulp for the final 16-bit rounding."""
    if backend == "cpp":
        return TOLERANCES[dtype][0]
    lanes = TRITON_RTOL[torch.float64 if dtype == torch.float64 else torch.float32] * max(1.0, 1.0 / p)
    return _HALF_ULP.get(dtype, 0.0) + lanes


# Shapes of the grads: odd sizes, chunk edges (16384), one tensor, three, 300 small ones.
SHAPES = {
    "one": [(7,)],
    "three": [(1,), (4097,), (3, 5)],
    "chunk_edges": [(16383,), (1,), (16385,), (0,)],
    "300": [(n % 37,) for n in range(300)],
}
BIG = [(1_000_003,), (2, 3)]  # millions of elements: fp32 and bf16 only (takes ~0.1 s each)


def make(shapes, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]


def reference(tensors, p):
    """The norm in float64 of the elements as they are stored."""
    flat = torch.cat([t.double().flatten().cpu() for t in tensors])
    return torch.linalg.vector_norm(flat, p)


# Fused clipping: clip_grad_norm_(optimizer=opt) then opt.step().
FUSED = {
    "Adam": dict(lr=1e-2, weight_decay=0.01),
    "AdamW": dict(lr=1e-2, amsgrad=True),
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True),
    "Adadelta": dict(lr=0.5, weight_decay=0.01),
}


def training(name, kwargs, dtype=torch.float32, n_steps=12):
    """Params in two groups (one param without grad); grads sized so about half the steps clip."""
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in (1, 7, 4097, 300, 0, 5)]
    groups = [dict(params=params[:3]), dict(params=params[3:], lr=kwargs["lr"] / 2)]
    grads = [[None if i == 5 else (torch.randn(p.shape, generator=gen) * (0.2 + step % 4 * 0.5)).to(dtype)
              for i, p in enumerate(params)] for step in range(n_steps)]
    return params, groups, grads
