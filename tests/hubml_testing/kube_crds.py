"""The CRDs the test control plane serves (Kubeflow, KServe, kwok's Logs): installing them,
removing them and waiting until the API server and its discovery agree.

KServe's are its real ones (config/crd/full of the releases pinned in
dev/kube/versions.env, fetched by dev/kube/kserve-crds.sh into the cache), so
hub_ext's InferenceServices are checked against the schema KServe ships, and
its schema detection against two releases: ``KSERVE_VERSION`` (Standard-mode
``spec.canary[]``) and ``KSERVE_PREVIOUS_VERSION`` (no ``spec.canary``).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from hubml_testing.kube_binaries import KUBE_DEV_DIR, KubeHarnessError, cache_root, read_versions
from hubml_testing.kube_rest import Rest

CRD_DIR = KUBE_DEV_DIR / "crds"
KWOK_CRD_DIR = KUBE_DEV_DIR / "kwok-crds"

#: short name -> CRD object name (Kubeflow's: file dev/kube/crds/<object name>.yaml;
#: KServe's: the cached release, see ``crd_file``)
CRDS: dict[str, str] = {
    "pytorchjob": "pytorchjobs.kubeflow.org",
    "trainjob": "trainjobs.trainer.kubeflow.org",
    "inferenceservice": "inferenceservices.serving.kserve.io",
    "servingruntime": "servingruntimes.serving.kserve.io",
    "clusterservingruntime": "clusterservingruntimes.serving.kserve.io",
}

#: the CRDs that come from a KServe release rather than dev/kube/crds/
KSERVE_CRDS = ("inferenceservice", "servingruntime", "clusterservingruntime")


def kserve_versions() -> dict[str, str]:
    """{"current": KSERVE_VERSION, "previous": KSERVE_PREVIOUS_VERSION} from versions.env."""
    versions = read_versions()
    return {"current": versions["KSERVE_VERSION"], "previous": versions["KSERVE_PREVIOUS_VERSION"]}


def crd_file(short: str, kserve_release: str = "current") -> Path:
    """The file a CRD is installed from; a KServe one must have been fetched (dev/bootstrap)."""
    check_crd_names([short])
    if short not in KSERVE_CRDS:
        return CRD_DIR / f"{CRDS[short]}.yaml"
    releases = kserve_versions()
    if kserve_release not in releases:
        raise ValueError(f"unknown KServe release {kserve_release!r}; choose from {sorted(releases)}")
    version = releases[kserve_release]
    group, _, _ = CRDS[short].partition(".")
    path = cache_root() / f"kserve-{version}" / f"serving.kserve.io_{group}.yaml"
    if not path.is_file():
        raise KubeHarnessError(
            f"KServe {version}'s CRD {path.name} is not in {path.parent}: fetch KServe's CRDs with "
            "`bash dev/kube/kserve-crds.sh` (dev/bootstrap runs it), then retry."
        )
    return path


@functools.lru_cache(maxsize=16)
def _load_crd_text(path: str, mtime: float) -> str:
    # The v0.20 InferenceService CRD is 2 MB of YAML: parse it once per process.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return json.dumps(yaml.load(Path(path).read_text(), Loader=loader))


def load_crd(path: Path) -> dict[str, Any]:
    """A CRD file's object (a fresh copy each call)."""
    return json.loads(_load_crd_text(str(path), path.stat().st_mtime))

#: kwok's own CRDs (dev/kube/kwok-crds/kwok.x-k8s.io_<file>.yaml -> CRD name), always installed:
#: kwok watches them (--enable-crds) to learn which file holds which container's log
KWOK_CRDS: dict[str, str] = {
    "logs": "logs.kwok.x-k8s.io",
    "clusterlogs": "clusterlogs.kwok.x-k8s.io",
}


def check_crd_names(names: Iterable[str]) -> None:
    bad = [n for n in names if n not in CRDS]
    if bad:
        raise ValueError(f"unknown CRD name(s) {bad}; choose from {sorted(CRDS)}")


