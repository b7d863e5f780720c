"""Build script. The package is pure Python plus an optional C++/CUDA extension that is
compiled just in time on first use (see anchor_kernels/_ext.py)."""

from setuptools import find_packages, setup

setup(
    name="anchor_kernels",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for ANCHOR hard-mined supervised contrastive learning",
    packages=find_packages(include=["anchor_kernels", "anchor_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "train": ["tqdm", "matplotlib"]},
    entry_points={"console_scripts": ["anchor-train=anchor_kernels.train.trainer:main"]},
)
