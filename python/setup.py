# Builds galore's PyTorch bridge (galore._C) against the torch that is installed:
#   pip install --no-build-isolation ./python        (or: python3 setup.py build_ext --inplace)
# The C++ library is header-only; its headers are in ../include, Eigen 3.4 on
# the system (libeigen3-dev) or under EIGEN3_INCLUDE_DIR.
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = Path(__file__).resolve().parent
eigen = os.environ.get("EIGEN3_INCLUDE_DIR", "/usr/include/eigen3")
# GALORE_NATIVE=1 builds for this machine's CPU (AVX2/AVX-512 paths); the
# default stays portable.
native = ["-march=native"] if os.environ.get("GALORE_NATIVE") == "1" else []

setup(
    name="galore",
    version="0.1.0",
    description="GaLore optimizers for PyTorch, on galore's C++ library",
    packages=["galore"],
    ext_modules=[
        CppExtension(
            "galore._C",
            ["csrc/bridge.cpp"],
            include_dirs=[str(here.parent / "include")],
            # Eigen as a system header: its own warnings are not ours to fix.
            extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-isystem", eigen] + native,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
