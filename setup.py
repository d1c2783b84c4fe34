"""Build mpop3: every .pyx in mpop3/ (the core's hot paths) and modules/
(the shipped modules). Per-file link flags go in the .pyx itself as
`# distutils: libraries = crypt` comments."""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("MPOP3_DEBUG") == "1"


def extensions():
    found = []
    for pyx in sorted(glob.glob("mpop3/*.pyx") + glob.glob("modules/*.pyx")):
        name = pyx[:-4].replace("/", ".")
        found.append(Extension(name, [pyx], extra_compile_args=["-O2", "-Wno-unused-function"]))
    return found


setup(
    name="mpop3",
    version=__import__("mpop3").__version__,
    packages=["mpop3"],
    package_data={"mpop3": ["include/*.pxi", "*.pyx", "*.pxd"]},
    ext_modules=cythonize(
        extensions(),
        include_path=["mpop3/include"],
        compiler_directives={"language_level": 3, "boundscheck": DEBUG, "wraparound": DEBUG},
        annotate=DEBUG,
    ),
    entry_points={"console_scripts": ["mpop3 = mpop3.cli:main"]},
    python_requires=">=3.11",
    install_requires=["uvloop"],
)
