"""Build mpop3: every .pyx under mpop3/ (the core's hot paths, as modules of
their packages) and modules/ (the shipped modules). Per-file link flags go in
the .pyx itself as `# distutils: libraries = crypt` comments."""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

DEBUG = os.environ.get("MPOP3_DEBUG") == "1"  # bounds checks and annotated HTML


def extensions():
    sources = sorted(glob.glob("mpop3/**/*.pyx", recursive=True) + glob.glob("modules/*.pyx"))
    return [
        Extension(pyx[:-4].replace("/", "."), [pyx], extra_compile_args=["-O2", "-Wno-unused-function"])
        for pyx in sources
    ]


setup(
    name="mpop3",
    version=__import__("mpop3").__version__,
    packages=find_packages(include=["mpop3", "mpop3.*"]),
    package_data={"": ["include/*.pxi", "*.pyx", "*.pxd"]},
    ext_modules=cythonize(
        extensions(),
        include_path=["mpop3/include", "."],  # "." lets modules cimport mpop3.mbox._kernels
        compiler_directives={"language_level": 3, "boundscheck": DEBUG, "wraparound": DEBUG},
        annotate=DEBUG,
    ),
    entry_points={"console_scripts": ["mpop3 = mpop3.cli:main"]},
    python_requires=">=3.11",
    install_requires=["uvloop"],
)
