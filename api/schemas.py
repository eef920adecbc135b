"""Response bodies the API itself defines; each task defines its own."""

from pydantic import BaseModel


class ErrorBody(BaseModel):
    detail: str
