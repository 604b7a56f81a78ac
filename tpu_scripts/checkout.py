"""Packs this checkout into one tarball that `setup` copies to every worker.

One file over scp is faster and more predictable than copying a tree, and the
file list is what git would commit (tracked plus untracked-but-not-ignored), so
virtual environments, caches and build outputs stay home. Outside a git
checkout a walk with a fixed exclusion list stands in.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tarfile

_SKIP_DIRS = {".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", "build", "dist"}
_SKIP_SUFFIXES = (".pyc", ".egg-info")


def repo_root() -> pathlib.Path:
  """The checkout that holds tpu_scripts/."""
  return pathlib.Path(__file__).resolve().parents[1]


def _git_files(root: pathlib.Path) -> list[str] | None:
  if not (root / ".git").exists() or shutil.which("git") is None:
    return None
  proc = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    return None
  # Deleted-but-tracked files are listed too; only existing files can be packed.
  return sorted(f for f in proc.stdout.split("\0") if f and (root / f).is_file())


def _walk_files(root: pathlib.Path) -> list[str]:
  files = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(_SKIP_SUFFIXES)]
    for name in names:
      if not name.endswith(_SKIP_SUFFIXES):
        files.append(os.path.relpath(os.path.join(folder, name), root))
  return sorted(files)


def list_files(root: str | os.PathLike) -> list[str]:
  """Relative paths of the files to ship from `root`.

  Raises:
    ValueError: `root` has no setup.py (it is not a bert_jax checkout).
  """
  root = pathlib.Path(root)
  if not (root / "setup.py").is_file():
    raise ValueError(f"SOURCE_DIR {root} has no setup.py: point it at a bert_jax checkout")
  files = _git_files(root)
  return files if files is not None else _walk_files(root)


def pack(root: str | os.PathLike, out: str | os.PathLike) -> int:
  """Writes the files of `root` into the gzipped tarball `out`; returns the file count."""
  root = pathlib.Path(root)
  files = list_files(root)
  with tarfile.open(out, "w:gz") as tar:
    for rel in files:
      tar.add(root / rel, arcname=rel, recursive=False)
  return len(files)
