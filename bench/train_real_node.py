"""``%%train --workers 2`` on the real node against plain torchrun in one pod (issue 11).

Both sides run the same DDP script (train_vs_torchrun.py's: gloo on CPU, rank 0 logs
params, a loss curve and the model to MLflow) from the single-user image on the test
cluster's real kubelet node, with the same MLflow server (on the node's address):

- A: a cell ``%%train --workers 2 --profile cpu-real`` sent to a real IPython kernel whose
  hubml backend is the hub service (JupyterHub + configurable-http-proxy + hub_ext, the
  stack of the hub tests). The service creates the ConfigMap, headless Service and Indexed
  Job; two pods (0.5 CPU, 1500M each) rendezvous at pod 0 and train.
- B: what a user would do by hand without hubml: one bare Pod of the same image, the
  script in a ConfigMap, ``python -m torch.distributed.run --nproc-per-node 2`` with the
  two pods' resources together (1 CPU, 3000M), created with one API call.

Two clocks, both from the first action (cell sent / Pod POSTed), polled every 0.1 s:
"running" until every worker pod reports phase Running, "done" until the cell returns
(A: its final status streamed back) or the pod reports Succeeded (B). One uncounted
warm-up of each, then alternating order; medians and ratios A/B printed side by side.

Usage (as root, on a machine where ``dev/bootstrap`` has run; starts and stops its own
control plane, real node, MLflow and JupyterHub)::

    .venv/bin/python bench/train_real_node.py [--reps 3] [--steps 300]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_ext_common import stack  # noqa: E402  (puts tests/ on sys.path)
from train_vs_torchrun import SCRIPT  # noqa: E402

from hubml.hub_ext import kube as k  # noqa: E402
from hubml.hub_ext import ownership  # noqa: E402
from hubml.hub_ext.pod_fields import security_context  # noqa: E402
from hubml_testing.images import image_archives  # noqa: E402
from hubml_testing.kernel import KernelSession  # noqa: E402
from hubml_testing.kube_control_plane import start_cluster  # noqa: E402
from hubml_testing.kube_node import GATEWAY_IP, REAL_NODE_TOLERATION, start_real_node, stop_real_node  # noqa: E402
from hubml_testing.mlflow_server import _stop as stop_mlflow  # noqa: E402
from hubml_testing.mlflow_server import start_mlflow_server  # noqa: E402
from hubml_testing.node_images import NodeImage  # noqa: E402
from hubml_testing.real_pods import REAL_PROFILE as PROFILE  # noqa: E402
from hubml_testing.real_pods import SINGLEUSER as IMAGE  # noqa: E402

SELECTOR = PROFILE["node_selector"]
ONE_POD = {"cpu": "1", "memory": "3000M"}  # the two %%train pods' resources together
POLL_S = 0.1


async def _until_running(kube: k.Kube, namespace: str, labels: dict[str, str], count: int, t0: float) -> float:
    while True:
        pods = await kube.list(k.POD, namespace, labels=labels)
        phases = [p.get("status", {}).get("phase") for p in pods]
        if len(pods) == count and all(ph in ("Running", "Succeeded") for ph in phases):
            return time.perf_counter() - t0
        if "Failed" in phases:
            raise SystemExit(f"a worker pod failed: {[p['metadata']['name'] for p in pods]}")
        await asyncio.sleep(POLL_S)


async def run_magic(svc: Any, kernel: KernelSession, script: str, seen: set[str]) -> tuple[float, float]:
    """A: the cell on the hub backend; (to all workers Running, to the cell's return)."""
    t0 = time.perf_counter()
    cell = asyncio.create_task(asyncio.to_thread(
        kernel.run, "%%train --workers 2 --profile cpu-real --experiment bench\n" + script, timeout=900))
    job_id = None
    while job_id is None:  # the job's id comes from the service's list, as the notebook sees it
        status, jobs = await asyncio.to_thread(svc.call, "GET", "/jobs", user="alice")
        new = [j["id"] for j in jobs if j["id"] not in seen] if status == 200 else []
        job_id = new[0] if new else None
        if cell.done() and job_id is None:
            raise SystemExit(f"%%train returned before a job appeared:\n{cell.result()}")
        await asyncio.sleep(POLL_S)
    seen.add(job_id)
    running = await _until_running(svc.kube, svc.namespace, {ownership.LABEL_JOB: job_id}, 2, t0)
    res = await cell
    done = time.perf_counter() - t0
    if res.status != "ok" or "succeeded" not in res.text:
        raise SystemExit(f"%%train failed:\n{res.text[-4000:]}")
    return running, done


async def run_pod(svc: Any, script: str, mlflow_url: str) -> tuple[float, float]:
    """B: one Pod running torchrun by hand; (to Running, to Succeeded)."""
    name = f"bench-torchrun-{secrets.token_hex(3)}"
    ns = svc.namespace
    await svc.kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
                           "data": {"train.py": script}})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"bench": name}},
           "spec": {
               "restartPolicy": "Never", "automountServiceAccountToken": False, "enableServiceLinks": False,
               "nodeSelector": SELECTOR, "tolerations": [REAL_NODE_TOLERATION],
               "volumes": [{"name": "code", "configMap": {"name": name}},
                           {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
               "containers": [{
                   "name": "torchrun", "image": IMAGE, "securityContext": security_context(),
                   "command": ["python", "-m", "torch.distributed.run", "--nproc-per-node", "2", "/code/train.py"],
                   "env": [{"name": "MLFLOW_TRACKING_URI", "value": mlflow_url},
                           {"name": "MLFLOW_EXPERIMENT_NAME", "value": "bench"},
                           {"name": "PYTHONUNBUFFERED", "value": "1"}],
                   "resources": {"requests": ONE_POD, "limits": ONE_POD},
                   "volumeMounts": [{"name": "code", "mountPath": "/code", "readOnly": True},
                                    {"name": "dshm", "mountPath": "/dev/shm"}]}]}}
    t0 = time.perf_counter()
    await svc.kube.create(pod)
    running = await _until_running(svc.kube, ns, {"bench": name}, 1, t0)
    while True:
        phase = (await svc.kube.get(k.POD, ns, name)).get("status", {}).get("phase")
        if phase == "Succeeded":
            done = time.perf_counter() - t0
            break
        if phase == "Failed":
            log = await svc.kube.pod_log(ns, name)
            raise SystemExit(f"torchrun pod failed:\n{log[-3000:]}")
        await asyncio.sleep(POLL_S)
    await svc.kube.delete(k.POD, ns, name)
    await svc.kube.delete(k.CONFIG_MAP, ns, name)
    return running, done


async def bench(reps: int, steps: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hubml-bench-node-"))
    script = SCRIPT.replace("STEPS", str(steps))
    t = time.perf_counter()
    cluster = start_cluster()
    node = mlflow_proc = svc = kernel = None
    try:
        node = start_real_node(cluster)
        print(f"control plane + real node up in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        node.import_image(NodeImage(IMAGE, image_archives(["singleuser"])[IMAGE]))
        print(f"single-user image present on the node after {time.perf_counter() - t:.1f} s")
        mlflow, mlflow_proc = start_mlflow_server(tmp / "mlflow", host=GATEWAY_IP)
        extra = "\n".join([f"c.HubMLService.profiles = {[*stack.PROFILES, PROFILE]!r}",
                           f"c.HubMLService.default_image = {IMAGE!r}",
                           "c.HubMLService.extra_pod_annotations = {}"])
        svc = await stack.start_stack(cluster, mlflow.url, tmp, users=["alice"], extra_config=extra)
        kernel = KernelSession(tmp / "home", load_ext=True, extra_env={
            "JUPYTERHUB_API_TOKEN": svc.tokens["alice"], "JUPYTERHUB_API_URL": svc.hub.api_url,
            "HUBML_SERVICE_URL": svc.url, "JUPYTERHUB_USER": "alice", "HUBML_LIVE_VIEW": "text"})
        seen: set[str] = set()
        a = await run_magic(svc, kernel, script, seen)
        print(f"warm-up  %%train   running {a[0]:6.2f} s  done {a[1]:6.2f} s")
        b = await run_pod(svc, script, mlflow.url)
        print(f"warm-up  torchrun  running {b[0]:6.2f} s  done {b[1]:6.2f} s")
        magic: list[tuple[float, float]] = []
        plain: list[tuple[float, float]] = []
        for rep in range(reps):
            order = ["magic", "pod"] if rep % 2 == 0 else ["pod", "magic"]
            for side in order:
                if side == "magic":
                    magic.append(await run_magic(svc, kernel, script, seen))
                else:
                    plain.append(await run_pod(svc, script, mlflow.url))
            print(f"rep {rep + 1}: %%train running {magic[-1][0]:6.2f} s done {magic[-1][1]:6.2f} s | "
                  f"torchrun pod running {plain[-1][0]:6.2f} s done {plain[-1][1]:6.2f} s")
        for i, what in ((0, "to all workers Running"), (1, "to the end (cell returns / pod Succeeded)")):
            ma, pb = statistics.median(m[i] for m in magic), statistics.median(p[i] for p in plain)
            print(f"median {what}: %%train {ma:6.2f} s  torchrun pod {pb:6.2f} s  ratio {ma / pb:.3f}")
    finally:
        if kernel is not None:
            kernel.shutdown()
        if svc is not None:
            await stack.stop_stack(svc)
        if mlflow_proc is not None:
            stop_mlflow(mlflow_proc)
        if node is not None:
            stop_real_node(cluster, node)
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="counted repetitions of each side (default 3)")
    parser.add_argument("--steps", type=int, default=300, help="training steps in the script (default 300)")
    args = parser.parse_args()
    asyncio.run(bench(args.reps, args.steps))


if __name__ == "__main__":
    main()
