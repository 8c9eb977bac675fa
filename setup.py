from setuptools import find_packages, setup

setup(
    name="ptuning-lama",
    version="0.1.0",
    description="P-tuning (continuous prompts) on the LAMA knowledge probe, from a laptop to MegatronLM-11B.",
    packages=find_packages(include=["ptuning", "ptuning.*", "launcher", "model_parallel"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors",
        "accelerate",
        "gguf",
        "deepspeed",
        "megatron-core",
        "wandb",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest"]},
)
