"""Where the test control plane's pinned versions and built binaries are, and the
error every part of the Kubernetes harness raises (it says what failed and how to fix it)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]
KUBE_DEV_DIR = REPO_ROOT / "dev" / "kube"
VERSIONS_FILE = KUBE_DEV_DIR / "versions.env"

#: binaries the control plane needs (kubectl and helm are built too, for humans and chart checks)
REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class KubeHarnessError(RuntimeError):
    """The test control plane could not be built, started, reached or configured.

    The message always says what failed and how to fix it; tests must fail
    with it, never skip.
    """


# --------------------------------------------------------------------------
# versions and binaries
# --------------------------------------------------------------------------


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse dev/kube/versions.env (KEY=VALUE lines), the one place versions are pinned."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise KubeHarnessError(f"{path}: line {raw!r} is not KEY=VALUE; fix the file.")
        versions[key.strip()] = value.strip().strip('"')
    return versions


def cache_root() -> Path:
    """${HUBML_KUBE_CACHE:-${HUBML_CACHE:-~/.cache/hubml}}, as build.sh and kserve-crds.sh compute it."""
    return Path(
        os.environ.get("HUBML_KUBE_CACHE") or os.environ.get("HUBML_CACHE") or Path.home() / ".cache" / "hubml"
    )


def cache_dir(versions: Mapping[str, str] | None = None) -> Path:
    """Where build.sh puts the binaries: <cache_root>/kube-<KUBE_VERSION>."""
    versions = versions or read_versions()
    return cache_root() / f"kube-{versions['KUBE_VERSION']}"


def find_binaries(names: Iterable[str] = REQUIRED_BINARIES) -> dict[str, Path]:
    """Paths of the built binaries; raises naming the missing ones and the build command."""
    bin_dir = cache_dir() / "bin"
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        path = bin_dir / name
        stamp = bin_dir / f".{name}.stamp"
        if path.is_file() and os.access(path, os.X_OK) and stamp.is_file():
            found[name] = path
        else:
            missing.append(name)
    if missing:
        raise KubeHarnessError(
            f"Kubernetes harness binaries missing or half-built in {bin_dir}: {', '.join(missing)}. "
            f"Build them with `bash {KUBE_DEV_DIR / 'build.sh'}` (needs Go >= 1.26 and the Go "
            "module proxy; about an hour cold on 2 cores, seconds when cached) and rerun."
        )
    return found
