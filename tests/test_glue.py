"""GLUE: TSV layouts of all tasks, real SST-2/MRPC files, offline tfds, features, metrics."""
import gzip
import math
import os

import numpy as np
import pytest

from bert_jax.tasks import glue
from bert_jax.tasks import glue_metrics

# ----------------------------------------------------------------------------
# Synthetic GLUE folders in the distributed layout of each task
# ----------------------------------------------------------------------------

_MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
              "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")
_STSB_HEAD = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"

# folder -> file -> text; expected (text_a, text_b, label, index) of the first row.
_FILES = {
    "CoLA": {
        "train.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                     "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\n",
        "dev.tsv": "gj04\t1\t\tOur friends won't buy this analysis.\n",
        "test.tsv": "index\tsentence\n0\tBill whistled past the house.\n"},
    "SST-2": {
        "train.tsv": "sentence\tlabel\nhide new secretions \t0\n",
        "dev.tsv": "sentence\tlabel\nit 's charming . \t1\n",
        "test.tsv": "index\tsentence\n0\tuneasy mishmash of styles .\n"},
    "MRPC": {
        "train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                     '1\t702876\t702977\tHe said "no".\t"No," he said.\n',
        "dev.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA b.\tC d.\n",
        "test.tsv": "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n7\t1\t2\tTest a.\tTest b.\n"},
    "STS-B": {
        "train.tsv": _STSB_HEAD + "\tscore\n0\tmain-captions\tMSRvid\t2012test\t0001\tnone\t"
                     "none\tA plane is taking off.\tAn air plane is taking off.\t5.000\n",
        "dev.tsv": _STSB_HEAD + "\tscore\n0\tg\tf\ty\t1\ts\ts\tA man plays.\tA man sings.\t1.5\n",
        "test.tsv": _STSB_HEAD + "\n3\tg\tf\ty\t1\ts\ts\tA girl runs.\tA boy runs.\n"},
    "QQP": {
        "train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                     "133273\t213221\t213222\tHow is the life?\tHow is life?\t1\n",
        "dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n5\t1\t2\tA?\tB?\t0\n",
        "test.tsv": "id\tquestion1\tquestion2\n11\tWhy?\tHow?\n"},
    "MNLI": {
        "train.tsv": _MNLI_HEAD + "\tlabel1\tgold_label\n"
                     "0\t31193\t31193n\tgovernment\t( ( x ) )\t( y )\t(ROOT x)\t(ROOT y)\t"
                     "Conceptually cream skimming has two dimensions.\tProduct and geography "
                     "are what make it work.\tneutral\tneutral\n",
        "dev_matched.tsv": _MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
                           "0\t1\t1e\tfiction\tp\tp\tp\tp\tThe cat sat.\tA cat sat.\t"
                           "entailment\tentailment\tneutral\tentailment\tentailment\t"
                           "entailment\n",
        "dev_mismatched.tsv": _MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
                              "0\t2\t2c\tletters\tp\tp\tp\tp\tYes.\tNo.\tcontradiction\t"
                              "contradiction\tcontradiction\tcontradiction\tcontradiction\t"
                              "contradiction\n",
        "test_matched.tsv": _MNLI_HEAD + "\n0\t3\t3\tslate\tp\tp\tp\tp\tHi there.\tHello.\n",
        "test_mismatched.tsv": _MNLI_HEAD + "\n4\t5\t5\tnineeleven\tp\tp\tp\tp\tX.\tY.\n"},
    "QNLI": {
        "train.tsv": "index\tquestion\tsentence\tlabel\n0\tWhat came?\tThe rain came.\t"
                     "entailment\n",
        "dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWho?\tNobody knows.\tnot_entailment\n",
        "test.tsv": "index\tquestion\tsentence\n2\tWhen?\tAt noon.\n"},
    "RTE": {
        "train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA dog barks.\tAn animal makes "
                     "noise.\tentailment\n",
        "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tnot_entailment\n",
        "test.tsv": "index\tsentence1\tsentence2\n9\tC.\tD.\n"},
    "WNLI": {
        "train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin through a carrot. "
                     "When I pulled the pin out, it had a hole.\tThe carrot had a hole.\t1\n",
        "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\tE.\tF.\t0\n",
        "test.tsv": "index\tsentence1\tsentence2\n1\tG.\tH.\n"},
    "diagnostic": {"diagnostic.tsv": "index\tsentence1\tsentence2\n0\tThe cat sat.\tThe cat "
                                     "did not sit.\n"},
}

