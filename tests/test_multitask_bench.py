"""bench/multitask_vs_single.py: the bert and t5 variants' configs (built, not run)."""
import pytest

from bert_jax import multitask
from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
  return load_bench("multitask_vs_single")


def test_bert_variant_keeps_its_settings(bench):
  config = bench.make_config(bench.parse_args(["--minilm=/minilm"]))
  assert config.family == "bert" and config.init_from == "/minilm"
  assert config.optim.learning_rate == 5e-5 and config.train.warmup_fraction == 0.1
  assert (config.mixing.rule, config.mixing.temperature, config.mixing.cap) == (
      "temperature", 2.0, 0)
  assert config.tasks.sst2.data.max_length == 64 and config.tasks.sst2.data.pad_multiple == 16


def test_t5_variant_is_the_text_to_text_mixture(bench, tmp_path):
  (tmp_path / "checkpoints").mkdir()  # what validate checks of a pretraining workdir
  args = bench.parse_args(["--variant=t5", f"--init_from={tmp_path}", "--steps=40",
                           "--max_eval=8"])
  config = bench.make_config(args)
  assert config.family == "t5" and config.init_from == str(tmp_path)
  assert config.optim.name == "adafactor" and config.optim.learning_rate == 1e-3
  assert config.optim.schedule == "constant"
  assert (config.mixing.rule, config.mixing.cap) == ("proportional", 2 ** 19)
  assert sorted(config.tasks.keys()) == sorted(bench.METRICS)
  conll = config.tasks.conll.data
  assert (conll.max_length, conll.pad_multiple, conll.max_eval_examples) == (128, 32, 8)
  assert conll.max_target_length == 128  # the variant's own target length stays
  multitask.validate(config)  # every task's fine-tuning config checks
  single = bench.make_config(args, ["mrpc"], 3)
  assert list(single.tasks.keys()) == ["mrpc"] and single.train.num_steps == 3
  with pytest.raises(SystemExit, match="--init_from"):
    bench.make_config(bench.parse_args(["--variant=t5"]))
