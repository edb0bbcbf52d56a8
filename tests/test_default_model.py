"""Which model runs when none is named: the first shipped of embedded.DEFAULT_MODELS, or the one
$LETTERPRESS_DEFAULT_MODEL names (tests/conftest.py sets it to tiny_code for the engine and server tests)."""

from __future__ import annotations

import pytest

from letterpress.embedded import ASSETS, DEFAULT_MODELS, default_model_dir, shipped_models
from letterpress.errors import CheckpointError


def test_default_is_the_first_shipped_of_the_default_models(monkeypatch):
    monkeypatch.delenv("LETTERPRESS_DEFAULT_MODEL", raising=False)
    shipped = shipped_models()
    first = next((name for name in DEFAULT_MODELS if name in shipped), None)
    if first is None:
        pytest.skip("no default model is shipped (the placeholder is used)")
    assert default_model_dir() == ASSETS / first


def test_the_environment_variable_picks_a_shipped_model(monkeypatch):
    shipped = shipped_models()
    if "sudoku" not in shipped:
        pytest.skip("the Sudoku model is not shipped")
    monkeypatch.setenv("LETTERPRESS_DEFAULT_MODEL", "sudoku")
    assert default_model_dir() == ASSETS / "sudoku"
    monkeypatch.setenv("LETTERPRESS_DEFAULT_MODEL", "no_such_model")
    with pytest.raises(CheckpointError, match="LETTERPRESS_DEFAULT_MODEL=no_such_model: not a shipped model"):
        default_model_dir()
