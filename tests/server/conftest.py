"""Fixtures of the server tests: real federations on loopback (tests/harness/loopback.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from harness.loopback import Federation


@pytest.fixture()
def make_federation(tmp_path: Path, dataset_writer):  # type: ignore[no-untyped-def]
    """A factory of federations; every process they started is killed at teardown, pass or fail."""
    made: list[Federation] = []

    def make(names: Sequence[str] = ("a", "b", "c"), **kwargs: Any) -> Federation:
        fed = Federation(tmp_path / f"fed{len(made)}", names, dataset_writer, **kwargs)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()


@pytest.fixture(scope="module")
def federation(tmp_path_factory, dataset_writer):  # type: ignore[no-untyped-def]
    """Three institutions, TLS and node authentication on, all registered and connected."""
    fed = Federation(tmp_path_factory.mktemp("federation"), ("a", "b", "c"), dataset_writer)
    try:
        fed.start_superlink()
        fed.register()
        for name in ("a", "b", "c"):
            fed.start_supernode(name)
        yield fed
    finally:
        fed.close()
