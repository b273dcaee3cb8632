"""Shared test settings: small thread count (2-core CI), and long lab runs skipped on CI."""
import os

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
