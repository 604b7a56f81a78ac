"""The data package's module graph: top-level imports only, acyclic, each module importable alone.

An import hidden inside a function is how a cycle between two modules goes
unnoticed (it used to join tokenizer.py with sources.py and bpe.py): these
tests read the source with `ast`, so they catch one before any code path runs
it, and then import every module on its own in a fresh interpreter.
"""
import ast
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "bert_jax" / "data"
PACKAGE = "bert_jax.data"
MODULES = sorted(p.stem for p in DATA.glob("*.py") if p.stem != "__init__")


def _imported_modules(node: ast.AST) -> list:
  """Dotted names of the bert_jax modules an Import / ImportFrom node brings in.

  `from bert_jax.data import sources` names the module bert_jax.data.sources;
  `from bert_jax.data.files import isfile` names bert_jax.data.files. A
  relative import (`from . import x`) counts as one of the data package.
  """
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.split(".")[0] == "bert_jax"]
  if isinstance(node, ast.ImportFrom):
    if node.level:
      base = PACKAGE if node.module is None else f"{PACKAGE}.{node.module}"
    elif node.module and node.module.split(".")[0] == "bert_jax":
      base = node.module
    else:
      return []
    if base == PACKAGE:
      return [f"{PACKAGE}.{a.name}" for a in node.names]
    return [base]
  return []


def _parse(name: str) -> ast.Module:
  path = DATA / f"{name}.py"
  return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_data_modules_import_bert_jax_at_top_level_only():
  hidden = []
  for name in MODULES:
    tree = _parse(name)
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
      if id(node) not in top and _imported_modules(node):
        hidden.append(f"bert_jax/data/{name}.py:{node.lineno}: {ast.unparse(node)}")
  assert not hidden, ("bert_jax imports inside a function, class or block (move them to the "
                      "top; if that makes a cycle, move code down a module):\n" + "\n".join(hidden))


def test_data_module_graph_is_acyclic():
  graph = {}
  for name in MODULES:
    deps = set()
    for node in _parse(name).body:
      deps.update(m[len(PACKAGE) + 1:] for m in _imported_modules(node)
                  if m.startswith(PACKAGE + "."))
    graph[name] = sorted(d.split(".")[0] for d in deps)
  assert all(d in graph for deps in graph.values() for d in deps), graph

  done, path = set(), []

  def visit(name):
    if name in path:
      raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
    if name not in done:
      path.append(name)
      for dep in graph[name]:
        visit(dep)
      path.pop()
      done.add(name)

  for name in MODULES:
    visit(name)
  # The tokenizer stack in particular: the interface below, the loader above.
  for low in ("bpe", "sources", "tokenizer_base", "files"):
    assert "tokenizer" not in graph[low], f"{low} imports tokenizer, which imports {low}"


def _import_alone(name: str):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{name}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  return name, proc.returncode, proc.stderr[-2000:]


@pytest.mark.slow
def test_each_data_module_imports_alone_in_a_fresh_interpreter():
  # One interpreter per module (each pays TensorFlow's import), a few at a time.
  workers = max(2, min(len(MODULES), os.cpu_count() or 2))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(_import_alone, MODULES))
  failed = [f"{name} (exit {rc}):\n{err}" for name, rc, err in results if rc != 0]
  assert not failed, "\n\n".join(failed)
  assert len(results) == len(MODULES) >= 12
