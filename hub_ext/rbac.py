"""The hub service's own RBAC, as manifests (pure): what the chart grants and the tests compare."""

from __future__ import annotations

from typing import Any

def service_rbac(namespace: str, service_account: str = "hubml",
                 service_account_namespace: str | None = None) -> list[dict[str, Any]]:
    """The least privilege the hub service needs: a Role in the jobs namespace, plus
    read-only nodes/pods cluster-wide for profile availability (optional: without
    the ClusterRole the service runs and leaves availability out).

    No rights on Secrets, RBAC, namespaces or anything outside ``namespace``;
    training pods get no token (``automountServiceAccountToken: false``).
    """
    sa_ns = service_account_namespace or namespace
    verbs_rw = ["create", "get", "list", "watch", "patch", "delete"]
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "hubml-service", "namespace": namespace},
            "rules": [
                {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": list(verbs_rw)},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["services", "configmaps"],
                 "verbs": ["create", "get", "patch", "delete"]},
                {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
                 "verbs": ["create", "get", "patch", "delete"]},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": list(verbs_rw)},
                {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"],
                 "verbs": ["create", "get", "patch", "delete"]},
                {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": list(verbs_rw)},
                {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": list(verbs_rw)},
                {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": list(verbs_rw)},
            ]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "hubml-service", "namespace": namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "hubml-service"},
               "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": sa_ns}]}
    cluster_role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": f"hubml-service-availability-{namespace}"},
                    "rules": [{"apiGroups": [""], "resources": ["nodes", "pods"], "verbs": ["get", "list", "watch"]}]}
    cluster_binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                       "metadata": {"name": f"hubml-service-availability-{namespace}"},
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                   "name": f"hubml-service-availability-{namespace}"},
                       "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": sa_ns}]}
    return [role, binding, cluster_role, cluster_binding]

