"""TensorFlow never takes an accelerator from JAX (bert_jax/host_tf.py).

The source check holds every module to the rule (TensorFlow only through
host_tf, so that the GPUs are hidden before any TensorFlow op); the stand-in
`tf.config` checks what hiding does on a host with GPUs, which this CPU
machine is not.
"""
import ast
import logging
import pathlib

from bert_jax import host_tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
TF_FAMILY = ("tensorflow", "tensorflow_text", "tensorflow_datasets")


def _imports(tree: ast.AST):
  """(line, module name, node) of every import in the file, nested ones too."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from ((node.lineno, a.name, node) for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.lineno, node.module, node


def test_every_module_takes_tensorflow_through_host_tf():
  bad = []
  for path in sorted((ROOT / "bert_jax").rglob("*.py")):
    if path.name == "host_tf.py":
      continue
    rel = path.relative_to(ROOT)
    found = sorted(_imports(ast.parse(path.read_text(encoding="utf-8"))), key=lambda t: t[0])
    hidden_at = min((line for line, name, node in found if name == "bert_jax.host_tf" or (
        name == "bert_jax" and any(a.name == "host_tf" for a in node.names))), default=None)
    for line, name, node in found:
      if name.split(".")[0] not in TF_FAMILY:
        continue
      if name == "tensorflow" and isinstance(node, ast.Import):
        bad.append(f"{rel}:{line}: `{ast.unparse(node)}` (use `from bert_jax.host_tf import tf`)")
      elif name == "tensorflow_datasets":
        bad.append(f"{rel}:{line}: `{ast.unparse(node)}` (use `host_tf.datasets()`)")
      elif hidden_at is None or hidden_at > line:
        bad.append(f"{rel}:{line}: `{ast.unparse(node)}` comes before any "
                   "`from bert_jax.host_tf import tf`")
  assert not bad, "TensorFlow imported around host_tf:\n" + "\n".join(bad)


class _Device:

  def __init__(self, name):
    self.name = name


class _Config:
  """A stand-in tf.config with physical GPUs; `initialised` mimics a TF that ran an op."""

  def __init__(self, gpus=2, initialised=False):
    self.physical = {"GPU": [_Device(f"/physical_device:GPU:{i}") for i in range(gpus)],
                     "TPU": []}
    self.visible = {k: list(v) for k, v in self.physical.items()}
    self.initialised = initialised
    self.calls = []

  def list_physical_devices(self, device_type):
    return list(self.physical[device_type])

  def get_visible_devices(self, device_type):
    return list(self.visible[device_type])

  def set_visible_devices(self, devices, device_type):
    self.calls.append((list(devices), device_type))
    if self.initialised and devices != self.visible[device_type]:
      raise RuntimeError("Visible devices cannot be modified after being initialized")
    self.visible[device_type] = list(devices)


def test_hide_accelerators_hides_every_gpu_before_tensorflow_starts():
  config = _Config(gpus=2)
  assert host_tf.hide_accelerators(config) == []
  assert config.visible["GPU"] == []
  # Only types that have devices are touched: TPU has none on this stand-in.
  assert config.calls == [([], "GPU")]


def test_hide_accelerators_warns_when_tensorflow_already_holds_a_gpu(caplog):
  config = _Config(gpus=1, initialised=True)
  with caplog.at_level(logging.WARNING):
    still = host_tf.hide_accelerators(config)
  assert still == ["/physical_device:GPU:0"]
  assert "before bert_jax could hide it" in caplog.text
  assert "/physical_device:GPU:0" in caplog.text


def test_hide_accelerators_is_a_no_op_without_accelerators(caplog):
  config = _Config(gpus=0, initialised=True)
  with caplog.at_level(logging.WARNING):
    assert host_tf.hide_accelerators(config) == []
  assert config.calls == [] and not caplog.text


def test_tensorflow_ops_still_run_on_the_cpu_after_hiding():
  x = host_tf.tf.constant([1.0, 2.0]) * 2.0
  assert x.numpy().tolist() == [2.0, 4.0]
  assert all(d.device_type == "CPU" for d in host_tf.tf.config.get_visible_devices())
