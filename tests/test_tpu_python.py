"""A Python the pinned jax supports, on every TPU worker (issue "Cloud TPU VMs").

setup.py stops on an old Python with a message naming the version it needs;
tpu_scripts' remote setup script, run for real in bash inside a sandbox whose
only `python3` is 3.10, ends with a venv on 3.11+ (through uv when no newer
Python is installed) and is idempotent.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import uuid

import pytest

from tpu_scripts import remote

ROOT = pathlib.Path(__file__).resolve().parents[1]


_RUN_SETUP_PY = """
import collections, runpy, sys, setuptools
setuptools.setup = lambda **kw: print('SETUP REACHED', kw['python_requires'])
if len(sys.argv) > 1:  # pretend to be that Python, as setup.py sees it
  sys.version_info = collections.namedtuple('v', 'major minor micro releaselevel serial')(
      *map(int, sys.argv[1].split('.')), 'final', 0)
runpy.run_path('setup.py', run_name='__main__')
"""


@pytest.mark.parametrize("version", ["3.10.12", "3.9.2", ""])
def test_setup_py_names_the_python_it_needs(version):
  # setup.py runs as pip runs it (as __main__) in an interpreter that reports
  # `version`; an old one stops with the message before setuptools.setup().
  proc = subprocess.run([sys.executable, "-c", _RUN_SETUP_PY, *([version] if version else [])],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  if not version:  # this interpreter: supported, setup() runs
    assert proc.returncode == 0 and "SETUP REACHED >=3.11,<3.14" in proc.stdout, proc.stderr
    return
  assert proc.returncode == 1 and "SETUP REACHED" not in proc.stdout
  assert proc.stderr.strip().splitlines()[-1] == (
      f"bert_jax needs Python >= 3.11 (jax >= 0.7 requires it); this is Python {version}. "
      "On a TPU VM, tpu_scripts/tpu.py setup installs one.")


# A Python that reports VERSION: `--version` prints it; `-c CODE` runs CODE in
# the real interpreter with sys.version_info set to VERSION (so the setup
# script's own version check decides); `-m venv DIR` makes a venv of itself;
# `-m pip install --user uv` "installs" the fake uv. Every call is logged.
FAKE_PYTHON = """#!/bin/bash
echo "{name} $*" >> "$HOME/calls.log"
case "$1" in
  --version) echo "Python {version}";;
  -c) exec {real} -I -S -c "import collections, sys
sys.version_info = collections.namedtuple('v', 'major minor micro releaselevel serial')(
    {major}, {minor}, {micro}, 'final', 0)
$2";;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && ln -s {self} "$3/bin/python" &&
        cp {fakes}/pip "$3/bin/pip";
      elif [ "$*" = "-m pip install --user -q uv" ]; then mkdir -p "$HOME/.local/bin" &&
        cp {fakes}/uv "$HOME/.local/bin/uv";
      else exit 1; fi;;
  *) exit 1;;
esac
"""

# uv: `python install 3.12` puts a fake CPython 3.12 under ~/.local/share/uv;
# `venv --python 3.12 --seed DIR` makes a venv of it, with pip (--seed).
FAKE_UV = """#!/bin/bash
echo "uv $*" >> "$HOME/calls.log"
managed="$HOME/.local/share/uv/python/cpython-3.12.8/bin/python3.12"
if [ "$1 $2 $3" = "python install 3.12" ]; then
  mkdir -p "$(dirname "$managed")" && cp {fakes}/python3.12 "$managed"
elif [ "$1 $2 $3 $4" = "venv --python 3.12 --seed" ] && [ -x "$managed" ]; then
  mkdir -p "$5/bin" && ln -s "$managed" "$5/bin/python" && cp {fakes}/pip "$5/bin/pip"
else
  exit 2
