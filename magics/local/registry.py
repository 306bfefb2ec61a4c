"""The local backend's model registry: ``hubml.registry`` on this machine's MLflow store.

One user, one store (``home.tracking_uri``): no ownership checks, so every
method passes ``owner=None``. Aliases, not the deprecated stages.
"""

from __future__ import annotations

from hubml.magics.local.home import LocalHome
from hubml.models import ModelRef, ModelVersionInfo, RegisteredModelInfo, RegisterRequest
from hubml.registry import Registry

#: What a user does when the local store fails: it is theirs, so check where it points.
STORE_STEP = "check MLFLOW_TRACKING_URI (or HUBML_HOME) points to a reachable, writable store, then retry."


class LocalRegistry:
    """Mixin of ``LocalBackend``: reads ``self.home``, defines no ``__init__``."""

    home: LocalHome

    @property
    def registry(self) -> Registry:
        """One ``Registry`` per backend object (its ``MlflowClient`` keeps the store's connection pool)."""
        registry = self.__dict__.get("_registry")
        if registry is None or registry.tracking_uri != self.home.tracking_uri:
            registry = Registry(self.home.tracking_uri, unreachable_step=STORE_STEP)
            self.__dict__["_registry"] = registry
        return registry

    def register_model(self, request: RegisterRequest) -> ModelVersionInfo:
        return self.registry.register(request)

    def models(self) -> list[RegisteredModelInfo]:
        return self.registry.models()

    def resolve(self, ref: ModelRef) -> ModelVersionInfo:
        """The registered version ``ref`` points to now; ``NotFound`` naming what is missing."""
        return self.registry.resolve(ref)
