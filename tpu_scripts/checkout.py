"""Packs the code that `setup` copies to every worker into one tarball.

One file over scp is faster and more predictable than copying a tree. By
default the tarball is `git archive` of one commit, so a run is pinned to a
revision that launch.json records and recover can ship again; uncommitted
edits stay home. With --allow_dirty the working tree is packed instead (the
files git would commit: tracked plus untracked-but-not-ignored, so virtual
environments, caches and build outputs stay home), and the stamp says so with
a hash of the edits. Every tarball holds a STAMP_FILE naming what it is, which
launch compares with what it is about to record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import tarfile

STAMP_FILE = "BERT_JAX_REVISION"


@dataclasses.dataclass(frozen=True)
class Revision:
  """What is shipped: a commit, and whether uncommitted edits ride along.

  Attributes:
    commit: the git commit (HEAD unless given), or '' outside git.
    dirty: uncommitted edits (tracked or untracked) are shipped.
    diff_hash: sha256 of those edits ('' when not dirty).
  """
  commit: str
  dirty: bool = False
  diff_hash: str = ""

  @property
  def stamp(self) -> str:
    """One line that names this code: COMMIT, or COMMIT+dirty.HASH12."""
    return f"{self.commit or 'no-git'}+dirty.{self.diff_hash[:12]}" if self.dirty else self.commit


def _git(root: pathlib.Path, *args: str, text: bool = True) -> subprocess.CompletedProcess:
  return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=text)


def _is_git(root: pathlib.Path) -> bool:
  return (root / ".git").exists() and shutil.which("git") is not None


def _edits_hash(root: pathlib.Path, files: list[str]) -> tuple[bool, str]:
  """(dirty, sha256 of `git diff HEAD` plus every untracked file's path and bytes)."""
  status = _git(root, "status", "--porcelain", "--untracked-files=all")
  if not status.stdout.strip():
    return False, ""
  digest = hashlib.sha256(_git(root, "diff", "--binary", "HEAD", text=False).stdout)
  untracked = set(_git(root, "ls-files", "-o", "--exclude-standard", "-z").stdout.split("\0"))
  for rel in files:
    if rel in untracked:
      digest.update(rel.encode() + b"\0" + (root / rel).read_bytes())
  return True, digest.hexdigest()


def revision(root: str | os.PathLike, allow_dirty: bool = False,
             commit: str = "") -> Revision:
  """The revision that setup ships from `root`, and launch records.

  Args:
    root: the checkout.
    allow_dirty: ship uncommitted edits (the working tree) when there are any.
    commit: a commit to ship instead of HEAD (recover ships the recorded one).

  Raises:
    ValueError: not a git checkout and `allow_dirty` is False, or an unknown commit.
  """
  root = pathlib.Path(root)
  if not _is_git(root):
    if not allow_dirty:
      raise ValueError(f"{root} is not a git checkout, so no revision pins the run: commit it "
                       "to git, or pass --allow_dirty to ship the folder as it is")
    digest = hashlib.sha256()
    for rel in _walk_files(root):
      digest.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return Revision("", True, digest.hexdigest())
  head = _git(root, "rev-parse", "--verify", "HEAD^{commit}").stdout.strip()
  if not head:
    raise ValueError(f"{root} has no commit yet: commit, or pass --allow_dirty")
  if commit:
    full = _git(root, "rev-parse", "--verify", f"{commit}^{{commit}}").stdout.strip()
    if not full:
      raise ValueError(f"revision {commit} is not a commit of {root} (fetch it first)")
    if full != head or not allow_dirty:
      return Revision(full)
  if not allow_dirty:
    return Revision(head)
  dirty, digest = _edits_hash(root, list_files(root))
  return Revision(head, dirty, digest)

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


def _add_stamp(tar: tarfile.TarFile, stamp: str) -> None:
  data = (stamp + "\n").encode()
  info = tarfile.TarInfo(STAMP_FILE)
  info.size, info.mode = len(data), 0o644
  tar.addfile(info, io.BytesIO(data))


def pack(root: str | os.PathLike, out: str | os.PathLike, rev: Revision | None = None) -> int:
  """Writes the code of `rev` into the gzipped tarball `out`; returns the file count.

  A clean `rev` (a commit) is `git archive` of that commit; a dirty one, or
  None, packs the files of the working tree. The tarball's STAMP_FILE holds
  `rev.stamp` when `rev` is given.
  """
  root = pathlib.Path(root)
  if rev is not None and not rev.dirty:
    archive = _git(root, "archive", "--format=tar", rev.commit, text=False)
    if archive.returncode != 0:
      raise ValueError(f"git archive {rev.commit} failed in {root}: "
                       f"{archive.stderr.decode(errors='replace').strip()}")
    count = 0
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as src, \
        tarfile.open(out, "w:gz") as tar:
      for member in src.getmembers():
        count += member.isfile()
        tar.addfile(member, src.extractfile(member) if member.isfile() else None)
      _add_stamp(tar, rev.stamp)
    return count
  files = list_files(root)
  with tarfile.open(out, "w:gz") as tar:
    for rel in files:
      tar.add(root / rel, arcname=rel, recursive=False)
    if rev is not None:
      _add_stamp(tar, rev.stamp)
  return len(files)


def export(root: str | os.PathLike, rev: Revision, folder: str | os.PathLike) -> None:
  """Unpacks the code of `rev` into `folder` (to check a config as the workers will see it)."""
  tarball = pathlib.Path(folder) / ".export.tar.gz"
  pack(root, tarball, rev)
  with tarfile.open(tarball) as tar:
    # The "tar" filter (3.12, backported to 3.10.12) keeps links that point outside.
    kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    tar.extractall(folder, **kwargs)
  tarball.unlink()
