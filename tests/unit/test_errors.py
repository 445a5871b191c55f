"""Finding the job's input error inside what Ray raises (its wrappers built here, no cluster)."""

from __future__ import annotations

from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from bird_datasets.format import DatasetFormatError
from workers.errors import JobInputError, RunInputError, input_error_in, root_cause


def _task_error(cause: BaseException) -> RayTaskError:
    return RayTaskError("drive", "Traceback ...\nremote frames", cause)


def test_an_input_error_is_found_through_every_ray_wrapper() -> None:
    inner = RunInputError("bird cannot train this student: needs an embedding")
    wrapped = _task_error(
        WorkerGroupError("rank 0 failed", {1: RuntimeError("x"), 0: _task_error(inner)})
    )
    assert input_error_in(wrapped) is inner
    assert input_error_in(_task_error(ControllerError(inner))) is inner
    part = DatasetFormatError("datasets/x/part-0.parquet is not a readable Parquet file", "u")
    assert input_error_in(_task_error(part)) is part
    chained = RuntimeError("while planning")
    chained.__cause__ = JobInputError("invalid job options: lr")
    assert isinstance(input_error_in(chained), JobInputError)


def test_other_errors_are_not_input_errors_and_have_a_root_cause() -> None:
    lost = ConnectionError("node 3 died")
    wrapped = _task_error(WorkerGroupError("rank 0 failed", {0: lost}))
    assert input_error_in(wrapped) is None
    assert root_cause(wrapped) is lost
    # An exception that was merely being handled is not the reason.
    context = RuntimeError("retry failed")
    context.__context__ = JobInputError("old")
    assert input_error_in(context) is None
