"""eesmm_jax: EESMM (superposition-masked SimMIM) pretraining of Swin Transformers in JAX/Flax."""

from setuptools import find_packages, setup

TORCH = ["torch==2.14.1", "torchvision==0.29.1", "timm>=0.9"]

setup(
    name="eesmm_jax",
    version="0.1.0",
    description="EESMM / SimMIM pretraining of Swin Transformers in JAX and Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # configs/ ships inside the package as eesmm_jax.configs (the demo reads its config there).
    packages=find_packages(include=["eesmm_jax", "eesmm_jax.*"]) + ["eesmm_jax.configs"],
    package_dir={"eesmm_jax.configs": "configs"},
    install_requires=[
        "jax>=0.5",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-cpu>=2.16",  # tf.data only; JAX owns the accelerators
        "tensorflow-datasets>=4.9",
        "ml-collections>=1.0",
        "chex>=0.1.88",
        "absl-py>=2.0",
        "clu>=0.0.10",  # metric writers (TensorBoard + logging)
        "tensorboard>=2.16",
        "numpy>=1.26",
        "pillow>=10",
    ],
    extras_require={
        # CUDA 12 wheels still ship kernels for V100 (sm_70); CUDA 13 wheels need sm >= 7.5.
        "cuda12": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # The PyTorch reference (timm) and the weight converter's .pth reader.
        "torch": TORCH,
        # The demo's real images: scikit-learn's digits ship inside the package.
        "demo": ["scikit-learn>=1.3"],
        # `python -m eesmm_jax.tools.study`: the demo's digits, and matplotlib for study.png.
        "study": ["scikit-learn>=1.3", "matplotlib>=3.8"],
        "test": ["pytest>=8", "pytest-xdist>=3", "scikit-learn>=1.3", "matplotlib>=3.8"] + TORCH,
    },
)
