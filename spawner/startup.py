"""Refuse to start a hub whose ``gpu_profiles`` are wrong.

JupyterHub creates spawners lazily (first spawn), so trait validation alone
would let a broken catalogue through until a user hits it.  See
:func:`check_running_hub_config` for how the check is hooked into start-up.
"""

from __future__ import annotations

import asyncio
import sys


def _profiles_from_config(config) -> object | None:
    for section in ("HubMLSpawner", "KubeSpawner", "Spawner"):
        if section in config and "gpu_profiles" in config[section]:
            return config[section]["gpu_profiles"]
    return None


def validate_hub_config() -> None:
    """Validate the running JupyterHub's gpu_profiles; exit(1) listing the problems."""
    from jupyterhub.app import JupyterHub

    if not JupyterHub.initialized():
        return
    app = JupyterHub.instance()
    profiles = _profiles_from_config(app.config)
    if profiles is None:
        return
    from hubml.profiles import ProfileConfigError

    from .spawner import check_gpu_profiles

    try:
        check_gpu_profiles(profiles)
    except ProfileConfigError as e:
        app.log.critical("Refusing to start:\n%s", e)
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(1)


def check_running_hub_config() -> None:
    """Called when hubml.spawner is imported.

    JupyterHub imports every spawner entry point while it constructs its
    application (to list configurable classes), before the config file is read
    and before its event loop runs, and offers no start-up hook to spawners.
    So we wrap, once, the first step of ``JupyterHub.initialize`` that runs after
    the config file is loaded (``init_spawners``) with :func:`validate_hub_config`.
    Outside a hub process (tests, tools, the culler) nothing is touched.
    """
    try:
        from jupyterhub.app import JupyterHub
    except ImportError:  # pragma: no cover - jupyterhub is in the hub extra
        return
    if JupyterHub.initialized():
        try:
            asyncio.get_running_loop().call_soon(validate_hub_config)
        except RuntimeError:
            validate_hub_config()
        return
    if not _in_hub_process() or getattr(JupyterHub.init_spawners, "_hubml_checked", False):
        return
    original = JupyterHub.init_spawners

    async def init_spawners(self, *args, **kwargs):
        validate_hub_config()
        return await original(self, *args, **kwargs)

    init_spawners._hubml_checked = True
    JupyterHub.init_spawners = init_spawners


def _in_hub_process() -> bool:
    """True when this process is ``jupyterhub`` (or ``python -m jupyterhub``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    argv0 = sys.argv[0] if sys.argv else ""
    return (spec is not None and spec.name in ("jupyterhub", "jupyterhub.__main__")) or argv0.endswith("jupyterhub")
