"""Errors of a job, and how to find the one that matters inside what Ray raises.

Ray wraps what a remote function raises: ``RayTaskError`` around a task's exception, Ray
Train's ``WorkerGroupError`` (the exception of each rank) and ``ControllerError``, Tune's trial
errors. :func:`input_error_in` looks through every layer for an error of the job's own inputs
(the spec or the data): such a job fails at once instead of being retried.
"""

from __future__ import annotations

from collections.abc import Iterator

from bird_datasets.format import DatasetError

__all__ = [
    "JobCancelled",
    "JobInputError",
    "RunInputError",
    "causes",
    "input_error_in",
    "root_cause",
]


class JobInputError(ValueError):
    """The job cannot succeed as specified (bad dataset, teacher, options); no retry helps."""


class RunInputError(ValueError):
    """An error of the job's inputs found inside a Ray run (e.g. a student the method cannot
    train); raised by the training loop so that the worker fails the job at once."""


class JobCancelled(Exception):
    """The job stops: cancellation was requested (or the worker lost the job's lease)."""


def _input_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the inputs' fault wherever they are raised. (A missing object or a
    checkpoint that does not load is the input's fault only while the inputs are read; the
    pipeline turns those into :class:`JobInputError` there.)"""
    # Imported here: the teacher module loads torch, which this module needs not.
    from workers.teachers import TeacherLoadError

    return (JobInputError, RunInputError, DatasetError, TeacherLoadError)


def _inner(error: BaseException) -> list[BaseException]:
    """The exceptions ``error`` wraps, most specific first."""
    inner: list[BaseException] = []
    cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError
    if isinstance(cause, BaseException):
        inner.append(cause)
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
    if isinstance(failures, dict):
        inner.extend(failures[rank] for rank in sorted(failures))
    controller = getattr(error, "controller_failure", None)  # ray.train.ControllerError
    if isinstance(controller, BaseException):
        inner.append(controller)
    # Explicit chaining only (``raise ... from``): an implicit __context__ is an exception that
    # was being handled, not necessarily the reason.
    if error.__cause__ is not None:
        inner.append(error.__cause__)
    return inner


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it wraps, breadth first, each once."""
    seen: set[int] = set()
    queue = [error]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue.extend(_inner(current))


def input_error_in(error: BaseException) -> BaseException | None:
    """The first error of the job's own inputs among ``error`` and what it wraps, if any."""
    kinds = _input_error_types()
    for current in causes(error):
        if isinstance(current, kinds):
            return current
    return None


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception that is not one of Ray's wrappers (``error`` itself if none)."""
    found = error
    for current in causes(error):
        if not _inner(current):
            return current
        found = current
    return found
