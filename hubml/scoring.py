"""The scoring protocols ``%predict`` speaks, in one place (pure functions, no I/O).

Models are served by MLflow's scoring server (locally ``mlflow models serve``,
in the cluster the same server in a pod: ``POST /invocations``) or by KServe,
whose MLflow runtime (MLServer) speaks the Open Inference Protocol
(``POST /v2/models/<name>/infer``). Both backends and the hub service use
this module for the three translations: the user's data into a request body
(``request_body``), a response body into predictions (``predictions``), and a
server's error body into what the user reads (``server_error_text``,
``refused_data``). Pandas and NumPy are recognised by duck typing, so
importing this module costs nothing.
"""

from __future__ import annotations

import json
from typing import Any

from hubml.errors import InvalidRequest

#: The top-level keys MLflow's scoring server accepts (one per request).
SCORING_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances")
#: MLflow's scoring server (``/invocations``) and the Open Inference Protocol (KServe V2).
MLFLOW = "mlflow"
OPEN_INFERENCE = "v2"
PROTOCOLS = (MLFLOW, OPEN_INFERENCE)


def protocol_path(protocol: str, name: str) -> str:
    """The path a protocol answers predictions on, below the server's base URL."""
    if protocol == OPEN_INFERENCE:
        return f"/v2/models/{name}/infer"  # KServe's MLflow runtime (MLServer)
    return "/invocations"


def protocol_of_url(url: str) -> str:
    """Which protocol a prediction URL speaks, from the path ``protocol_path`` gave it."""
    return OPEN_INFERENCE if url.rstrip("/").endswith("/infer") else MLFLOW


def request_body(data: Any, protocol: str = MLFLOW) -> dict[str, Any]:
    """The JSON body that asks a model of ``protocol`` to predict on ``data``; ``InvalidRequest`` when it cannot."""
    payload = scoring_payload(data)
    return v2_request(payload) if protocol == OPEN_INFERENCE else payload


def predictions(body: Any, protocol: str = MLFLOW) -> Any:
    """The predictions inside a server's answer: the same list for the same model on both protocols."""
    return v2_outputs(body) if protocol == OPEN_INFERENCE else predictions_from_response(body)


def scoring_payload(data: Any) -> dict[str, Any]:
    """Wrap ``data`` in the JSON body MLflow's ``/invocations`` expects.

    - a pandas DataFrame -> ``dataframe_split`` (keeps column names and order);
    - a dict that already has exactly one scoring key -> sent as is;
    - a dict of columns (``{"a": [1, 2], "b": [3, 4]}``) or of scalars (one row)
      -> ``dataframe_split``;
    - a list of dicts -> ``dataframe_records``;
    - anything else list-like (nested lists, a NumPy array, a Series) -> ``inputs``.
    """
    if _is_dataframe(data):
        body = {"dataframe_split": json.loads(data.to_json(orient="split", index=False))}
    elif isinstance(data, dict):
        body = _dict_payload(data)
    elif hasattr(data, "tolist") and callable(data.tolist):  # numpy array, pandas Series
        body = {"inputs": data.tolist()}
    elif isinstance(data, (list, tuple)):
        if not data:
            raise InvalidRequest("The data to predict on is empty: give at least one row, e.g. [[1.0, 2.0]] "
                                 "for a model that takes two numbers per row.")
        if all(isinstance(row, dict) for row in data):
            body = {"dataframe_records": list(data)}
        else:
            # a ragged table is no tensor on either protocol: refuse it here, not after a round trip
            _rectangular(list(data))
            body = {"inputs": list(data)}
    else:
        raise InvalidRequest(
            f"Cannot send a {type(data).__name__} to a model: give a list of rows (e.g. [[1.0, 2.0], [3.0, 4.0]]), "
            f"a dict of columns, a pandas DataFrame or a NumPy array."
        )
    try:
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(
            f"The data to predict on cannot be sent as JSON ({e}); use numbers, strings, booleans and "
            f"null only (no NaN or infinity, no Python objects)."
        ) from None
    return body


def _decoded(body: Any) -> Any:
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf8", "replace")
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError:
            return body
    return body