fi
"""

RECORDER = '#!/bin/bash\necho "{name} $*" >> "$HOME/calls.log"\n'


def _python_sandbox(tmp_path, pythons):
  """A worker with only the given fake Pythons: returns (home, env for bash).

  `pythons` maps a command name on PATH (python3, python3.11) to the version
  it reports. PATH holds those, recording sudo/apt-get stubs, and links to the
  few system tools the script uses, and no real Python.
  """
  fakes, bin_dir, tools = tmp_path / "fakes", tmp_path / "bin", tmp_path / "tools"
  for folder in (fakes, bin_dir, tools):
    folder.mkdir()

  def write(path, text):
    path.write_text(text)
    path.chmod(0o755)

  def python(path, name, version):
    major, minor, micro = version.split(".")
    write(path, FAKE_PYTHON.format(name=name, version=version, real=sys.executable, self=path,
                                   fakes=fakes, major=major, minor=minor, micro=micro))

  python(fakes / "python3.12", "python3.12", "3.12.8")  # what uv installs
  write(fakes / "uv", FAKE_UV.format(fakes=fakes))
  write(fakes / "pip", '#!/bin/bash\necho "pip $* in $PWD" >> "$HOME/calls.log"\n')
  for name, version in pythons.items():
    python(bin_dir / name, name, version)
  write(bin_dir / "sudo", '#!/bin/bash\necho "sudo $*" >> "$HOME/calls.log"\nexec "$@"\n')
  write(bin_dir / "apt-get", RECORDER.format(name="apt-get"))
  for tool in ("bash", "tar", "gzip", "rm", "mkdir", "mv", "cp", "ln", "cat", "dirname",
               "hostname", "pgrep"):
    found = shutil.which(tool)
    if not found:
      pytest.skip(f"needs {tool} on PATH")
    (tools / tool).symlink_to(found)
  path = f"{bin_dir}{os.pathsep}{tools}"
  for name in ("python", "python3.11", "python3.12", "python3.13", "uv"):
    if name not in pythons:
      assert shutil.which(name, path=path) is None
  home = tmp_path / "home"
  home.mkdir()
  from tpu_scripts import checkout
  source = tmp_path / "src"
  source.mkdir()
  (source / "setup.py").write_text("")
  checkout.pack(source, home / remote.TARBALL)
  return home, {"HOME": str(home), "PATH": path, "LANG": "C"}


def _setup_run(script, home, env):
  """Runs the setup script; returns (its stdout, the calls it made but version queries)."""
  log = home / "calls.log"
  log.unlink(missing_ok=True)
  out = subprocess.run([shutil.which("bash"), "-c", script], env=env, cwd=home,
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 0 and "BERT_JAX_SETUP_DONE" in out.stdout, out.stdout + out.stderr
  calls = log.read_text().splitlines() if log.exists() else []
  queries = ("-c ", "--version")
  return out.stdout, [c for c in calls if not c.split(" ", 1)[1].startswith(queries)]


def _venv_version(venv):
  out = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import sys; print('%d.%d' % sys.version_info[:2])"],
                       capture_output=True, text=True, timeout=30)
  return out.stdout.strip()


def test_setup_script_on_a_python_3_10_image_installs_3_12_with_uv(tmp_path, monkeypatch):
  venv = f"venv_{uuid.uuid4().hex[:12]}"
  monkeypatch.setattr(remote, "JOB_PATTERN", f"{venv}/bin/bert-ja[x]")
  home, env = _python_sandbox(tmp_path, {"python3": "3.10.12"})
  script = remote.setup_script("code", venv, "python3", [])
  install = [f"pip install -q --upgrade pip in {home}",
             f"pip install -q -e .[tpu] in {home / 'code'}"]

  stdout, calls = _setup_run(script, home, env)
  assert "no Python 3.11+" in stdout and "python3 is Python 3.10.12" in stdout
  assert "BERT_JAX_VENV created Python 3.12.8" in stdout
  assert calls == ["python3 -m pip install --user -q uv", "uv python install 3.12",
                   f"uv venv --python 3.12 --seed {home / venv}", *install]
  assert _venv_version(home / venv) == "3.12"  # the version check itself, in the venv

  # Again: the venv is reused as it is; uv is not asked for anything.
  (home / venv / "marker").write_text("")
  stdout, calls = _setup_run(script, home, env)
  assert "BERT_JAX_VENV reused Python 3.12.8" in stdout
  assert calls == install and (home / venv / "marker").exists()

  # A venv left on 3.10 (an earlier setup) is rebuilt; the installed uv is reused.
  (home / venv / "bin" / "python").unlink()
  (home / venv / "bin" / "python").symlink_to(tmp_path / "bin" / "python3")
  stdout, calls = _setup_run(script, home, env)
  assert "BERT_JAX_VENV created Python 3.12.8" in stdout
  assert not (home / venv / "marker").exists()
  assert calls == ["uv python install 3.12", f"uv venv --python 3.12 --seed {home / venv}",
                   *install]
  assert _venv_version(home / venv) == "3.12"


def test_setup_script_prefers_an_installed_python_3_11(tmp_path, monkeypatch):
  venv = f"venv_{uuid.uuid4().hex[:12]}"
  monkeypatch.setattr(remote, "JOB_PATTERN", f"{venv}/bin/bert-ja[x]")
  home, env = _python_sandbox(tmp_path, {"python3": "3.10.12", "python3.11": "3.11.9"})
  stdout, calls = _setup_run(remote.setup_script("code", venv, "python3", []), home, env)
  assert "BERT_JAX_VENV created Python 3.11.9" in stdout
  assert calls[0] == f"python3.11 -m venv {home / venv}"  # no uv, no apt
  assert _venv_version(home / venv) == "3.11"
