"""The full counts (`resilience_full`) run only when asked: `pytest -m resilience_full tests/resilience`."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    if "resilience_full" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="full counts: run with -m resilience_full (benchmarks/resilience.py prints them)")
    for item in items:
        if "resilience_full" in item.keywords:
            item.add_marker(skip)
