"""Shared tables for dropout: the test suite (tests/test_dropout.py, tests/triton/test_dropout.py),
the checker (dropout.py) and the end-to-end bench (bench/e2e.py) import them from here.

The reference mask comes from `philox_draws`, a plain numpy Philox-4x32-10 written from Triton's
language/random.py (tests/triton/test_dropout.py checks it against the real tl.rand4x), never from
the kernels under test. Every comparison is exact: dropout multiplies by one rounded scale, so
there is no tolerance to state. The dropped fraction is binomial: within SIGMAS standard
deviations of n * p.
"""

import functools

import numpy as np
import torch

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SIZES = [1, 7, 64 * 1024 + 3]
# 0.15: 1/float32(0.85) != float32(1/0.85); 1e-7 and 1 - 1e-7: the edges of float32's p.
MASK_PS = [0.1, 0.5, 0.9, 1e-7, 1 - 1e-7, 0.15]
CROSS_BACKEND_PS = [0.1, 0.5, 1 - 1e-7]  # C++ against Triton, bit for bit
FRACTION_PS, FRACTION_SEEDS, FRACTION_N, SIGMAS = [0.1, 0.5, 0.9], (1, 2, 3), 1 << 18, 5


def philox_rand4x(seed, offsets):
    """tl.rand4x(seed, offsets), as a (4, len(offsets)) array: Philox-4x32-10 on the counter
    (lo, hi, 0, 0) of each int64 offset, keyed by the seed's (lo, hi) words; each output word,
    read as int32, folded to >= 0 and multiplied by 4.6566127342e-10 in float32."""
    offsets = np.asarray(offsets, dtype=np.uint64)
    low = np.uint64(0xFFFFFFFF)
    c0, c1 = offsets & low, offsets >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = np.uint64(0xCD9E8D57) * c2, np.uint64(0xD2511F53) * c0
        c0, c1 = (p0 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p0 & low
        c2, c3 = (p1 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p1 & low
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    x = np.stack([c0, c1, c2, c3]).astype(np.uint32).view(np.int32)
    return np.where(x < 0, ~x, x).astype(np.float32) * np.float32(4.6566127342e-10)


def philox_draws(seed, draws):
    """pyfused's draw d for each int64 d: word d % 4 of tl.rand4x(seed, d // 4)."""
    draws = np.asarray(draws, dtype=np.int64)
    return philox_rand4x(seed, draws // 4)[draws % 4, np.arange(draws.size)]


def generator(seed=1234, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def drawn_seed(seed=1234, device="cpu"):
    """The seed pyfused draws from generator(seed, device): one int64 random_() on the device."""
    return torch.empty(1, dtype=torch.int64, device=device).random_(generator=generator(seed, device)).item()


def torch_scale(p, dtype):
    """What torch's CPU dropout multiplies kept elements by: its noise.div_(1 - p)."""
    return torch.ones((), dtype=dtype).div_(1 - p)


def expected(x, p, seed, group=1):
    """x * mask * scale with the reference mask, in torch's arithmetic for the dtype (differentiable
    in x: bench/e2e.py trains through it)."""
    keep = torch.from_numpy(reference_draws(seed, x.numel(), group) > np.float32(p)).view(x.shape).to(x.device)
    return x * torch.where(keep, torch_scale(p, x.dtype).to(x.device), torch.zeros((), dtype=x.dtype, device=x.device))


@functools.lru_cache(maxsize=8)
def reference_draws(seed, n, group=1):
    """The reference's draws for n elements in groups of `group` (read-only: cached, since a case
    table reuses one seed for many p and dtypes)."""
    draws = philox_draws(seed, np.arange(n) // group)
    draws.flags.writeable = False
    return draws


def fraction_bound(n, p):
    """SIGMAS binomial standard deviations of the dropped count."""
    return SIGMAS * (n * p * (1 - p)) ** 0.5


def bits(t):
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(a, b):
    """Equal bits, except a NaN's: torch's own 16-bit paths disagree on those (0x7fc0 or 0xffff)."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    a, b = a.cpu(), b.cpu()
    assert torch.equal(a.isnan(), b.isnan()), "NaNs in other places"
    same = (bits(a) == bits(b)) | a.isnan()
    assert same.all(), f"{(~same).sum().item()} elements differ"
