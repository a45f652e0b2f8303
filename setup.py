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
        # clean-fid pulls torchvision, which pulls a CUDA torch build (~6 GB): kept out of the core install.
        "fid": ["clean-fid>=0.1.35"],
        "xformers": ["xformers"],
        "dev": ["pytest>=8", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["stepdistill=stepdistill.cli:main"]},
)