_FIRST = {  # (task, split) -> (text_a, text_b, label, index) of the first example
    ("cola", "train"): ("The sailors rode the breeze clear of the rocks.", None, "1", 0),
    ("cola", "test"): ("Bill whistled past the house.", None, None, 0),
    ("sst2", "dev"): ("it 's charming . ", None, "1", 0),
    ("sst2", "test"): ("uneasy mishmash of styles .", None, None, 0),
    ("mrpc", "train"): ('He said "no".', '"No," he said.', "1", 0),
    ("mrpc", "test"): ("Test a.", "Test b.", None, 7),
    ("stsb", "train"): ("A plane is taking off.", "An air plane is taking off.", 5.0, 0),
    ("stsb", "dev"): ("A man plays.", "A man sings.", 1.5, 0),
    ("stsb", "test"): ("A girl runs.", "A boy runs.", None, 3),
    ("qqp", "train"): ("How is the life?", "How is life?", "1", 0),
    ("qqp", "test"): ("Why?", "How?", None, 11),
    ("mnli", "train"): ("Conceptually cream skimming has two dimensions.",
                        "Product and geography are what make it work.", "neutral", 0),
    ("mnli", "dev_matched"): ("The cat sat.", "A cat sat.", "entailment", 0),
    ("mnli", "dev_mismatched"): ("Yes.", "No.", "contradiction", 0),
    ("mnli", "test_matched"): ("Hi there.", "Hello.", None, 0),
    ("mnli", "test_mismatched"): ("X.", "Y.", None, 4),
    ("qnli", "train"): ("What came?", "The rain came.", "entailment", 0),
    ("qnli", "test"): ("When?", "At noon.", None, 2),
    ("rte", "dev"): ("A.", "B.", "not_entailment", 0),
    ("rte", "test"): ("C.", "D.", None, 9),
    ("wnli", "train"): ("I stuck a pin through a carrot. When I pulled the pin out, it had a "
                        "hole.", "The carrot had a hole.", "1", 0),
    ("wnli", "test"): ("G.", "H.", None, 1),
    ("ax", "test"): ("The cat sat.", "The cat did not sit.", None, 0),
}


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("glue_data")
  for folder, files in _FILES.items():
    os.makedirs(root / folder)
    for name, text in files.items():
      (root / folder / name).write_text(text, encoding="utf-8")
  return root


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  from bert_jax.data.tokenizer import WordPieceTokenizer
  return WordPieceTokenizer(str(minilm_dir / "vocab.txt"), lower_case=True)


@pytest.mark.parametrize("task,split", sorted(_FIRST))
def test_tsv_layout_of_every_task(glue_dir, task, split):
  examples = glue.read_tsv(str(glue_dir), task, split)
  first = examples[0]
  assert (first.text_a, first.text_b, first.label, first.index) == _FIRST[(task, split)]
  line = 1 if task == "cola" and split != "test" else 2  # CoLA train/dev have no header
  assert first.guid.endswith(f"{glue.TASKS[task].files[split]}:{line}")


def test_every_split_of_every_task_reads(glue_dir):
  for task in glue.TASKS.values():
    for split in task.files:
      examples = glue.read_tsv(str(glue_dir), task.name, split)
      assert examples
      labelled = not split.startswith("test")
      assert all((e.label is not None) == labelled for e in examples)
      assert all((e.text_b is not None) == task.is_pair for e in examples)


