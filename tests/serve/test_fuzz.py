"""The HTTP API fuzzed from its own OpenAPI schema by schemathesis, against a live server over a tiny
run: data that fits the schema and data that does not, for every operation; never a 5xx, nor an
undocumented status, content type or body shape."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 60  # per operation and mode: the whole run stays well under a minute on two shared cores
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
calls: dict[str, int] = {}  # cases sent per mode, printed for docs/reliability.md


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_fuzzed_from_its_schema_never_answers_5xx(live_server, mode):
    # (schemathesis's own pytest loader does not work with this pytest; the cases are driven here.)
    server = live_server(max_batch=4, max_tokens_limit=16, max_prompt_tokens=64)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    if mode is GenerationMode.NEGATIVE:  # invalid input needs a body (a path string cannot be invalid)
        operations = [op for op in operations if len(op.body)]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case) -> None:
            calls[mode.value] = calls.get(mode.value, 0) + 1
            case.call_and_validate(checks=CHECKS)

        call()
    print(f"schemathesis {mode.value}: {calls[mode.value]} cases over {len(operations)} operations, 0 failures")
