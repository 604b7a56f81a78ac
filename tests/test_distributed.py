"""When jax.distributed starts: the decision per cluster environment, checked
against the installed JAX's own detection, and the start itself in two processes.

No cluster and no network: the metadata server is a dict (or a local HTTP
server), and "a Cloud TPU VM" is an argument.
"""
import http.server
import os
import pathlib
import socket
import subprocess
import sys
import threading

import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from bert_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The metadata a gcloud TPU VM sees: worker 1 of a v4-32 (4 workers), in the
# current format (hostnames) and the old one (name:id:ip triples).
V4_32 = {"agent-worker-number": "1", "worker-network-endpoints": "t1-w-0,t1-w-1,t1-w-2,t1-w-3"}
V4_32_OLD = {"agent-worker-number": "1",
             "worker-network-endpoints": "a:0:10.0.0.2,b:1:10.0.0.3,c:2:10.0.0.4,d:3:10.0.0.5"}
V4_8 = {"agent-worker-number": "0", "worker-network-endpoints": "t1-w-0"}
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
        "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0"}

# (name, env, on a Cloud TPU VM, metadata attributes, start?, words of the reason)
CASES = [
    ("laptop", {}, False, {}, False, "single host"),
    ("gcloud TPU VM slice", {}, True, V4_32, True, "Cloud TPU VM slice (metadata server) of 4"),
    ("gcloud TPU VM slice, old endpoints", {}, True, V4_32_OLD, True, "of 4 workers"),
    ("single-host TPU VM", {}, True, V4_8, False, "of 1 worker"),
    ("multislice of single hosts (tpu-env)", {}, True,
     {**V4_8, "tpu-env": "MEGASCALE_COORDINATOR_ADDRESS: 't1-w-0'\nMEGASCALE_NUM_SLICES: '2'"},
     True, "2 slices of 1 worker"),
    ("multislice of single hosts (env)", {"MEGASCALE_NUM_SLICES": "2"}, True, V4_8, True,
     "2 slices"),
    ("TPU VM, metadata has no worker number", {}, True, {}, False, "single host"),
    ("TPU VM, JAX skips the metadata", {"TPU_SKIP_MDS_QUERY": "1"}, True, V4_32, False,
     "single host"),
    ("metadata of a slice, but no TPU VM", {}, False, V4_32, False, "single host"),
    ("GKE slice", {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "2"}, True, {},
     True, "GKE TPU slice (TPU_WORKER_HOSTNAMES) of 4"),
    ("GKE one worker", {"TPU_WORKER_HOSTNAMES": "h0", "TPU_WORKER_ID": "0"}, True, {}, False,
     "of 1 worker"),
    # JAX reads TPU_PROCESS_ADDRESSES before TPU_WORKER_HOSTNAMES.
    ("GKE process addresses first", {"TPU_PROCESS_ADDRESSES": "h0:8476",
                                     "TPU_WORKER_HOSTNAMES": "h0,h1", "TPU_WORKER_ID": "0"},
     True, {}, False, "of 1 worker"),
    # JAX looks for GKE TPU variables only on a TPU VM.
    ("GKE variables off a TPU VM", {"TPU_WORKER_HOSTNAMES": "h0,h1", "TPU_WORKER_ID": "0"},
     False, {}, False, "single host"),
    ("Slurm, 2 tasks", SLURM, False, {}, True, "Slurm job step, SLURM_NTASKS=2"),
    ("Slurm, 1 task", {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False, {}, False,
     "single host: Slurm job step, SLURM_NTASKS=1"),
    # salloc's shell: an allocation, but no job step (srun) to join.
    ("Slurm allocation, no step", {k: v for k, v in SLURM.items()
                                   if k != "SLURM_STEP_NODELIST"}, False, {}, False,
     "single host"),
    ("Open MPI, 4 ranks", OMPI, False, {}, True, "Open MPI job, OMPI_COMM_WORLD_SIZE=4"),
    ("Open MPI, 1 rank", {**OMPI, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"},
     False, {}, False, "single host: Open MPI job, OMPI_COMM_WORLD_SIZE=1"),
    # Open MPI comes first in JAX's order, whatever else is set.
    ("Open MPI before a TPU slice", {**OMPI, "OMPI_COMM_WORLD_SIZE": "1",
                                     "OMPI_COMM_WORLD_RANK": "0"}, True, V4_32, False,
     "single host: Open MPI"),
]


class FakeMetadata:
  """The metadata server as a dict; records every key asked for."""

  def __init__(self, attributes):
    self.attributes, self.asked = dict(attributes), []

  def __call__(self, key):
    self.asked.append(key)
    return self.attributes.get(key)


@pytest.mark.parametrize("name, env, tpu_vm, attributes, start, reason", CASES,
                         ids=[c[0] for c in CASES])
def test_decision_per_environment(name, env, tpu_vm, attributes, start, reason):
  metadata = FakeMetadata(attributes)
  got, why = distributed.should_initialize(env, tpu_vm=tpu_vm, metadata=metadata)
  assert (got, reason in why) == (start, True), why
  if not tpu_vm:  # JAX asks the metadata server only on a TPU VM: so do we
    assert metadata.asked == []
  # Explicit flags start it whatever the environment says.
  assert distributed.should_initialize(env, explicit=True, tpu_vm=tpu_vm,
                                       metadata=metadata) == (True,
                                                              "explicit --coordinator_address")


_CLUSTER_VARIABLES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR",
                      "KUBERNETES_", "JOB_COMPLETION_INDEX")


@pytest.mark.parametrize("name, env, tpu_vm, attributes, start, reason", CASES,
                         ids=[c[0] for c in CASES])
def test_decision_matches_the_installed_jax(name, env, tpu_vm, attributes, start, reason,
                                            monkeypatch):
  # The same inputs through JAX's own cluster classes (jax._src.clusters):
  # the first present cluster in JAX's order, and its process count. Ours
  # starts the client exactly where JAX finds a cluster of more than one.
  for key in list(os.environ):
    if key.startswith(_CLUSTER_VARIABLES):
      monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", tpu_vm)
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata",
                      lambda key: (attributes[key], 200) if key in attributes else ("", 404))
  found = next((c for c in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
                if not c.opt_in_only_method and c.is_env_present()), None)
  jax_starts = found is not None and found.get_process_count() > 1
  assert jax_starts == start, found
  assert distributed.should_initialize(dict(os.environ), tpu_vm=tpu_vm,
                                       metadata=FakeMetadata(attributes))[0] == jax_starts


