"""Registered models and deployments: references a user types and what backends return."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hubml import names
from hubml.errors import InvalidRequest


@dataclass(frozen=True)
class ModelRef:
    """``NAME``, ``NAME@alias`` or ``NAME/version`` as typed after ``%deploy``.

    A bare name means the latest version, as in MLflow's ``models:/NAME/latest``.
    """

    name: str
    alias: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        raw = (text or "").strip()
        if not raw:
            raise InvalidRequest(
                "Name a registered model: NAME, NAME@alias or NAME/version (for example iris-clf@champion)."
            )
        if "@" in raw and "/" in raw:
            raise InvalidRequest(f"{raw!r}: give either @alias or /version, not both.")
        if "@" in raw:
            name, _, al = raw.partition("@")
            return cls(names.model_name(name), alias=names.alias(al))
        if "/" in raw:
            name, _, ver = raw.partition("/")
            if not ver.isdigit() or int(ver) < 1:
                raise InvalidRequest(
                    f"{raw!r}: the version after '/' must be a positive whole number (for example {name}/3)."
                )
            return cls(names.model_name(name), version=int(ver))
        return cls(names.model_name(raw))

    @property
    def uri(self) -> str:
        """The ``models:/`` URI MLflow resolves."""
        if self.alias:
            return f"models:/{self.name}@{self.alias}"
        if self.version:
            return f"models:/{self.name}/{self.version}"
        return f"models:/{self.name}/latest"

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        if self.version:
            return f"{self.name}/{self.version}"
        return self.name


@dataclass(frozen=True)
class RegisterRequest:
    name: str
    run_id: str
    artifact_path: str = "model"
    alias: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def validate(self) -> "RegisterRequest":
        names.model_name(self.name)
        if self.alias is not None:
            names.alias(self.alias)
        if not self.run_id or not str(self.run_id).isalnum():
            raise InvalidRequest(f"Run id {self.run_id!r} is not an MLflow run id (32 hex characters).")
        if not self.artifact_path or self.artifact_path.startswith("/") or ".." in self.artifact_path.split("/"):
            raise InvalidRequest(
                f"--artifact-path {self.artifact_path!r} must be a relative path inside the run's artifacts "
                f"(the 'name' given to mlflow.<flavor>.log_model, 'model' by default)."
            )
        for key in self.tags:
            if not key or len(key) > 250:
                raise InvalidRequest(f"Tag name {key!r} must be 1 to 250 characters.")
        return self


MAX_TAG_KEY = 250
MAX_TAG_VALUE = 5000


def parse_tags(items: list[str] | None) -> dict[str, str]:
    """``--tag KEY=VALUE`` (repeatable) to a dict, with MLflow's limits checked up front.

    Checked before anything is registered, so a bad tag never leaves a
    half-tagged model version behind.
    """
    tags: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidRequest(
                f"--tag expects KEY=VALUE, got {item!r}. Example: --tag team=vision (repeat --tag for more)."
            )
        if len(key) > MAX_TAG_KEY or not key.isprintable():
            raise InvalidRequest(
                f"Tag name {key[:40]!r} must be 1 to {MAX_TAG_KEY} printable characters."
            )
        if len(value) > MAX_TAG_VALUE:
            raise InvalidRequest(f"The value of tag {key!r} is longer than {MAX_TAG_VALUE} characters; shorten it.")
        if key in tags and tags[key] != value:
            raise InvalidRequest(f"--tag {key} is given twice with different values; keep one.")
        tags[key] = value
    return tags


@dataclass
class ModelVersionInfo:
    name: str
    version: int
    run_id: str | None = None
    source: str | None = None
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RegisteredModelInfo:
    name: str
    versions: list[ModelVersionInfo] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DeploySpec:
    """``%deploy``: which model version to serve, under which deployment name."""

    model: ModelRef
    name: str
    profile: str | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    canary_percent: int | None = None
    #: Local backend only: serve on this loopback port instead of a free one.
    port: int | None = None

    def validate(self) -> "DeploySpec":
        names.dns_label(self.name, "Deployment name")
        if self.port is not None and (
            isinstance(self.port, bool) or not isinstance(self.port, int) or not 1024 <= self.port <= 65535
        ):
            raise InvalidRequest(
                f"--port must be a whole number from 1024 to 65535; got {self.port!r}. "
                f"Leave --port out to get a free port."
            )
        if self.profile is not None:
            names.dns_label(self.profile, "Profile")
        for flag, value in (("--min-replicas", self.min_replicas), ("--max-replicas", self.max_replicas)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
                raise InvalidRequest(f"{flag} must be a whole number from 0 to 100; got {value!r}.")
        if self.max_replicas < max(self.min_replicas, 1):
            raise InvalidRequest(
                f"--max-replicas ({self.max_replicas}) must be at least --min-replicas ({self.min_replicas}) and 1."
            )
        if self.canary_percent is not None and (
            isinstance(self.canary_percent, bool) or not isinstance(self.canary_percent, int)
            or not 0 < self.canary_percent < 100
        ):
            raise InvalidRequest(f"--canary must be a percentage from 1 to 99; got {self.canary_percent!r}.")
        return self


@dataclass
class DeploymentInfo:
    name: str
    model: str          # "iris-clf@champion" as asked
    version: int        # the version it resolved to when deployed
    url: str            # the endpoint that answers predictions
    state: str          # "ready", "starting", "failed", "dead"
    backend: str
    created: float
    message: str = ""
    pid: int | None = None
    #: KServe canary beside the stable version: {"model", "version", "percent", "name", "ready": bool | None}
    canary: dict[str, Any] | None = None

    def traffic(self) -> str:
        """The split in words for ``%deployments``: ``100% v3`` or ``80% v3 / 20% v4 (canary ready)``."""
        if not self.canary:
            return f"100% v{self.version}"
        pct = int(self.canary.get("percent") or 0)
        ready = self.canary.get("ready")
        state = "ready" if ready else "not ready" if ready is False else "starting"
        return f"{100 - pct}% v{self.version} / {pct}% v{self.canary.get('version')} (canary {state})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeploymentInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
