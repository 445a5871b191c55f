"""Schemathesis extension for bird: one built-in check, refined to what a JSON schema can say.

``positive_data_acceptance`` expects every schema-valid request to succeed. A job spec can be
well formed and still be refused with a 422 by a rule that a JSON schema cannot state: the
dataset it names does not exist, the options it gives do not belong to its method, a search
space's bounds are inconsistent. An upload (``POST /datasets``, ``POST /teachers``)
likewise: its files must include ``manifest.json``, once each, none larger than the
deployment's setting. Those rules answer errors of type ``value_error`` (pydantic's model
validators and the API's own checks). :func:`positive_data_acceptance_beyond_schema` accepts
exactly that answer from these operations and defers to the built-in check for everything
else, so a 422 with any other error type (``missing``, ``string_too_long``,
``extra_forbidden``: the schema lied) still fails.

Run with the built-in check excluded: in-process,
``case.validate_response(response, excluded_checks=[positive_data_acceptance])`` (this module
registers the refined check, which then runs by default); from the command line,
``SCHEMATHESIS_HOOKS=tests/integration/schemathesis_hooks.py st run ... --checks all
--exclude-checks positive_data_acceptance``.
"""

from __future__ import annotations

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

__all__ = ["positive_data_acceptance", "positive_data_acceptance_beyond_schema"]


# The operations with rules a JSON schema cannot state.
_BEYOND_SCHEMA = frozenset({"POST /jobs", "POST /datasets", "POST /teachers"})


def _refused_beyond_schema(response: schemathesis.Response) -> bool:
    try:
        errors = json.loads(response.content)["detail"]
    except (ValueError, KeyError, TypeError):
        return False
    return (
        isinstance(errors, list)
        and bool(errors)
        and all(isinstance(error, dict) and error.get("type") == "value_error" for error in errors)
    )


@schemathesis.check
def positive_data_acceptance_beyond_schema(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """``positive_data_acceptance``, except that a job spec or a dataset upload refused by a
    rule beyond its schema (a 422 whose every error is a ``value_error``) is an answer the
    schema allows."""
    if (
        case.operation.label in _BEYOND_SCHEMA
        and response.status_code == 422
        and _refused_beyond_schema(response)
    ):
        return None
    return positive_data_acceptance(ctx, response, case)
