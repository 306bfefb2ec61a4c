"""``python -m hubml.culler``: the traitlets Application and its web endpoints.

Every setting is a trait with ``config=True`` (config file or command line;
both ``--flag value`` and ``--flag=value`` work). All settings are validated in
:meth:`CullerApp.build` before any network traffic, so a bad value stops the
culler at start-up with one paragraph naming the setting and the fix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from urllib.parse import urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web
from tornado.httpserver import HTTPServer
from traitlets import Bool, Float, Int, TraitError, Unicode, default, validate
from traitlets.config import Application

from hubml.quantities import DURATION_EXAMPLES, parse_duration

from .catalogue import CatalogueError, from_spawner_catalogue, load_profiles_setting
from .cycle import Culler
from .gpu import PrometheusGpuSource
from .hub import HubClient
from .metrics import CullerMetrics
from .notify import NoticeBoard, WebhookNotifier
from .policy import PolicyConfig, ProfilePolicy

#: where Kubernetes mounts the pod's service-account namespace
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class Duration(Float):
    """Seconds, given as a number or a string such as ``"30m"``, ``"1h30m"``.

    The grammar is :func:`hubml.quantities.parse_duration`, the one the profile
    catalogue's ``idle_timeout`` and ``%%train --timeout`` use. Zero passes here
    because it means something for some settings (``max_age``: no limit,
    ``grace_period``: no warning); the others refuse it in ``_nonzero``.
    """

    info_text = f"a duration (a number of seconds, or e.g. {DURATION_EXAMPLES})"

    def validate(self, obj, value):
        try:
            return parse_duration(value, allow_zero=True)
        except ValueError as e:
            raise TraitError(f"{self.name}: {e}") from None

    def from_string(self, s):
        return s


class ConfigError(Exception):
    """A setting is wrong; the message says which and how to fix it."""


def _check_url(name: str, value: str, required: bool) -> str:
    if not value:
        if required:
            raise ConfigError(f"{name} is not set")
        return value
    u = urlparse(value)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ConfigError(f"{name} must be an http(s) URL such as http://hub:8081/hub/api, not {value!r}")
    return value


class CullerApp(Application):
    name = "hubml-culler"
    description = (
        "GPU-aware idle culler for JupyterHub: per-profile timeouts, kernel and "
        "GPU activity, warnings with a grace period, dry-run and Prometheus metrics."
    )

    # --- hub connection --------------------------------------------------
    api_url = Unicode(
        help="JupyterHub API URL. Default: $JUPYTERHUB_API_URL (set by the hub for services)."
    ).tag(config=True)

    @default("api_url")
    def _api_url(self):
        return os.environ.get("JUPYTERHUB_API_URL", "")

    api_token = Unicode(
        help="API token of the culler service. Default: $JUPYTERHUB_API_TOKEN. "
        "Prefer the environment: command lines are visible to other processes."
    ).tag(config=True)

    @default("api_token")
    def _api_token(self):
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    server_base_url = Unicode(
        help="Base URL through which users' servers are reached to read their "
        "kernels (the proxy, e.g. http://proxy-public). Default: the API URL "
        "without its /hub/api path."
    ).tag(config=True)

    @default("server_base_url")
    def _server_base_url(self):
        u = urlparse(self.api_url or "")
        return f"{u.scheme}://{u.netloc}" if u.netloc else ""

    concurrency = Int(10, help="Most HTTP requests in flight at once (hub and servers).").tag(config=True)
    api_page_size = Int(200, help="Users per page of the hub's user list (the hub caps it at its api_page_max_limit).").tag(config=True)
    request_timeout = Duration(30, help="Timeout of one hub API request.").tag(config=True)
    kernel_timeout = Duration(10, help="Timeout of one kernel-list request to a user's server.").tag(config=True)

    @validate("concurrency", "api_page_size")
    def _positive(self, proposal):
        if proposal.value < 1:
            raise TraitError(f"{proposal.trait.name} must be at least 1, not {proposal.value}")
        return proposal.value

    # --- policy -----------------------------------------------------------
    timeout = Duration(3600, help="Default idle timeout for servers whose profile sets none.").tag(config=True)
    max_age = Duration(0, help="Default maximum server age (0: no limit). Culls even active servers, except while a kernel is busy.").tag(config=True)
    profiles = Unicode(
        "",
        help="Per-profile settings as inline JSON or a JSON/YAML file path: "
        '{"<profile>": {"idle_timeout": "30m", "max_age": "8h", "gpu": 1}}. '
        "Overrides the spawner catalogue (hubml.profile_config) per profile. The profile "
        "is read from the server's user_options['profile'].",
    ).tag(config=True)
    spawner_profiles = Unicode(
        "",
        help="JSON/YAML file with the spawner's profile list (what c.HubMLSpawner.gpu_profiles "
        "holds); each profile's idle_timeout and GPU count become its defaults. "
        "Entries in `profiles` override them.",
    ).tag(config=True)
    use_kernels = Bool(True, help="Read kernels' execution_state/last_activity (needs access:servers). Unreadable kernels skip the server.").tag(config=True)
    gpu_idle_window = Duration(1800, help="How long GPU utilisation must stay at or below gpu_idle_threshold, with a kernel busy and nobody attached, for the server to count as idle.").tag(config=True)
    gpu_idle_threshold = Float(0.0, help="GPU utilisation (percent) at or below which the GPU counts as idle.").tag(config=True)
    grace_period = Duration(600, help="Time between the warning and the cull; activity in it cancels the cull. 0: cull without warning.").tag(config=True)
    cull_every = Duration(60, help="Interval between passes. Passes never overlap.").tag(config=True)
    cull_default_servers = Bool(True, help="Cull default servers.").tag(config=True)
    cull_named_servers = Bool(True, help="Cull named servers.").tag(config=True)
    remove_named_servers = Bool(False, help="Delete named servers after stopping them (needs delete:servers; removes their state).").tag(config=True)
    cull_users = Bool(False, help="Delete users whose every server this pass stopped (needs admin:users).").tag(config=True)

    @validate("gpu_idle_threshold")
    def _percent(self, proposal):
        if not 0 <= proposal.value <= 100:
            raise TraitError(f"gpu_idle_threshold is a percentage 0-100, not {proposal.value}")
        return proposal.value

    @validate("timeout", "gpu_idle_window", "cull_every", "request_timeout", "kernel_timeout", "prometheus_step")
    def _nonzero(self, proposal):
        if proposal.value <= 0:
            raise TraitError(f"{proposal.trait.name} must be greater than 0, not {proposal.value}")
        return proposal.value

    # --- GPU source ------------------------------------------------------------
    prometheus_url = Unicode(
        "",
        help="Prometheus base URL for DCGM_FI_DEV_GPU_UTIL (e.g. http://prometheus-server). "
        "Empty: no GPU source; GPU servers are then judged on hub and kernel activity only.",
    ).tag(config=True)
    prometheus_step = Duration(60, help="Spacing of GPU samples requested from Prometheus (>= its scrape interval).").tag(config=True)
    namespace = Unicode(
        help="Kubernetes namespace of the user pods. Default: $POD_NAMESPACE, else the namespace of the "
        "service account the culler runs under (the hub pod's, where z2jh runs it), else 'default'.",
    ).tag(config=True)

    @default("namespace")
    def _namespace(self):
        # a hub-managed service does not inherit the hub's environment, but it
        # runs in the hub pod, whose service account names the namespace
        if os.environ.get("POD_NAMESPACE"):
            return os.environ["POD_NAMESPACE"]
        try:
            ns = Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip()
        except OSError:
            ns = ""
        return ns or "default"

    pod_name_template = Unicode(
        "jupyter-{user_server}",
        help="KubeSpawner's pod_name_template ({username}, {servername}, {user_server}), to match GPU metrics to servers.",
    ).tag(config=True)

    # --- notices, web, modes --------------------------------------------------
    webhook_url = Unicode("", help="Optional URL that receives JSON warning/cancelled/culled events.").tag(config=True)
    service_url = Unicode(help="Where to serve /metrics and the notices page. Default: $JUPYTERHUB_SERVICE_URL; empty: no web server.").tag(config=True)

    @default("service_url")
    def _service_url(self):
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "")

    service_prefix = Unicode(help="URL prefix of the service. Default: $JUPYTERHUB_SERVICE_PREFIX or /services/hubml-culler/.").tag(config=True)

    @default("service_prefix")
    def _service_prefix(self):
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/hubml-culler/")

    dry_run = Bool(False, help="Run one pass that changes nothing; list what would be culled, why, and the GPU-hours reclaimed.").tag(config=True)
    once = Bool(False, help="Run one pass and exit.").tag(config=True)
    config_file = Unicode("", help="Load this traitlets config file (.py or .json).").tag(config=True)

    aliases = {
        "api-url": "CullerApp.api_url",
        "server-base-url": "CullerApp.server_base_url",
        "concurrency": "CullerApp.concurrency",
        "api-page-size": "CullerApp.api_page_size",
        "request-timeout": "CullerApp.request_timeout",
        "kernel-timeout": "CullerApp.kernel_timeout",
        "timeout": "CullerApp.timeout",
        "max-age": "CullerApp.max_age",
        "profiles": "CullerApp.profiles",
        "spawner-profiles": "CullerApp.spawner_profiles",
        "gpu-idle-window": "CullerApp.gpu_idle_window",
        "gpu-idle-threshold": "CullerApp.gpu_idle_threshold",
        "grace-period": "CullerApp.grace_period",
        "cull-every": "CullerApp.cull_every",
        "prometheus-url": "CullerApp.prometheus_url",
        "prometheus-step": "CullerApp.prometheus_step",
        "namespace": "CullerApp.namespace",
        "pod-name-template": "CullerApp.pod_name_template",
        "webhook-url": "CullerApp.webhook_url",
        "service-url": "CullerApp.service_url",
        "config": "CullerApp.config_file",
        "log-level": "Application.log_level",
    }
    flags = {
        "dry-run": ({"CullerApp": {"dry_run": True}}, "List what would be culled and exit; changes nothing."),
        "once": ({"CullerApp": {"once": True}}, "Run one pass and exit."),
        "no-kernels": ({"CullerApp": {"use_kernels": False}}, "Do not read kernels (drops the access:servers need)."),
        "no-default-servers": ({"CullerApp": {"cull_default_servers": False}}, "Do not cull default servers."),
        "no-named-servers": ({"CullerApp": {"cull_named_servers": False}}, "Do not cull named servers."),
        "remove-named-servers": ({"CullerApp": {"remove_named_servers": True}}, "Delete named servers after stopping them."),
        "cull-users": ({"CullerApp": {"cull_users": True}}, "Delete users whose servers were all culled."),
    }

    # ---------------------------------------------------------------------
    def initialize(self, argv=None):
        super().initialize(argv)
        if self.config_file:
            if not os.path.isfile(self.config_file):
                raise ConfigError(f"config file {self.config_file!r} does not exist; pass an existing .py or .json traitlets config file to --config")
            self.load_config_file(self.config_file)

    def policy_config(self) -> PolicyConfig:
        default_policy = ProfilePolicy(idle_timeout=self.timeout, max_age=self.max_age)
        profiles = {}
        profiles.update(from_spawner_catalogue(self.spawner_profiles, default_policy))
        profiles.update(load_profiles_setting(self.profiles, default_policy))
        return PolicyConfig(
            default=default_policy,
            profiles=profiles,
            gpu_idle_window=self.gpu_idle_window,
            gpu_idle_threshold=self.gpu_idle_threshold,
            grace_period=self.grace_period,
            cull_default_servers=self.cull_default_servers,
            cull_named_servers=self.cull_named_servers,
            use_kernels=self.use_kernels,
        )

    def build(self) -> Culler:
        """Validate everything and build the culler. Raises ConfigError."""
        _check_url("api_url (--api-url or $JUPYTERHUB_API_URL)", self.api_url, True)
        _check_url("server_base_url", self.server_base_url, self.use_kernels)
        _check_url("prometheus_url", self.prometheus_url, False)
        _check_url("webhook_url", self.webhook_url, False)
        if self.service_url:
            _check_url("service_url", self.service_url, False)
        if not self.api_token:
            raise ConfigError("no API token: set $JUPYTERHUB_API_TOKEN (the hub does this for services) or CullerApp.api_token in a config file")
        try:
            self.pod_name_template.format(username="u", servername="s", user_server="u--s")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"pod_name_template {self.pod_name_template!r} is invalid ({e!r}); "
                "use only {username}, {servername} and {user_server}"
            ) from None
        try:
            policy = self.policy_config()
        except CatalogueError as e:
            raise ConfigError(str(e)) from None
        hub = HubClient(
            self.api_url, self.api_token,
            server_base_url=self.server_base_url,
            concurrency=self.concurrency,
            page_size=self.api_page_size,
            timeout=self.request_timeout,
            kernel_timeout=self.kernel_timeout,
        )
        gpu_source = None
        if self.prometheus_url:
            gpu_source = PrometheusGpuSource(self.prometheus_url, step=self.prometheus_step, timeout=self.request_timeout)
        self.board = NoticeBoard()
        notifiers = [self.board]
        if self.webhook_url:
            notifiers.append(WebhookNotifier(self.webhook_url, log=self.log))
        self.metrics = CullerMetrics()
        return Culler(
            hub, policy,
            gpu_source=gpu_source if gpu_source is not None else _NoGpuSource(),
            gpu_step=self.prometheus_step,
            pod_name_template=self.pod_name_template,
            namespace=self.namespace,
            notifiers=notifiers,
            metrics=self.metrics,
            dry_run=self.dry_run,
            remove_named_servers=self.remove_named_servers,
            cull_users=self.cull_users,
            log=self.log,
        )

    def make_web_app(self, culler: Culler) -> web.Application:
        from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler

        prefix = self.service_prefix if self.service_prefix.endswith("/") else self.service_prefix + "/"
        service_name = os.environ.get("JUPYTERHUB_SERVICE_NAME") or prefix.rstrip("/").rsplit("/", 1)[-1]
        hub_auth = HubOAuth(
            api_token=self.api_token,
            api_url=self.api_url,
            base_url=prefix,
            cache_max_age=60,
            access_scopes={f"access:services!service={service_name}"},
            oauth_client_id=os.environ.get("JUPYTERHUB_CLIENT_ID") or f"service-{service_name}",
        )
        settings = {"hub_auth": hub_auth, "culler": culler, "board": self.board, "metrics": self.metrics, "cookie_secret": os.urandom(32)}
        return web.Application(
            [
                (prefix + "metrics", MetricsHandler),
                ("/metrics", MetricsHandler),
                (prefix + "health", HealthHandler),
                (prefix + "notices", NoticesHandler),
                (prefix + "oauth_callback", HubOAuthCallbackHandler),
                (prefix, NoticesPageHandler),
            ],
            **settings,
        )

    async def run(self) -> int:
        culler = self.build()
        if self.dry_run or self.once:
            try:
                report = await culler.run_pass()
            finally:
                culler.hub.close()
            assert report is not None
            print(report.render(datetime.now(timezone.utc)))
            return 1 if report.partial else 0
        server = None
        if self.service_url:
            u = urlparse(self.service_url)
            server = HTTPServer(self.make_web_app(culler))
            server.listen(u.port or 80, u.hostname or "")
            self.log.info("serving metrics and notices on %s%s", self.service_url, self.service_prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks: set[asyncio.Task] = set()
        try:
            while not stop.is_set():
                # a pass that outlives the interval is not stacked: run_pass
                # returns at once while the previous one holds the lock
                t = asyncio.ensure_future(culler.run_pass())
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.cull_every)
                except asyncio.TimeoutError:
                    pass
        finally:
            for t in tasks:
                t.cancel()
            if server is not None:
                server.stop()
            culler.hub.close()
        return 0


class _NoGpuSource:
    """Used when no Prometheus is configured: GPU data is 'known empty'.

    With no samples the forgotten-loop rule never fires and the GPU adds no
    activity, so GPU servers are judged like CPU servers, as documented.
    """

    async def utilisation(self, pods, window, now, *, lookback=0.0, threshold=0.0):
        from .policy import GpuReading

        return {p: GpuReading(ok=True) for p in pods}


class MetricsHandler(web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.write(generate_latest(self.settings["metrics"].registry))


class HealthHandler(web.RequestHandler):
    def get(self):
        report = self.settings["culler"].last_report
        self.write({"last_pass": report.started.isoformat() if report else None})


def _auth_mixin():
    from jupyterhub.services.auth import HubOAuthenticated

    return HubOAuthenticated


class NoticesHandler(_auth_mixin(), web.RequestHandler):
    """The signed-in user's pending cull notices, as JSON (never anyone else's)."""

    @web.authenticated
    def get(self):
        user = self.current_user["name"]
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"notices": [n.to_json() for n in self.settings["board"].for_user(user)]}))


class NoticesPageHandler(_auth_mixin(), web.RequestHandler):
    """The hub page a user opens from the services menu."""

    @web.authenticated
    def get(self):
        user = self.current_user["name"]
        notices = self.settings["board"].for_user(user)
        if notices:
            items = "".join(
                f"<li>Server <b>{escape(n.server or '(default)')}</b> has been idle "
                f"({escape(n.reason)}) and will be stopped at {escape(n.cull_at.isoformat())} "
                "unless you use it before then.</li>"
                for n in notices
            )
            body = f"<ul>{items}</ul>"
        else:
            body = "<p>None of your servers is about to be stopped.</p>"
        self.write(f"<!doctype html><title>Idle servers</title><h1>Idle server notices</h1>{body}")


_BUILTIN_OPTIONS = {"help", "help-all", "version", "show-config", "show-config-json", "debug"}


def check_argv(argv: list[str]) -> None:
    """Refuse options traitlets would only warn about (typos must not pass)."""
    known = set(CullerApp.aliases) | set(CullerApp.flags) | _BUILTIN_OPTIONS
    traits = set(CullerApp.class_trait_names(config=True))
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if name in known:
            continue
        if "." in name:
            cls, _, trait = name.partition(".")
            if cls in ("CullerApp", "Application") and trait.replace("-", "_") in traits:
                continue
        raise ConfigError(
            f"unknown option --{name}; run `python -m hubml.culler --help-all` for the "
            "list of options (both --flag value and --flag=value forms work)"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for configuration errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    app = CullerApp()
    try:
        check_argv(argv)
        captured: list[str] = []

        class _Capture(logging.Handler):
            def emit(self, record):
                captured.append(record.getMessage())

        handler = _Capture(level=logging.CRITICAL)
        app.log.addHandler(handler)
        try:
            app.initialize(argv)
        except SystemExit as e:
            # traitlets logs the bad value (catch_config_error), then exits
            if e.code in (0, None):
                return 0
            why = captured[-1] if captured else "see the message above"
            why = why.removeprefix("Bad config encountered during initialization: ")
            raise ConfigError(why) from None
        finally:
            app.log.removeHandler(handler)
        if app.extra_args:
            raise ConfigError(
                f"unexpected arguments {app.extra_args}; options start with -- "
                "(e.g. --timeout=30m)"
            )
        return asyncio.run(app.run())
    except (ConfigError, TraitError, CatalogueError) as e:
        print(f"hubml-culler: configuration error: {e}. Nothing was changed.", file=sys.stderr)
        return 2
