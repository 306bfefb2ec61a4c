"""How often gloo aborts a rank at the end of a DDP script, by how the script ends.

Why this exists: a ``%%train`` cell whose rank 0 logs the model while rank 1
leaves (``destroy_process_group`` and exit) sometimes ends with rank 1 killed by
SIGABRT, its only line libstdc++'s "terminate called without an active
exception". That is PyTorch's, not hubml's: this bench shows it under plain
``torch.distributed.run`` and measures the three endings a user writes, run
alternately so that the machine's load falls on all three alike:

- ``late``: rank 0 works (uploads), then every rank calls ``destroy_process_group``;
- ``early``: every rank calls ``destroy_process_group``, then rank 0 works;
- ``barrier``: rank 0 works, then ``dist.barrier()`` and ``destroy_process_group``
  (what README.md and examples/quickstart.ipynb do).

Rank 0's upload is a 2 s sleep after 60 DDP steps on CPU. Prints each ending's
aborts out of its runs.

Usage::

    .venv/bin/python bench/gloo_teardown.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = '''
import os, time, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)))
opt = torch.optim.Adam(model.parameters(), lr=0.05)
X, y = torch.randn(150, 4), torch.randint(0, 3, (150,))
for _ in range(60):
    loss = torch.nn.functional.cross_entropy(model(X), y)
    opt.zero_grad(); loss.backward(); opt.step()
ending = os.environ["ENDING"]
if ending == "early":
    dist.destroy_process_group()
if rank == 0:
    time.sleep(2.0)  # rank 0 uploads the model
if ending == "barrier":
    dist.barrier()
if ending != "early":
    dist.destroy_process_group()
'''

ENDINGS = ("late", "early", "barrier")
ABORT = "terminate called without an active exception"


def one_run(script: Path, ending: str) -> tuple[bool, bool]:
    """(succeeded, a rank aborted in gloo's teardown) for one torchrun launch."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script)],
        env={**os.environ, "ENDING": ending}, capture_output=True, text=True, timeout=300,
    )
    return proc.returncode == 0, ABORT in proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="launches per ending (default 20)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ddp_end.py"
        script.write_text(SCRIPT)
        aborts = dict.fromkeys(ENDINGS, 0)
        failures = dict.fromkeys(ENDINGS, 0)
        for i in range(args.runs):
            for ending in ENDINGS:
                ok, aborted = one_run(script, ending)
                failures[ending] += not ok
                aborts[ending] += aborted
            print(f"after {i + 1} run(s) each: " + ", ".join(f"{e} {aborts[e]} aborted" for e in ENDINGS), flush=True)
    print()
    for ending in ENDINGS:
        print(f"{ending:8} {aborts[ending]:3d} of {args.runs} runs aborted in gloo's teardown "
              f"({failures[ending]} failed in all)")


if __name__ == "__main__":
    main()
