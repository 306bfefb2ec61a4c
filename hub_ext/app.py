"""``HubMLService``: the hub service process (``python -m hubml.hub_ext``).

A JupyterHub service (managed or external): it reads the standard service
variables (``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_API_URL``,
``JUPYTERHUB_SERVICE_PREFIX``, ``JUPYTERHUB_SERVICE_URL``), authenticates
callers through ``jupyterhub.services.auth.HubAuth`` and acts in the cluster
with its own Kubernetes service account. Everything it needs is a traitlet
with ``help``; bad configuration stops it at startup with the reason, before
it listens.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from typing import Any
from urllib.parse import urlsplit

from jupyterhub.services.auth import HubAuth
from tornado import httpserver, web
from traitlets import Bool, Dict, Enum, Float, Integer, List, Unicode, default, validate
from traitlets.config import Application

from hubml import names
from hubml.errors import InvalidRequest
from hubml.availability import UsageIndex
from hubml.profile_config import load_catalogue
from hubml.profiles import ProfileConfigError
from hubml.registry import Registry

from . import handlers
from . import kube as k
from . import training_objects
from .endpoints import KSERVE_URL_FIELDS, Endpoints, check_template
from .policy import Caller, Policy
from .serving import KServeSettings, Serving
from .training import CrdCache, JobReflector, Training

#: What a user does when the cluster's MLflow fails: nothing they can fix themselves.
MLFLOW_DOWN_STEP = "retry in a minute; if it persists, tell the hub administrator that MLflow is unreachable."


class HubMLService(Application):
    name = "hubml-service"
    description = "hubml's JupyterHub service: training jobs, models and deployments on Kubernetes."

    config_file = Unicode("hubml_service_config.py", help="Python config file to load (traitlets).").tag(config=True)
    aliases = {"config": "HubMLService.config_file", "log-level": "Application.log_level"}

    # ---------------------------------------------------------------- where it listens
    service_prefix = Unicode(help="URL prefix the proxy routes to the service (JUPYTERHUB_SERVICE_PREFIX).").tag(
        config=True)

    @default("service_prefix")
    def _default_prefix(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/hubml/")

    @validate("service_prefix")
    def _check_prefix(self, proposal: Any) -> str:
        value = proposal.value
        if not value.startswith("/"):
            raise ValueError(f"service_prefix {value!r} must start with '/'.")
        return value if value.endswith("/") else value + "/"

    bind_url = Unicode(help="Where to listen, e.g. http://0.0.0.0:8000 (default: JUPYTERHUB_SERVICE_URL).").tag(
        config=True)

    @default("bind_url")
    def _default_bind(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "http://0.0.0.0:10101")

    # ---------------------------------------------------------------- Kubernetes
    namespace = Unicode("hubml-jobs", help="Namespace where every user's jobs and deployments live (shared, "
                                           "scoped by the hubml.io/user label).").tag(config=True)

    @validate("namespace")
    def _check_namespace(self, proposal: Any) -> str:
        try:
            return names.dns_label(proposal.value, "namespace")
        except InvalidRequest as e:
            raise ValueError(str(e)) from None

    kubeconfig = Unicode("", help="Kubeconfig file; empty = the pod's service account (in-cluster).").tag(config=True)
    training_flavour = Enum(["auto", "job", "pytorchjob", "trainjob"], "auto",
                            help="Training objects: 'job' (Indexed Job + headless Service), 'pytorchjob' (Kubeflow "
                                 "training operator v1), 'trainjob' (Kubeflow Trainer v2 TrainJob on "
                                 "trainjob_runtime) or 'auto': PyTorchJob when its CRD is installed, else TrainJob "
                                 "when its CRD is installed, else 'job'. An explicit operator flavour whose CRD the "
                                 "cluster lacks stops the service at startup.").tag(config=True)
    trainjob_runtime = Unicode("torch-distributed",
                               help="The Kubeflow Trainer runtime TrainJobs reference (spec.runtimeRef.name): the "
                                    "stock 'torch-distributed' ClusterTrainingRuntime, or an administrator's own "
                                    "Torch runtime whose replicated job and container are both named 'node'."
                               ).tag(config=True)
    trainjob_runtime_kind = Enum(["ClusterTrainingRuntime", "TrainingRuntime"], "ClusterTrainingRuntime",
                                 help="Kind of trainjob_runtime: a cluster-wide ClusterTrainingRuntime, or a "
                                      "TrainingRuntime in the jobs namespace.").tag(config=True)

    @validate("trainjob_runtime")
    def _check_trainjob_runtime(self, proposal: Any) -> str:
        try:
            training_objects.TrainerRuntime(name=proposal.value).validate()
        except InvalidRequest as e:
            raise ValueError(str(e)) from None
        return proposal.value
    serving_flavour = Enum(["auto", "kserve", "deployment"], "auto",
                           help="Serving objects: 'kserve' (InferenceService), 'deployment' (Deployment + Service + "
                                "HPA running MLflow's scoring server) or 'auto' (KServe when its CRD is "
                                "installed).").tag(config=True)
    deployment_url_template = Unicode(
        "",
        help="Base URL where notebook pods reach a deployment, for clusters that expose models through an ingress "
             "or gateway, e.g. 'https://models.example.org/{namespace}/{name}'. Placeholders: {name} (deployment), "
             "{namespace}, {user} (the owner's label-safe name), {flavour} ('deployment' or 'kserve'). hubml "
             "appends the protocol path: /invocations (MLflow's scoring server: Deployment flavour, KServe with the "
             "hubml-mlflow runtime) or /v2/models/{name}/infer (KServe's own MLflow runtime, Open Inference Protocol). Empty (default): in-cluster DNS, http://{name}.{namespace}.svc.cluster.local "
             "for the Deployment flavour and http://{name}-predictor.{namespace}.svc.cluster.local for KServe. An "
             "InferenceService's own reported URL (see kserve_url_field) wins over this template once KServe has "
             "set it.").tag(config=True)

    @validate("deployment_url_template")
    def _check_url_template(self, proposal: Any) -> str:
        return check_template(proposal.value) if proposal.value else ""

    kserve_url_field = Enum(list(KSERVE_URL_FIELDS), "address",
                            help="Which URL an InferenceService reports is used for %predict once KServe has set "
                                 "it: 'address' (status.address.url, cluster-local: right for notebook pods in the "
                                 "cluster), 'url' (status.url, through KServe's ingress domain) or 'none' (always "
                                 "deployment_url_template / the in-cluster default).").tag(config=True)
    kserve_deployment_mode = Unicode(
        "Standard",
        help="How new InferenceServices are deployed (annotation serving.kserve.io/deploymentMode): 'Standard' "
             "(raw Kubernetes Deployments, KServe's default; legacy name RawDeployment) or 'Knative' (legacy "
             "Serverless; needs Knative Serving). It decides how %deploy --canary splits traffic: Standard uses "
             "named canaries (spec.canary[], KServe >= 0.20, detected from the CRD's schema), Knative "
             "canaryTrafficPercent. Existing InferenceServices keep the mode they were made with.").tag(config=True)

    @validate("kserve_deployment_mode")
    def _check_kserve_mode(self, proposal: Any) -> str:
        from .canary import normal_mode

        return normal_mode(proposal.value)

    kserve_runtime = Unicode(
        "hubml-mlflow",
        help="The ServingRuntime (in the jobs namespace) or ClusterServingRuntime InferenceServices name: "
             "'hubml-mlflow' (a ServingRuntime of helm-values/hubml-extras) runs MLflow's own scoring server (`mlflow models serve`, "
             "protocol /invocations) from the serving image. Empty: let KServe choose its runtime for "
             "modelFormat mlflow (MLServer, Open Inference Protocol v2; MLflow dropped that integration).").tag(
        config=True)

    @validate("kserve_runtime")
    def _check_kserve_runtime(self, proposal: Any) -> str:
        if proposal.value:
            try:
                names.dns_label(proposal.value, "kserve_runtime")
            except InvalidRequest as e:
                raise ValueError(str(e)) from None
        return proposal.value

    kserve_storage_uri_map = Dict(
        key_trait=Unicode(), value_trait=Unicode(),
        help="Where KServe's storage initializer finds what the MLflow registry calls a model's location: URI "
             "prefix -> readable prefix (s3://, gs://, https://, pvc://, hdfs://, webhdfs://, oci://, hf://). E.g. "
             "{'mlflow-artifacts:/': 's3://mlflow/artifacts/'} for a tracking server started with "
             "--artifacts-destination s3://mlflow/artifacts, or {'file:///mlflow/artifacts/': "
             "'pvc://mlflow-artifacts/'} for one writing to a volume. A model whose location stays unreadable "
             "(mlflow-artifacts:, file:, models:, runs:) is refused by %deploy on KServe, with nothing "
             "created.").tag(config=True)

    @validate("kserve_storage_uri_map")
    def _check_storage_map(self, proposal: Any) -> dict[str, str]:
        from .storage_uris import check_map

        return check_map(proposal.value)

    extra_pod_annotations = Dict(
        key_trait=Unicode(), value_trait=Unicode(),
        help="Annotations added to every training pod (e.g. for a scheduler, a mesh, or test simulation).",
    ).tag(config=True)
    crd_cache_seconds = Float(30.0, help="How long the detected CRDs (PyTorchJob, TrainJob, InferenceService) are "
                                         "trusted before asking the API server again.").tag(config=True)
    use_informers = Bool(True, help="Answer job reads from watch-updated copies of Jobs and Pods (KubeSpawner's "
                                    "reflector) instead of asking the API server on every request.").tag(config=True)
    profile_availability = Bool(True, help="Report free GPUs per profile (needs list nodes/pods cluster-wide; "
                                           "without the ClusterRole, availability is left out).").tag(config=True)

    # ---------------------------------------------------------------- profiles and limits
    profiles = List(help="The GPU profile catalogue (same list as HubMLSpawner.gpu_profiles).").tag(config=True)
    profiles_file = Unicode("", help="YAML file holding the profile list (used when `profiles` is empty).").tag(
        config=True)
    default_image = Unicode(
        "ghcr.io/hubml/singleuser:0.1.0",
        help="Training image for profiles without an image choice: the single-user image "
             "(helm-values/images/singleuser.Dockerfile), so workers import what the notebook imports (torch, "
             "mlflow, which every %%train cell's rank 0 logs with). Pin a version; an image without mlflow fails "
             "every job.").tag(config=True)
    serving_image = Unicode(
        "ghcr.io/hubml/serving:0.1.0",
        help="Image of MLflow's scoring server (helm-values/images/serving.Dockerfile: mlflow and torch, so a "
             "PyTorch model loads; ghcr.io/mlflow/mlflow has no torch), run by the Deployment flavour and by the "
             "hubml-mlflow ServingRuntime.").tag(config=True)
    allowed_images = List(Unicode(), help="Anchored regexes of extra images a job may ask for.").tag(config=True)

    @validate("allowed_images")
    def _check_images(self, proposal: Any) -> list[str]:
        for rx in proposal.value:
            if not (rx.startswith("^") and rx.endswith("$")):
                raise ValueError(f"allowed_images entry {rx!r} must start with '^' and end with '$'.")
            try:
                re.compile(rx)
            except re.error as e:
                raise ValueError(f"allowed_images entry {rx!r} does not compile: {e}") from None
        return proposal.value

    max_gpus_per_user = Integer(8, help="GPUs one user's running jobs may hold at once.").tag(config=True)
    max_active_jobs_per_user = Integer(4, help="Unfinished jobs per user.").tag(config=True)
    max_workers = Integer(16, help="Workers (pods) per job.").tag(config=True)
    max_deployments_per_user = Integer(4, help="Deployments per user.").tag(config=True)
    backoff_limit = Integer(0, help="Job backoffLimit: pod failures tolerated before the job fails.").tag(config=True)
    ttl_seconds_after_finished = Integer(7 * 86400, help="Finished jobs (and their logs) are deleted after this "
                                                          "many seconds.").tag(config=True)
    worker_python = Unicode("python", help="Python executable in the training image.").tag(config=True)

    # ---------------------------------------------------------------- MLflow
    mlflow_tracking_uri = Unicode(help="Tracking server the service talks to (MLFLOW_TRACKING_URI).").tag(config=True)

    @default("mlflow_tracking_uri")
    def _default_mlflow(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI", "")

    mlflow_pod_tracking_uri = Unicode("", help="Tracking URI as seen from training pods (default: "
                                              "mlflow_tracking_uri).").tag(config=True)
    mlflow_egress = List(Dict(), help="NetworkPolicy egress rules ({to: [...], ports: [...]}) letting training pods "
                                      "reach MLflow; default: the tracking URI's port.").tag(config=True)
    hub_groups_cache_seconds = Float(60.0, help="How long a user's groups are cached.").tag(config=True)

    # ---------------------------------------------------------------- startup

    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        if self.config_file and os.path.exists(self.config_file):
            self.load_config_file(self.config_file)
        self.policy = self._build_policy()
        if not self.mlflow_tracking_uri:
            self.exit_with("mlflow_tracking_uri is empty: set HubMLService.mlflow_tracking_uri or "
                           "MLFLOW_TRACKING_URI to the tracking server (e.g. http://mlflow.mlflow:5000).")
        self.hub_auth = HubAuth(cache_max_age=60)
        if not self.hub_auth.api_token:
            self.exit_with("No JupyterHub API token: run the service as a JupyterHub service (JUPYTERHUB_API_TOKEN).")
        self._groups: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._avail: tuple[float, dict[str, Any]] | None = None

    def exit_with(self, message: str) -> None:
        self.log.critical(message)
        raise SystemExit(f"hubml service: {message}")

    def _build_policy(self) -> Policy:
        entries = self.profiles
        if not entries and self.profiles_file:
            import yaml

            try:
                with open(self.profiles_file) as f:
                    entries = yaml.safe_load(f) or []
            except OSError as e:
                self.exit_with(f"profiles_file {self.profiles_file!r} cannot be read: {e}")
        if not entries:
            entries = [{"name": "cpu", "display": "CPU", "default": True}]
        try:
            catalogue = load_catalogue(entries, source="HubMLService.profiles")
        except ProfileConfigError as e:
            self.exit_with(str(e))
        return Policy(namespace=self.namespace, catalogue=catalogue, default_image=self.default_image,
                      serving_image=self.serving_image, allowed_images=tuple(self.allowed_images),
                      max_gpus_per_user=self.max_gpus_per_user,
                      max_active_jobs_per_user=self.max_active_jobs_per_user, max_workers=self.max_workers,
                      max_deployments_per_user=self.max_deployments_per_user, backoff_limit=self.backoff_limit,
                      ttl_seconds_after_finished=self.ttl_seconds_after_finished, python=self.worker_python)

    async def setup(self) -> web.Application:
        """Connect to Kubernetes and MLflow, check the namespace is usable, build the tornado app."""
        try:
            self.kube = await k.Kube.connect(self.kubeconfig or None)
        except Exception as e:  # noqa: BLE001 - startup: say what to fix
            self.exit_with(f"cannot load Kubernetes credentials ({e}); set HubMLService.kubeconfig or run in a pod.")
        try:
            await self.kube.list(k.JOB, self.namespace)
        except k.Forbidden as e:
            self.exit_with(f"the service account may not list Jobs in namespace {self.namespace!r} ({e}); "
                           f"apply the Role in the README's 'Hub service RBAC' section (or install helm-values/hubml-extras).")
        except k.KubeError as e:
            self.exit_with(f"Kubernetes API unusable for namespace {self.namespace!r}: {e}")
        self.registry = Registry(self.mlflow_tracking_uri, unreachable_step=MLFLOW_DOWN_STEP)
        pod_uri = self.mlflow_pod_tracking_uri or self.mlflow_tracking_uri
        egress = [training_objects.EgressRule(to=r.get("to", []), ports=r.get("ports", [])) for r in self.mlflow_egress] \
            or training_objects.mlflow_egress_from_uri(pod_uri)
        self.crds = CrdCache(self.kube, ttl=self.crd_cache_seconds)
        await self._check_training_operator()
        self.training = Training(self.kube, self.registry, self.policy, self.crds, flavour=self.training_flavour,
                                 mlflow_pod_uri=pod_uri, mlflow_egress=egress,
                                 extra_pod_annotations=dict(self.extra_pod_annotations),
                                 trainer_runtime=training_objects.TrainerRuntime(self.trainjob_runtime,
                                                                        self.trainjob_runtime_kind))
        self.serving = Serving(self.kube, self.registry, self.policy, self.crds, flavour=self.serving_flavour,
                               mlflow_pod_uri=pod_uri,
                               endpoints=Endpoints(self.deployment_url_template, self.kserve_url_field),
                               kserve=KServeSettings(self.kserve_deployment_mode, self.kserve_runtime,
                                                     dict(self.kserve_storage_uri_map)))
        if self.use_informers:
            from kubernetes_asyncio import config as k8s_config

            # the reflector uses kubernetes_asyncio's global configuration (as KubeSpawner does)
            if self.kubeconfig:
                await k8s_config.load_kube_config(config_file=self.kubeconfig)
            else:
                k8s_config.load_incluster_config()
            cache = JobReflector(self.namespace)
            await cache.start()
            self.training.use_cache(cache)
        found = await self.crds.get()
        self.log.info("hubml service: namespace %s, CRDs %s", self.namespace, found)
        app = web.Application(handlers.routes(self.service_prefix), hubml_service=self,
                              default_handler_class=handlers.NotFoundHandler, log_function=self._log_request)
        return app

    async def _check_training_operator(self) -> None:
        """An explicitly configured operator flavour needs its CRD served and the right to use it."""
        res = {"pytorchjob": k.PYTORCH_JOB, "trainjob": k.TRAIN_JOB}.get(self.training_flavour)
        if res is None:
            return
        if not (await self.crds.get()).get(res.kind):
            self.exit_with(
                f"training_flavour is {self.training_flavour!r}, but the cluster does not serve {res.kind} "
                f"({res.api_version}): install its operator (CRD), or set HubMLService.training_flavour to 'auto' "
                f"or 'job'.")
        try:
            await self.kube.list(res, self.namespace)
        except k.Forbidden as e:
            self.exit_with(f"the service account may not list {res.plural}.{res.group} in namespace "
                           f"{self.namespace!r} ({e}); apply the Role in the README's 'Hub service RBAC' section "
                           f"(or install helm-values/hubml-extras).")

    def _log_request(self, handler: web.RequestHandler) -> None:
        status = handler.get_status()
        level = self.log.warning if status >= 500 else self.log.debug
        level("%s %s %s %.1fms", status, handler.request.method, handler.request.path,
              handler.request.request_time() * 1000)

    @property
    def api_url_path(self) -> str:
        return f"{self.service_prefix}api/v1"

    # ---------------------------------------------------------------- used by handlers

    async def authenticate(self, handler: web.RequestHandler, needed: tuple[str, ...]) -> Caller:
        token = self.hub_auth.get_token(handler, in_cookie=False)
        if not token:
            raise handlers.ApiError(401, "No token: send 'Authorization: token <JUPYTERHUB_API_TOKEN>'.")
        try:
            model = await self.hub_auth.user_for_token(token, sync=False)
        except Exception as e:  # noqa: BLE001 - the hub is down or answered oddly
            raise handlers.ApiError(503, f"JupyterHub could not check the token: {e}") from None
        if not model:
            raise handlers.ApiError(401, "The hub does not recognise this token (expired or revoked).")
        if model.get("kind", "user") != "user":
            raise handlers.ApiError(403, "Only hub users own jobs and deployments; services cannot use this API.")
        # hubml's scopes are about the caller's own objects: both the `!user`-filtered
        # grant (custom:hubml:jobs!user=<name>, as helm-values' roles give it) and the
        # unfiltered scope satisfy this; a scope filtered to another user does not.
        own = tuple(f"{scope}!user={model['name']}" for scope in needed)
        if not handlers.has_scope(model.get("scopes") or [], own):
            raise handlers.scope_error(model["name"], needed)
        groups = model.get("groups")
        if groups is None:
            groups = await self._user_groups(model["name"])
        return Caller(name=model["name"], groups=tuple(groups))

    async def _user_groups(self, name: str) -> tuple[str, ...]:
        """The user's groups via the service's own token (needs ``read:users:groups``), cached."""
        hit = self._groups.get(name)
        if hit and time.monotonic() - hit[0] < self.hub_groups_cache_seconds:
            return hit[1]
        import json
        from urllib.parse import quote

        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        data = None
        try:
            resp = await AsyncHTTPClient().fetch(
                f"{self.hub_auth.api_url.rstrip('/')}/users/{quote(name, safe='')}",
                headers={"Authorization": f"token {self.hub_auth.api_token}"}, request_timeout=10)
            data = json.loads(resp.body)
        except (HTTPClientError, OSError, ValueError) as e:
            # without groups, group-restricted profiles are refused (safe side)
            self.log.warning("cannot read the groups of %s from the hub: %s", name, e)
        groups = tuple((data or {}).get("groups") or ())
        self._groups[name] = (time.monotonic(), groups)
        return groups

    async def flavours(self) -> tuple[str, str]:
        found = await self.crds.get()
        training = await self.training.resolved_flavour()
        serving = self.serving_flavour if self.serving_flavour != "auto" else (
            "kserve" if found.get("InferenceService") else "deployment")
        return training, serving

    async def profiles_for(self, caller: Caller) -> list[dict[str, Any]]:
        avail = await self._availability()
        out = []
        for p in self.policy.catalogue.allowed_for(caller.groups):
            a = avail.get(p.name) if avail is not None else None
            out.append({"name": p.name, "display": p.display, "description": p.description,
                        "gpu": p.describe_gpu(), "gpus": p.gpu.count if p.gpu else 0,
                        "hourly_cost": p.hourly_cost, "default": p is self.policy.catalogue.default,
                        "available": a.startable if a else None, "free": a.free if a else None,
                        "total": a.total if a else None})
        return out

    async def _availability(self) -> dict[str, Any] | None:
        """Free GPUs per profile from nodes and pods (cached 5 s); None when not permitted."""
        if not self.profile_availability:
            return None
        if self._avail and time.monotonic() - self._avail[0] < 5:
            return self._avail[1]
        try:
            nodes, pods = await asyncio.gather(self.kube.list(k.NODE, None),
                                               self.kube.list(k.POD, None, field_selector=
                                                              "status.phase!=Succeeded,status.phase!=Failed"))
        except k.Forbidden:
            return None
        index = UsageIndex()
        for n in nodes:
            index.set_node(n)
        for p in pods:
            meta = p.get("metadata") or {}
            index.set_pod(f"{meta.get('namespace')}/{meta.get('name')}", p)
        result = index.availability_all(self.policy.catalogue)
        self._avail = (time.monotonic(), result)
        return result

    # ---------------------------------------------------------------- run

    def start(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        app = await self.setup()
        url = urlsplit(self.bind_url)
        server = httpserver.HTTPServer(app, xheaders=True)
        server.listen(url.port or 80, url.hostname or "")
        self.log.info("hubml service listening on %s%s", self.bind_url.rstrip("/"), self.service_prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()
        if self.training.cache is not None:
            await self.training.cache.stop()
        await self.kube.close()


main = HubMLService.launch_instance
