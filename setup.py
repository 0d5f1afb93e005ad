# Placeholder build script; the CUDA extension build is added with the kernels.
from setuptools import find_packages, setup

setup(
    name="mtpkern",
    version="0.1.0",
    packages=find_packages(include=["mtpkern", "mtpkern.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.40", "tokenizers", "safetensors", "numpy", "tqdm", "matplotlib", "sacrebleu"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"], "data": ["datasets"]},
    entry_points={"console_scripts": ["mtpkern=mtpkern.cli:main"]},
)
