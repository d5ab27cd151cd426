"""What the python-backend models of the repository share (torch-free: ``preprocess`` runs without torch).

Each model answers every request of a batch on its own: a bad request gets its own INVALID_ARG
error and an unexpected failure an INTERNAL one, and neither reaches the other requests or takes
the model down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class RequestError(ValueError):
    """A request whose tensors or parameters cannot be used; the message goes back to the caller."""


def answer_each(
    requests: Sequence[Any],
    handle: Callable[[Any], list[Any]],
    invalid: tuple[type[Exception], ...],
    model: str,
    pb_utils: Any,
) -> list[Any]:
    """One response per request: ``handle(request)``'s output tensors, or the error it raised
    (``invalid`` exceptions as INVALID_ARG with their message; anything else as an internal error
    naming ``model``). ``pb_utils`` is the server's ``triton_python_backend_utils``."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except invalid as exc:
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
        except Exception as exc:  # an unexpected failure must not take the model down for other requests
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{model} failed: {type(exc).__name__}: {exc}")))
    return responses
