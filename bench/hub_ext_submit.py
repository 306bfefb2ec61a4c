"""Submit-to-all-workers-Running of an 8-worker ``%%train`` job through the hub service.

A: ``POST /services/hubml/api/v1/jobs`` (what ``%%train --workers 8`` sends from a
   notebook) through configurable-http-proxy: token check with JupyterHub, policy,
   MLflow run creation, Job (suspended) + ConfigMap + headless Service +
   NetworkPolicy, resume; timed until the API server reports all 8 pods Running
   (scheduled by kube-scheduler, started by kwok).
B: the peer: the same Indexed Job manifest created directly with cluster-admin
   credentials (what ``kubectl apply`` does), not suspended, no MLflow run, no
   dependants; timed the same way.

Alternating, ``--reps`` counted repetitions after one warm-up of each; prints each
repetition, the medians, the ratio A/B and A against the 3 s target.

Usage::

    .venv/bin/python bench/hub_ext_submit.py [--reps 5] [--workers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time

from hub_ext_common import running_stack

from hubml.hub_ext import kube as k
from hubml.hub_ext import ownership, training_objects


async def _all_running(svc, job_id: str, workers: int, t0: float) -> float:
    while True:
        pods = await svc.kube.list(k.POD, svc.namespace, labels={ownership.LABEL_JOB: job_id})
        if len(pods) == workers and all((p.get("status") or {}).get("phase") == "Running" for p in pods):
            return time.perf_counter() - t0
        await asyncio.sleep(0.02)


SUBMIT_ANSWERED: list[float] = []


async def via_service(svc, workers: int) -> float:
    t0 = time.perf_counter()
    status, job = await asyncio.to_thread(svc.call, "POST", "/jobs", {"code": "print('x')\n", "workers": workers})
    if status != 201:
        raise RuntimeError(f"submit failed: {status} {job}")
    answered = time.perf_counter() - t0
    elapsed = await _all_running(svc, job["id"], workers, t0)
    SUBMIT_ANSWERED.append(answered)
    await asyncio.to_thread(svc.call, "POST", f"/jobs/{job['id']}/cancel")
    return elapsed


async def direct(svc, workers: int) -> float:
    job_id = f"raw-{secrets.token_hex(4)}"
    plan = training_objects.TrainingPlan(job_id=job_id, namespace=svc.namespace, username="alice",
                                image="quay.io/hubml/runtime:1", code="print('x')\n", workers=workers,
                                resources={"requests": {"cpu": "1", "memory": "1073741824"}},
                                pod_annotations={"kwok.hubml.io/outcome": "run"}, suspend=False)
    manifest = training_objects.indexed_job(plan)
    t0 = time.perf_counter()
    await svc.kube.create(manifest)
    elapsed = await _all_running(svc, job_id, workers, t0)
    await svc.kube.delete(k.JOB, svc.namespace, job_id, propagation="Background")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    extra = "c.HubMLService.max_active_jobs_per_user = 1000\nc.HubMLService.max_workers = 64\n"
    async with running_stack(["alice"], extra_config=extra) as (svc, _cluster):
        print(f"warm-up: service {await via_service(svc, args.workers):.3f} s, "
              f"direct {await direct(svc, args.workers):.3f} s")
        a, b = [], []
        for rep in range(1, args.reps + 1):
            a.append(await via_service(svc, args.workers))
            b.append(await direct(svc, args.workers))
            print(f"rep {rep}: service {a[-1]:.3f} s   direct {b[-1]:.3f} s")
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"of which the POST itself answered in (median) {statistics.median(SUBMIT_ANSWERED[1:]):.3f} s")
        print(f"median: service {ma:.3f} s, direct Job {mb:.3f} s; ratio service/direct = {ma / mb:.2f}")
        print(f"submit-to-{args.workers}-workers-Running {ma:.3f} s (target < 3 s): "
              f"{'OK' if ma < 3 else 'OVER TARGET'}")


if __name__ == "__main__":
    asyncio.run(main())
