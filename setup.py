"""Builds and installs the Python package `gatherer` (python/gatherer) with its
extension module compiled by Gatherer's own CMake project:

    /usr/bin/python3 -m pip install --no-build-isolation --break-system-packages .

Needs what .ci/install-deps installs (a C++20 compiler, CMake, the libraries,
pybind11-dev, python3-dev). CMAKE_BUILD_PARALLEL_LEVEL sets the build's jobs
(default 2).
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build, exist_ok=True)
        configure = ["cmake", "-S", HERE, "-B", build,
                     "-DCMAKE_BUILD_TYPE=Release",
                     "-DGATHERER_PYTHON=ON",
                     "-DGATHERER_BUILD_TESTS=OFF",
                     "-DGATHERER_WERROR=OFF",
                     f"-DPython3_EXECUTABLE={sys.executable}"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        subprocess.run(["cmake", "--build", build, "--target", "_gatherer"], check=True, env=env)
        built = os.path.join(build, "python", "gatherer", os.path.basename(self.get_ext_filename(ext.name)))
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(built, target)


def version():
    with open(os.path.join(HERE, "CMakeLists.txt")) as f:
        for line in f:
            if line.startswith("project(gatherer VERSION "):
                return line.split()[2]
    raise RuntimeError("no version in CMakeLists.txt")


setup(
    name="gatherer",
    version=version(),
    description="Gatherer: large batches of HTTP requests on a pool of workers, responses in order",
    packages=["gatherer"],
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("gatherer._gatherer")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    zip_safe=False,
)
