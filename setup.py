"""Build: the C++ extension `rstitch_engine._C` through CMake; three source folders, one package."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        subprocess.run(
            ["cmake", str(ROOT), f"-DCMAKE_BUILD_TYPE={cfg}",
             f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
             f"-DPython_EXECUTABLE={sys.executable}",
             f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
            cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


setup(
    packages=find_packages("python") + ["rstitch_engine.engine", "rstitch_engine.kernels"],
    package_dir={
        "rstitch_engine": "python/rstitch_engine",
        "rstitch_engine.engine": "engine",
        "rstitch_engine.kernels": "rstitch_kernels",
    },
    ext_modules=[CMakeExtension("rstitch_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
)
