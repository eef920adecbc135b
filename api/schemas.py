"""Response bodies the API itself defines; each task defines its own."""

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    detail: str


class ValidationErrorBody(BaseModel):
    """A 422: the server's own message, or FastAPI's list of validation errors (a query
    parameter or header out of range)."""

    detail: str | list[dict[str, Any]]


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given statuses, each with its JSON error body."""
    return {
        status: {
            "model": ValidationErrorBody if status == 422 else ErrorBody,
            "description": description,
        }
        for status, description in descriptions.items()
    }
