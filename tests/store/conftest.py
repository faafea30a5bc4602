"""The store tests' fixture: a small stored run (see ``stored_runs``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.store.stored_runs import StoredRun, write_run


@pytest.fixture
def stored_run(tmp_path: Path) -> StoredRun:
    return write_run(tmp_path / "runs.db")
