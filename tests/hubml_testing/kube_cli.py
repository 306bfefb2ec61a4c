"""Command line of the test control plane, wrapped by ``dev/kube-up`` / ``dev/kube-down``::

    PYTHONPATH=tests python -m hubml_testing.kube_cli up      # prints the KUBECONFIG path
    PYTHONPATH=tests python -m hubml_testing.kube_cli down    # stops it, removes its state
    PYTHONPATH=tests python -m hubml_testing.kube_cli scale --nodes 1000 --pods 20000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

from hubml_testing.kube_binaries import KubeHarnessError
from hubml_testing.kube_cluster import STATE_FILE, KubeCluster, default_state_dir, scale_up
from hubml_testing.kube_control_plane import start_cluster
from hubml_testing.kube_crds import CRDS
from hubml_testing.kube_processes import pid_alive, stop_processes

def _running_cluster(state_dir: Path) -> KubeCluster | None:
    if not (state_dir / STATE_FILE).is_file():
        return None
    with contextlib.suppress(KubeHarnessError, KeyError):
        cluster = KubeCluster.load(state_dir)
        if cluster.pids and all(pid_alive(p) for p in cluster.pids.values()) and cluster.is_healthy():
            return cluster
    return None


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hubml_testing.kube_cli",
        description="Start/stop the hubml test Kubernetes control plane (etcd, kube-apiserver, "
        "controller-manager, scheduler, kwok GPU nodes) on loopback.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=None,
                        help="where PKI, etcd data, logs and the kubeconfig live "
                        "(default $HUBML_KUBE_RUN_DIR or <tmp>/hubml-kube-<uid>)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", parents=[common], help="start (or reuse) the control plane; print the KUBECONFIG path on stdout")
    up.add_argument("--without-crd", action="append", default=[], choices=sorted(CRDS),
                    help="do not install this CRD (repeatable)")
    sub.add_parser("down", parents=[common], help="stop the control plane and remove its state")
    sub.add_parser("status", parents=[common], help="say whether it runs; print the KUBECONFIG path if so")
    sc = sub.add_parser("scale", parents=[common], help="add scale-mode nodes and pods to the running control plane")
    sc.add_argument("--nodes", type=int, default=1000)
    sc.add_argument("--pods", type=int, default=20000)
    args = parser.parse_args(argv)
    state_dir: Path = (args.state_dir or default_state_dir()).resolve()

    if args.cmd == "up":
        running = _running_cluster(state_dir)
        if running:
            _err(f"control plane already running ({running.server})")
            print(running.kubeconfig)
            return 0
        if (state_dir / STATE_FILE).exists():  # stale: stop leftovers, start clean
            with contextlib.suppress(KubeHarnessError):
                stale = KubeCluster.load(state_dir)
                stop_processes(stale.pids, stale.binaries, {}, 10.0)
            shutil.rmtree(state_dir, ignore_errors=True)
        t0 = time.monotonic()
        crds = [c for c in CRDS if c not in args.without_crd]
        try:
            cluster = start_cluster(state_dir, crds=crds, detach=True, log=_err)
        except KubeHarnessError as exc:
            _err(f"kube-up failed: {exc}")
            return 1
        _err(f"control plane up in {time.monotonic() - t0:.1f} s at {cluster.server}; "
             f"CRDs: {', '.join(cluster.crds) or 'none'}")
        _err(f"use it with: export KUBECONFIG={cluster.kubeconfig}  (stop: dev/kube-down)")
        print(cluster.kubeconfig)
        return 0
    if args.cmd == "down":
        if not (state_dir / STATE_FILE).exists():
            _err(f"no control plane state in {state_dir}; nothing to stop")
            shutil.rmtree(state_dir, ignore_errors=True)
            return 0
        cluster = KubeCluster.load(state_dir)
        pids = dict(cluster.pids)
        cluster.stop()
        left = [f"{n} (pid {p})" for n, p in pids.items() if pid_alive(p)]
        if left:
            _err(f"could not stop: {', '.join(left)}")
            return 1
        _err(f"control plane in {state_dir} stopped")
        return 0
    if args.cmd == "status":
        running = _running_cluster(state_dir)
        if running:
            print(running.kubeconfig)
            return 0
        _err(f"no healthy control plane in {state_dir}")
        return 1
    if args.cmd == "scale":
        running = _running_cluster(state_dir)
        if not running:
            _err(f"no healthy control plane in {state_dir}; run dev/kube-up first")
            return 1
        if args.nodes < 1 or args.pods < 0:
            _err("--nodes must be >= 1 and --pods >= 0")
            return 2
        res = scale_up(running, args.nodes, args.pods, log=_err)
        print(json.dumps(res))
        return 0
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    sys.exit(main())
