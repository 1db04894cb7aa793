"""Fixtures for the embedded model zoo (to be moved into conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def micro_zoo_cache(tmp_path_factory) -> Path:
    """A cache directory holding the built micro zoo (built once per test session)."""
    from lata.zoo import build_zoo, load_preset

    cache = tmp_path_factory.mktemp("zoo-cache")
    build_zoo(load_preset("micro"), cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def micro_zoo(micro_zoo_cache):
    """The micro zoo family (``lata.zoo.ZooFamily``), from ``micro_zoo_cache``."""
    from lata.zoo import build_zoo, load_preset

    return build_zoo(load_preset("micro"), micro_zoo_cache, progress=False)
