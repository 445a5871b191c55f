"""Property-based API testing: schemathesis fuzzes every operation of the live app's OpenAPI.

Positive cases (valid per the schema) and negative ones (deliberately invalid) go to the real
server (uvicorn, PostgreSQL, S3) with the tenant's bearer key, and every answer goes through all
of schemathesis's checks: no 5xx, every status, content type, header and body documented by the
schema, invalid data refused, valid data accepted, requests without the key refused. Per-job
operations run both with generated ids and with the id of a real job of the tenant (so their
success paths run too), and ``POST /jobs`` also with valid specs on a dataset that exists.
Examples are derandomized (the same cases every run) and bounded so the file runs in well under
a minute.

A second test runs schemathesis's own engine (the ``st`` command line) over the same live server
with every check and its coverage and fuzzing phases: boundary values, missing headers,
unsupported methods, malformed bodies.

One check is refined, not dropped (``schemathesis_hooks.py`` says why): a schema-valid job spec
refused by a rule beyond the schema (a 422 made only of ``value_error`` entries, e.g. a dataset
that does not exist) counts as accepted; any other refusal of schema-valid data still fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from service import queue
from tests.integration.api_fixtures import LiveAPI, job_spec, publish_checkpoint
from tests.integration.schemathesis_hooks import positive_data_acceptance

POSITIVE_EXAMPLES = 20
NEGATIVE_EXAMPLES = 12
FIXED_EXAMPLES = 8
WITHOUT_INPUT = frozenset({"GET /healthz", "GET /readyz"})


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def test_every_answer_conforms_to_the_schema(live_api: LiveAPI, tiny_dataset: str) -> None:
    auth = live_api.headers()
    with httpx.Client(base_url=live_api.base_url, headers=auth) as http:
        job = http.post("/jobs", json=job_spec(tiny_dataset)).json()
    publish_checkpoint(live_api, job["id"], "best")
    with live_api.session() as session:
        queue.record_metrics(
            session,
            job["id"],
            [
                {"split": "val", "name": "auroc", "value": 0.5, "epoch": 0},
                {"split": "val", "name": "group/1/tpr", "value": 0.5, "epoch": 0},
            ],
        )
        queue.append_log(session, job["id"], "info", "hello")

    schema = schemathesis.openapi.from_url(f"{live_api.base_url}/openapi.json", timeout=10)
    calls: Counter[str] = Counter()
    statuses: dict[str, Counter[int]] = {}

    def exercise(strategy: object, label: str, max_examples: int) -> None:
        @given(case=strategy)
        @_settings(max_examples)
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=live_api.base_url, headers=auth, timeout=30)
            calls[label] += 1
            statuses.setdefault(label, Counter())[response.status_code] += 1
            # Every check, the refined positive_data_acceptance (registered by
            # schemathesis_hooks) in place of the built-in one.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        run()

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    for operation in operations:
        label = operation.label
        exercise(operation.as_strategy(GenerationMode.POSITIVE), label, POSITIVE_EXAMPLES)
        try:
            exercise(operation.as_strategy(GenerationMode.NEGATIVE), label, NEGATIVE_EXAMPLES)
        except Unsatisfiable:
            # Nothing to get wrong in a request without parameters or body.
            assert label in WITHOUT_INPUT, label
        if "{job_id}" in operation.path:
            real = {"job_id": job["id"]}
            if "{name}" in operation.path:
                real["name"] = "best"
            fixed = operation.as_strategy(path_parameters=real)
            exercise(fixed, label, FIXED_EXAMPLES)
        if label == "POST /jobs":
            exercise(operation.as_strategy(body=job_spec(tiny_dataset)), label, FIXED_EXAMPLES)

    # Not vacuous: every operation was called many times, and the success paths ran.
    for operation in operations:
        least = 1 if operation.label in WITHOUT_INPUT else POSITIVE_EXAMPLES
        assert calls[operation.label] >= least, (operation.label, calls)
    assert sum(calls.values()) >= 25 * (len(operations) - len(WITHOUT_INPUT))
    print({label: dict(codes) for label, codes in statuses.items()})
    for label in [
        op.label for op in operations if "{job_id}" in op.path and "files" not in op.path
    ]:
        assert any(200 <= code < 400 for code in statuses[label]), (label, statuses[label])
    assert statuses["POST /jobs"][201] >= 1, statuses["POST /jobs"]
    assert statuses["POST /jobs"][422] >= 1, statuses["POST /jobs"]


HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
ENGINE_EXAMPLES = 15


def test_schemathesis_engine_finds_nothing_with_every_check_and_phase(
    live_api: LiveAPI, tiny_dataset: str, tmp_path: Path
) -> None:
    junit = tmp_path / "junit.xml"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{live_api.base_url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",  # refined in schemathesis_hooks.py, which "all" includes
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(ENGINE_EXAMPLES),
        "--generation-deterministic",
        "--workers",
        "1",
        "--header",
        f"Authorization: Bearer {live_api.api_key}",
        "--report",
        "junit",
        "--report-junit-path",
        str(junit),
        "--no-color",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert live_api.api_key not in output
    # Not vacuous: every operation ran, through the coverage phase too, hundreds of cases.
    suites = ElementTree.parse(junit).getroot()
    cases = suites.findall(".//testcase")
    assert len(cases) >= 13, output[-3000:]
    assert all(case.find("failure") is None and case.find("error") is None for case in cases)
    generated = re.search(r"(\d+) generated", output)
    assert generated is not None and int(generated.group(1)) >= 300, output[-3000:]
    assert re.search(r"Coverage \(in [\d.]+s\)", output), output[-3000:]
