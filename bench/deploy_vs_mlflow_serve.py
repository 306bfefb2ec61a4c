"""``%deploy`` time to first good prediction vs ``mlflow models serve`` started by hand.

Both sides serve the same registered model version from the same sqlite MLflow
store on this machine:

- hubml: ``LocalBackend.deploy`` (what ``%deploy NAME/1`` calls: resolve the
  version, pick a free port, start ``mlflow models serve --env-manager local``,
  wait until it answers) followed by ``predict`` (what ``%predict`` calls);
- by hand: ``mlflow models serve -m models:/NAME/1 --env-manager local --port P``
  started with ``subprocess``, then POST ``/invocations`` polled every 50 ms
  (the same interval hubml polls ``/ping`` with) until a correct prediction.

The clock runs from the call until the first correct prediction is back. The
runs alternate (hubml first on even rounds, by hand first on odd ones) after one
untimed warm-up of each, and the medians are compared. The ratio must stay
<= 1.05 (issue 2). Usage::

    .venv/bin/python bench/deploy_vs_mlflow_serve.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROW = [5.1, 3.5, 1.4, 0.2]  # iris setosa: a model trained on iris answers class 0
POLL = 0.05


def log_and_register(home: Path, backend) -> None:
    """One sklearn classifier on iris, logged by MLflow and registered as bench-clf/1."""
    code = (
        "import mlflow\nfrom sklearn.datasets import load_iris\nfrom sklearn.linear_model import LogisticRegression\n"
        "X, y = load_iris(return_X_y=True)\nmlflow.set_experiment('bench')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.sklearn.log_model(LogisticRegression(max_iter=500).fit(X, y), name='model',"
        " pip_requirements=['scikit-learn'])\n"
        "print(run.info.run_id)\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": backend.home.tracking_uri}
    run_id = subprocess.run([sys.executable, "-c", code], env=env, cwd=home, check=True, capture_output=True,
                            text=True).stdout.strip().splitlines()[-1]
    from hubml.models import RegisterRequest

    backend.register_model(RegisterRequest(name="bench-clf", run_id=run_id).validate())


def hubml_once(backend) -> float:
    from hubml.models import DeploySpec, ModelRef

    t0 = time.perf_counter()
    backend.deploy(DeploySpec(model=ModelRef.parse("bench-clf/1"), name="bench"))
    answer = backend.predict("bench", [ROW])
    elapsed = time.perf_counter() - t0
    assert answer == [0], answer
    backend.undeploy("bench")
    return elapsed


def by_hand_once(tracking_uri: str, workdir: Path) -> float:
    from hubml.magics.local.model_server import free_port

    port = free_port()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    body = json.dumps({"inputs": [ROW]}).encode()
    url = f"http://127.0.0.1:{port}/invocations"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(bindir / "mlflow"), "models", "serve", "-m", "models:/bench-clf/1",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("mlflow models serve exited")
            try:
                req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if json.loads(resp.read()) == {"predictions": [0]}:
                        return time.perf_counter() - t0
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(POLL)
    finally:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGTERM)
        psutil.wait_procs(tree, timeout=15)
        proc.wait()


def own_work(backend, repeat: int = 20) -> float:
    """Median time of what %deploy adds around the server itself; small and load-independent."""
    from hubml.magics.local.model_server import free_port
    from hubml.models import ModelRef

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        backend.resolve(ModelRef.parse("bench-clf/1"))
        with backend._lock():
            backend._records()
            free_port()
            backend._write_record("own-work", {"name": "own-work"})
        times.append(time.perf_counter() - t0)
        os.unlink(backend._record_path("own-work"))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from hubml.magics.local.backend import LocalBackend
    from hubml.magics.local.home import LocalHome

    root = Path(tempfile.mkdtemp(prefix="hubml-bench-deploy-"))
    backend = LocalBackend(LocalHome(root=root, tracking_uri=f"sqlite:///{root / 'mlflow.db'}"))
    try:
        log_and_register(root, backend)
        hubml_once(backend)                          # warm-up, untimed: OS caches, the client's DB engine
        by_hand_once(backend.home.tracking_uri, root)
        ours, theirs = [], []
        for i in range(args.rounds):
            if i % 2 == 0:
                ours.append(hubml_once(backend))
                theirs.append(by_hand_once(backend.home.tracking_uri, root))
            else:
                theirs.append(by_hand_once(backend.home.tracking_uri, root))
                ours.append(hubml_once(backend))
            print(f"round {i + 1}: %deploy+%predict {ours[-1]:.2f} s   mlflow models serve by hand {theirs[-1]:.2f} s",
                  flush=True)
        own = own_work(backend)
    finally:
        for dep in backend.deployments():
            backend.undeploy(dep.name)
        shutil.rmtree(root, ignore_errors=True)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    cores = os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    print(f"\nmachine: {cores} cores, {mem:.0f} GiB, {platform.machine()}, Python {platform.python_version()}")
    print(f"median time to first good prediction over {args.rounds} rounds:")
    print(f"  hubml %deploy + %predict           {mo:.2f} s")
    print(f"  mlflow models serve, by hand       {mt:.2f} s")
    print(f"  hubml's own work around the server (resolve version, pick port, write record): {own * 1000:.1f} ms")
    print(f"ratio hubml / mlflow models serve: {mo / mt:.3f} (target <= 1.05)")
    return 0 if mo / mt <= 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