def test_other_explicit_signals():
  # JAX_COORDINATOR_ADDRESS is read by jax.distributed.initialize itself.
  assert distributed.should_initialize({"JAX_COORDINATOR_ADDRESS": "h0:1234"}) == (
      True, "JAX_COORDINATOR_ADDRESS is set")
  # A Kubernetes indexed Job, where JAX can ask the API (the kubernetes package).
  k8s = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"}
  assert distributed.should_initialize(k8s, k8s_available=True) == (True,
                                                                    "Kubernetes indexed Job")
  assert not distributed.should_initialize(k8s, k8s_available=False)[0]
  # A plain pod (no Job index): JAX would fail to find its process id.
  assert not distributed.should_initialize({"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
                                           k8s_available=True)[0]


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
  attributes = {"agent-worker-number": "3", "worker-network-endpoints": "a,b,c,d"}

  def do_GET(self):  # pylint: disable=invalid-name
    prefix = "/computeMetadata/v1/instance/attributes/"
    key = self.path[len(prefix):] if self.path.startswith(prefix) else None
    if self.headers.get("Metadata-Flavor") != "Google":
      self.send_response(403)
    elif key not in self.attributes:
      self.send_response(404)
    else:
      body = self.attributes[key].encode()
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)
      return
    self.end_headers()

  def log_message(self, *args):
    pass


def test_gce_metadata_reads_the_server_jax_reads():
  server = http.server.HTTPServer(("127.0.0.1", 0), _MetadataHandler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    env = {"GCE_METADATA_IP": f"127.0.0.1:{server.server_port}"}
    assert distributed.gce_metadata("agent-worker-number", env) == "3"
    assert distributed.gce_metadata("tpu-env", env) is None  # unset: 404
    lookup = lambda key: distributed.gce_metadata(key, env)  # noqa: E731
    assert distributed.should_initialize({}, tpu_vm=True, metadata=lookup) == (
        True, "Cloud TPU VM slice (metadata server) of 4 workers")
  finally:
    server.shutdown()
    server.server_close()
  # No server: None after the tries, without raising.
  assert distributed.gce_metadata("agent-worker-number", env, timeout=0.5, tries=1) is None


def test_tpu_chips_counts_google_pci_devices(tmp_path):
  for i, vendor in enumerate(["0x1ae0", "0x1ae0", "0x8086", "0x1ae0"]):
    device = tmp_path / f"0000:00:0{i}.0"
    device.mkdir()
    (device / "vendor").write_text(vendor + "\n")
  assert distributed.tpu_chips(str(tmp_path)) == 3
  assert distributed.tpu_chips(str(tmp_path / "absent")) == 0


def test_single_host_does_not_start_the_client():
  import jax  # pylint: disable=import-outside-toplevel
  assert not distributed.initialize(env={}, tpu_vm=False)
  assert not jax.distributed.is_initialized()


# One of two CPU processes (4 devices each) started as srun would start them:
# only Slurm's variables, no flags. distributed.initialize() must decide to
# start the client and JAX must find the same cluster; then process 0 gets a
# SIGTERM at step 3 and both must save the same preemption step.
_WORKER = """
import os, signal, sys, time
import numpy as np
from bert_jax import distributed
started = distributed.initialize()
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from bert_jax import checkpoint, loop
pid = jax.process_index()
assert started and jax.process_count() == 2 and pid == int(os.environ["SLURM_PROCID"])
mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
values = np.arange(16, dtype=np.float32)
state = {"w": jax.make_array_from_callback(values.shape, NamedSharding(mesh, P("x")),
                                           lambda i: values[i])}
ckpt = checkpoint.Checkpointer(sys.argv[1], every_steps=1000, keep=2)
preemption = loop.Preemption()
saved = None
for step in range(1, 100):
  if pid == 0 and step == 3:
    os.kill(os.getpid(), signal.SIGTERM)
  if preemption.requested(step):
    ckpt.save(step, state, data_position={"step": step}, config=None, force=True)
    saved = step
    break
  time.sleep(0.1)
ckpt.close()
print(f"RESULT processes={jax.process_count()} saved={saved} steps={ckpt.all_steps()}",
      flush=True)
"""


def test_two_slurm_processes_start_the_client_and_save_the_same_preemption_step(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  base = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARIABLES)}
  base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
              SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
              JAX_COORDINATOR_PORT=str(port))
  procs = [subprocess.Popen(
      [sys.executable, "-c", _WORKER, str(tmp_path / "ckpt")], cwd=ROOT,
      env=dict(base, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=180)[0])
  finally:
    for proc in procs:
      proc.kill()
  results = []
  for proc, out in zip(procs, outputs):
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-3000:]
    results.append(lines[-1])
  assert results[0] == results[1], results
  saved = int(results[0].split("saved=")[1].split()[0])
  assert saved >= 3  # not before the notice was sent
  assert results[0] == f"RESULT processes=2 saved={saved} steps=[{saved}]"
