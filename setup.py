from setuptools import find_packages, setup

setup(
    name="ldm_lite",
    version="0.1.0",
    description="Pure-PyTorch DDPM/LDM toolkit for studying and fixing the biases of diffusion models",
    packages=find_packages(include=["ldm_lite", "ldm_lite.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "einops",
        "numpy",
        "tqdm",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        # References we prove parity against; ldm_lite itself never imports them.
        "dev": ["pytest", "diffusers", "scipy"],
    },
)
