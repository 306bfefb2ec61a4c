"""The real helm on hubml's charts: `helm lint` and `helm template`.

* helm-values/hubml-extras: lint --strict clean; renders what each setting
  promises (ServiceMonitors only where the CRD is served, RBAC per user
  namespace, MLflow's external database) and refuses bad values with a message
  naming the field (its values.schema.json).
* helm-values/values.yaml + overlays against the zero-to-jupyterhub chart's
  own defaults and schema, merged and validated by helm itself: a throwaway
  chart in a temp dir carries ../shared/z2jh's values.yaml and schema (the
  chart's templates are not needed for value validation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hubml_testing.helm_values import (
    EXTRAS_CHART,
    OVERLAYS,
    VALUES_FILE,
    Z2JH_DIR,
    overlay_path,
    run_helm,
    z2jh_chart_files,
)

SM_API = "monitoring.coreos.com/v1/ServiceMonitor"
SR_API = "serving.kserve.io/v1alpha1/ServingRuntime"


def render(*args: str, namespace: str = "hubml") -> list[dict]:
    proc = run_helm("template", "hubml-extras", str(EXTRAS_CHART), "--namespace", namespace, *args)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def test_extras_chart_lints_clean():
    proc = run_helm("lint", "--strict", str(EXTRAS_CHART))
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


def test_default_rendering():
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted([
        "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
        "Role", "RoleBinding",                                # the spawner's quota reads
        "ConfigMap", "Deployment", "Service", "NetworkPolicy",  # hub_ext
        "NetworkPolicy",                                      # training floor
        "PersistentVolumeClaim", "Deployment", "Service",     # MLflow
        "Service", "ConfigMap",                               # culler metrics, scrape config
    ]), kinds
    assert all(d["metadata"].get("namespace", "hubml") == "hubml" for d in docs)
    # no ServiceMonitor without the CRD: plain scrape annotations instead
    assert one(docs, "Service", "hubml-culler-metrics")["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    scrape = yaml.safe_load(one(docs, "ConfigMap", "hubml-prometheus-scrape")["data"]["scrape-configs.yaml"])
    assert [j["job_name"] for j in scrape] == ["hubml-culler", "hubml-hub-ext", "dcgm-exporter"]


def permissions(rules: list[dict]) -> set[tuple[str, str, str]]:
    """RBAC rules as a set of (apiGroup, resource, verb), so rule layout does not matter."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_grants_exactly_what_hub_ext_needs():
    """The chart's Role is hubml.hub_ext.rbac.service_rbac(): hub_ext's own statement of its needs."""
    from hubml.hub_ext.rbac import service_rbac

    docs = render()
    needed_role, _, needed_cluster_role, _ = service_rbac("hubml")
    role = one(docs, "Role", "hubml-hub-ext")
    granted = permissions(role["rules"])
    needed = permissions(needed_role["rules"])
    assert granted == needed, (f"chart grants more: {sorted(granted - needed)}; "
                               f"chart lacks: {sorted(needed - granted)}")
    assert not any(r == "secrets" or g == "rbac.authorization.k8s.io" or "*" in (g, r, v)
                   or v in ("escalate", "bind", "impersonate") for g, r, v in granted)
    cluster = by_kind(docs, "ClusterRole")
    assert len(cluster) == 1
    assert permissions(cluster[0]["rules"]) == permissions(needed_cluster_role["rules"]) == {
        ("", res, verb) for res in ("nodes", "pods") for verb in ("get", "list", "watch")}
    binding = by_kind(docs, "ClusterRoleBinding")[0]
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {("hub", "hubml"), ("hubml-hub-ext", "hubml")}
    # the spawner's quota check (README: "GPU profiles (HubMLSpawner)"): read ResourceQuotas of the hub's namespace
    quota = one(docs, "Role", "hubml-hub-quota-reader")
    assert permissions(quota["rules"]) == {("", "resourcequotas", v) for v in ("get", "list", "watch")}
    assert one(docs, "RoleBinding", "hubml-hub-quota-reader")["subjects"] == [
        {"kind": "ServiceAccount", "name": "hub", "namespace": "hubml"}]


def test_service_monitors_only_where_the_crd_is_served():
    docs = render("--api-versions", SM_API)
    monitors = by_kind(docs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"hubml-culler", "hubml-hub-ext", "hubml-dcgm-exporter"}
    dcgm = one(docs, "ServiceMonitor", "hubml-dcgm-exporter")
    assert dcgm["spec"]["namespaceSelector"]["matchNames"] == ["gpu-operator"]
    assert [c["metadata"]["name"] for c in by_kind(docs, "ConfigMap")] == ["hubml-hub-ext-config"], (
        "the plain scrape config is only for clusters without the operator")
    assert "annotations" not in one(docs, "Service", "hubml-culler-metrics")["metadata"]
    # switched off explicitly: no ServiceMonitor even with the CRD
    docs = render("--api-versions", SM_API, "--set", "monitoring.serviceMonitor.enabled=false")
    assert not by_kind(docs, "ServiceMonitor")


