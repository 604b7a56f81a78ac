"""Multi-task fine-tuning: mixing rates and schedule, per-task batches, counts, metrics, resume.

The end-to-end runs train a tiny random BERT on SST-2 + MRPC + CoNLL files of
a few rows written here (a WordPiece vocabulary cut from them), so each run
takes seconds; what is checked is the mixer and the loop, not accuracy.
"""
import importlib.util
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bert_jax import defaults
from bert_jax import loop
from bert_jax import multitask
from bert_jax.models import bert
from bert_jax.models import configs as model_configs
from bert_jax.tasks import mixing

ROOT = pathlib.Path(__file__).resolve().parents[1]
_WORDS = ("good bad film plot fun dull actor story great awful the a is was and but not "
          "very quite some").split()
_NAMES = ["Paris", "Berlin", "Anna", "Bob", "Acme", "Globex"]


# ------------------------------------------------------------------- mixing


def test_rates_of_each_rule_by_hand():
  sizes = [100, 400, 10_000]
  np.testing.assert_allclose(mixing.rates(sizes, "proportional"),
                             np.array([100, 400, 10_000]) / 10_500)
  np.testing.assert_allclose(mixing.rates(sizes, "proportional", cap=1000),
                             np.array([100, 400, 1000]) / 1500)  # T5: min(n_i, K)
  np.testing.assert_allclose(mixing.rates(sizes, "temperature", temperature=2.0),
                             np.array([10, 20, 100]) / 130)  # sqrt of the sizes
  np.testing.assert_allclose(mixing.rates(sizes, "temperature", temperature=2.0, cap=400),
                             np.array([10, 20, 20]) / 50)  # capped first, then tempered
  np.testing.assert_allclose(mixing.rates(sizes, "temperature", temperature=1.0),
                             mixing.rates(sizes, "proportional"))
  np.testing.assert_allclose(mixing.rates(sizes, "uniform", cap=50), [1 / 3] * 3)
  for kwargs, message in (({"rule": "sqrt"}, "unknown mixing rule 'sqrt'"),
                          ({"rule": "temperature", "temperature": 0.0}, "temperature"),
                          ({"rule": "proportional", "cap": -1}, "cap")):
    with pytest.raises(ValueError, match=message):
      mixing.rates(sizes, **kwargs)
  with pytest.raises(ValueError, match="training examples"):
    mixing.rates([5, 0], "uniform")


def test_schedule_is_a_pure_function_of_seed_and_step():
  rates = [0.2, 0.3, 0.5]
  whole = mixing.schedule(7, 1, 1001, rates)
  np.testing.assert_array_equal(whole, mixing.schedule(7, 1, 1001, rates))
  # Any range of steps, computed alone, agrees: a resumed run draws the same tasks.
  np.testing.assert_array_equal(whole, np.concatenate([mixing.schedule(7, 1, 378, rates),
                                                       mixing.schedule(7, 378, 1001, rates)]))
  assert [mixing.task_of_step(7, s, rates) for s in (1, 500, 1000)] == [
      whole[0], whole[499], whole[999]]
  assert not np.array_equal(whole, mixing.schedule(8, 1, 1001, rates))
  np.testing.assert_array_equal(mixing.task_steps(7, 1000, rates),
                                np.bincount(whole, minlength=3))


def test_empirical_task_frequencies_follow_the_rates():
  for rates in ([0.2, 0.3, 0.5], mixing.rates([100, 400, 10_000], "temperature", 2.0),
                [0.98, 0.01, 0.01]):
    counts = mixing.task_steps(0, 40_000, rates)
    np.testing.assert_allclose(counts / 40_000, rates, atol=0.01)


