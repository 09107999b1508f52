"""The README stays true: its settings table is exactly `core.settings.Settings` (`python -m core.settings`)."""

from __future__ import annotations

from core.settings import env_table
from tests.conftest import REPO


def test_the_settings_table_lists_every_setting_as_the_code_declares_it() -> None:
    readme = (REPO / "README.md").read_text()
    assert env_table() in readme, "README's settings table is stale: paste `python -m core.settings` over it"
