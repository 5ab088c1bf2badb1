"""Shared test configuration.

Its presence puts tests/ on sys.path (pytest's default "prepend" import mode), so every test
directory can import the helpers that live here, e.g. `from ports import free_port`.
"""

from __future__ import annotations

import pytest

# The suite's longest files, in seconds of one run (pytest --durations, 2026-12-07), both
# suites of `make test`. They run first: `make test` spreads whole files over two workers
# (pytest-xdist --dist loadfile) in collection order, and a two-minute file collected last left
# one worker idle for most of those two minutes at the end of the run.
LONG_FILES = {
    "tests/integration/test_turn_offload_netns.py": 110,
    "tests/e2e/test_turn_bandwidth_uclient.py": 84,
    "tests/integration/test_install.py": 60,
    "tests/integration/test_bench_turn_smoke.py": 58,
    "tests/integration/test_bench_proxy_smoke.py": 55,
    "tests/integration/test_ops_reload_workers.py": 34,
    "tests/e2e/test_turn_uclient.py": 24,
    "tests/e2e/test_demo_call.py": 22,
    "tests/e2e/test_host_netns.py": 21,
    "tests/e2e/test_turns_on_https_port.py": 20,
    "tests/integration/test_qa_operator.py": 19,
    "tests/integration/test_ops_reload.py": 17,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first (LONG_FILES), the rest in their usual order (a stable sort)."""
    root = config.rootpath

    def weight(item: pytest.Item) -> int:
        try:
            name = item.path.relative_to(root).as_posix()
        except ValueError:
            return 0
        return -LONG_FILES.get(name, 0)

    items.sort(key=weight)
