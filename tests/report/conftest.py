"""The known store of report_testutil as a fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_testutil import build_store

from ptqlab.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return build_store(tmp_path / "runs.db")
