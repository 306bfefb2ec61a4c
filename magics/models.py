"""``%register_model``, ``%models``, ``%deploy``, ``%deployments``, ``%undeploy``, ``%predict``.

Thin wrappers over ``hubml.magics.api``: parse the line, call, print a short
human summary. Errors a user can fix (``InvalidRequest``, ``NotFound``,
``Conflict``, ``Forbidden``) become one-paragraph ``UsageError``s; a
``BackendError`` (something outside failed) is shown with its next step and no
traceback wall.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import shlex
from collections.abc import Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from hubml.errors import Conflict, Forbidden, InvalidRequest, NotFound
from hubml.magics import api
from hubml.magics.session import BACKENDS, SESSION
from hubml.models import parse_tags

_BACKEND_HELP = f"Where to act: {', '.join(BACKENDS)} (default: the session's, auto = hub inside a hubml hub, else local)."


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show what the user can fix as a ``UsageError`` (one paragraph, no traceback)."""
    try:
        yield
    except (InvalidRequest, NotFound, Conflict, Forbidden) as e:
        raise UsageError(str(e)) from None


@magics_class
class ModelMagics(Magics):
    """Register models from ``%%train`` runs, serve them and ask them for predictions."""

    @magic_arguments()
    @argument("--name", help="Registered model name (required); each registration adds a version under it.")
    @argument("--run", metavar="RUN_ID", help="MLflow run to register (default: the last %%%%train run of this kernel).")
    @argument("--artifact-path", default="model", metavar="PATH",
              help="The name the model was logged under in the run (mlflow.<flavor>.log_model(..., name=PATH)); "
                   "default 'model'.")
    @argument("--alias", help="Point this MLflow alias (e.g. champion) at the new version; %%deploy NAME@ALIAS "
                              "then serves it. Aliases replace MLflow's deprecated stages.")
    @argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="Tag the new version (repeatable).")
    @argument("--backend", help=_BACKEND_HELP)
    @line_magic
    def register_model(self, line: str) -> None:
        """Register the model logged by a ``%%train`` run in MLflow's model registry.

        Example: ``%register_model --name iris-clf --alias champion``
        """
        args = _parse(self.register_model, line)
        with user_errors():
            if args.name is None:
                raise InvalidRequest(
                    "%register_model needs --name NAME: the registered model the new version goes under "
                    "(for example --name iris-clf)."
                )
            tags = parse_tags(args.tag)
            info = api.register_model(args.name, args.run, artifact_path=args.artifact_path, alias=args.alias,
                                      tags=tags, backend=args.backend)
        alias = f", alias @{', @'.join(info.aliases)}" if info.aliases else ""
        print(f"Registered {info.name} version {info.version}{alias} (run {info.run_id}).")
        ref = f"{info.name}@{info.aliases[0]}" if info.aliases else f"{info.name}/{info.version}"
        print(f"Serve it with: %deploy {ref}")

    @magic_arguments()
    @argument("--backend", help=_BACKEND_HELP)
    @line_magic
    def models(self, line: str) -> None:
        """List registered models with their versions and aliases."""
        args = _parse(self.models, line)
        with user_errors():
            found = api.models(backend=args.backend)
        if not found:
            print("No registered models yet. Register one with %register_model --name NAME after a %%train.")
            return
        rows = [("MODEL", "VERSIONS", "ALIASES", "LATEST RUN")]
        for m in found:
            versions = ", ".join(str(v.version) for v in m.versions) or "-"
            aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(m.aliases.items())) or "-"
            latest = m.versions[-1].run_id if m.versions else None
            rows.append((m.name, versions, aliases, latest or "-"))
        print(_table(rows))

    @magic_arguments()
    @argument("model", metavar="NAME[@alias|/version]", nargs="?",
              help="The registered model: NAME (latest version), NAME@alias or NAME/version.")
    @argument("--name", help="Deployment name (default: the model name). Deploying again under the same name "
                             "replaces the running server without downtime.")
    @argument("--port", type=int, help="Local backend: serve on this 127.0.0.1 port (default: a free one).")
    @argument("--timeout", type=float, default=None,
              help="Seconds to wait for the server to answer (default 180); on timeout nothing is left running.")
    @argument("--profile", help="Hub backend: the GPU/CPU profile of the serving pods (see the hub's profiles).")
    @argument("--min-replicas", type=int, default=1, metavar="N",
              help="Hub backend: fewest replicas the autoscaler keeps (0 lets KServe scale to zero; default 1).")
    @argument("--max-replicas", type=int, default=1, metavar="N", help="Hub backend: most replicas (default 1).")
    @argument("--canary", type=int, default=None, metavar="PERCENT",
              help="Hub backend with KServe: redeploy under the same name sending PERCENT%% of the traffic "
                   "to the new version (1-99); the rest stays on the running one. Again with the same version "
                   "changes its share; finish with --promote or --rollback.")
    @argument("--promote", metavar="DEPLOYMENT",
              help="Hub backend with KServe: the canary of DEPLOYMENT takes all traffic and becomes its stable "
                   "version (no pod restarts).")
    @argument("--rollback", metavar="DEPLOYMENT",
              help="Hub backend with KServe: DEPLOYMENT's stable version takes all traffic again; the canary "
                   "goes.")
    @argument("--backend", help=_BACKEND_HELP)
    @line_magic
    def deploy(self, line: str) -> None:
        """Serve a registered model; returns when it answers predictions and prints its URL.

        Example: ``%deploy iris-clf@champion`` then ``%predict iris-clf [[5.1, 3.5, 1.4, 0.2]]``
        """
        args = _parse(self.deploy, line)
        if args.promote or args.rollback:
            self._finish_rollout(args)
            return
        if not args.model:
            raise UsageError("%deploy needs the model to serve (%deploy NAME[@alias|/version]), or --promote "
                             "DEPLOYMENT / --rollback DEPLOYMENT to finish a canary. See %deploy? for details.")
        with user_errors():
            spec = api.deploy_request(args.model, args.name, port=args.port, timeout=args.timeout,
                                      profile=args.profile, min_replicas=args.min_replicas,
                                      max_replicas=args.max_replicas, canary=args.canary)
            backend = SESSION.backend(args.backend)
            print(f"Deploying {spec.model} as {spec.name!r}: waiting until its server answers...", flush=True)
            info = backend.deploy(spec, wait=args.timeout)
        if info.canary:
            print(f"Deployment {info.name!r}: {info.traffic()} at {info.url}")
            print(f"Watch it with %deployments; finish with %deploy --promote {info.name} or "
                  f"%deploy --rollback {info.name}.")
            return
        print(f"Deployment {info.name!r} serves {info.model} (version {info.version}) at {info.url}")
        if info.message:
            print(f"({info.message})")
        print(f"Try it: %predict {info.name} [[...]]   or   hubml.predict({info.name!r}, data)")

    @staticmethod
    def _finish_rollout(args: Any) -> None:
        """``%deploy --promote NAME`` / ``--rollback NAME``: nothing else may be on the line."""
        if args.promote and args.rollback:
            raise UsageError("Give --promote or --rollback, not both: one finishes the canary forwards, the other "
                             "backwards.")
        flag, name = ("--promote", args.promote) if args.promote else ("--rollback", args.rollback)
        extra = [f for f, v in (("a model", args.model), ("--canary", args.canary), ("--name", args.name),
                                ("--port", args.port), ("--profile", args.profile), ("--timeout", args.timeout))
                 if v is not None]
        extra += [f for f, v, d in (("--min-replicas", args.min_replicas, 1), ("--max-replicas", args.max_replicas, 1))
                  if v != d]
        if extra:
            raise UsageError(f"%deploy {flag} {name} takes only --backend; remove {', '.join(extra)}. (To deploy "
                             f"another version, run %deploy MODEL --name {name} on its own.)")
        with user_errors():
            if args.promote:
                info = api.promote(name, backend=args.backend)
                print(f"Promoted: deployment {info.name!r} now serves {info.model} (version {info.version}) to all "
                      f"traffic at {info.url}")
            else:
                info = api.rollback(name, backend=args.backend)
                print(f"Rolled back: deployment {info.name!r} serves {info.model} (version {info.version}) to all "
                      f"traffic again; the canary is gone.")

    @magic_arguments()
    @argument("--backend", help=_BACKEND_HELP)
    @line_magic
    def deployments(self, line: str) -> None:
        """List deployments with their state: ready, unresponsive or dead (its server exited)."""
        args = _parse(self.deployments, line)
        with user_errors():
            found = api.deployments(backend=args.backend)
        if not found:
            print("No deployments. Start one with %deploy NAME[@alias|/version].")
            return
        rows = [("DEPLOYMENT", "MODEL", "VERSION", "STATE", "TRAFFIC", "URL")]
        rows += [(d.name, d.model, str(d.version), d.state, d.traffic(), d.url) for d in found]
        print(_table(rows))
        for d in found:
            if d.state != "ready" and d.message:
                print(f"{d.name}: {d.message}")

    @magic_arguments()
    @argument("name", help="The deployment to stop (see %%deployments).")
    @argument("--backend", help=_BACKEND_HELP)
    @line_magic
    def undeploy(self, line: str) -> None:
        """Stop a deployment's server and remove it."""
        args = _parse(self.undeploy, line)
        with user_errors():
            api.undeploy(args.name, backend=args.backend)
        print(f"Deployment {args.name!r} stopped and removed.")

    @magic_arguments()
    @argument("--backend", help=_BACKEND_HELP)
    @argument("name", help="The deployment to ask (see %%deployments).")
    @argument("data", metavar="DATA",
              help="A Python or JSON literal (e.g. [[1.0, 2.0], [3.0, 4.0]] or {\"x\": [1, 2]}) or the name of a "
                   "notebook variable (a list, dict, pandas DataFrame or NumPy array). The rest of the line is "
                   "DATA, spaces included.")
    @no_var_expand
    @line_magic
    def predict(self, line: str) -> Any:
        """Send DATA to a deployment and return its predictions (so ``y = %predict NAME X`` works)."""
        backend, name, text = _split_predict_line(line)
        with user_errors():
            data = self._data(text)
            return api.predict(name, data, backend=backend)

    def _data(self, text: str) -> Any:
        """DATA: a notebook variable by name, else a Python literal, else JSON (true/false/null)."""
        if text.isidentifier() and text not in ("True", "False", "None"):
            ns = self.shell.user_ns if self.shell is not None else {}
            if text in ns:
                return ns[text]
            raise InvalidRequest(
                f"DATA {text!r} is not defined in the notebook. Give a literal (one list per row, e.g. "
                f"[[1.0, 2.0], [3.0, 4.0]]) or the name of a variable that holds the rows."
            )
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
        try:
            return json.loads(text)
        except ValueError as e:
            raise InvalidRequest(
                f"DATA is neither a Python/JSON literal nor a notebook variable name ({e.msg} at column "
                f"{e.colno}): {text[:80]!r}. Write one list per row, e.g. [[1.0, 2.0], [3.0, 4.0]]."
            ) from None


def _parse(magic: Any, line: str) -> Any:
    """Split like a shell (quotes removed, so ``--name "a b"`` gives ``a b``), then parse the flags."""
    try:
        argv = shlex.split(line or "")
    except ValueError as e:
        raise UsageError(f"Cannot read the arguments ({e}): close the quote or remove it.") from None
    return magic.parser.parse_args(argv)


_PREDICT_LINE = re.compile(r"^\s*(?:--backend(?:=|\s+)(?P<backend>\S+)\s+)?(?P<name>[^\s-]\S*)\s+(?P<data>\S.*?)\s*$", re.S)


def _split_predict_line(line: str) -> tuple[str | None, str, str]:
    """``[--backend B] NAME DATA``: DATA keeps its spaces and quotes, so it is not shell-split."""
    match = _PREDICT_LINE.match(line or "")
    if not match:
        raise UsageError(
            "%predict needs a deployment name and the data: %predict NAME DATA, for example "
            "%predict my-model [[1.0, 2.0], [3.0, 4.0]] (DATA may also be a notebook variable). "
            "See %predict? for details."
        )
    return match.group("backend"), match.group("name"), match.group("data")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
