"""bench/finetune_sst2.py: per-method settings and a two-method quick run on real SST-2 rows."""
import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
  return load_bench("finetune_sst2")


def test_unfreeze_is_full_with_stages_at_thirds(bench):
  from configs import glue as glue_config
  config = glue_config.get_config("sst2")
  bench.set_method(config, "unfreeze", 313, 5e-5)
  assert config.finetune.method == "full"
  assert config.finetune.unfreeze_schedule == "top_ln_all"
  assert tuple(config.finetune.unfreeze_steps) == (104, 208)
  bench.set_method(config, "lora", 313, 5e-4)
  assert config.finetune.method == "lora" and config.optim.learning_rate == 5e-4
  with pytest.raises(ValueError, match="--methods"):
    bench.set_method(config, "adapters", 313, 1e-3)


def test_learning_rate_overrides(bench):
  rates = bench._learning_rates("lora=1e-4, prompt=0.3")
  assert rates["lora"] == 1e-4 and rates["prompt"] == 0.3
  assert rates["full"] == 5e-5 and rates["bitfit"] == 1e-3  # the defaults stay
  with pytest.raises(ValueError, match="--lrs"):
    bench._learning_rates("lorra=1e-4")


@pytest.mark.slow
def test_quick_run_full_and_lora(bench, shared_data, minilm_dir, capsys):
  results = bench.main([f"--minilm={minilm_dir}", f"--data={shared_data}", "--only=sst2",
                        "--num_train=32", "--max_eval=32", "--methods=full,lora"])
  full, lora = results
  assert (full["method"], lora["method"]) == ("full", "lora")
  assert full["trainable_params"] == full["total_params"]
  # LoRA adds its factors to the model and trains them and the head alone.
  assert lora["total_params"] > full["total_params"]
  assert lora["trainable_params"] < full["trainable_params"] // 50
  # AdamW keeps two float32 moments per trainable parameter (plus step counters).
  for r in results:
    assert 8 * r["trainable_params"] <= r["opt_state_bytes"] < 8 * r["trainable_params"] + 1024
    assert 0.0 <= r["dev/accuracy"] <= 1.0
  assert (full["learning_rate"], lora["learning_rate"]) == (5e-5, 5e-4)
  assert "| sst2 | lora | 0.0005 |" in capsys.readouterr().out
