"""T5 text-to-text fine-tuning through `bert-jax finetune` (config.family = 't5').

A tiny T5 v1.1 with a SentencePiece model trained here on Python's own docs;
real GLUE / CoNLL / SQuAD rows from ../shared/data. What is checked is the
loop: teacher-forced training lowers the loss and teaches greedy decoding
the label words, eval scores decoded texts with the task's metric, the best
epoch is kept and reproduced by `evaluate` (greedy and beam search), predict
writes the task's file, and a T5 model starts from a Hugging Face folder or a
span-corruption pretraining workdir.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bert_jax import defaults
from bert_jax import finetune
from bert_jax import save_pretrained
from bert_jax import train
from bert_jax.data import sources
from bert_jax.data import tokenizer as tok_lib
from bert_jax.models import t5
from bert_jax.tasks import adapters
from bert_jax.tasks import glue
from bert_jax.tasks import text2text

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 384  # 256 pieces + 100 sentinels, rounded up to a multiple of 128


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  """A T5-layout SentencePiece model (pad 0, eos 1, unk 2, 100 extra ids)."""
  folder = tmp_path_factory.mktemp("t5_spm")
  tok = tok_lib.train_sentencepiece(sources.iter_paragraphs("builtin:pydoc_topics"),
                                    str(folder / "spm"), 256, input_sentence_size=3000,
                                    num_threads=2)
  return pathlib.Path(tok.path)


@pytest.fixture(scope="module")
def hf_t5(spm, tmp_path_factory):
  """A Hugging Face T5 folder (config.json, model.safetensors, spiece.model) of a random tiny T5."""
  folder = tmp_path_factory.mktemp("hf_t5") / "t5"
  model = t5.T5Model(t5.T5Config.preset("t5_v1_1_tiny", vocab_size=VOCAB, dropout_rate=0.0))
  variables = jax.jit(model.init)(jax.random.key(3), jnp.ones((1, 8), jnp.int32),
                                  jnp.ones((1, 4), jnp.int32))
  params = jax.tree.map(lambda x: getattr(x, "value", x), variables["params"],
                        is_leaf=lambda x: hasattr(x, "value"))
  save_pretrained(model, params, folder)
  shutil.copy(spm, folder / "spiece.model")
  return folder


def _records(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _config(variant, data_dir, **fields):
  """configs/text2text.py:VARIANT with `fields` ('a.b' -> value) set, for a tiny quick run."""
  sys.path.insert(0, str(ROOT / "configs"))
  try:
    import text2text as t2t_config  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = t2t_config.get_config(variant)
  config.data.data_dir = str(data_dir)
  config.log.every_steps = 1
  config.log.progress = False
  config.checkpoint.every_epochs = 100  # only after the last epoch: saves are slow here
  config.update_from_flattened_dict(fields)
  return config


# ---------------------------------------------------------------- config


def test_text2text_config_covers_every_task(shared_data):
  for variant in [n for n, t in glue.TASKS.items() if t.labelled is not None] + [
      "conll", "squad", "squad_v2"]:
    config = _config(variant, shared_data)
    assert config.family == "t5" and config.optim.name == "adafactor"
    assert config.optim.schedule == "constant" and config.optim.learning_rate == 1e-3
    config.init_from = str(shared_data)  # neither a HF folder nor a pretraining workdir
    with pytest.raises(ValueError, match="config.init_from"):
      finetune.validate(config)
    config.init_from, config.data.tokenizer = "", "spiece.model"
    finetune.validate(config)
    kind = variant if variant in ("conll", "squad") else (
        "squad" if variant == "squad_v2" else "glue")
    assert config.task == kind
  assert _config("squad_v2", shared_data).data.train_split == "train-v2.0.json"
  assert _config("mnli", shared_data).data.eval_splits == "dev_matched,dev_mismatched"
  with pytest.raises(ValueError, match="variant 'sst5'"):
    _config("sst5", shared_data)


# ---------------------------------------------------------------- features


def test_pad_matches_make_features_and_fills_rows_with_eos(shared_data, spm, tmp_path):
  """The adapter's batches equal text2text.make_features; filler rows are one EOS, weight 0."""
  config = _config("sst2", shared_data, **{"data.tokenizer": str(spm),
                                           "data.max_length": 24, "data.padding": "dynamic",
                                           "data.pad_multiple": 8})
  tokenizer = tok_lib.load_tokenizer(str(spm))
  task = adapters.make_task(config, tokenizer)
  assert isinstance(task, adapters.Text2TextTask) and task.metric == "accuracy"
  split = task.load("dev", 6)
  batch = task.pad(split.features, 8)  # 6 real rows + 2 fillers

  inputs, targets = text2text.glue_to_text("sst2", split.examples)
  assert inputs[0].startswith("sst2 sentence: ")
  assert set(targets) <= {"positive", "negative"}
  ref = text2text.make_features(inputs, targets, tokenizer, max_input_length=24,
                                max_target_length=config.data.max_target_length,
                                multiple=8).arrays
  for key, value in ref.items():
    np.testing.assert_array_equal(batch[key][:6], value, err_msg=key)
  np.testing.assert_array_equal(batch["encoder_input_tokens"][6:, 0], tokenizer.eos_id)
  assert not batch["encoder_input_tokens"][6:, 1:].any()
  assert not batch["decoder_loss_weights"][6:].any()
  # Unlabelled rows (a test split) give encoder features only.
  (tmp_path / "SST-2").mkdir()
  (tmp_path / "SST-2" / "test.tsv").write_text(
      "index\tsentence\n0\ta quiet film .\n1\tloud and long .\n", encoding="utf-8")
  config.data.data_dir = str(tmp_path)
  test_split = adapters.make_task(config, tokenizer).load("test", 0)
  assert len(test_split.features) == 2
  assert set(task.pad(test_split.features, 4)) == {"encoder_input_tokens"}