def test_task_batches_cover_each_epoch_and_are_reproducible():
  lengths = list(np.random.default_rng(0).integers(3, 40, size=37))
  for bucket in (False, True):
    a = mixing.TaskBatches("sst2", lengths, 8, seed=3, bucket=bucket)
    assert a.per_epoch == 5
    epoch0 = np.concatenate([a[k] for k in range(5)])
    epoch1 = np.concatenate([a[k] for k in range(5, 10)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(37))
    assert not np.array_equal(epoch0, epoch1)  # a new shuffle each epoch
    b = mixing.TaskBatches("sst2", lengths, 8, seed=3, bucket=bucket)
    np.testing.assert_array_equal(a[7], b[7])  # batch k straight away, no replay
    assert a.examples_in(7) == 37 + sum(len(a[k]) for k in range(5, 7))
    # Another task name (or seed) orders the same data differently.
    c = mixing.TaskBatches("mrpc", lengths, 8, seed=3, bucket=bucket)
    assert not np.array_equal(np.concatenate([c[k] for k in range(5)]), epoch0)


# -------------------------------------------------------- the shared model


def _tiny_bert(vocab_size=64):
  return model_configs.BertConfig.preset("tiny", vocab_size=vocab_size, hidden_size=32,
                                         num_layers=2, num_heads=2, intermediate_size=64,
                                         dropout_rate=0.0, attention_dropout_rate=0.0)


def test_encoder_learns_from_every_task_and_each_head_from_its_own():
  cfg = _tiny_bert()
  mt = multitask.MultiTaskModel(
      {"cls": bert.build(cfg, "sequence_classification", num_labels=2),
       "ner": bert.build(cfg, "token_classification", num_labels=5)},
      shared=("encoder",), init_shapes={"encoder_input_tokens": jax.ShapeDtypeStruct(
          (1, 1), jnp.int32)})
  tx = optax.adamw(1e-2)
  state = mt.init_fn(tx)(jax.random.PRNGKey(0))
  assert set(state.params) == {"encoder", multitask.HEADS}
  assert set(state.params[multitask.HEADS]) == {"cls", "ner"}
  assert "pooler" in state.params["encoder"]  # the classifier's, kept in the shared tree
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 64, size=(4, 6)), jnp.int32)
  batches = {"cls": {"encoder_input_tokens": tokens, "classifier_labels": jnp.array([0, 1, 1, 0]),
                     "classifier_weights": jnp.ones(4)},
             "ner": {"encoder_input_tokens": tokens,
                     "token_labels": jnp.asarray(np.arange(24).reshape(4, 6) % 5, jnp.int32)}}
  objective = {"cls": "classification", "ner": "token_classification"}
  from bert_jax import objectives  # pylint: disable=import-outside-toplevel
  for name, other in (("cls", "ner"), ("ner", "cls")):
    obj = objectives.get(objective[name])

    def loss(params):
      model = mt.models[name]
      out = model.apply({"params": mt.view(params, name)}, tokens)
      return obj.loss(obj.metrics(out, batches[name]), obj.normalizers(batches[name]))
    grads = jax.grad(loss)(state.params)
    norm = lambda tree: float(optax.global_norm(tree))  # noqa: E731
    assert norm(grads["encoder"]["layer_0"]) > 0  # the shared encoder learns from both
    assert norm(grads[multitask.HEADS][name]) > 0
    assert norm(grads[multitask.HEADS][other]) == 0
    # The step leaves the other head, and its Adam moments, exactly as they were.
    new, _ = jax.jit(lambda s, b: multitask.task_train_step(
        s, b, mt=mt, name=name, tx=tx, objective=obj))(state, batches[name])
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(  # noqa: E731
        jax.tree.leaves(a), jax.tree.leaves(b)))
    assert same(new.params[multitask.HEADS][other], state.params[multitask.HEADS][other])
    assert not same(new.params[multitask.HEADS][name], state.params[multitask.HEADS][name])
    assert not same(new.params["encoder"]["layer_0"], state.params["encoder"]["layer_0"])
    assert same(new.params["encoder"]["pooler"], state.params["encoder"]["pooler"]) == (
        name == "ner")  # NER reads no pooler: untouched by its steps
    assert same(new.opt_state[0].mu[multitask.HEADS][other],
                state.opt_state[0].mu[multitask.HEADS][other])


# ------------------------------------------------------------- end to end


