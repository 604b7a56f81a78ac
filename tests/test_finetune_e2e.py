"""Fine-tuning end to end: SQuAD v2.0, resume after preemption, two processes.

The paths of bert_jax/finetune.py that tests/test_finetune.py leaves out:
  * SQuAD v2.0 (null answers) with configs/squad.py:v2: the loss falls,
    `evaluate` and `predict` agree, the predictions JSON has every question
    id, '' for a null answer.
  * Preemption: `bert-jax finetune` sent SIGTERM mid-epoch exits 143 after
    saving the step it stopped at, and the same command finishes the run
    with the losses, dev scores and best/ params of a run nothing stopped
    (==, not approx); likewise after SIGKILL, from the last epoch checkpoint;
    and a preemption that lands on the last step of an epoch.
  * Two processes x 4 CPU devices (gloo) follow one process x 8.

The GLUE runs use a synthetic SST-2 folder written here (sentences of filler
words with one or two sentiment words, labelled by them), so they need no
shared data; the model is a random BERT of hidden size 32. Subprocesses
compile unoptimised XLA code into a compilation cache shared by the module's
runs: start-up and compiling dominate runs this small.
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from bert_jax import defaults
from bert_jax import checkpoint as checkpoint_lib
from bert_jax import finetune
from bert_jax.tasks import squad, squad_eval
from conftest import run_two_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_POSITIVE = "good great fine lovely superb warm bright charming".split()
_NEGATIVE = "bad awful dull poor boring grim weak tedious".split()
_FILLER = "the a film movie plot actors story is was and very quite".split()
_VOCAB = _SPECIALS + _POSITIVE + _NEGATIVE + _FILLER
# 128 rows in batches of 16: 8 steps an epoch, time enough to stop one mid-way.
NUM_TRAIN, BATCH, NUM_EPOCHS = 128, 16, 3
STEPS_PER_EPOCH = NUM_TRAIN // BATCH
NUM_STEPS = NUM_EPOCHS * STEPS_PER_EPOCH
_FIELDS = {
    "model.vocab_size": len(_VOCAB), "model.hidden_size": 32, "model.num_heads": 2,
    "model.intermediate_size": 64, "model.max_position_embeddings": 32,
    "data.max_length": 32, "data.padding": "max", "train.batch_size": BATCH,
    "eval.batch_size": 16, "train.num_epochs": NUM_EPOCHS, "optim.learning_rate": 1e-2,
    "log.every_steps": 1, "log.progress": False,
}
_OVERRIDES = tuple(f"--config.{k}={v}" for k, v in _FIELDS.items())


# ------------------------------------------------------------------- helpers


def _sentences(rng, n: int) -> list:
  """(text, label) rows: filler words with one or two words of the label's sentiment."""
  rows = []
  for _ in range(n):
    label = int(rng.integers(2))
    words = list(rng.choice(_FILLER, int(rng.integers(3, 12))))
    for _ in range(1 + int(rng.integers(2))):
      words.insert(int(rng.integers(len(words) + 1)),
                   str(rng.choice(_POSITIVE if label else _NEGATIVE)))
    rows.append((" ".join(words), label))
  return rows


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  """A GLUE root with SST-2/{train,dev,test}.tsv and the vocab.txt of its words."""
  root = tmp_path_factory.mktemp("glue")
  (root / "SST-2").mkdir()
  rng = np.random.default_rng(0)
  for name, n in (("train", NUM_TRAIN), ("dev", 32)):
    lines = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in _sentences(rng, n)]
    (root / "SST-2" / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  lines = ["index\tsentence"] + [f"{i}\t{t}" for i, (t, _) in enumerate(_sentences(rng, 24))]
  (root / "SST-2" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  (root / "vocab.txt").write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
  return root


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _env(devices: int, cache: str) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  return env


def _command(command: str, workdir, glue, *extra) -> list:
  return [sys.executable, "-m", "bert_jax.main", command, "--config=configs/glue.py:sst2",
          f"--workdir={workdir}", f"--config.data.data_dir={glue}",
          f"--config.data.tokenizer={glue / 'vocab.txt'}", *_OVERRIDES, *extra]


def _run(workdir, glue, cache, *extra, timeout=300):
  proc = subprocess.run(_command("finetune", workdir, glue, *extra), cwd=ROOT,
                        env=_env(8, cache), capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"


def _records(workdir) -> list:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  return [json.loads(line) for line in lines[:-1]]  # the last one may be half written


def _losses(workdir) -> dict:
  """step -> training loss (log.every_steps=1); a step logged twice is an error."""
  out = {}
  for r in _records(workdir):
    if "loss" in r:
      assert r["step"] not in out, f"step {r['step']} logged twice"
      out[r["step"]] = r["loss"]
  return out


def _evals(workdir) -> list:
  return [r for r in _records(workdir) if "eval/dev/accuracy" in r]


def _best(workdir) -> tuple[int, dict]:
  """(step, flat {path: array}) of the best/ checkpoint, read as numpy."""
  folder = os.path.join(workdir, "best")
  steps = [int(s) for s in os.listdir(folder) if s.isdigit()]
  assert len(steps) == 1, steps
  path = os.path.join(folder, str(steps[0]), "state")
  reader = ocp.PyTreeCheckpointer()
  tree = reader.metadata(path).item_metadata.tree
  restored = reader.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return steps[0], traverse_util.flatten_dict(restored["params"], sep="/")


def _signal_at(workdir, glue, cache, sig, ready, *extra, timeout=300) -> tuple[int, str]:
  """Runs `bert-jax finetune`, sends `sig` once ready(workdir); (exit status, stderr)."""
  err_path = os.path.join(os.path.dirname(workdir), "stderr.txt")
  with open(err_path, "w") as err:  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen(_command("finetune", workdir, glue, *extra), cwd=ROOT,
                            env=_env(8, cache), stderr=err)
    try:
      deadline = time.time() + timeout
      while proc.poll() is None and time.time() < deadline:
        if ready(workdir):
          proc.send_signal(sig)
          break
        time.sleep(0.01)
      proc.wait(timeout=timeout)
    finally:
      proc.kill()
  with open(err_path, encoding="utf-8") as f:
    return proc.returncode, f.read()


def _assert_same_run(workdir, reference):
  """Every loss, dev score and the best/ params equal the reference run's (==)."""
  losses, expected = _losses(workdir), _losses(reference)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  for step in expected:
    assert losses[step] == expected[step], (step, losses[step], expected[step])
  assert _evals(workdir) == _evals(reference)
  step, params = _best(workdir)
  expected_step, expected_params = _best(reference)
  assert step == expected_step and sorted(params) == sorted(expected_params)
  for name, value in expected_params.items():
    np.testing.assert_array_equal(params[name], value, err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(glue_dir, compile_cache, tmp_path_factory):
  """Workdir of a 3-epoch run nothing interrupts (checkpoint only at the end)."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  _run(workdir, glue_dir, compile_cache, "--config.checkpoint.every_epochs=100")
  evals = _evals(workdir)
  assert [r["epoch"] for r in evals] == [1, 2, 3]
  losses = _losses(workdir)
  first, last = (np.mean([losses[s] for s in range(e * STEPS_PER_EPOCH + 1,
                                                    (e + 1) * STEPS_PER_EPOCH + 1)])
                 for e in (0, NUM_EPOCHS - 1))
  assert last < first - 0.1, (first, last)  # it learns
  assert evals[-1]["eval/dev/accuracy"] > 0.8, evals
  return workdir


# ----------------------------------------------------------------- preemption


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_the_same_command_resumes_exactly(
    glue_dir, compile_cache, uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  extra = ("--config.checkpoint.every_epochs=100",)  # no epoch checkpoint to fall back on
  in_epoch_2 = lambda w: STEPS_PER_EPOCH + 1 in _losses(w)
  status, err = _signal_at(workdir, glue_dir, compile_cache, signal.SIGTERM, in_epoch_2, *extra)
  assert status == 143, err[-3000:]  # stopped, not finished
  assert "preempted: saved step" in err
  stopped = max(_losses(workdir))
  # Mid-epoch (an epoch's last step is the case of the next test).
  assert stopped > STEPS_PER_EPOCH and stopped % STEPS_PER_EPOCH, stopped
  saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert saved == [stopped]
  assert os.path.isfile(workdir / "checkpoints" / str(stopped) / checkpoint_lib.COMMIT_MARKER)
  assert [r["epoch"] for r in _evals(workdir)] == list(range(1, stopped // STEPS_PER_EPOCH + 1))

  _run(workdir, glue_dir, compile_cache, *extra)
  _assert_same_run(workdir, uninterrupted)


@pytest.mark.slow
def test_sigkill_after_an_epoch_checkpoint_resumes_exactly(
    glue_dir, compile_cache, uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  extra = ("--config.checkpoint.every_epochs=1",)
  first = workdir / "checkpoints" / str(STEPS_PER_EPOCH) / checkpoint_lib.COMMIT_MARKER
  in_epoch_2 = lambda w: os.path.isfile(first) and STEPS_PER_EPOCH + 1 in _losses(w)
  status, err = _signal_at(workdir, glue_dir, compile_cache, signal.SIGKILL, in_epoch_2, *extra)
  assert status == -signal.SIGKILL, err[-3000:]
  killed_at = max(_losses(workdir))
  committed = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit() and
               os.path.isfile(workdir / "checkpoints" / s / checkpoint_lib.COMMIT_MARKER)]
  assert committed and max(committed) >= STEPS_PER_EPOCH, committed
  assert killed_at > max(committed), (killed_at, committed)  # steps lost, to be redone

  _run(workdir, glue_dir, compile_cache, *extra)
  # The steps the killed run logged after its checkpoint were dropped and redone.
  _assert_same_run(workdir, uninterrupted)
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [
      NUM_STEPS]


# Runs bert_jax.main as if a preemption notice (SIGTERM) arrived during step
# sys.argv[1] (then dropped from argv): the real handler, at an exact step.
_SIGTERM_AT_STEP = """
import runpy, signal, sys
from bert_jax import loop
at = int(sys.argv.pop(1))
asked = loop.Preemption.requested
def requested(self, step):
  if step == at:
    signal.raise_signal(signal.SIGTERM)  # handled before raise_signal returns
  return asked(self, step)
loop.Preemption.requested = requested
runpy.run_module("bert_jax.main", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_sigterm_at_the_last_step_of_an_epoch_still_evaluates_it(
    glue_dir, compile_cache, uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  extra = ("--config.checkpoint.every_epochs=100",)
  at = 2 * STEPS_PER_EPOCH
  proc = subprocess.run(
      [sys.executable, "-c", _SIGTERM_AT_STEP, str(at)] + _command(
          "finetune", workdir, glue_dir, *extra)[3:],
      cwd=ROOT, env=_env(8, compile_cache), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert max(_losses(workdir)) == at

  _run(workdir, glue_dir, compile_cache, *extra)
  _assert_same_run(workdir, uninterrupted)


# ----------------------------------------------------------------- multi-host

# Runs bert_jax.main and reports every file opened for writing under
# sys.argv[1] (then dropped from argv) on stderr: which process wrote what.
_WRITE_WATCH = """
import os, runpy, sys
watched = os.path.abspath(sys.argv.pop(1))
def hook(event, args):
  if event == "open" and isinstance(args[0], str) and args[0].startswith(watched):
    mode, flags = args[1], args[2]
    if (mode and any(c in mode for c in "wax+")) or (
        mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
      print(f"WROTE {args[0]}", file=sys.stderr, flush=True)
sys.addaudithook(hook)
runpy.run_module("bert_jax.main", run_name="__main__", alter_sys=True)
"""


def _two_processes(args_of, cache, timeout=300) -> list:
  """Runs argv lists args_of(i) for processes 0 and 1 (4 CPU devices each); their stderr."""
  return [err for _, err in run_two_processes(args_of, _env(4, cache), ROOT, timeout)]


@pytest.mark.slow
def test_two_processes_equal_one(glue_dir, compile_cache, uninterrupted, tmp_path):
  """2 processes x 4 CPU devices (gloo): the 1 x 8 run's losses and dev accuracy."""
  workdir = tmp_path / "run"
  extra = ("--config.checkpoint.every_epochs=100",)
  _two_processes(lambda i: _command("finetune", workdir, glue_dir, *extra), compile_cache)
  losses, expected = _losses(workdir), _losses(uninterrupted)
  assert sorted(losses) == sorted(expected)  # process 0 alone logs, each step once
  for step, loss in expected.items():
    assert losses[step] == pytest.approx(loss, rel=1e-5), step
  evals, expected_evals = _evals(workdir), _evals(uninterrupted)
  assert [r["epoch"] for r in evals] == [1, 2, 3]
  for r, e in zip(evals, expected_evals):
    assert r["eval/dev/accuracy"] == pytest.approx(e["eval/dev/accuracy"]), (r, e)
  assert _best(workdir)[0] == _best(uninterrupted)[0]

  # predict: one SST-2.tsv, written by process 0 only.
  out = tmp_path / "predictions"
  errs = _two_processes(lambda i: [sys.executable, "-c", _WRITE_WATCH, str(out)] + _command(
      "predict", workdir, glue_dir, *extra, f"--out={out}")[3:], compile_cache)
  writes = [[line for line in err.splitlines() if line.startswith("WROTE ")] for err in errs]
  assert writes == [[f"WROTE {out / 'SST-2.tsv'}"], []], writes
  lines = (out / "SST-2.tsv").read_text(encoding="utf-8").splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 25
  assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(24)]
  assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


def test_two_hosts_need_only_the_global_device_count_to_divide_the_batch(glue_dir, monkeypatch):
  """jax.device_count() already counts every host's devices: batch 8 fits 2 x 4 devices."""
  config = defaults.finetune_config()
  config.update_from_flattened_dict({
      "glue_task": "sst2", "data.data_dir": str(glue_dir),
      "data.tokenizer": str(glue_dir / "vocab.txt"), **_FIELDS,
      "train.batch_size": 8, "eval.batch_size": 8})
  assert finetune.validate(config) == (8, 1, 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # 8 devices over 2 hosts
  assert finetune.validate(config) == (8, 1, 1)


# --------------------------------------------------------------------- SQuAD


def _squad_v2(folder, shared_data) -> list:
  """train-v2.0.json = dev-v2.0.json: 6 real questions of one paragraph and 6 unanswerable.

  The shared data has SQuAD v1.1 only; the unanswerable questions are real
  questions about another article, asked of this paragraph (is_impossible,
  as v2.0 writes them). Returns the question ids.
  """
  with gzip.open(shared_data / "squad" / "dev-v1.1.json.gz", "rt", encoding="utf-8") as f:
    articles = json.load(f)["data"]
  paragraph = articles[0]["paragraphs"][2]  # 58 words: one window of 128 tokens
  qas = [dict(qa, is_impossible=False) for qa in paragraph["qas"][:6]]
  others = [qa for p in articles[1]["paragraphs"] for qa in p["qas"]][:6]
  qas += [{"id": f"{qa['id']}-null", "question": qa["question"], "answers": [],
           "is_impossible": True} for qa in others]
  data = {"version": "v2.0", "data": [{"title": articles[0]["title"], "paragraphs": [
      {"context": paragraph["context"], "qas": qas}]}]}
  for name in ("train-v2.0.json", "dev-v2.0.json"):
    (folder / name).write_text(json.dumps(data), encoding="utf-8")
  words = set()
  for text in [paragraph["context"]] + [qa["question"] for qa in qas]:
    words |= set(squad_eval.basic_tokens(text))
  (folder / "vocab.txt").write_text("\n".join(_SPECIALS + sorted(words)) + "\n",
                                    encoding="utf-8")
  return [qa["id"] for qa in qas]


def _load_config_file(name: str, arg: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.slow
def test_squad_v2_finetune_evaluate_and_null_predictions(shared_data, tmp_path):
  data_dir = tmp_path / "squad"
  data_dir.mkdir()
  ids = _squad_v2(data_dir, shared_data)
  config = _load_config_file("squad", "v2")
  config.update_from_flattened_dict({
      "data.data_dir": str(data_dir), "data.tokenizer": str(data_dir / "vocab.txt"),
      "data.max_length": 128, "data.doc_stride": 64, "data.max_query_length": 32,
      "train.batch_size": 8, "eval.batch_size": 16, "train.num_epochs": 6,
      "optim.learning_rate": 3e-3, "log.every_steps": 1, "log.progress": False,
      "checkpoint.every_epochs": 100})
  vocab_size = len((data_dir / "vocab.txt").read_text().split())
  config.model.update(dict(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=2,
                           intermediate_size=128, max_position_embeddings=128))
  workdir = tmp_path / "run"
  result = finetune.finetune(config, str(workdir))

  losses = _losses(workdir)
  per_epoch = len(losses) // 6
  assert per_epoch * 6 == len(losses)
  first = np.mean([losses[s] for s in range(1, per_epoch + 1)])
  last = np.mean([losses[s] for s in range(len(losses) - per_epoch + 1, len(losses) + 1)])
  assert last < 0.7 * first, (first, last)
  evals = [r for r in _records(workdir) if "eval/dev-v2.0.json/f1" in r]
  assert [r["epoch"] for r in evals] == list(range(1, 7))
  assert result["best"]["metric"] == "dev-v2.0.json/f1"
  assert result["best"]["value"] == max(r["eval/dev-v2.0.json/f1"] for r in evals)

  scores = finetune.evaluate(config, str(workdir))
  assert scores["dev-v2.0.json/f1"] == pytest.approx(result["best"]["value"])
  assert 0.0 <= scores["dev-v2.0.json/exact"] <= scores["dev-v2.0.json/f1"] <= 100.0

  path = finetune.predict(config, str(workdir), out=str(tmp_path / "preds"))
  with open(path, encoding="utf-8") as f:
    predictions = json.load(f)
  assert sorted(predictions) == sorted(ids)
  assert all(isinstance(v, str) for v in predictions.values())
  # The official v2.0 scoring of the file gives evaluate's numbers; null
  # answers are written as '' and the unanswerable questions learnt.
  official = squad_eval.evaluate(squad.read_squad(str(data_dir / "dev-v2.0.json")), predictions)
  assert official["exact"] == pytest.approx(scores["dev-v2.0.json/exact"])
  assert official["f1"] == pytest.approx(scores["dev-v2.0.json/f1"])
  for key in ("HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
    if f"dev-v2.0.json/{key}" in scores:  # reported by the task or not
      assert scores[f"dev-v2.0.json/{key}"] == pytest.approx(official[key]), key
  assert official["NoAns_total"] == 6 and official["HasAns_total"] == 6
  assert "" in predictions.values() and official["NoAns_exact"] > 50.0, predictions