def test_t5_needs_an_eos_tokenizer_and_rejects_bert_only_controls(shared_data, spm, tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
  config = _config("sst2", shared_data, **{"data.tokenizer": str(vocab)})
  with pytest.raises(ValueError, match="no EOS id"):
    finetune.finetune(config, str(tmp_path / "a"))
  config = _config("sst2", shared_data, **{"data.tokenizer": str(spm),
                                           "finetune.freeze_layers": 1})
  config.model = defaults.model_config("t5", "t5_v1_1_tiny", vocab_size=VOCAB)
  with pytest.raises(ValueError, match="finetune.freeze_layers: needs per-layer names"):
    finetune.finetune(config, str(tmp_path / "b"))
  config = _config("sst2", shared_data, **{"data.tokenizer": str(spm), "decode.beam_size": 0})
  with pytest.raises(ValueError, match="config.decode"):
    finetune.finetune(config, str(tmp_path / "c"))


# -------------------------------------------------------------- end to end


def _env(devices: int) -> dict:
  """Subprocess environment: `devices` CPU devices, unoptimised XLA (compiling dominates)."""
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
              "--xla_backend_optimization_level=0")


_EVAL_FIELDS = ("--config.data.max_eval_examples=16", "--config.data.max_length=64",
                "--config.eval.batch_size=16")