def _write_data(root: pathlib.Path) -> pathlib.Path:
  """SST-2 / MRPC TSVs and CoNLL files of a few rows; returns a vocab.txt covering them."""
  rng = np.random.default_rng(0)
  sentence = lambda n: " ".join(rng.choice(_WORDS, size=n))  # noqa: E731
  texts = []
  for folder, rows, header in (("SST-2", 40, "sentence\tlabel"),
                               ("MRPC", 24, "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String")):
    os.makedirs(root / folder)
    for split, n in (("train", rows), ("dev", 16)):
      lines = [header]
      for i in range(n):
        a, b = sentence(int(rng.integers(3, 9))), sentence(int(rng.integers(3, 9)))
        label = int("good" in a)
        lines.append(f"{a}\t{label}" if folder == "SST-2" else f"{label}\t{i}\t{i + 1}\t{a}\t{b}")
        texts += [a, b]
      (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  os.makedirs(root / "conll")
  for split, n in (("train.txt", 32), ("valid.txt", 16)):
    blocks = ["-DOCSTART- -X- -X- O"]
    for _ in range(n):
      words = [(w, "O") for w in rng.choice(_WORDS, size=int(rng.integers(2, 6)))]
      k = int(rng.integers(0, len(words)))
      words.insert(k, (str(rng.choice(_NAMES)), "B-LOC"))
      blocks.append("\n".join(f"{w} X X {t}" for w, t in words))
      texts.append(" ".join(w for w, _ in words))
    (root / "conll" / split).write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
  words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n",
                   encoding="utf-8")
  return vocab


