"""When to start jax.distributed, decided from the signals JAX's own detection reads.

`jax.distributed.initialize()` without arguments asks each cluster type in
jax._src.clusters, in this order, whether it is present (mpi4py is opt-in
only), and takes its process count from the first that is:

  Open MPI     OMPI_MCA_orte_hnp_uri set; size OMPI_COMM_WORLD_SIZE
  Slurm        SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and
               SLURM_LOCALID set; size SLURM_NTASKS
  GKE TPU      a Cloud TPU VM with TPU_PROCESS_ADDRESSES (else TPU_WORKER_HOSTNAMES)
               set; size: its comma-separated hosts x MEGASCALE_NUM_SLICES
  GCE TPU VM   a Cloud TPU VM (TPU_SKIP_MDS_QUERY unset) whose metadata server has
               agent-worker-number; size: the hosts in the metadata's
               worker-network-endpoints x MEGASCALE_NUM_SLICES (env, else the
               metadata's tpu-env)
  Kubernetes   KUBERNETES_SERVICE_HOST set and the `kubernetes` package installed;
               size from the Job (an API call), process id JOB_COMPLETION_INDEX

A gcloud TPU VM slice is the GCE case: its workers get no TPU_WORKER_HOSTNAMES,
only the metadata server knows the slice. `should_initialize` mirrors these
checks on plain inputs (an environment mapping, whether this is a Cloud TPU VM,
a metadata lookup), so each case is tested without a cluster. It differs from
JAX in one way on purpose: a cluster of one process is a single host, where the
distributed client is not started.

Without the client a pod would still run, but orbax's preemption check
(`reached_preemption`) would never fire, and a preempted run would resume from
its last periodic checkpoint instead of the preemption step.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Callable, Mapping

# metadata(key) -> the value of instance attribute `key`, or None where unset.
Metadata = Callable[[str], "str | None"]

_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
          "SLURM_LOCALID")
_GOOGLE_PCI_VENDOR = "0x1ae0"


def _count(value: str | None) -> int | None:
  try:
    return int(value)
  except (TypeError, ValueError):
    return None


def _tpu_env_value(key: str, env: Mapping[str, str], metadata: Metadata | None) -> str | None:
  """KEY from the environment, else from the metadata's tpu-env (as JAX reads it)."""
  if key in env:
    return env[key]
  text = metadata("tpu-env") if metadata else None
  value = None
  for line in (text or "").splitlines():  # lines like MEGASCALE_NUM_SLICES: '2'
    name, sep, rest = line.partition(":")
    if sep and name.strip() == key:
      value = rest.strip().strip("'")
  return value


def _sized(kind: str, size_key: str, env: Mapping[str, str]) -> tuple[bool, str]:
  n = _count(env.get(size_key))
  # A size JAX cannot read is its error to report, not a reason to skip.
  start = n is None or n > 1
  return start, f"{'' if start else 'single host: '}{kind}, {size_key}={env.get(size_key)}"


def _tpu_decision(kind: str, hosts: list[str], env: Mapping[str, str],
                  metadata: Metadata | None) -> tuple[bool, str]:
  if len(hosts) > 1:
    return True, f"{kind} of {len(hosts)} workers"
  # One worker per slice: several slices (Multislice) still make several processes.
  slices = _count(_tpu_env_value("MEGASCALE_NUM_SLICES", env, metadata)) or 1
  if slices > 1:
    return True, f"{kind}: {slices} slices of 1 worker"
  return False, f"single host: {kind} of 1 worker"


