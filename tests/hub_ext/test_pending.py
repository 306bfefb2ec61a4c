"""Why a job or server is Pending, in words: the pure explanation, then real pods on the test control plane.

On the cluster the reasons come from the real kube-scheduler (a worker asking
for more CPU than any node has) and from Kueue's admission step (queue-labelled
Jobs created suspended, plain pods gated; hubml_testing.kueue does it with the
API server's own MutatingAdmissionPolicy). The reason must show within one poll
of the live view, in %train_status, and while %train_logs --follow waits.
"""

from __future__ import annotations

import asyncio
import io

import pytest

from hubml import pending
from hubml.hub_ext import kube as k
from hubml.hub_ext import training_objects
from hubml.jobs import JobState, JobStatus
from hubml.profile_config import load_catalogue
from hubml_testing.kube import wait_for
from hubml_testing.kueue import GATE, kueue_admission

from .conftest import PROFILES, running_stack


def _pod(rank: int = 0, *, phase: str = "Pending", labels=None, gates=(), conditions=(), waiting=None) -> dict:
    status: dict = {"phase": phase, "conditions": list(conditions)}
    if waiting:
        status["containerStatuses"] = [{"name": "worker", "image": "registry.example.org/ml/t:1",
                                        "state": {"waiting": waiting}}]
    return {"metadata": {"name": f"p{rank}", "labels": dict(labels or {})},
            "spec": {"schedulingGates": [{"name": g} for g in gates]} if gates else {}, "status": status}


UNSCHEDULABLE = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/12 nodes are available: 12 Insufficient nvidia.com/gpu. preemption: 0/12 nodes "
                            "are available: 12 No preemption victims found for incoming pod."}