def install_crds(rest: Rest, names: Iterable[str], timeout: float = 30.0, kserve_release: str = "current") -> None:
    """Create (or replace) the CRDs and wait until the API server serves them.

    ``kserve_release`` ("current" or "previous") picks the KServe release of
    the KServe CRDs among ``names``; replacing a CRD keeps its objects.
    """
    names = list(names)
    check_crd_names(names)
    install_crd_files(rest, {CRDS[short]: crd_file(short, kserve_release) for short in names}, timeout)


def install_kwok_crds(rest: Rest, timeout: float = 30.0) -> None:
    """Install kwok's Logs and ClusterLogs CRDs (dev/kube/kwok-crds/), which kwok watches."""
    install_crd_files(rest, {crd: KWOK_CRD_DIR / f"kwok.x-k8s.io_{file}.yaml" for file, crd in KWOK_CRDS.items()},
                      timeout)


def install_crd_files(rest: Rest, files: Mapping[str, Path], timeout: float = 30.0) -> None:
    """Create (or replace) the CRDs {object name: file} and wait until the API server serves them."""
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for name, path in files.items():
        crd = load_crd(path)
        status, existing = rest.request("GET", f"{base}/{name}")
        if status == 200:
            if existing["metadata"].get("deletionTimestamp"):
                wait_gone(rest, f"{base}/{name}", timeout)
            else:
                crd["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                rest.must("PUT", f"{base}/{name}", crd)
                continue
        rest.must("POST", base, crd)
    deadline = time.monotonic() + timeout
    for name in files:
        while True:
            crd = rest.must("GET", f"{base}/{name}")
            conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
            if conds.get("Established") == "True":
                break
            if conds.get("NamesAccepted") == "False":
                raise KubeHarnessError(f"CRD {name} names not accepted: {crd['status']}")
            if time.monotonic() > deadline:
                raise KubeHarnessError(f"CRD {name} not Established after {timeout} s: {conds}")
            time.sleep(0.1)
        # discovery must list the resource before clients can use it
        group, version = crd["spec"]["group"], crd["spec"]["versions"][0]["name"]
        plural = crd["spec"]["names"]["plural"]
        while True:
            status, disc = rest.request("GET", f"/apis/{group}/{version}")
            if status == 200 and any(r["name"] == plural for r in disc.get("resources", [])):
                break
            if time.monotonic() > deadline:
                raise KubeHarnessError(f"{group}/{version} {plural} not in discovery after {timeout} s")
            time.sleep(0.1)


def uninstall_crds(rest: Rest, names: Iterable[str], timeout: float = 60.0) -> None:
    """Delete the CRDs and wait until they are gone (their objects go with them)."""
    names = list(names)
    check_crd_names(names)
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for short in names:
        rest.must("DELETE", f"{base}/{CRDS[short]}", ok=(200, 202, 404))
    deadline = time.monotonic() + timeout
    for short in names:
        wait_gone(rest, f"{base}/{CRDS[short]}", timeout)
        # The API server's CRD handler and discovery lag behind the CRD object:
        # until they catch up, creates answer 403 "definition is terminating".
        spec = load_crd(crd_file(short))["spec"]
        group, version, plural = spec["group"], spec["versions"][0]["name"], spec["names"]["plural"]
        while True:
            status, disc = rest.request("GET", f"/apis/{group}/{version}")
            listed = status == 200 and any(r["name"] == plural for r in disc.get("resources", []))
            if not listed and rest.request("GET", f"/apis/{group}/{version}/{plural}")[0] == 404:
                break
            if time.monotonic() > deadline:
                raise KubeHarnessError(f"{group}/{version} {plural} still served {timeout} s after deleting its CRD")
            time.sleep(0.1)


def wait_gone(rest: Rest, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while rest.request("GET", path)[0] != 404:
        if time.monotonic() > deadline:
            raise KubeHarnessError(f"{path} still exists after {timeout} s")
        time.sleep(0.1)
