"""What a failed request answers: the HTTP status and a message that names the problem."""

from __future__ import annotations

from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)


class RequestError(Exception):
    """A request the app refuses, with the HTTP status to answer and a message that says what is wrong.

    Args:
        status_code: 400 (malformed request: a path instead of an id, bad JSON), 404 (unknown id, model or
            session) or 422 (well-formed but unusable: an unreadable upload, an out-of-range parameter).
        message: what is wrong, for the client.
    """

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, message)
        self.status_code = status_code
        self.message = message

    def __str__(self) -> str:
        return self.message


def status_code_of(error: BaseException) -> int:
    """The HTTP status for ``error``: its own for a :class:`RequestError`, 404 for MONAI Label's "not found"
    exceptions, 400 for its ``INVALID_INPUT``, otherwise 500."""
    if isinstance(error, RequestError):
        return error.status_code
    if isinstance(error, (ImageNotFoundException, LabelNotFoundException)):
        return 404
    if isinstance(error, MONAILabelException) and error.error == MONAILabelError.INVALID_INPUT:
        return 400
    return 500


def message_of(error: BaseException) -> str:
    """The message for the client: a :class:`RequestError`'s own, otherwise the exception's type and text."""
    if isinstance(error, RequestError):
        return error.message
    text = error.msg if isinstance(error, MONAILabelException) else str(error)
    return f"{type(error).__name__}: {text}" if text else f"{type(error).__name__} (the error gave no message)"