def should_initialize(env: Mapping[str, str], *, explicit: bool = False, tpu_vm: bool = False,
                      metadata: Metadata | None = None,
                      k8s_available: bool = False) -> tuple[bool, str]:
  """Whether to call jax.distributed.initialize(), and why.

  Args:
    env: the process environment (os.environ).
    explicit: --coordinator_address was given (CPU tests, GPU clusters).
    tpu_vm: this is a Cloud TPU VM, as JAX decides at import (libtpu and TPU
      chips present); JAX looks for TPU clusters only there.
    metadata: the GCE metadata lookup; only called on a TPU VM.
    k8s_available: the `kubernetes` package is installed (JAX needs it).

  Returns:
    (start it, a reason naming the signal) for the log.
  """
  if explicit:
    return True, "explicit --coordinator_address"
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True, "JAX_COORDINATOR_ADDRESS is set"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return _sized("Open MPI job", "OMPI_COMM_WORLD_SIZE", env)
  if all(k in env for k in _SLURM):
    return _sized("Slurm job step", "SLURM_NTASKS", env)
  if tpu_vm:
    hosts = env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES"))
    if hosts is not None:
      return _tpu_decision("GKE TPU slice (TPU_WORKER_HOSTNAMES)", hosts.split(","), env,
                           metadata)
    # On a gcloud TPU VM only the metadata server knows the slice.
    if ("TPU_SKIP_MDS_QUERY" not in env and metadata
        and metadata("agent-worker-number") is not None):
      endpoints = metadata("worker-network-endpoints") or ""
      return _tpu_decision("Cloud TPU VM slice (metadata server)",
                           endpoints.split(",") if endpoints else [""], env, metadata)
  if "KUBERNETES_SERVICE_HOST" in env and k8s_available and "JOB_COMPLETION_INDEX" in env:
    return True, "Kubernetes indexed Job"
  return False, "single host: no multi-process cluster (MPI, Slurm, TPU slice, Kubernetes Job)"


def gce_metadata(key: str, env: Mapping[str, str] | None = None, *, timeout: float = 5.0,
                 tries: int = 3) -> str | None:
  """Instance attribute `key` from the GCE metadata server; None where it is unset.

  The server is GCE_METADATA_IP where set (as JAX reads it), else
  metadata.google.internal. A server that cannot be reached after `tries`
  also gives None: the caller then treats the host as single.
  """
  env = os.environ if env is None else env
  host = env.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
      headers={"Metadata-Flavor": "Google"})
  for attempt in range(tries):
    try:
      with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode("utf-8")
    except urllib.error.HTTPError:
      return None  # the server answered: the attribute is not set
    except (urllib.error.URLError, OSError) as e:
      if attempt + 1 == tries:
        logging.warning("metadata server %s unreachable (%s); assuming one host", host, e)
        return None
      time.sleep(0.5)
  return None


def tpu_chips(pci_root: str = "/sys/bus/pci/devices") -> int:
  """Google PCI devices (TPU chips) on this machine, counted as JAX counts them."""
  count = 0
  for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
    try:
      with open(vendor, encoding="ascii") as f:
        count += f.read().strip() == _GOOGLE_PCI_VENDOR
    except OSError:
      continue
  return count


def on_cloud_tpu_vm() -> bool:
  """JAX's own verdict (set when jax is imported); a chip count where it is absent."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return ("JAX_FORCE_TPU_INIT" in os.environ
            or (tpu_chips() > 0 and importlib.util.find_spec("libtpu") is not None))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, env: Mapping[str, str] | None = None,
               tpu_vm: bool | None = None, metadata: Metadata | None = None) -> bool:
  """Starts jax.distributed where `should_initialize` says so; returns whether it runs.

  Call before JAX touches devices. With a coordinator address the three
  arguments go to JAX as given; else JAX finds them itself from the cluster
  that `should_initialize` saw. Idempotent: a started client is kept.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if jax.distributed.is_initialized():
    return True
  env = os.environ if env is None else env
  tpu_vm = on_cloud_tpu_vm() if tpu_vm is None else tpu_vm
  start, reason = should_initialize(
      env, explicit=bool(coordinator_address), tpu_vm=tpu_vm,
      metadata=metadata or (lambda key: gce_metadata(key, env)),
      k8s_available=importlib.util.find_spec("kubernetes") is not None)
  logging.info("jax.distributed %s: %s", "starts" if start else "not started", reason)
  if not start:
    return False
  if not tpu_vm:
    # CPU processes talk over gloo (the default CPU client has no collectives);
    # accelerator collectives do not use this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  return True