def test_serving_runtime_only_where_kserve_is_served_and_it_fits_hubmls_inference_services():
    from hubml.hub_ext import serving_objects

    assert not by_kind(render(), "ServingRuntime"), "no KServe, no ServingRuntime (helm would fail on the kind)"
    docs = render("--api-versions", SR_API, "--set", "jobsNamespace=hubml-jobs")
    runtime = one(docs, "ServingRuntime", "hubml-mlflow")
    assert runtime["metadata"]["namespace"] == "hubml-jobs"  # beside the InferenceServices that name it
    config = json.loads(one(docs, "ConfigMap", "hubml-hub-ext-config")["data"]["hubml_service_config.json"])
    hub = config["HubMLService"]
    assert hub["kserve_runtime"] == "hubml-mlflow" and hub["kserve_deployment_mode"] == "Standard"
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == hub["serving_image"] == "ghcr.io/hubml/serving:0.1.0"
    assert container["command"] + container["args"][:2] == ["mlflow", "models", "serve", "--model-uri", "/mnt/models"]
    assert "--env-manager" in container["args"] and container["securityContext"]["runAsNonRoot"] is True
    # what KServe matches an InferenceService against: model format and protocol
    plan = serving_objects.ServingPlan(name="iris", namespace="hubml-jobs", username="alice", model="iris/1",
                                       model_name="iris", version=1, storage_uri="s3://b/1/model",
                                       image=hub["serving_image"], runtime=hub["kserve_runtime"]).validate()
    model = serving_objects.inference_service(plan)["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model.get("protocolVersion", "v1") in runtime["spec"]["protocolVersions"]
    # switched off: no runtime, and hub_ext lets KServe choose (kserve_runtime "")
    docs = render("--api-versions", SR_API, "--set", "serving.kserve.runtime.enabled=false")
    assert not by_kind(docs, "ServingRuntime")
    config = json.loads(one(docs, "ConfigMap", "hubml-hub-ext-config")["data"]["hubml_service_config.json"])
    assert config["HubMLService"]["kserve_runtime"] == ""


def test_kserve_storage_map_follows_mlflows_artifact_destination():
    def service_config(*args):
        docs = render(*args)
        text = one(docs, "ConfigMap", "hubml-hub-ext-config")["data"]["hubml_service_config.json"]
        return json.loads(text)["HubMLService"]

    assert "kserve_storage_uri_map" not in service_config()  # artifacts on MLflow's PVC: nothing KServe reads
    config = service_config("--set", "mlflow.artifactsDestination=s3://bucket/mlflow/")
    assert config["kserve_storage_uri_map"] == {"mlflow-artifacts:/": "s3://bucket/mlflow/"}
    config = service_config("--set", "mlflow.artifactsDestination=s3://bucket/mlflow",
                            "--set-json", 'serving.kserve.storageUriMap={"mlflow-artifacts:/":"gs://mirror/a/"}')
    assert config["kserve_storage_uri_map"] == {"mlflow-artifacts:/": "gs://mirror/a/"}  # explicit wins


def test_jobs_namespace_gets_role_and_training_policy():
    docs = render("--set", "jobsNamespace=hubml-jobs")
    for kind, name in (("Role", "hubml-hub-ext"), ("RoleBinding", "hubml-hub-ext"),
                       ("NetworkPolicy", "hubml-training-egress")):
        assert one(docs, kind, name)["metadata"]["namespace"] == "hubml-jobs"
    assert one(docs, "RoleBinding", "hubml-hub-ext")["subjects"] == [
        {"kind": "ServiceAccount", "name": "hubml-hub-ext", "namespace": "hubml"}]
    config = json.loads(one(docs, "ConfigMap", "hubml-hub-ext-config")["data"]["hubml_service_config.json"])
    assert config["HubMLService"]["namespace"] == "hubml-jobs"


def test_hub_ext_config_comes_from_the_same_values(tmp_path, monkeypatch):
    """One profile list for the spawner and hub_ext: the GPU overlay passed to both charts."""
    from hubml.hub_ext.app import HubMLService

    docs = render("-f", str(overlay_path("mig")), "--set", "hubExt.config.max_gpus_per_user=2")
    text = one(docs, "ConfigMap", "hubml-hub-ext-config")["data"]["hubml_service_config.json"]
    config = json.loads(text)["HubMLService"]
    mig = yaml.safe_load(overlay_path("mig").read_text())["hub"]["config"]["HubMLSpawner"]["gpu_profiles"]
    assert config["profiles"] == mig
    assert config["max_gpus_per_user"] == 2
    assert config["mlflow_tracking_uri"] == "http://hubml-mlflow.hubml.svc:5000"
    assert config["mlflow_egress"][0]["to"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "hubml-mlflow"}}
    unknown = sorted(set(config) - set(HubMLService.class_traits(config=True)))
    assert unknown == [], f"the chart configures HubMLService traits that do not exist: {unknown}"
    container = one(docs, "Deployment", "hubml-hub-ext")["spec"]["template"]["spec"]["containers"][0]
    assert "--config=/etc/hubml/hubml_service_config.json" in container["args"]
    # hub_ext itself loads the file as the pod would (--config=...), profiles validated
    path = tmp_path / "hubml_service_config.json"
    path.write_text(text)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "not-used")
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://hub:8081/hub/api")
    app = HubMLService()
    app.initialize([f"--config={path}"])
    assert (app.namespace, app.bind_url, app.service_prefix) == ("hubml", "http://0.0.0.0:8000", "/services/hubml/")
    assert app.policy.catalogue.names() == [p["name"] for p in mig]


