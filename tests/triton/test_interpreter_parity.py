"""The Triton kernels against torch's for-loop implementation, through the C++ suite's parity
table (pyfused/check/optim_cases.py): every case in fp32, one case per optimizer in each other dtype,
sizes that fit the interpreter (~1e6 elements/s).

On a GPU machine the kernels run compiled on CUDA tensors, where test_cpp_vs_triton.py shows them
bit-identical to the C++ backend, which the C++ suite holds to torch; this table builds CPU
tensors, so it runs under the interpreter only.
"""

import pytest

from pyfused.check import optim_cases as oc
from triton_suite import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="the parity table builds CPU tensors: interpreter only")

SIZES = (0, 1, 7, 130)
FIRST_CASE_PER_OPTIMIZER = [next(c for c in oc.CASES if c.optimizer == name) for name in oc.OPTIMIZERS]
OTHER_DTYPES = [dt for dt in oc.DTYPES if dt.name != "fp32"]


@pytest.mark.parametrize("case, dt", oc.parity_params(dtypes=[oc.DTYPES_BY_NAME["fp32"]])
                         + oc.parity_params(FIRST_CASE_PER_OPTIMIZER, OTHER_DTYPES))
def test_triton_matches_torch(case, dt):
    oc.check_parity(case, dt, sizes=SIZES, backend="triton")
