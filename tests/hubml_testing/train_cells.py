"""Training cells and helpers shared by the %%train tests (real DDP on CPU with gloo)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from hubml_testing.kernel import KernelSession, processes_with_home

#: Two workers train a tiny linear model with DDP; rank 0 logs params, a loss
#: curve and the model into the run the magic created.
DDP_CELL = '''
import os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
x = torch.randn(64, 4)
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
model = DDP(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=float(os.environ.get("LR", "0.1")))
check = torch.tensor([float(rank)])
dist.all_reduce(check)
print(f"world={world} rank-sum={check.item():.0f}", flush=True)
if rank == 0:
    import mlflow
    mlflow.start_run()
    mlflow.log_params({"lr": os.environ.get("LR", "0.1"), "world_size": world})
for step in range(8):
    part = slice(rank * 32, (rank + 1) * 32)
    loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
    opt.zero_grad(); loss.backward(); opt.step()
    if rank == 0:
        mlflow.log_metric("loss", loss.item(), step=step)
print(f"done rank {rank}", flush=True)
if rank == 0:
    mlflow.pytorch.log_model(model.module, name="model", serialization_format="pickle", pip_requirements=["torch"])
    mlflow.end_run()
dist.barrier()  # rank 1 waits for rank 0's upload: gloo may abort a rank that leaves while its peer runs
dist.destroy_process_group()
'''

#: Rank 1 fails after a first line; rank 0 waits in a collective it never completes.
FAILING_CELL = '''
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
print(f"rank {rank} up", flush=True)
if rank == 1:
    print("about to fail", file=sys.stderr, flush=True)
    raise ValueError("boom from rank 1")
dist.barrier()
time.sleep(120)
'''

#: Both ranks print "tick" forever (no torch import: starts fast).
SLEEPY_CELL = '''
import os, time
rank = int(os.environ["RANK"])
while True:
    print(f"tick {rank}", flush=True)
    time.sleep(0.3)
'''

QUICK_CELL = '''
import os
rank = int(os.environ["RANK"])
print(f"quick hello from {rank} of {os.environ['WORLD_SIZE']} GREETING={os.environ.get('GREETING')}", flush=True)
'''


def job_processes(home: Path, kernel: KernelSession) -> list[psutil.Process]:
    """Processes started for ``home`` other than the kernel itself (supervisor, torchrun, workers)."""
    return [p for p in processes_with_home(home) if p.pid != kernel.pid]


def worker_processes(home: Path, kernel: KernelSession) -> list[psutil.Process]:
    """torchrun and the workers (not the supervisor, which records the outcome and then exits)."""
    found = []
    for proc in job_processes(home, kernel):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "supervisor.py" not in cmd:
            found.append(proc)
    return found


def wait_gone(home: Path, kernel: KernelSession, timeout: float = 20.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    left = job_processes(home, kernel)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = job_processes(home, kernel)
    return left


def job_dirs(home: Path) -> list[str]:
    jobs = home / "jobs"
    return sorted(os.listdir(jobs)) if jobs.is_dir() else []