def test_task_table():
  assert set(glue.TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte",
                             "wnli", "ax"}
  stsb = glue.get_task("STS-B")
  assert stsb.is_regression and stsb.num_labels == 1 and stsb.primary_metric == "pearson"
  assert glue.get_task("SST-2").num_labels == 2 and not glue.get_task("sst2").is_pair
  assert glue.get_task("mnli").label_names == ("contradiction", "entailment", "neutral")
  assert glue.get_task("mnli").dev_splits == ("dev_matched", "dev_mismatched")
  assert glue.get_task("cola").primary_metric == "mcc"
  assert glue.get_task("mrpc").metrics == ("f1", "accuracy")
  # Every metric a task names is one glue_metrics defines (compute_metrics looks them up).
  assert {m for t in glue.TASKS.values() for m in t.metrics} <= set(glue_metrics.METRICS)
  with pytest.raises(ValueError, match="unknown GLUE task 'squad'"):
    glue.get_task("squad")


# ----------------------------------------------------------------------------
# Real files
# ----------------------------------------------------------------------------

def test_real_sst2(shared_data):
  dev = glue.read_tsv(str(shared_data / "sst2"), "sst2", "dev")
  assert len(dev) == 872  # data README: 444 positive, 428 negative
  assert sum(e.label == "1" for e in dev) == 444 and sum(e.label == "0" for e in dev) == 428
  assert dev[0].text_a.startswith("it 's a charming and often affecting journey")
  train = glue.read_tsv(str(shared_data), "sst2", "train")  # train.tsv.gz, data root
  assert len(train) == 67349
  assert train[0].text_a.startswith("hide new secretions") and train[0].label == "0"


def test_real_mrpc(shared_data):
  train = glue.read_tsv(str(shared_data), "mrpc", "train")
  dev = glue.read_tsv(str(shared_data / "mrpc"), "mrpc", "dev")
  assert (len(train), len(dev)) == (3668, 408)
  # The header's byte-order mark did not hide the 'Quality' column.
  assert train[0].text_a.startswith("Amrozi accused his brother")
  assert train[0].text_b.startswith("Referring to him as only")
  assert {e.label for e in train} == {"0", "1"}
  # A field starting with '"' is not a CSV quote (GLUE files are unquoted).
  assert dev[0].text_b.startswith('"The foodservice pie business')


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def _write(tmp_path, folder, name, text, gz=False):
  os.makedirs(tmp_path / folder, exist_ok=True)
  path = tmp_path / folder / (name + (".gz" if gz else ""))
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def test_bad_rows_name_file_and_line(tmp_path):
  path = _write(tmp_path, "SST-2", "train.tsv", "sentence\tlabel\ngood .\t1\nbad\trow\t0\n")
  with pytest.raises(ValueError, match=rf"{path}:3: 3 tab-separated columns, expected 2"):
    glue.read_tsv(str(tmp_path), "sst2", "train")
  path = _write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\ngood .\t1\nbad .\t2\n", gz=True)
  with pytest.raises(ValueError, match=rf"{path}:3: label '2' is not in the sst2 label set"):
    glue.read_tsv(str(tmp_path), "sst2", "dev")
  path = _write(tmp_path, "CoLA", "train.tsv", "a\t1\t\tok.\nb\t1\tno sentence\n")
  with pytest.raises(ValueError, match=rf"{path}:2: 3 tab-separated columns, expected 4"):
    glue.read_tsv(str(tmp_path), "cola", "train")
  path = _write(tmp_path, "STS-B", "dev.tsv", _STSB_HEAD + "\tscore\n"
                "0\tg\tf\ty\t1\ts\ts\tA.\tB.\tn/a\n")
  with pytest.raises(ValueError, match=rf"{path}:2: stsb label 'n/a' is not a finite number"):
    glue.read_tsv(str(tmp_path), "stsb", "dev")
  path = _write(tmp_path, "MNLI", "train.tsv", _MNLI_HEAD + "\tlabel1\tgold_label\n"
                "0\t1\t1\tg\tp\tp\tp\tp\tA.\tB.\t-\t-\n")
  with pytest.raises(ValueError, match=rf"{path}:2: label '-' is not in the mnli label set"):
    glue.read_tsv(str(tmp_path), "mnli", "train")


