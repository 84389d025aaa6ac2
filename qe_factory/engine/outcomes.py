"""What became of a structure: one vocabulary, carried by the exceptions that end a run as data.

FireWorks stores `exception.to_dict()` with a FIZZLED launch (`_exception._details`); the workflow layer reads the
outcome there (`outcome_of`), never from a stack trace. `DFTErrorType` says what pw.x did; an Outcome says what that
means for the structure, and whether its work goes back to READY (nobody's failure) or ends.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any, ClassVar


class Outcome(Enum):
    """Every terminal outcome of a structure's run, with a code (900-999; pw.x's own errors are DFTErrorType)."""

    LABELLED = (0, False, "labelled: energy, forces and stress passed the sanitizer")
    REFUSED = (901, False, "refused before pw.x ran: the input cannot be calculated as given")
    FAILED = (902, False, "pw.x failed and recovery could not fix it (the error type says how)")
    UNPHYSICAL = (903, False, "pw.x converged but the sanitizer refused the result")
    WORKER_LOST = (904, False, "its worker ended without finishing it, too often (killed, node lost, crashed)")
    INTERRUPTED = (910, True, "stopped on request (Ctrl-C, SIGTERM): nobody's failure, run again")
    DISK_FULL = (911, True, "a file could not be written for lack of space: run again once space is back")
    ENVIRONMENT = (912, True, "the worker cannot run it (missing program, MPI cannot launch, missing pseudopotential "
                              "directory, busy JobStore): the worker's fault, not the structure's")
    ERROR = (999, False, "an unexpected error (a bug or a library's failure): the message names the exception")

    @property
    def code(self) -> int:
        return self.value[0]

    @property
    def requeued(self) -> bool:
        """Whether the work goes back to READY rather than failing the structure."""
        return self.value[1]

    @property
    def description(self) -> str:
        return self.value[2]


def outcome_details(outcome: Outcome, error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    """The record of an outcome as a FIZZLED launch keeps it (`_exception._details`)."""
    return {**extra, "outcome": outcome.name, "outcome_code": outcome.code, "error_type": error_type,
            "error_message": message}


class CarriesOutcome:
    """Mixin for exceptions that end a run with a known outcome; FireWorks stores their `to_dict()`."""

    outcome: ClassVar[Outcome]

    def to_dict(self) -> dict[str, Any]:
        return outcome_details(self.outcome, type(self).__name__, str(self))


class DiskFullError(CarriesOutcome, OSError):
    """A file could not be written for lack of space or quota (pw.x's scratch, or the factory's state); the message
    names what. Not a failure of the structure: run it again once space is back."""

    outcome = Outcome.DISK_FULL


class EnvironmentFault(CarriesOutcome, RuntimeError):
    """This machine cannot run the work (pw.x or the MPI launcher missing or not executable, no pseudopotential
    directory, a JobStore another process holds locked): not the structure's fault; the message names what."""

    outcome = Outcome.ENVIRONMENT


class StoreBusy(EnvironmentFault):
    """The JobStore's database is locked by another process beyond its busy timeout."""


class UnexpectedError(CarriesOutcome, RuntimeError):
    """An exception the factory has no name for, raised inside one of its jobs: kept as its type and message."""

    outcome = Outcome.ERROR

    def __init__(self, exc: BaseException):
        super().__init__(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
        self.exception_type = type(exc).__name__

    def to_dict(self) -> dict[str, Any]:
        return outcome_details(self.outcome, self.exception_type, str(self))


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def named(exc: BaseException) -> BaseException:
    """`exc` if it carries an outcome; else the factory's name for it where it has one (a full disk, a busy or
    full sqlite JobStore), else UnexpectedError."""
    if _has_outcome(exc):
        return exc
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return DiskFullError(exc.errno, exc.strerror or str(exc), *([exc.filename] if exc.filename else []))
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "database or disk is full" in text:
            return DiskFullError(errno.ENOSPC, f"the JobStore's database: {text}")
        if "locked" in text or "busy" in text:
            return StoreBusy(f"the JobStore's database is locked by another process ({text}); run again once it "
                             "is released")
    return UnexpectedError(exc)


def _has_outcome(exc: BaseException) -> bool:
    return isinstance(exc, CarriesOutcome) or hasattr(exc, "result")  # DFTFatalError: its report holds it


@contextmanager
def named_outcomes() -> Iterator[None]:
    """Re-raise whatever the block raises as an exception that carries its outcome (`named`), the original chained:
    what FireWorks records for a failed job is then data, not only a stack trace."""
    try:
        yield
    except BaseException as exc:
        name = named(exc)
        if name is exc or isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise name from exc


@contextmanager
def named_store_faults() -> Iterator[None]:
    """Re-raise a full disk or a busy (locked) sqlite database as the factory's named outcome; anything else as is
    (for code that calls a library which catches its own exceptions)."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as exc:
        name = named(exc)
        if isinstance(name, UnexpectedError) or name is exc:
            raise
        raise name from exc


def outcome_of(details: dict[str, Any] | None) -> Outcome:
    """The outcome a FIZZLED launch's `_exception._details` records (ERROR when it records none: an exception
    raised outside the factory's jobs)."""
    name = (details or {}).get("outcome")
    return Outcome[name] if name in Outcome.__members__ else Outcome.ERROR
