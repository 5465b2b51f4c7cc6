from setuptools import find_packages, setup

setup(
    name="kprune",
    version="0.1.0",
    description="Structured channel pruning for Keras 3 models: graph, surgeon, criteria, ResRep, Slimming, CondenseNet.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kprune", "kprune.*"]),
    python_requires=">=3.10",
    install_requires=["tensorflow>=2.16", "keras>=3.5", "numpy"],
    extras_require={
        "dev": ["pytest", "hypothesis", "scikit-learn", "ai-edge-litert", "matplotlib",
                "nbclient", "nbformat", "ipykernel", "mnist1d"],
        "litert": ["ai-edge-litert"],
        "hub": ["keras-hub>=0.20"],
        "plot": ["matplotlib"],
        # The other Keras backends, for KERAS_BACKEND=jax / torch (CPU builds; torch 2.13.0 is
        # the release whose CPU wheel the project's machines hold).
        "backends": ["jax[cpu]", "torch==2.13.0"],
    },
    entry_points={"console_scripts": ["kprune=kprune.tools.cli:main"]},
)
