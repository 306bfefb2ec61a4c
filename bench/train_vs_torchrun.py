"""Wall time of ``%%train --workers 2`` against plain ``torchrun --nproc-per-node 2``.

The same DDP script (gloo, CPU, 2 workers; rank 0 logs params, a loss curve
and the model to MLflow) runs both ways, alternating, several times:

- A: a cell ``%%train --workers 2`` executed in a real IPython kernel (started
  with ``%load_ext hubml``), timed from sending the cell to the kernel going
  idle: run creation, supervisor, torchrun, streaming, final status, all in;
- B: ``python -m torch.distributed.run --nproc-per-node 2 script.py`` started
  by this process with the same MLflow store in ``MLFLOW_TRACKING_URI`` (rank 0's
  ``mlflow.start_run()`` then creates its own run, the work the magic does for A).

One warm-up of each is not counted (the kernel's first ``%%train`` imports MLflow
and creates the sqlite store; that one-off cost is printed separately). Between
repetitions the bench waits until every process of the previous one has exited.
It prints each repetition, the medians and the ratio A/B (target <= 1.10).

Usage::

    .venv/bin/python bench/train_vs_torchrun.py [--reps 5] [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hubml_testing.kernel import KernelSession, processes_with_home  # noqa: E402

SCRIPT = '''
import os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
x = torch.randn(4096, 64)
y = x @ torch.randn(64, 1)
model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
if rank == 0:
    import mlflow
    mlflow.start_run()
    mlflow.log_params({"steps": STEPS, "world_size": dist.get_world_size()})
for step in range(STEPS):
    part = slice(rank * 2048, (rank + 1) * 2048)
    loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
    opt.zero_grad(); loss.backward(); opt.step()
    if rank == 0 and step % 25 == 0:
        mlflow.log_metric("loss", loss.item(), step=step)
        print(f"step {step} loss {loss.item():.4f}", flush=True)
if rank == 0:
    mlflow.pytorch.log_model(model.module, name="model", serialization_format="pickle", pip_requirements=["torch"])
    mlflow.end_run()
dist.barrier()  # rank 1 must not tear gloo down while rank 0 still uploads the model (it aborts)
dist.destroy_process_group()
'''


def wait_quiet(home: Path, kernel_pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in processes_with_home(home) if p.pid != kernel_pid]:
            return
        time.sleep(0.1)
    raise SystemExit("processes of the previous repetition did not exit")


def run_magic(kernel: KernelSession, script: str) -> float:
    t0 = time.perf_counter()
    res = kernel.run("%%train --workers 2 --experiment bench\n" + script, timeout=900)
    elapsed = time.perf_counter() - t0
    if res.status != "ok":
        raise SystemExit(f"%%train failed:\n{res}")
    return elapsed


def run_torchrun(script_path: Path, env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script_path)],
                          env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="counted repetitions of each (default 5)")
    parser.add_argument("--steps", type=int, default=300, help="training steps in the script (default 300)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="hubml-bench-"))
    script = SCRIPT.replace("STEPS", str(args.steps))
    kernel = KernelSession(home, load_ext=True, extra_env={"HUBML_LIVE_VIEW": "text"})
    try:
        script_path = home / "bench_script.py"
        script_path.write_text(script)
        env = dict(os.environ)
        env.update({"HUBML_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
                    "MLFLOW_EXPERIMENT_NAME": "bench", "PYTHONUNBUFFERED": "1"})
        cold = run_magic(kernel, script)
        wait_quiet(home, kernel.pid)
        print(f"warm-up  %%train (first in this kernel: imports MLflow, creates the store) {cold:7.2f} s")
        first = run_torchrun(script_path, env, kernel.cwd)
        wait_quiet(home, kernel.pid)
        print(f"warm-up  torchrun {first:7.2f} s")
        magic, plain = [], []
        for rep in range(args.reps):
            order = [("magic", lambda: run_magic(kernel, script)), ("torchrun", lambda: run_torchrun(script_path, env, kernel.cwd))]
            if rep % 2:
                order.reverse()
            for name, fn in order:
                t = fn()
                wait_quiet(home, kernel.pid)
                (magic if name == "magic" else plain).append(t)
            print(f"rep {rep + 1}: %%train {magic[-1]:7.2f} s   torchrun {plain[-1]:7.2f} s")
        med_magic, med_plain = statistics.median(magic), statistics.median(plain)
        print(f"median   %%train {med_magic:7.2f} s   torchrun {med_plain:7.2f} s")
        pairs = sorted(m - p for m, p in zip(magic, plain))
        print(f"median of paired differences %%train - torchrun: {statistics.median(pairs):+.2f} s")
        print(f"ratio %%train / torchrun = {med_magic / med_plain:.3f} (target <= 1.10)")
    finally:
        kernel.shutdown()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
