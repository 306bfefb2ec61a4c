"""Kueue's admission step on the test control plane, as MutatingAdmissionPolicies.

Kueue itself (controller, webhooks with their certificates, its CRDs) is not
part of the test cluster. What hubml depends on is what Kueue's webhooks do to
a workload labelled ``kueue.x-k8s.io/queue-name`` when it is created, before
any quota is checked: a ``batch/v1`` Job is made ``suspend: true`` (Kueue's
job webhook), a plain Pod gets the ``kueue.x-k8s.io/admission`` scheduling gate
(its pod integration). The API server does exactly that here, through the
admission API Kubernetes itself serves (``admissionregistration.k8s.io/v1``
MutatingAdmissionPolicy, CEL), bound to one namespace. Nothing ever admits the
workloads, which is what a full ClusterQueue looks like.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from hubml_testing.kube_rest import Rest

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GATE = "kueue.x-k8s.io/admission"
_BASE = "/apis/admissionregistration.k8s.io/v1"
_QUEUED = f"has(object.metadata.labels) && '{QUEUE_LABEL}' in object.metadata.labels"


def _policies(name: str) -> list[tuple[str, dict, dict]]:
    jobs = {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["jobs"]}
    pods = {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
    suspend = "Object{spec: Object.spec{suspend: true}}"
    gate = f'Object{{spec: Object.spec{{schedulingGates: [Object.spec.schedulingGates{{name: "{GATE}"}}]}}}}'
    out = []
    for suffix, rule, expression, extra in (
        ("jobs", jobs, suspend, []),
        # pods a Job owns are the Job's business (Kueue skips them too)
        ("pods", pods, gate, [{"name": "standalone", "expression": "!has(object.metadata.ownerReferences)"}]),
    ):
        policy = {
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": f"{name}-{suffix}"},
            "spec": {
                "matchConstraints": {"resourceRules": [rule]},
                "matchConditions": [{"name": "queued", "expression": _QUEUED}, *extra],
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "mutations": [{"patchType": "ApplyConfiguration", "applyConfiguration": {"expression": expression}}],
            },
        }
        out.append((suffix, policy, rule))
    return out


@contextlib.contextmanager
def kueue_admission(rest: Rest, namespace: str, timeout: float = 30.0) -> Iterator[None]:
    """Within the block, queue-labelled Jobs and Pods created in ``namespace`` are held as Kueue holds them."""
    name = f"hubml-test-kueue-{namespace}"[:60]
    made: list[str] = []
    try:
        for suffix, policy, _ in _policies(name):
            rest.must("POST", f"{_BASE}/mutatingadmissionpolicies", policy)
            made.append(f"{_BASE}/mutatingadmissionpolicies/{policy['metadata']['name']}")
            binding = {
                "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicyBinding",
                "metadata": {"name": policy["metadata"]["name"]},
                "spec": {"policyName": policy["metadata"]["name"], "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}},
            }
            rest.must("POST", f"{_BASE}/mutatingadmissionpolicybindings", binding)
            made.append(f"{_BASE}/mutatingadmissionpolicybindings/{binding['metadata']['name']}")
        _wait_effective(rest, namespace, timeout)
        yield
    finally:
        for path in reversed(made):
            rest.request("DELETE", path)


def _wait_effective(rest: Rest, namespace: str, timeout: float) -> None:
    """The API server loads new policies asynchronously: probe with dry-run creates until both apply."""
    probe_pod = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "kueue-probe", "labels": {QUEUE_LABEL: "probe"}},
                 "spec": {"containers": [{"name": "c", "image": "registry.invalid/probe:1"}]}}
    probe_job = {"apiVersion": "batch/v1", "kind": "Job",
                 "metadata": {"name": "kueue-probe", "labels": {QUEUE_LABEL: "probe"}},
                 "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                     {"name": "c", "image": "registry.invalid/probe:1"}]}}}}
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        _, pod = rest.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", probe_pod)
        _, job = rest.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs?dryRun=All", probe_job)
        gated = [g.get("name") for g in ((pod or {}).get("spec") or {}).get("schedulingGates") or ()] == [GATE]
        suspended = ((job or {}).get("spec") or {}).get("suspend") is True
        if gated and suspended:
            return
        last = (pod, job)
        time.sleep(0.2)
    raise AssertionError(f"the Kueue admission policies did not take effect in {timeout:.0f} s: {last}")
