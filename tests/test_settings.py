"""Prefect's environment on a fresh clone (no .ipr/ folder yet)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.settings import configure_prefect_env


def test_prefect_home_is_created_with_its_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "fresh-clone" / ".ipr" / "prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    configure_prefect_env()
    assert home.is_dir()