@pytest.fixture(scope="module")
def sst2_run(shared_data, hf_t5, tmp_path_factory):
  """Workdir of `bert-jax finetune --config=configs/text2text.py:sst2` from the HF folder."""
  workdir = tmp_path_factory.mktemp("t5_sst2") / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "bert_jax.main", "finetune", "--config=configs/text2text.py:sst2",
       f"--workdir={workdir}", f"--config.init_from={hf_t5}",
       f"--config.data.data_dir={shared_data}", "--config.data.max_train_examples=32",
       *_EVAL_FIELDS, "--config.train.batch_size=8", "--config.train.num_epochs=6",
       "--config.optim.learning_rate=1e-2", "--config.checkpoint.every_epochs=100",
       "--config.log.every_steps=1", "--config.log.progress=False"],
      cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_sst2_text_to_text_from_hf_folder_cli(shared_data, hf_t5, sst2_run):
  """Training teaches greedy decoding the label words; evaluate (greedy, beam) and predict."""
  workdir = sst2_run
  records = _records(workdir)
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 24 and np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
  evals = [r for r in records if "eval/dev/accuracy" in r]
  assert [r["epoch"] for r in evals] == list(range(1, 7))
  # A random model decodes junk; after training every output is a label word.
  assert evals[-1]["eval/dev/num_unparseable"] == 0, evals
  best = evals[int(np.argmax([r["eval/dev/accuracy"] for r in evals]))]
  assert evals[-1]["best/epoch"] == best["epoch"]

  config = _config("sst2", shared_data, **{"init_from": str(hf_t5),
                                           "data.max_eval_examples": 16,
                                           "data.max_length": 64, "eval.batch_size": 16,
                                           "data.predict_split": "dev"})
  scores = finetune.evaluate(config, str(workdir))
  assert scores["dev/accuracy"] == best["eval/dev/accuracy"]
  config.decode.beam_size = 2
  beam = finetune.evaluate(config, str(workdir))
  assert 0.0 <= beam["dev/accuracy"] <= 1.0 and beam["dev/num_unparseable"] == 0

  path = finetune.predict(config, str(workdir))
  assert os.path.basename(path) == "sst2-dev.tsv"  # SST-2.tsv is the test split's name
  lines = pathlib.Path(path).read_text().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 17
  assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
  # The file's labels are the decoded words' labels, scored as evaluate did.
  dev = glue.read_tsv(str(shared_data), "sst2", "dev")[:16]
  correct = [line.split("\t")[1] == ex.label for line, ex in zip(lines[1:], dev)]
  assert np.mean(correct) == pytest.approx(beam["dev/accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("variant,metric", [("conll", "f1"), ("squad", "exact")])
def test_conll_and_squad_as_text_random_init(shared_data, spm, tmp_path, variant, metric):
  """NER and QA cast as text train (loss falls), score by entity F1 / official EM, and predict."""
  data = {"conll": ("conll2003", "train.txt", "valid.txt", "test.txt"),
          "squad": ("squad", "dev-v1.1.json", "dev-v1.1.json", "dev-v1.1.json")}[variant]
  config = _config(variant, shared_data / data[0], **{
      "data.tokenizer": str(spm), "data.train_split": data[1], "data.eval_splits": data[2],
      "data.predict_split": data[3], "data.max_train_examples": 16,
      "data.max_eval_examples": 8, "data.max_length": 96, "data.max_target_length": 16,
      "train.batch_size": 8, "eval.batch_size": 8, "train.num_epochs": 3,
      "optim.learning_rate": 1e-2})
  config.model = defaults.model_config("t5", "t5_v1_1_tiny", vocab_size=VOCAB, dropout_rate=0.0)
  workdir = tmp_path / variant
  out = finetune.finetune(config, str(workdir))
  losses = [r["loss"] for r in _records(workdir) if "loss" in r]
  assert len(losses) == 6 and losses[-1] < losses[0], losses
  key = f"eval/{data[2]}/{metric}"
  assert key in out and 0.0 <= out[key] <= 100.0
  path = finetune.predict(config, str(workdir))
  if variant == "squad":
    answers = json.loads(pathlib.Path(path).read_text())
    assert len(answers) == 8 and all(isinstance(v, str) for v in answers.values())
  else:
    blocks = pathlib.Path(path).read_text().strip().split("\n\n")
    assert len(blocks) == 8
    assert all(len(line.split()) == 3 for b in blocks for line in b.splitlines())


@pytest.mark.slow
def test_init_from_span_corruption_pretraining_workdir(shared_data, tmp_path):
  """A `bert-jax train` T5 run's weights and tokenizer start a text-to-text fine-tune."""
  sys.path.insert(0, str(ROOT / "configs"))
  try:
    import quickstart  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  pre = quickstart.get_config("span_corruption")
  pre.update_from_flattened_dict({"train.num_steps": 2, "checkpoint.every_steps": 2,
                                  "log.every_steps": 1, "log.progress": False,
                                  "eval.source": "", "train.batch_size": 8})
  pre_dir = tmp_path / "pretrain"
  train.train_and_evaluate(pre, str(pre_dir))

  # Learning rate 0: the fine-tuned weights must be exactly the pretrained ones.
  config = _config("sst2", shared_data, **{
      "init_from": str(pre_dir), "data.max_train_examples": 8, "data.max_eval_examples": 8,
      "data.max_length": 32, "train.batch_size": 8, "eval.batch_size": 8,
      "train.num_epochs": 1, "optim.learning_rate": 0.0})
  workdir = tmp_path / "ft"
  finetune.finetune(config, str(workdir))
  run = finetune._setup(config)  # pylint: disable=protected-access
  assert config.data.tokenizer.startswith(str(pre_dir))  # the run's own SentencePiece model
  assert run.model.config.d_model == pre.model.d_model
  params, _, _ = finetune._restore_best(config, run, str(workdir))  # pylint: disable=protected-access
  flat = traverse_util.flatten_dict(jax.device_get(params))
  pretrained = traverse_util.flatten_dict(jax.device_get(run.pretrained))
  assert flat.keys() == pretrained.keys() and any(k[0] == "decoder" for k in flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(value, pretrained[key], err_msg="/".join(key))


@pytest.mark.slow
def test_two_processes_evaluate_and_predict_as_one(shared_data, hf_t5, sst2_run, tmp_path):
  """`bert-jax evaluate` / `predict` on 2 processes x 4 devices give the 1 x 8 results."""
  from conftest import run_two_processes  # pylint: disable=import-outside-toplevel
  config = _config("sst2", shared_data, **{"init_from": str(hf_t5),
                                           "data.max_eval_examples": 16,
                                           "data.max_length": 64, "eval.batch_size": 16,
                                           "data.predict_split": "dev"})
  expected = finetune.evaluate(config, str(sst2_run))
  one = pathlib.Path(finetune.predict(config, str(sst2_run), out=str(tmp_path / "one")))

  def command(name, *extra):
    return lambda i: [sys.executable, "-m", "bert_jax.main", name,
                      "--config=configs/text2text.py:sst2", f"--workdir={sst2_run}",
                      f"--config.init_from={hf_t5}", f"--config.data.data_dir={shared_data}",
                      *_EVAL_FIELDS, *extra]
  outputs = run_two_processes(command("evaluate"), _env(4), ROOT, timeout=600)
  printed = outputs[0][0]  # process 0 prints the scores (gloo logs its connections too)
  scores = json.loads(printed[printed.index("{"):printed.rindex("}") + 1])
  assert scores == pytest.approx(expected) and "dev/accuracy" not in outputs[1][0]
  out = tmp_path / "two"
  run_two_processes(command("predict", "--config.data.predict_split=dev", f"--out={out}"),
                    _env(4), ROOT, timeout=600)
  assert (out / one.name).read_text() == one.read_text()


def decode_texts(hf: str, data_dir: str) -> list:
  """Greedy texts of the first 16 SST-2 dev rows by the T5 of `hf`, through
  Text2TextTask.decode on a data-parallel mesh of every process's devices."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  from bert_jax import from_pretrained, sharding  # pylint: disable=import-outside-toplevel
  config = defaults.finetune_config()
  config.update_from_flattened_dict({
      "family": "t5", "data.data_dir": data_dir, "data.max_length": 64,
      "data.max_target_length": 8, "data.pad_multiple": 32})
  tokenizer = tok_lib.load_tokenizer(hf)
  task = adapters.make_task(config, tokenizer)
  model, params = from_pretrained(hf, task="seq2seq")
  mesh = sharding.make_mesh()
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  return task.decode(model, params, task.load("dev", 16), 8, sharding.batch_sharding(mesh))


_DECODE_SCRIPT = """
import json, sys
import jax
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(flags["coordinator_address"], int(flags["num_processes"]),
                           int(flags["process_id"]))
sys.path.insert(0, "tests")
from test_finetune_t5 import decode_texts
texts = decode_texts(flags["hf"], flags["data"])
print("TEXTS " + json.dumps(texts))
"""


@pytest.mark.slow
def test_two_processes_decode_the_texts_of_one(shared_data, hf_t5):
  """Text2TextTask.decode: each host decodes its rows of every batch; all hosts get all texts.

  The model is the random one, so its texts are varied junk: a row decoded on
  the wrong host or put back in the wrong place would show.
  """
  from conftest import run_two_processes  # pylint: disable=import-outside-toplevel
  expected = decode_texts(str(hf_t5), str(shared_data))
  assert len(set(expected)) > 4, expected
  outputs = run_two_processes(
      lambda i: [sys.executable, "-c", _DECODE_SCRIPT, f"--hf={hf_t5}", f"--data={shared_data}"],
      _env(4), ROOT, timeout=600)
  for stdout, _ in outputs:  # every process has every row's text
    line = next(l for l in stdout.splitlines() if l.startswith("TEXTS "))
    assert json.loads(line[len("TEXTS "):]) == expected

