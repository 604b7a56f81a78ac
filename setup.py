"""bert_jax: BERT-family and T5 pretraining and fine-tuning in JAX/Flax.

Install for running:   pip install -e .
Install for testing:   pip install -e ".[test]"   (CPU torch + transformers for parity tests)
Install on a TPU VM:   pip install -e ".[tpu]"
"""
import sys

# Every jax/jaxlib release in the pinned range (0.7 to 0.10) declares
# Requires-Python >= 3.11. Checked before anything else, so an older Python
# gets this message instead of a resolver error about jax. The upper bound is
# the newest Python that tensorflow-text (2.20+) ships wheels for: 3.13.
PYTHON_REQUIRES = ">=3.11,<3.14"
PYTHON_MIN = (3, 11)


def check_python(version_info) -> None:
  """Raises SystemExit naming the required Python where `version_info` is older."""
  if tuple(version_info)[:2] < PYTHON_MIN:
    found = ".".join(str(n) for n in tuple(version_info)[:3])
    raise SystemExit(
        f"bert_jax needs Python >= {PYTHON_MIN[0]}.{PYTHON_MIN[1]} (jax >= 0.7 requires it); "
        f"this is Python {found}. On a TPU VM, tpu_scripts/tpu.py setup installs one.")


check_python(sys.version_info)

import setuptools  # noqa: E402  (after the check: its message comes first)

# Ranges, not pins: each lower bound is the oldest release whose API we use
# (jax.make_mesh axis_types, orbax CheckpointManager options, flax logical
# partitioning); each upper bound stops at the next major/minor line that has
# not been tried. The combination checked in CI is recorded in README.md.
INSTALL_REQUIRES = [
    "jax>=0.7,<0.11",
    "flax>=0.11,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    # The full tensorflow wheel (not tensorflow-cpu): tensorflow-text's in-graph
    # tokenizers link against it. It runs on CPU; JAX owns the accelerators.
    "tensorflow>=2.18,<2.22",
    "tensorflow-text>=2.18,<2.22",
    "tensorflow-datasets>=4.9.7,<5",
    # tfds imports importlib_resources but no longer declares it.
    "importlib_resources",
    "sentencepiece>=0.2,<0.3",
    "ml_collections>=1.0,<2",
    "numpy>=1.26,<3",
    "safetensors>=0.4",
]

EXTRAS = {
    "tpu": ["jax[tpu]>=0.7,<0.11"],
    # Reference implementations for the parity tests. torch is pinned to the
    # release whose CPU wheel CI installs; an unpinned torch resolves to a
    # multi-GB CUDA build.
    "test": [
        "pytest>=8",
        # The README's test command runs the files on two workers (-n 2 --dist loadfile).
        "pytest-xdist>=3.8,<4",  # 3.8: --no-loadscope-reorder
        "torch==2.13.0",
        "transformers>=5,<6",
        # ROUGE parity (tasks/summarization.py is tested equal to it; nltk: its stemmer).
        "rouge-score>=0.1.2",
        # Sentence-embedding parity (tests/test_embed.py); it needs torch, pinned above.
        "sentence-transformers>=5,<7",
    ],
}

setuptools.setup(
    name="bert_jax",
    version="0.1.0",
    description="Pretrain and fine-tune BERT-family encoders and T5 in JAX/Flax on TPU pods.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=PYTHON_REQUIRES,
    packages=setuptools.find_packages(include=["bert_jax", "bert_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["bert-jax=bert_jax.main:run"]},
)
