"""Schemathesis over every operation tether serves (tests/fuzz_api.py): valid and invalid
requests, a few tens per operation here (bench/fuzz.py runs 1,000+). No reply may be a
5xx, every error is in OpenAI's shape with no stack trace, and every JSON body and SSE
event meets the specs (tests/spec.py checks each as it passes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.routing import Route

import fuzz_api
from tether.routes import routes

from conftest import served

EXAMPLES = int(os.environ.get("TETHER_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("TETHER_FUZZ_SEED", "1414"))
OPERATIONS = fuzz_api.operations()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzz_api.Fuzzer]:
    with served(
        tmp_path_factory.mktemp("fuzz"),
        "--engine",
        "scripted",
        "--scripted-rate",
        "100",
        "--scripted-length",
        "10",
    ) as server:
        fuzzer = fuzz_api.Fuzzer(server.url)
        try:
            yield fuzzer
        finally:
            fuzzer.close()


def test_every_served_route_is_fuzzed() -> None:
    """The fuzzed document covers every API operation the server routes (the playground's
    static page aside)."""
    served_ops = {
        (r.path.replace(":path", ""), method.lower())
        for r in routes
        if isinstance(r, Route) and r.methods
        for method in r.methods - {"HEAD"}
        if r.path.startswith("/v1") or r.path in ("/health", "/metrics")
    }
    documented = {(path, method) for path, ops in fuzz_api.DOC["paths"].items() for method in ops}
    assert served_ops == documented


@pytest.mark.parametrize("operation", OPERATIONS, ids=[o.label for o in OPERATIONS])
def test_fuzzed_operation_has_no_server_errors(fuzzed: fuzz_api.Fuzzer, operation: Any) -> None:
    print(f"seed {SEED}: TETHER_FUZZ_SEED={SEED} reproduces this run")
    tally = fuzz_api.fuzz(fuzzed, operation, EXAMPLES, SEED, stop_on_problem=True)
    assert tally.examples > 0
    assert not tally.problems, tally.problems[:5]