@pytest.mark.parametrize("pod, expected", [
    (_pod(conditions=[UNSCHEDULABLE]), "cannot be scheduled (Unschedulable): 0/12 nodes are available: 12 "
                                       "Insufficient nvidia.com/gpu."),
    (_pod(gates=[GATE], labels={pending.KUEUE_QUEUE_LABEL: "team-a"},
          conditions=[{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]),
     "queued in Kueue LocalQueue 'team-a'"),
    (_pod(gates=[GATE]), "held by Kueue (scheduling gate kueue.x-k8s.io/admission)"),
    (_pod(gates=["example.com/wait-for-volume"]), "held by scheduling gate(s) example.com/wait-for-volume"),
    (_pod(waiting={"reason": "ImagePullBackOff", "message": "Back-off pulling image"}),
     "cannot pull image 'registry.example.org/ml/t:1' (ImagePullBackOff): Back-off pulling image"),
    (_pod(waiting={"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}),
     "container 'worker' cannot start (CreateContainerConfigError): secret \"s3\" not found"),
])
def test_pod_reasons(pod, expected):
    assert expected in pending.pod_reason(pod)


@pytest.mark.parametrize("pod", [
    _pod(),                                                         # just created: nothing to say yet
    _pod(waiting={"reason": "ContainerCreating"}),                  # starting normally
    _pod(phase="Running", conditions=[UNSCHEDULABLE]),              # stale condition on a running pod
    _pod(phase="Failed"),
])
def test_no_reason_when_there_is_nothing_to_explain(pod):
    assert pending.pod_reason(pod) == ""


def test_job_reason_groups_ranks_and_puts_the_queue_first():
    pods = {r: _pod(r, conditions=[UNSCHEDULABLE]) for r in range(4)}
    msg = pending.job_reason({"metadata": {}, "spec": {}}, pods, 4)
    assert msg.startswith("Pending: All 4 workers cannot be scheduled (Unschedulable): 0/12 nodes") and msg.count(
        "Insufficient") == 1
    pods[3] = _pod(3, waiting={"reason": "ErrImagePull", "message": "not found"})
    msg = pending.job_reason({"metadata": {}, "spec": {}}, pods, 4)
    assert "Workers 0, 1, 2 cannot be scheduled" in msg and "Worker 3 cannot pull image" in msg
    queued = {"metadata": {"labels": {pending.KUEUE_QUEUE_LABEL: "team-a"}}, "spec": {"suspend": True}}
    assert pending.job_reason(queued, {}, 4).startswith("Queued in Kueue LocalQueue 'team-a'")
    # admitted (unsuspended): the pods' own reasons again
    admitted = {**queued, "spec": {"suspend": False}}
    assert pending.job_reason(admitted, pods, 4).startswith("Pending: Workers 0, 1, 2")
    pytorchjob = {**queued, "spec": {"runPolicy": {"suspend": True}}}
    assert "team-a" in pending.job_reason(pytorchjob, {}, 2)


def test_queue_profile_labels_the_job_and_its_pods_only():
    from hubml.hub_ext import policy as pol
    from hubml.jobs import TrainSpec

    catalogue = load_catalogue([*PROFILES, {"name": "queued", "display": "Queued", "cpu": 1, "queue": "team-a"}])
    policy = pol.Policy(namespace="ns", catalogue=catalogue, default_image="quay.io/hubml/runtime:1",
                        serving_image="quay.io/hubml/serving:1", max_gpus_per_user=8)
    plan = pol.plan_training(policy, pol.Caller("alice"), TrainSpec(code="print(1)\n", workers=2, profile="queued"),
                             job_id="train-q123456789", mlflow_env={"MLFLOW_RUN_ID": "r"}, record={"workers": 2})
    for manifest in (training_objects.indexed_job(plan), training_objects.pytorch_job(plan),
                     training_objects.train_job(plan)):
        assert manifest["metadata"]["labels"][pending.KUEUE_QUEUE_LABEL] == "team-a", manifest["kind"]
    job = training_objects.indexed_job(plan)
    assert job["spec"]["template"]["metadata"]["labels"][pending.KUEUE_QUEUE_LABEL] == "team-a"
    for dependant in (training_objects.code_config_map(plan), training_objects.rendezvous_service(plan)):
        assert pending.KUEUE_QUEUE_LABEL not in dependant["metadata"]["labels"]  # not workloads
    assert pending.KUEUE_QUEUE_LABEL not in catalogue.get("queued").pod_annotations()


# ---------------------------------------------------------------- on the cluster

EXTRA_PROFILES = [
    # more CPU than any node of dev/kube/topology.yaml has: the real scheduler says Insufficient cpu
    {"name": "too-big", "display": "Too big", "cpu": 500, "memory": "1G"},
    {"name": "queued", "display": "Queued CPU", "cpu": 1, "memory": "1G", "queue": "team-a"},
]


@pytest.fixture(scope="module")
async def pending_service(kube_cluster, mlflow_server, tmp_path_factory):
    profiles = repr([*PROFILES, *EXTRA_PROFILES])  # a Python literal in the service's config file
    async for svc in running_stack(kube_cluster, mlflow_server, tmp_path_factory.mktemp("pending"),
                                   extra_config=f"c.HubMLService.profiles = {profiles}"):
        with kueue_admission(kube_cluster.rest, svc.namespace):
            yield svc


class _Backend:
    """What the magics' hub backend returns, read straight from the service (one GET = one poll)."""

    def __init__(self, svc):
        self.svc = svc

    def job(self, job_id: str) -> JobStatus:
        status, body = self.svc.call("GET", f"/jobs/{job_id}")
        assert status == 200, body
        return JobStatus.from_dict(body)


async def _submit(svc, profile: str) -> str:
    status, job = await asyncio.to_thread(svc.call, "POST", "/jobs", {"code": "print(1)\n", "workers": 2,
                                                                     "profile": profile})
    assert status == 201, job
    return job["id"]


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_unschedulable_workers_are_explained_within_one_poll(pending_service, kernel_factory):
    svc = pending_service
    job_id = await _submit(svc, "too-big")

    async def scheduler_said():
        pods = await svc.kube.list(k.POD, svc.namespace, labels={"hubml.io/job": job_id})
        conds = [c for p in pods for c in (p.get("status") or {}).get("conditions") or ()
                 if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"]
        return len(conds) == 2 or None

    await wait_for(scheduler_said, timeout=60, what="the scheduler to mark both workers Unschedulable")
    # the very next read says why, in the scheduler's words
    status = await asyncio.to_thread(_Backend(svc).job, job_id)
    assert status.state is JobState.PENDING
    assert status.message.startswith("Pending: All 2 workers cannot be scheduled (Unschedulable): 0/"), status.message
    assert "Insufficient cpu" in status.message

    # the live view (text form) prints it on its first update; %train_logs --follow says it and keeps waiting
    from hubml.magics.watch import TextView

    out = io.StringIO()
    view = TextView(out)
    view.start(status)
    assert "Insufficient cpu" in out.getvalue()

    from hubml.magics import watch

    class Following(_Backend):
        reads = 0

        def read_logs(self, job_id, cursor):
            Following.reads += 1
            if Following.reads >= 3:  # stop following after three polls, as Ctrl-C does
                raise KeyboardInterrupt
            from hubml.jobs import LogChunk

            return LogChunk(lines=[], next_cursor=cursor)

    follow_out = io.StringIO()
    final = await asyncio.to_thread(watch.follow_logs, Following(svc), job_id, poll=0.1, out=follow_out)
    assert final.state is JobState.PENDING and Following.reads == 3  # waited through Pending
    text = follow_out.getvalue()
    assert f"({job_id} is pending: Pending: All 2 workers cannot be scheduled" in text and text.count("pending:") == 1

    # and %train_status in a real kernel on the hub backend
    kernel = await asyncio.to_thread(kernel_factory, extra_env={
        "JUPYTERHUB_API_TOKEN": svc.tokens["alice"], "JUPYTERHUB_API_URL": svc.hub.api_url,
        "HUBML_SERVICE_URL": svc.url, "JUPYTERHUB_USER": "alice"})
    res = await asyncio.to_thread(kernel.run_ok, f"%train_status {job_id}")
    assert "pending" in res.text and "Insufficient cpu" in res.text, res.text
    assert (await asyncio.to_thread(svc.call, "POST", f"/jobs/{job_id}/cancel"))[0] == 200


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_a_kueue_queued_job_says_which_queue_holds_it(pending_service):
    svc = pending_service
    job_id = await _submit(svc, "queued")
    job = await svc.kube.get(k.JOB, svc.namespace, job_id)
    assert job["metadata"]["labels"][pending.KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["suspend"] is True  # held at admission, as Kueue's webhook does
    status = await asyncio.to_thread(_Backend(svc).job, job_id)
    assert status.state is JobState.PENDING
    assert status.message.startswith("Queued in Kueue LocalQueue 'team-a'"), status.message
    # no pod exists while queued
    assert await svc.kube.list(k.POD, svc.namespace, labels={"hubml.io/job": job_id}) == []
    # cancelling a queued job removes it without ever unsuspending it (no pod behind Kueue's back)
    status, body = await asyncio.to_thread(svc.call, "POST", f"/jobs/{job_id}/cancel")
    assert status == 200 and body["state"] == "cancelled" and "no worker ran" in body["message"], body
    assert await svc.kube.get_or_none(k.JOB, svc.namespace, job_id) is None
    assert await svc.kube.list(k.POD, svc.namespace, labels={"hubml.io/job": job_id}) == []


@pytest.mark.kube
@pytest.mark.hub
async def test_a_gated_server_pod_on_a_queued_profile_names_its_queue(pending_service, kube_cluster):
    """A plain pod (a notebook server) with the profile's labels is gated; the real scheduler reports
    SchedulingGated, and the explanation the spawner's progress shows names the queue."""
    from hubml.profile_config import load_catalogue as load

    svc = pending_service
    labels = load(EXTRA_PROFILES).get("queued").pod_labels()
    pod = kube_cluster.rest.must("POST", f"/api/v1/namespaces/{svc.namespace}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "jupyter-alice", "labels": labels},
        "spec": {"containers": [{"name": "notebook", "image": "registry.invalid/ml/base:1"}]}})
    assert [g["name"] for g in pod["spec"]["schedulingGates"]] == [GATE]

    def gated():
        _, live = kube_cluster.rest.request("GET", f"/api/v1/namespaces/{svc.namespace}/pods/jupyter-alice")
        conds = [c for c in (live.get("status") or {}).get("conditions") or () if c.get("type") == "PodScheduled"]
        return live if conds and conds[0].get("reason") == "SchedulingGated" else None

    live = await wait_for(lambda: asyncio.to_thread(gated), timeout=30, what="the scheduler to see the gate")
    assert pending.pod_reason(live).startswith("queued in Kueue LocalQueue 'team-a'")
    kube_cluster.rest.request("DELETE", f"/api/v1/namespaces/{svc.namespace}/pods/jupyter-alice")