def test_empty_split_wrong_header_and_missing_file(tmp_path):
  path = _write(tmp_path, "RTE", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n\n")
  with pytest.raises(ValueError, match=rf"{path}: no examples \(rte split dev is empty\)"):
    glue.read_tsv(str(tmp_path), "rte", "dev")
  path = _write(tmp_path, "RTE", "train.tsv", "")
  with pytest.raises(ValueError, match=rf"{path}: empty file"):
    glue.read_tsv(str(tmp_path), "rte", "train")
  path = _write(tmp_path, "QNLI", "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t"
                "entailment\n")
  with pytest.raises(ValueError, match=rf"{path}:1: header .* has no column 'question'"):
    glue.read_tsv(str(tmp_path), "qnli", "train")
  with pytest.raises(FileNotFoundError, match="GLUE wnli split train"):
    glue.read_tsv(str(tmp_path), "wnli", "train")
  with pytest.raises(ValueError, match="no split 'dev'; it has"):
    glue.read_tsv(str(tmp_path), "mnli", "dev")


# ----------------------------------------------------------------------------
# tfds (offline)
# ----------------------------------------------------------------------------

def _prepare_fake_tfds_mnli(data_dir):
  """A prepared tfds folder glue/mnli/2.0.0 with tfds glue's MNLI features (no download)."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class Glue(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("2.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="mnli")]

    def _info(self):
      # tfds glue/mnli orders its classes entailment, neutral, contradiction.
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["entailment", "neutral", "contradiction"]),
          "idx": np.int32}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"validation_matched": self._generate_examples(3, False),
              "test_mismatched": self._generate_examples(2, True)}

    def _generate_examples(self, n, test):
      for i in range(n):
        yield i, {"premise": f"premise {i}", "hypothesis": f"hypothesis {i}",
                  "label": -1 if test else i, "idx": i}

  Glue(config="mnli", data_dir=str(data_dir)).download_and_prepare()


def test_tfds_reader_on_a_prepared_folder(tmp_path):
  _prepare_fake_tfds_mnli(tmp_path)
  dev = sorted(glue.read_tfds("mnli", "dev_matched", str(tmp_path)), key=lambda e: e.index)
  assert [(e.text_a, e.text_b, e.label) for e in dev] == [
      ("premise 0", "hypothesis 0", "entailment"), ("premise 1", "hypothesis 1", "neutral"),
      ("premise 2", "hypothesis 2", "contradiction")]
  test = glue.read_tfds("mnli", "test_mismatched", str(tmp_path))
  assert sorted(e.index for e in test) == [0, 1] and all(e.label is None for e in test)
  with pytest.raises(ValueError, match="has no split 'validation_mismatched'"):
    glue.read_tfds("mnli", "dev_mismatched", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="glue/sst2 is not prepared"):
    glue.read_tfds("sst2", "train", str(tmp_path))


def test_tfds_real_prepared_glue():
  data_dir = os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  if not os.path.isdir(os.path.join(data_dir, "glue", "sst2")):
    pytest.skip(f"no prepared tfds glue/sst2 under {data_dir} (bert_jax never downloads)")
  dev = glue.read_tfds("sst2", "dev", data_dir)
  assert len(dev) == 872 and {e.label for e in dev} == {"0", "1"}


# ----------------------------------------------------------------------------
# Features and batching
# ----------------------------------------------------------------------------

def test_pair_features_decode_back_to_text(tokenizer):
  task = glue.get_task("mrpc")
  ex = glue.GlueExample("x:2", 0, "The quick brown fox.", "It jumped!", "1")
  (f,) = glue.encode_examples([ex], tokenizer, task, max_length=64)
  tokens, types = f["encoder_input_tokens"], f["encoder_type_ids"]
  assert tokens.dtype == np.int32 and types.dtype == np.int32
  assert tokenizer.decode(tokens) == "[CLS] the quick brown fox . [SEP] it jumped ! [SEP]"
  # [CLS] the quick brown fox . [SEP] -> 0 (7 tokens); it jumped ! [SEP] -> 1 (4 tokens).
  assert types.tolist() == [0] * 7 + [1] * 4
  assert f["classifier_labels"] == 1 and f["classifier_labels"].dtype == np.int32


def test_single_sentence_regression_and_test_labels(tokenizer):
  (f,) = glue.encode_examples([glue.GlueExample("x", 0, "Hello world", None, "0")],
                              tokenizer, "sst2")
  assert tokenizer.decode(f["encoder_input_tokens"]) == "[CLS] hello world [SEP]"
  assert not f["encoder_type_ids"].any()
  f, g = glue.encode_examples([glue.GlueExample("x", 0, "A.", "B.", 3.25),
                               glue.GlueExample("y", 5, "C.", "D.", None)], tokenizer, "stsb")
  assert f["classifier_labels"].dtype == np.float32 and f["classifier_labels"] == 3.25
  assert g["classifier_labels"] == -1.0
  (h,) = glue.encode_examples([glue.GlueExample("z", 1, "E.", "F.", None)], tokenizer, "rte")
  assert h["classifier_labels"] == -1
  with pytest.raises(ValueError, match="label 'maybe' is not in the rte label set"):
    glue.encode_examples([glue.GlueExample("z", 1, "E.", "F.", "maybe")], tokenizer, "rte")


def test_truncate_longer_first():
  a, b = np.arange(10), np.arange(100, 104)
  ta, tb = glue.truncate_pair(a, b, 9)  # 14 -> 9: only A, the longer, loses (10 -> 5)
  assert ta.tolist() == [0, 1, 2, 3, 4] and tb.tolist() == [100, 101, 102, 103]
  ta, tb = glue.truncate_pair(a, b, 8)  # A down to 4: a tie, but the total fits
  assert (len(ta), len(tb)) == (4, 4)
  ta, tb = glue.truncate_pair(a, b, 7)  # at the 4/4 tie B loses first
  assert (len(ta), len(tb)) == (4, 3) and tb.tolist() == [100, 101, 102]
  ta, tb = glue.truncate_pair(a, None, 3)
  assert ta.tolist() == [0, 1, 2] and tb is None


def test_features_truncate_to_max_length(tokenizer):
  long_a = " ".join(["alpha"] * 30)
  ex = glue.GlueExample("x", 0, long_a, "beta gamma", "entailment")
  (f,) = glue.encode_examples([ex], tokenizer, "rte", max_length=16)
  assert len(f["encoder_input_tokens"]) == 16
  # 13 text tokens: B keeps its 2, A is cut to 11.
  assert tokenizer.decode(f["encoder_input_tokens"]) == (
      "[CLS] " + " ".join(["alpha"] * 11) + " [SEP] beta gamma [SEP]")


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

def test_metrics_hand_checked():
  p = np.array([1, 1, 0, 0, 1, 0, 1, 1])
  y = np.array([1, 0, 0, 1, 1, 0, 0, 1])
  # tp 3, fp 2, fn 1, tn 2.
  assert glue_metrics.accuracy(p, y) == 5 / 8
  assert glue_metrics.f1_score(p, y) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
  assert glue_metrics.matthews_corrcoef(p, y) == pytest.approx(
      (3 * 2 - 2 * 1) / math.sqrt((3 + 2) * (3 + 1) * (2 + 2) * (2 + 1)))
  assert glue_metrics.matthews_corrcoef(np.ones(5), np.array([1, 0, 1, 0, 1])) == 0.0  # undefined
  assert glue_metrics.f1_score(np.zeros(4), np.array([0, 1, 0, 1])) == 0.0
  logits = np.array([[0.2, 0.8], [0.9, 0.1]])
  assert glue_metrics.accuracy(logits, [1, 1]) == 0.5
  # Spearman with ties: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4].
  assert glue_metrics.average_ranks([3.0, 2.0, 1.0, 2.0]).tolist() == [4.0, 2.5, 1.0, 2.5]
  assert glue_metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
      np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
  assert math.isnan(glue_metrics.pearson([1.0, 1.0], [1.0, 2.0]))


def test_pearson_hand_value():
  # x-mean = [-1, 0, 1]; y = [2, 4, 6.5], mean 4.1667, y-mean = [-2.1667, -0.1667, 2.3333]
  # cov = 4.5, var_x = 2, var_y = 4.6944 + 0.0278 + 5.4444 = 10.1667
  assert glue_metrics.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) == pytest.approx(
      4.5 / math.sqrt(2 * 10.1666666667))


def test_multiclass_mcc_hand_checked():
  # confusion [true, pred]: [[2, 1, 0], [0, 2, 0], [1, 0, 1]]; c=5, s=7,
  # t=[3, 2, 2], q=[3, 3, 1]: (5*7 - (9+6+2)) / sqrt((49-19)*(49-17)).
  y = np.array([0, 0, 0, 1, 1, 2, 2])
  p = np.array([0, 0, 1, 1, 1, 0, 2])
  assert glue_metrics.matthews_corrcoef(p, y) == pytest.approx(18 / math.sqrt(30 * 32))


def test_metrics_against_scipy():
  stats = pytest.importorskip("scipy.stats", reason="scipy absent: no reference correlations")
  rng = np.random.default_rng(1)
  x = rng.integers(0, 6, size=500).astype(np.float64)  # many ties
  y = x + rng.normal(size=500)
  assert glue_metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
  assert glue_metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
  assert glue_metrics.average_ranks(x).tolist() == stats.rankdata(x).tolist()
  # Binary MCC is the phi coefficient: Pearson of the two 0/1 vectors.
  p, t = rng.integers(0, 2, size=300), rng.integers(0, 2, size=300)
  assert glue_metrics.matthews_corrcoef(p, t) == pytest.approx(stats.pearsonr(p, t)[0], abs=1e-12)


def test_compute_metrics_per_task():
  p, y = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
  mrpc = glue.compute_metrics("mrpc", p, y)
  assert mrpc["f1"] == pytest.approx(0.8) and mrpc["accuracy"] == 0.75
  assert mrpc["score"] == pytest.approx((0.8 + 0.75) / 2)
  cola = glue.compute_metrics("cola", p, y)
  assert set(cola) == {"mcc", "accuracy", "score"} and cola["score"] == cola["mcc"]
  stsb = glue.compute_metrics("stsb", np.array([[0.5], [2.0], [4.0]]), np.array([1.0, 2.0, 5.0]))
  assert set(stsb) == {"pearson", "spearman", "score"} and stsb["spearman"] == pytest.approx(1.0)
  mnli = glue.split_metrics("mnli", {"dev_matched": (np.array([0, 1, 2]), np.array([0, 1, 1])),
                                     "dev_mismatched": (np.array([2, 2]), np.array([2, 2]))})
  assert mnli["dev_matched/accuracy"] == pytest.approx(2 / 3)
  assert mnli["dev_mismatched/accuracy"] == 1.0
  with pytest.raises(ValueError, match="equal 1-D shapes"):
    glue_metrics.accuracy(np.array([1, 0]), np.array([1]))


# ----------------------------------------------------------------------------
# Submission files
# ----------------------------------------------------------------------------

def test_write_predictions(tmp_path, glue_dir):
  examples = glue.read_tsv(str(glue_dir), "mrpc", "test")
  path = tmp_path / glue.get_task("mrpc").submission["test"]
  glue.write_predictions(str(path), "mrpc", examples, np.array([[0.1, 0.9]]))
  assert path.name == "MRPC.tsv" and path.read_text() == "index\tprediction\n7\t1\n"
  mnli = glue.read_tsv(str(glue_dir), "mnli", "test_mismatched")
  glue.write_predictions(str(tmp_path / "MNLI-mm.tsv"), "mnli", mnli, np.array([2]))
  assert (tmp_path / "MNLI-mm.tsv").read_text() == "index\tprediction\n4\tneutral\n"
  stsb = glue.read_tsv(str(glue_dir), "stsb", "test")
  glue.write_predictions(str(tmp_path / "STS-B.tsv"), "stsb", stsb, np.array([[3.14159]]))
  assert (tmp_path / "STS-B.tsv").read_text() == "index\tprediction\n3\t3.142\n"
  with pytest.raises(ValueError, match="class ids in"):
    glue.write_predictions(str(tmp_path / "x.tsv"), "mrpc", examples, np.array([2]))
  with pytest.raises(ValueError, match="2 predictions for 1 examples"):
    glue.write_predictions(str(tmp_path / "x.tsv"), "mrpc", examples, np.array([0, 1]))
