"""TTE-Flash: reasoning-aware multimodal embeddings with latent think tokens and fused Triton attention."""
from setuptools import setup

# Parquet input files: pyarrow reads every Parquet file (tte_flash.data.iter_rows: training/evaluation/MMEB-V2 rows,
# `tte-flash encode --input x.parquet`); datasets is no longer imported by tte_flash (tests compare against it)
PARQUET = ["pyarrow", "datasets"]
# encoding a corpus on a Ray cluster (tte_flash.distributed): Ray Data's streaming repartition by rows
# (Dataset.repartition(target_num_rows_per_block=...), Ray 2.44+); tested with Ray 2.60
DISTRIBUTED = ["ray[data]>=2.44", "pyarrow"]
TRAIN = ["accelerate>=1.0", "peft>=0.15", "pyyaml", *PARQUET]
# encode_query / encode_document / prompts of the sentence-transformers module need sentence-transformers 5
ST = "sentence-transformers>=5"

setup(
    name="tte-flash",
    version="0.1.0",
    description="Reasoning-aware multimodal embeddings: Qwen2-VL + latent think tokens + Triton TTE attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tte_flash", "tte_flash.kernels"],
    # kernels/ at the top level of the repo installs as tte_flash.kernels (never a top-level `kernels`,
    # which is the name of the Hugging Face `kernels` package that transformers probes for).
    package_dir={"tte_flash": "tte_flash", "tte_flash.kernels": "kernels"},
    package_data={"tte_flash": ["presets/*.json", "presets/tiny-instruct/*", "presets/tiny-reasoner/*",
                                 "presets/tiny-thinker/*"]},
    install_requires=[
        "torch>=2.5",
        "transformers>=5.0,<6",
        # the fused kernel; Linux only (no wheels elsewhere): other platforms use the reference attention
        "triton>=3.2; platform_system == 'Linux'",
        "safetensors",
        "tokenizers",  # imported directly (tte_flash.tokenization); also a dependency of transformers
        "pillow",
        "numpy",
        "tqdm",
        "huggingface_hub",
        # the lock on an output folder (tte_flash.writing); also a dependency of huggingface_hub
        "filelock>=3.0",
    ],
    extras_require={
        # training/ (Trainer, LoRA, YAML recipes, Parquet data)
        "train": TRAIN,
        "parquet": PARQUET,
        "distributed": DISTRIBUTED,
        # benchmarks/ plots (and tte_flash.explain's figures)
        "benchmarks": ["matplotlib", "scipy"],
        # ecosystem integrations (tte_flash.integrations)
        "sentence-transformers": [ST],
        # mteb's own image/video extras (torchvision, torchcodec) are not needed to load this model
        "mteb": ["mteb>=2"],
        # tests: everything the test suite exercises;
        # scikit-learn: the NDCG cross-check of tte_flash.mmeb's metrics (pytrec_eval, when installed, too)
        "dev": ["pytest", "hypothesis", *TRAIN, "matplotlib", "scipy", "scikit-learn", ST,
                "mteb>=2", *DISTRIBUTED],
        # Liger-Kernel's fused linear cross-entropy for the COT loss on CUDA (tte_flash.losses)
        "liger": ["liger-kernel"],
        "flash": ["flash-attn"],
        # video files: PyAV (seeks to the sampled frames); torchcodec is used instead when it is installed
        "video": ["av"],
        "torchcodec": ["torchcodec"],
    },
    entry_points={"console_scripts": ["tte-flash = tte_flash.cli:main"]},
)
