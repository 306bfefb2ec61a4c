"""``LocalBackend``: the two local mixins put together on one ``LocalHome``."""

from __future__ import annotations

from hubml.magics.backend import Backend
from hubml.magics.local.home import LocalHome
from hubml.magics.local.serving import LocalModels
from hubml.magics.local.training import LocalTraining


class LocalBackend(LocalTraining, LocalModels, Backend):
    """Both mixins read ``self.home``; neither defines ``__init__``."""

    name = "local"

    def __init__(self, home: LocalHome | None = None) -> None:
        self.home = home or LocalHome.from_env()
