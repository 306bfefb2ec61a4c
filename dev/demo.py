"""Run ``examples/quickstart.ipynb`` headless (nbclient) and print what it shows.

Called by ``dev/demo`` after the virtualenv is ready; the test suite runs it too
(``tests/magics/test_quickstart.py``). Everything happens in a throwaway
``HUBML_HOME`` (jobs, the sqlite MLflow store, deployments) unless ``--home`` is
given, and every model server the notebook started is stopped at the end, even
when a cell fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _print_outputs(cell, cell_index: int, **_: object) -> None:
    """nbclient hook: show each code cell's output as soon as it finished."""
    if cell.cell_type != "code":
        return
    first = cell.source.splitlines()[0] if cell.source else ""
    print(f"\n[{cell_index}] {first}", flush=True)
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            text = out.text
        elif out.output_type in ("execute_result", "display_data"):
            text = out.get("data", {}).get("text/plain", "")
        elif out.output_type == "error":
            text = f"{out.ename}: {out.evalue}"
        else:
            continue
        for line in str(text).rstrip().splitlines():
            print(f"    {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--notebook", default=str(ROOT / "examples" / "quickstart.ipynb"))
    parser.add_argument("--home", help="HUBML_HOME to use and keep (default: a temporary one, removed after)")
    parser.add_argument("--output", default=str(ROOT / "examples" / "quickstart.out.ipynb"),
                        help="where to write the executed notebook")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="hubml-demo-"))
    home.mkdir(parents=True, exist_ok=True)
    cwd = home / "cwd"
    cwd.mkdir(exist_ok=True)
    # The kernel (and every worker and server it starts) inherits these.
    os.environ["HUBML_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    print(f"Running {args.notebook} headless (HUBML_HOME={home})", flush=True)

    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}, on_cell_executed=_print_outputs)
    status = 0
    try:
        client.execute()
    except CellExecutionError as e:
        print(f"\nThe notebook failed:\n{str(e)[-3000:]}", file=sys.stderr)
        status = 1
    finally:
        nbformat.write(nb, args.output)
        _stop_servers(home)
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    predictions = [line for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.output_type == "stream"
                   for line in out.text.splitlines() if line.startswith("prediction:")]
    if status == 0 and not predictions:
        print("The notebook ran but printed no prediction.", file=sys.stderr)
        status = 1
    if status == 0:
        print("\n" + "\n".join(predictions))
        print(f"Executed notebook: {args.output}")
    return status


def _stop_servers(home: Path) -> None:
    """Stop any model server a failed run left (the notebook's last cell undeploys on success)."""
    from hubml.magics.local.backend import LocalBackend
    from hubml.magics.local.home import LocalHome

    models = LocalBackend(LocalHome(root=home, tracking_uri=f"sqlite:///{home / 'mlflow.db'}"))
    for dep in models.deployments():
        models.undeploy(dep.name)
        print(f"Stopped the model server of deployment {dep.name!r}.")


if __name__ == "__main__":
    sys.exit(main())
