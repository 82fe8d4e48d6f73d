"""Builds pyfused._C from csrc/ and maps kernels/ (Triton) to pyfused.kernels, bench/ to pyfused.bench."""

from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

# The instruction set is chosen at run time (csrc/isa_*.cpp), so nothing here targets the build
# machine. -ffp-contract=off: the compiler fuses nothing, so the only fused multiply-adds are the
# explicit ones where torch's kernels fuse (mul_add in csrc/optimizers.h); -fno-math-errno lets
# sqrt vectorize.
extension = Pybind11Extension(
    "pyfused._C",
    sorted(glob("csrc/*.cpp")),
    cxx_std=17,
    extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"],
)

ParallelCompile("PYFUSED_BUILD_JOBS", default=0).install()

setup(
    # Every package under pyfused/, found rather than listed, plus the ones mapped in from kernels/ and bench/.
    packages=find_packages(include=["pyfused", "pyfused.*"]) + ["pyfused.kernels", "pyfused.bench"],
    package_dir={"pyfused.kernels": "kernels", "pyfused.bench": "bench"},
    ext_modules=[extension],
    cmdclass={"build_ext": build_ext},
)
