"""The dashboard's errors: what a call refused, as {"error": "...", "field": "..."} with a 4xx status (5xx when
the system failed), never a stack trace."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from llmplan.runtime.web.http_guards import ApiError


class FieldError(ApiError):
    """A submitted value that is refused: 400, naming its field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(HTTPStatus.BAD_REQUEST, message, field)


def error_document(message: str, field: str | None = None) -> dict[str, str]:
    return {"error": message, "field": field} if field else {"error": message}


def error_answer(error: BaseException) -> tuple[int, str, str | None]:
    """(status, one-line message, field at fault) for any error a call raised."""
    if isinstance(error, ApiError):
        return error.status, str(error), error.field
    status, message = user_facing(error)
    return status, message, getattr(error, "field", None)


def user_facing(error: BaseException) -> tuple[HTTPStatus, str]:
    """Errors the planner and store raise for bad input, as one line; anything else as a server error."""
    import click

    from llmplan.runtime.jobs.cluster import ClusterError
    from llmplan.runtime.store.errors import UnknownJobError
    from llmplan.runtime.jobs.submission import NeverFits

    if isinstance(error, UnknownJobError):
        return HTTPStatus.NOT_FOUND, str(error)
    if isinstance(error, (NeverFits, ClusterError)):  # what the cluster cannot run, or a cluster not joined
        return HTTPStatus.BAD_REQUEST, first_line(str(error))
    if isinstance(error, click.ClickException):
        return HTTPStatus.BAD_REQUEST, first_line(error.format_message())
    if isinstance(error, (ValueError, LookupError, TypeError, ArithmeticError, RecursionError)):
        return HTTPStatus.BAD_REQUEST, first_line(str(error)) or type(error).__name__
    return HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {first_line(str(error))}"


def first_line(text: Any) -> str:
    lines = str(text).splitlines()
    return lines[0] if lines else ""