def _cause(stack_trace: str) -> str:
    """The exception line(s) that end a Python traceback: what actually went wrong in the model."""
    lines = [ln for ln in stack_trace.rstrip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if line[:1].isspace() or line.startswith(("Traceback (most recent call last)", "During handling",
                                                   "The above exception")):
            continue
        return " ".join(" ".join(lines[i:]).split())[:400]
    return ""


def server_error_text(body: Any) -> str:
    """What a model server said went wrong, on one line.

    MLflow's scoring server answers ``{"message": ..., "stack_trace": ...}``;
    for a model that raised, ``message`` is only its generic "Verify that the
    serialized input Dataframe is compatible...", and the model's own
    exception (e.g. ``AssertionError: Guard failed: input.size()[0] == 1``)
    is the last line of ``stack_trace``, so that line is added as the cause.
    The Open Inference Protocol answers ``{"error": ...}``.
    """
    body = _decoded(body)
    if not isinstance(body, dict):
        return " ".join(str(body).split())[:600]
    message = " ".join(str(body.get("message") or body.get("error") or body.get("detail") or body).split())
    cause = _cause(str(body.get("stack_trace") or ""))
    if cause and cause not in message:
        message = f"{message.rstrip('.')}. Cause: {cause}"
    return message[:900]


def refused_data(name: str, status: int, body: Any, signature: str | None, model_uri: str) -> InvalidRequest:
    """The one-paragraph error for data a deployment refused: the server's cause and the model's signature.

    ``signature`` is the input signature in the model version's MLmodel
    (``hubml.registry.Registry.signature``), None when unknown; it, not an
    example from some other model, says what shape the data must have.
    ``model_uri`` (``models:/NAME/VERSION``) is where the user finds it otherwise.
    """
    expected = (f"The model's input signature is {signature} (-1: any size); send data of that shape."
                if signature else
                f"Its input signature is not known here: mlflow.models.get_model_info({model_uri!r}).signature "
                f"shows the one its MLmodel records (log the model with input_example=... to record one).")
    return InvalidRequest(f"Deployment {name!r} refused the data (HTTP {status}): {server_error_text(body)} "
                          f"{expected}")


def _is_dataframe(data: Any) -> bool:
    return hasattr(data, "columns") and hasattr(data, "to_json") and hasattr(data, "iloc") and getattr(data, "ndim", 0) == 2


def _dict_payload(data: dict) -> dict[str, Any]:
    if not data:
        raise InvalidRequest("The data to predict on is an empty dict: give columns, e.g. {'x': [1.0, 2.0]}.")
    keys = set(data) & set(SCORING_KEYS)
    if keys:
        if len(data) != 1:
            raise InvalidRequest(
                f"A request body takes exactly one of {', '.join(SCORING_KEYS)}; got {', '.join(map(str, data))}."
            )
        return dict(data)
    if not all(isinstance(k, str) for k in data):
        raise InvalidRequest("Column names must be strings; got " + ", ".join(repr(k) for k in data) + ".")
    columns = list(data)
    values = [v.tolist() if hasattr(v, "tolist") else v for v in data.values()]
    if all(isinstance(v, (list, tuple)) for v in values):
        lengths = {len(v) for v in values}
        if len(lengths) != 1:
            raise InvalidRequest(
                "The columns have different lengths (" + ", ".join(f"{c}: {len(v)}" for c, v in zip(columns, values))
                + "); give every column the same number of rows."
            )
        rows = [list(r) for r in zip(*values)]
    elif not any(isinstance(v, (list, tuple, dict)) for v in values):
        rows = [values]  # one row of scalars
    else:
        raise InvalidRequest("Give either one value per column (one row) or a list per column (several rows), not a mix.")
    return {"dataframe_split": {"columns": columns, "data": rows}}


def predictions_from_response(body: Any) -> Any:
    """MLflow answers ``{"predictions": ...}``; return what is inside."""
    if isinstance(body, dict) and "predictions" in body:
        return body["predictions"]
    return body


def _v2_datatype(flat: list[Any]) -> str:
    if flat and all(isinstance(x, bool) for x in flat):
        return "BOOL"
    if flat and all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        return "INT64"
    if flat and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
        return "FP64"
    if all(isinstance(x, str) for x in flat):
        return "BYTES"
    raise InvalidRequest("A column or tensor mixes numbers, booleans, text or nulls; KServe's Open Inference "
                         "Protocol needs one type per tensor. Make every value of a column the same type.")


def _tensor(name: str, values: Any) -> dict[str, Any]:
    """One Open Inference Protocol input: ``shape`` from the nesting, ``data`` flattened row-major."""
    shape, flat = _rectangular(values)
    return {"name": name, "shape": shape, "datatype": _v2_datatype(flat), "data": flat}


def _rectangular(values: Any) -> tuple[list[int], list[Any]]:
    """The shape of nested rows and their values row-major; ``InvalidRequest`` when the table is ragged."""
    shape: list[int] = []
    probe = values
    while isinstance(probe, (list, tuple)):
        shape.append(len(probe))
        probe = probe[0] if probe else None
    flat: list[Any] = []

    def walk(value: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(value, (list, tuple, dict)):
                raise InvalidRequest("The rows are nested unevenly; give every row the same number of values.")
            flat.append(value)
            return
        if not isinstance(value, (list, tuple)) or len(value) != shape[depth]:
            raise InvalidRequest("The rows have different lengths; give every row the same number of values "
                                 "(a rectangular table), e.g. [[1.0, 2.0], [3.0, 4.0]].")
        for item in value:
            walk(item, depth + 1)

    walk(values, 0)
    return shape or [1], flat


def v2_request(payload: dict[str, Any]) -> dict[str, Any]:
    """MLflow scoring JSON -> an Open Inference Protocol (KServe V2) inference request.

    KServe serves MLflow models with MLServer's MLflow runtime, which decodes the
    request by its ``content_type`` parameter: rows or a tensor go as one input
    decoded to a NumPy array (``np``); named columns go as one input per column
    decoded to a pandas DataFrame (``pd``), the form MLflow's docs use for KServe.
    """
    if "dataframe_split" in payload or "dataframe_records" in payload:
        if "dataframe_split" in payload:
            split = payload["dataframe_split"]
            columns, rows = list(split.get("columns") or []), split.get("data") or []
            if not columns:
                columns = [f"input-{i}" for i in range(len(rows[0]) if rows else 0)]
        else:
            records = payload["dataframe_records"]
            columns = list(dict.fromkeys(k for r in records for k in r))
            rows = [[r.get(c) for c in columns] for r in records]
        if any(not isinstance(r, (list, tuple)) or len(r) != len(columns) for r in rows):
            raise InvalidRequest("Every row needs one value per column; some rows have more or fewer.")
        inputs = [_tensor(str(c), [r[i] for r in rows]) for i, c in enumerate(columns)]
        return {"parameters": {"content_type": "pd"}, "inputs": inputs}
    values = payload["inputs"] if "inputs" in payload else payload.get("instances")
    if isinstance(values, dict):  # named tensors
        return {"inputs": [_tensor(str(k), v) for k, v in values.items()]}
    return {"parameters": {"content_type": "np"}, "inputs": [_tensor("input-0", values)]}


def _unflatten(data: list[Any], shape: list[int]) -> Any:
    if len(shape) == 2 and shape[1] == 1:
        return data  # one value per row (MLServer pads a batch of scalars to [N, 1]): rows, as /invocations gives
    if len(shape) <= 1:
        return data
    step = len(data) // shape[0] if shape[0] else 0
    return [_unflatten(data[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def v2_outputs(result: Any) -> Any:
    """An Open Inference Protocol response -> the predictions (one output: its rows; several: by name).

    The same model answers the same list on both flavours: ``[0, 2]``, not ``[[0], [2]]``.
    """
    outputs = result.get("outputs") if isinstance(result, dict) else None
    if not isinstance(outputs, list):
        return result
    shaped = {o.get("name"): _unflatten(list(o.get("data") or []), list(o.get("shape") or [])) for o in outputs}
    return next(iter(shaped.values())) if len(shaped) == 1 else shaped