def _config_module():
  spec = importlib.util.spec_from_file_location("multitask_config",
                                                ROOT / "configs" / "multitask.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(root: pathlib.Path, vocab: pathlib.Path, **fields) -> ml_collections.ConfigDict:
  """configs/multitask.py:bert on the tiny files, a tiny random BERT, 14 steps of batch 8."""
  config = _config_module().get_config("bert")
  config.init_from = ""
  config.data.tokenizer = str(vocab)
  config.model.update(vocab_size=len(vocab.read_text().split()), hidden_size=32, num_layers=2,
                      num_heads=2, intermediate_size=64, dropout_rate=0.1)
  for name in ("sst2", "mrpc"):
    config.tasks[name].data.data_dir = str(root)
  config.tasks.conll.data.data_dir = str(root / "conll")
  config.train.batch_size = config.eval.batch_size = 8
  config.data.max_length = 32
  config.optim.learning_rate = 1e-3
  config.mixing.rule = "uniform"
  config.train.num_steps = 14
  config.eval.every_steps = 0  # at the end
  config.checkpoint.every_steps = 100  # at the end (and on preemption)
  config.log.every_steps = 1
  config.log.progress = False
  config.update_from_flattened_dict(fields)
  return config


def _records(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _step_lines(workdir) -> dict:
  """step -> (its task, its loss), from the per-step log lines."""
  out = {}
  for r in _records(workdir):
    tasks = [k.split("/")[1] for k in r if k.startswith("train/") and k.endswith("/loss")
             and k.count("/") == 2]
    if "loss" in r:
      assert len(tasks) == 1, r
      out[r["step"]] = (tasks[0], r["loss"])
  return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("mt_data")
  return root, _write_data(root)


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mt_full")
  return workdir, multitask.multitask(_config(*data), str(workdir))


@pytest.mark.slow
def test_run_counts_and_scores_every_task(data, full_run):
  workdir, out = full_run
  config = _config(*data)
  names = ["conll", "mrpc", "sst2"]  # sorted: the order of the rates
  expected = mixing.task_steps(config.seed, 14, mixing.rates([32, 24, 40], "uniform"))
  assert out["task_steps"] == dict(zip(names, expected.tolist()))
  assert all(n > 0 for n in out["task_steps"].values())
  # Per-task examples: whole epochs of each (40 SST-2 rows at batch 8: 5 batches each).
  assert out["task_examples"]["sst2"] == 8 * out["task_steps"]["sst2"]
  assert out["task_examples"]["mrpc"] == 8 * out["task_steps"]["mrpc"]
  steps = _step_lines(workdir)
  assert sorted(steps) == list(range(1, 15))
  schedule = mixing.schedule(config.seed, 1, 15, mixing.rates([32, 24, 40], "uniform"))
  assert [steps[s][0] for s in range(1, 15)] == [names[i] for i in schedule]
  last = [r for r in _records(workdir) if "loss" in r][-1]
  assert {n: last[f"tasks/{n}/steps"] for n in names} == out["task_steps"]
  assert {n: last[f"tasks/{n}/examples"] for n in names} == out["task_examples"]
  # Each task scored on its own dev split by its own metric.
  for key in ("eval/sst2/dev/accuracy", "eval/mrpc/dev/f1", "eval/mrpc/dev/accuracy",
              "eval/conll/valid.txt/f1", "eval/conll/valid.txt/precision"):
    assert 0.0 <= out[key] <= 100.0, key
  mean = np.mean([out["eval/sst2/dev/accuracy"], out["eval/mrpc/dev/f1"],
                  out["eval/conll/valid.txt/f1"]])
  assert out["eval/mean_primary"] == pytest.approx(mean)
  assert out["best"]["step"] == 14 and os.path.isdir(workdir / "best")


@pytest.mark.slow
def test_preempted_run_resumes_exactly(data, full_run, tmp_path, monkeypatch):
  """Stopped after step 6 and restarted, the run draws the same tasks and batches and
  logs the same losses as the uninterrupted one (dropout on)."""
  workdir = tmp_path / "resumed"
  monkeypatch.setattr(loop.Preemption, "requested", lambda self, step: step == 6)
  with pytest.raises(loop.Preempted):
    multitask.multitask(_config(*data), str(workdir))
  assert sorted(_step_lines(workdir)) == list(range(1, 7))
  monkeypatch.setattr(loop.Preemption, "requested", lambda self, step: False)
  out = multitask.multitask(_config(*data), str(workdir))
  full_dir, full_out = full_run
  expected, got = _step_lines(full_dir), _step_lines(workdir)
  assert [expected[s][0] for s in range(1, 15)] == [got[s][0] for s in range(1, 15)]
  np.testing.assert_allclose([got[s][1] for s in range(1, 15)],
                             [expected[s][1] for s in range(1, 15)], rtol=1e-5)
  assert out["task_steps"] == full_out["task_steps"]
  assert out["task_examples"] == full_out["task_examples"]
  for key, value in full_out.items():
    if key.startswith("eval/"):
      assert out[key] == pytest.approx(value, abs=1e-4), key
  # A changed mixture does not silently resume the old schedule.
  with pytest.raises(ValueError, match="per-task steps"):
    multitask.multitask(_config(*data, **{"mixing.rule": "temperature",
                                          "mixing.temperature": 0.1}), str(workdir))


def test_bad_config_names_the_field(data, tmp_path):
  cases = [({"mixing.rule": "sqrt"}, r"config\.mixing: unknown mixing rule 'sqrt'"),
           ({"tasks.sst2.task": "sts"}, r"config\.tasks\.sst2\.task: unknown task 'sts'"),
           ({"finetune.method": "lora"}, r"config\.finetune\.method")]
  for fields, message in cases:
    with pytest.raises(ValueError, match=message):
      multitask.validate(_config(*data, **fields))
  config = _config(*data)
  config.tasks.conll.finetune = ml_collections.ConfigDict({"ner_head": "lstm"})
  with pytest.raises(ValueError, match=r"config\.tasks\.conll\.finetune\.ner_head: unknown "
                                       "NER head"):
    multitask.validate(config)
  config = _config(*data)
  config.tasks.sst2.model = ml_collections.ConfigDict({"hidden_size": 8})
  with pytest.raises(ValueError, match=r"config\.tasks\.sst2\.model\.hidden_size: is not a "
                                       "per-task field"):
    multitask.validate(config)
  config = _config(*data)
  config.tasks.sst2.data.max_lenght = 3
  with pytest.raises(ValueError, match=r"config\.tasks\.sst2\.data\.max_lenght: unknown"):
    multitask.validate(config)


def test_config_variants_and_launch_command():
  module = _config_module()
  assert "bert-jax multitask --config=configs/multitask.py" in module.__doc__
  bert_config, t5_config = module.get_config(), module.get_config("t5")
  assert sorted(bert_config.tasks.keys()) == sorted(t5_config.tasks.keys()) == [
      "conll", "mrpc", "sst2"]
  assert t5_config.family == "t5" and t5_config.mixing.rule == "proportional"
  assert t5_config.mixing.cap == 2 ** 19
  assert set(defaults.finetune_config().keys()) <= set(bert_config.keys())
  with pytest.raises(ValueError, match="no variant 'xl'"):
    module.get_config("xl")
