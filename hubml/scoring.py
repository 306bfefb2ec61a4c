"""MLflow's scoring protocol: what ``%predict`` sends to ``/invocations`` and reads back.

Both backends serve models with MLflow's scoring server (locally ``mlflow models
serve``, in the cluster the same server in a pod), so the request body is built
once here, as a pure function of the user's data. Pandas and NumPy are
recognised by duck typing, so importing this module costs nothing.
"""

from __future__ import annotations

import json
from typing import Any

from hubml.errors import InvalidRequest

#: The top-level keys MLflow's scoring server accepts (one per request).
SCORING_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances")


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
            raise InvalidRequest("The data to predict on is empty: give at least one row, e.g. [[5.1, 3.5, 1.4, 0.2]].")
        if all(isinstance(row, dict) for row in data):
            body = {"dataframe_records": list(data)}
        else:
            body = {"inputs": list(data)}
    else:
        raise InvalidRequest(
            f"Cannot send a {type(data).__name__} to a model: give a list of rows (e.g. [[5.1, 3.5, 1.4, 0.2]]), "
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

