"""Request checks of recserve's Triton python models, and the status code each failure is answered with.

A request the caller got wrong (a shape, a count, a non-finite value, bytes that are not UTF-8) raises
:class:`~recserve.errors.InferenceError` and is answered ``INVALID_ARG`` (gRPC INVALID_ARGUMENT, HTTP 400);
anything else a model raises is a bug of ours and is answered ``INTERNAL``. Messages are bounded: nothing taken
from a request is echoed at any length.

Imported inside Triton's python stub: numpy and recserve.errors only (tests/unit/test_lean_runtime.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recserve.errors import InferenceError

MESSAGE_LIMIT = 300
"""Characters of an error message sent back to the caller (longer ones are cut, saying so)."""

INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"
"""Names of the codes on ``triton_python_backend_utils.TritonError``."""


def bounded(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (and one line), saying how much was left out."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def error_status(exc: BaseException) -> tuple[str, str]:
    """(code name, bounded message) answering a request whose handling raised ``exc``."""
    if isinstance(exc, InferenceError):
        return INVALID_ARG, bounded(str(exc))
    return INTERNAL, bounded(f"internal error ({type(exc).__name__}): {exc}")


def triton_error(pb_utils, code: str, message: str):
    """``pb_utils.TritonError`` with ``code`` (a Triton too old to take a code gets the message alone)."""
    value = getattr(pb_utils.TritonError, code, None)
    return pb_utils.TritonError(message) if value is None else pb_utils.TritonError(message, value)


def error_response(pb_utils, exc: BaseException):
    """The ``InferenceResponse`` answering a request whose handling raised ``exc``."""
    return pb_utils.InferenceResponse(error=triton_error(pb_utils, *error_status(exc)))


def _shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def require_shape(name: str, array: np.ndarray, shape: Sequence[int | None]) -> np.ndarray:
    """``array`` if it has ``shape`` (``None``: any size); InferenceError otherwise."""
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        raise InferenceError(f"input '{name}': expected shape {_shape(shape)}, got {list(array.shape)}")
    return array


def require_finite(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` if every value is finite; InferenceError naming the input otherwise."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise InferenceError(f"input '{name}' has NaN or infinite values; send finite numbers")
    return array


def top_k_inputs(scores: np.ndarray, item_ids: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``recommend_topk``'s inputs checked: (scores [N], item ids [N], k); InferenceError if they do not fit."""
    scores, item_ids, k = np.asarray(scores), np.asarray(item_ids), np.asarray(k)
    if scores.ndim != 2 or scores.shape[1:] != (1,):
        raise InferenceError(f"input 'score': expected shape [N, 1], got {list(scores.shape)}")
    scores, item_ids = require_finite("score", scores).ravel(), item_ids.ravel()
    if len(item_ids) != len(scores):
        raise InferenceError(f"{len(item_ids)} item_ids for {len(scores)} candidate rows")
    if k.size != 1:
        raise InferenceError(f"input 'top_k': expected one value, got shape {list(k.shape)}")
    value = int(k.ravel()[0])
    if value < 0:
        raise InferenceError(f"top_k must be >= 0, got {value}")
    return scores, item_ids, value


def user_embedding_input(embedding: np.ndarray, dim: int) -> np.ndarray:
    """``item_index``'s one user embedding as a [dim] vector; InferenceError unless it is [1, dim] and finite."""
    embedding = np.asarray(embedding)
    if embedding.ndim != 2 or embedding.shape[0] != 1:
        raise InferenceError(f"one user per request: input 'user_embedding' must be [1, {dim}], "
                             f"got {list(embedding.shape)}")
    require_shape("user_embedding", embedding, (1, dim))
    return require_finite("user_embedding", embedding)[0]
