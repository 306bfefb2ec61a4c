"""Real MLflow runs with real logged models, for the registry and serving tests.

Not a fixture plugin: plain helpers the model tests import. A run is logged by
real MLflow code (``mlflow.sklearn.log_model`` of a fitted scikit-learn
classifier on iris), either in a subprocess pointed at a tracking URI
(``log_runs``) or inside a test kernel (``LOG_RUNS_CELL``), so the model tests
do not depend on ``%%train``.

``pip_requirements`` is given explicitly: MLflow would otherwise infer them by
importing the model in a subprocess, which costs seconds and adds nothing here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

#: Defines ``log_runs(specs) -> {key: run_id}`` where ``specs`` maps a key to
#: ``{"artifact_path": "model" | None, "shift": int}``: ``artifact_path=None``
#: logs a run without any model; ``shift`` rotates the labels, so two models
#: with different shifts predict different classes for the same row.
LOG_RUNS_CODE = '''
def log_runs(specs, experiment="hubml-tests"):
    import mlflow
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    X, y = load_iris(return_X_y=True)
    mlflow.set_experiment(experiment)
    out = {}
    for key, spec in specs.items():
        with mlflow.start_run(run_name=key) as run:
            mlflow.log_param("shift", spec.get("shift", 0))
            if spec.get("artifact_path"):
                model = LogisticRegression(max_iter=500).fit(X, (y + spec.get("shift", 0)) % 3)
                mlflow.sklearn.log_model(model, name=spec["artifact_path"], pip_requirements=["scikit-learn"])
            else:
                mlflow.log_metric("loss", 1.0)
        out[key] = run.info.run_id
    return out
'''

#: The iris row every test predicts on; a model with shift s predicts class s for it.
SETOSA = [5.1, 3.5, 1.4, 0.2]


def log_runs(tracking_uri: str, specs: dict[str, dict], cwd: str | None = None,
             extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Log runs in a fresh Python process against ``tracking_uri``; returns ``{key: run_id}``."""
    script = LOG_RUNS_CODE + "\nimport json, sys\nprint(json.dumps(log_runs(json.loads(sys.argv[1]))))\n"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **(extra_env or {})}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(specs)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=240)
    if done.returncode != 0:
        raise RuntimeError(f"logging runs failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


#: A PyTorch model logged the MLflow 3 default way (``pt2``: exported with
#: ``torch.export``) with a one-row ``input_example``: the export specialises
#: the batch dimension to 1, so its server refuses two rows with a guard failure.
LOG_TORCH_ONE_ROW_CODE = '''
import json, mlflow, torch
torch.manual_seed(0)
mlflow.set_experiment("hubml-torch")
with mlflow.start_run(run_name="torch-one-row") as run:
    mlflow.pytorch.log_model(torch.nn.Linear(3, 2), name="model", input_example=torch.randn(1, 3).numpy(),
                             pip_requirements=["torch"])
print(json.dumps({"run_id": run.info.run_id}))
'''

