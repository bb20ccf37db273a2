"""deepseek_tf: DeepSeek-style LLMs in TensorFlow 2 / Keras 3.

Direct dependencies are pinned here to the TensorFlow 2.20 family (see BUILD.md for
why each is needed); `requirements/constraints.txt` pins every transitive package
to the exact versions the test suite ran with (`requirements/garden-constraints.txt`
adds those of the opt-in `garden` extra).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "tensorflow==2.20.*",
    "keras==3.15.*",  # the fused AdamW overrides private Keras members (test_optimizer.py)
    "tensorflow-text==2.20.*",
    "tensorflow-serving-api==2.20.*",
    "datasets>=4,<6",
    "sentencepiece>=0.2,<0.3",
    "tokenizers>=0.20,<1",
    "tqdm>=4.60,<5",
    "tensorboard==2.20.*",
    # tensorboard 2.20 imports pkg_resources, which setuptools 82 dropped and 80.9-81 warn
    # about on every start.
    "setuptools>=70,<80.9",
    "absl-py>=1.4,<3",
    "numpy>=1.26,<3",
    "ml_dtypes>=0.5,<1",  # bfloat16 / float8 numpy dtypes of safetensors files (convert)
    # convert/export: safetensors' numpy API reads and writes the plain dtypes (float8
    # is ours: numpy has none; ml_dtypes, a TensorFlow dependency, does)
    "safetensors>=0.8,<1",
    # evaluate: BLEU, ROUGE, classification F1
    "sacrebleu>=2.4,<3",
    "rouge-score==0.1.2",
]

EXTRAS = {
    # TF Model Garden, pinned with its TF family. Nothing in the package imports it (its
    # layers are Keras 2 / tf_keras, never mixed into our Keras 3 models) and it pulls in
    # opencv, kaggle and pycocotools, so it is opt-in: pip install '.[garden]'.
    "garden": ["tf-models-official==2.20.0"],
    # Everything tests/ imports beyond the package's own dependencies and the extras below.
    "dev": ["pytest>=8,<10", "pytest-xdist>=3,<4", "PyYAML>=6,<7", "pandas>=2,<4", "Jinja2>=3,<4",
            "grpcio>=1.60,<2", "protobuf>=5,<8", "openai==3.57.0"],
    # Reference implementations for the parity tests; CPU torch from a local wheel.
    # accelerate: transformers' fine-grained FP8 loader refuses to run without it.
    "parity": ["torch==2.13.0", "transformers>=5,<6", "accelerate>=1,<2"],
    # Edge export: TFLite interpreter, the LiteRT-LM bundle builder, its runtime (Python
    # API, a manylinux x86_64 wheel) and command line, LiteRT's quantizer (int4 weights);
    # versions the tests ran with.
    # The OpenAI-compatible HTTP server (python -m deepseek_tf.serve); the tests drive it
    # with the official openai client (in dev).
    "serve": ["fastapi==0.165.0", "uvicorn==0.54.0", "prometheus-client==0.26.0"],
    "edge": ["ai-edge-litert==2.3.0", "litert-lm-builder==0.18.1", "litert-lm-api==0.18.1",
             "litert-lm==0.18.1", "ai-edge-quantizer==0.10.0"],
}

setup(
    name="deepseek_tf",
    version="0.1.0",
    description="Pretrain, fine-tune, evaluate and deploy DeepSeek-style LLMs with "
                "TensorFlow 2 / Keras 3.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["deepseek_tf", "deepseek_tf.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "deepseek-tf-train=deepseek_tf.train.__main__:entry",
        "deepseek-tf-prepare=deepseek_tf.prepare:entry",
        "deepseek-tf-convert=deepseek_tf.convert.__main__:entry",
        "deepseek-tf-export=deepseek_tf.export.__main__:entry",
        "deepseek-tf-params=deepseek_tf.params:entry",
        "deepseek-tf-launch=deepseek_tf.launch:main",
        "deepseek-tf-generate=deepseek_tf.generate.__main__:entry",
        "deepseek-tf-evaluate=deepseek_tf.evaluate.__main__:entry",
        "deepseek-tf-serve=deepseek_tf.serve.__main__:entry",
        "deepseek-tf-merge-lora=deepseek_tf.tools.merge_lora:entry",
        "deepseek-tf-compare-runs=deepseek_tf.tools.compare_runs:entry",
        "deepseek-tf-inspect-checkpoint=deepseek_tf.tools.inspect_checkpoint:entry",
        "deepseek-tf-inspect-hf-checkpoint=deepseek_tf.tools.inspect_hf_checkpoint:entry",
        "deepseek-tf-profile-summary=deepseek_tf.tools.profile_summary:entry",
    ]},
    classifiers=["Programming Language :: Python :: 3",
                 "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
