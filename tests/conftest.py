"""Shared test settings: small thread count (2-core CI), and long lab runs skipped on CI; a fixture that runs
Python code in a fresh interpreter."""
import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    if not ON_CI:
        return
    skip = pytest.mark.skip(reason="slow: full-size run, skipped on CI (CI=true); the quick variant runs instead")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def run_snippet():
    """Run Python code in a fresh interpreter, with ``env`` set on top of this one's environment: its stdout lines,
    after checking that it exited cleanly (what an environment variable read at import changes)."""
    def run(code, env=None, timeout=300):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **(env or {})}, capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()
    return run