def test_training_policy_allows_only_mlflow_and_dns():
    docs = render()
    np = one(docs, "NetworkPolicy", "hubml-training-egress")
    spec = np["spec"]
    assert spec["podSelector"] == {"matchLabels": {"hubml.io/kind": "training"}}
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
    ports = sorted((p["protocol"], p["port"]) for rule in spec["egress"] for p in rule["ports"])
    assert ports == [("TCP", 53), ("TCP", 5000), ("UDP", 53)]
    for rule in spec["egress"]:
        assert rule["to"], "an egress rule without peers would allow every destination"
        assert all("ipBlock" not in peer for peer in rule["to"])


def test_mlflow_with_an_external_database():
    docs = render("--set", "mlflow.database.existingSecret=mlflow-db", "--set", "mlflow.persistence.enabled=false",
                  "--set", "mlflow.artifactsDestination=s3://bucket/mlflow")
    assert not by_kind(docs, "PersistentVolumeClaim")
    container = one(docs, "Deployment", "hubml-mlflow")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert "--artifacts-destination=s3://bucket/mlflow" in container["args"]
    hosts = next(a for a in container["args"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "hubml-mlflow:5000" in hosts and "hubml-mlflow.hubml.svc:5000" in hosts and "*" not in hosts


# Bad values -> helm refuses, naming the field (values.schema.json or `required`).
BAD_EXTRAS = {
    "port not a number": (["--set", "hubExt.port=http"], "/hubExt/port"),
    "namespace not a DNS label": (["--set", "jobsNamespace=Team_A"], "/jobsNamespace"),
    "misspelt key": (["--set", "hubExt.imagee.name=x"], "imagee"),
    "PVC size not a quantity": (["--set", "mlflow.persistence.size=lots"], "/mlflow/persistence/size"),
    "hub ServiceAccount empty": (["--set", "jupyterhub.hubServiceAccount="], "hubServiceAccount"),
    "unknown pull policy": (["--set", "mlflow.image.pullPolicy=Sometimes"], "pullPolicy"),
    "scrape interval without unit": (["--set", "monitoring.serviceMonitor.interval=30"], "interval"),
    "no training selector": (["--set", "trainingNetworkPolicy.podSelector=null"], "trainingNetworkPolicy.podSelector"),
    "unknown KServe mode": (["--set", "serving.kserve.deploymentMode=Fast"], "deploymentMode"),
    "runtime not a DNS label": (["--set", "serving.kserve.runtime.name=MLflow_Runtime"], "/serving/kserve/runtime/name"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXTRAS), ids=sorted(BAD_EXTRAS))
def test_extras_chart_refuses_bad_values(case):
    args, field = BAD_EXTRAS[case]
    proc = run_helm("template", "x", str(EXTRAS_CHART), *args, check=False)
    assert proc.returncode != 0, f"{case}: helm accepted it:\n{proc.stdout[:500]}"
    assert field in proc.stderr, f"{case}: the error does not name {field}:\n{proc.stderr}"


# ---- zero-to-jupyterhub, validated by helm itself -----------------------------


@pytest.fixture(scope="module")
def z2jh_values_chart(tmp_path_factory) -> Path:
    """A chart dir with z2jh's defaults and schema and no templates (temp dir, never the repo)."""
    defaults, schema = z2jh_chart_files()
    chart = tmp_path_factory.mktemp("z2jh") / "jupyterhub"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "jupyterhub", "version": "0.0.0-hubml-values-check",
        "description": f"values and schema of {Z2JH_DIR}", "icon": "https://jupyter.org/favicon.ico",
    }))
    (chart / "values.yaml").write_text((Z2JH_DIR / "values.yaml").read_text())
    (chart / "values.schema.json").write_text(json.dumps(schema))
    (chart / "templates" / "NOTES.txt").write_text("values check only\n")
    assert defaults  # the defaults parsed
    return chart


@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
def test_z2jh_accepts_hubml_values(z2jh_values_chart, overlay):
    files = ["-f", str(VALUES_FILE)] + (["-f", str(overlay_path(overlay))] if overlay else [])
    run_helm("lint", str(z2jh_values_chart), *files)
    run_helm("template", "jhub", str(z2jh_values_chart), *files)


def test_z2jh_check_refuses_bad_values(z2jh_values_chart, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"cull": {"enabled": "no"}, "hub": {"servics": {}}}))
    proc = run_helm("template", "jhub", str(z2jh_values_chart), "-f", str(VALUES_FILE), "-f", str(bad), check=False)
    assert proc.returncode != 0
    assert "cull.enabled" in proc.stderr or "cull/enabled" in proc.stderr, proc.stderr
    assert "servics" in proc.stderr, proc.stderr
