"""Documents: pydantic models that jobflow and FireWorks store and rebuild as the same class.

Both libraries serialise through monty's `as_dict`/`from_dict` protocol (with `@module`/`@class`); FireWorks turns
any other object into its `str()`. Models that travel inside a workflow (settings, recovery policy, the documents
handed between jobs) therefore speak that protocol, and a subclass (e.g. a user's RecoveryHandler) comes back as
itself on the worker.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class MSONProtocol:
    """`as_dict`/`from_dict` for a pydantic model, in monty's format."""

    def as_dict(self) -> dict[str, Any]:
        cls = type(self)
        return {"@module": cls.__module__, "@class": cls.__qualname__, **self.model_dump(mode="json")}  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls.model_validate({k: v for k, v in data.items() if not k.startswith("@")})  # type: ignore[attr-defined]


class Document(MSONProtocol, BaseModel):
    """A pydantic model that jobflow and FireWorks can store and rebuild."""
