"""`tuneworks models list|prepare`."""

from __future__ import annotations

import sys

from core import base_models
from core.settings import Settings


def list_models(settings: Settings) -> int:
    for model_id in base_models.known_ids(settings):
        model = base_models.get(settings, model_id)
        assert model is not None
        state = "prepared" if model.prepared else "not prepared"
        print(f"{model_id}\t{state}\t{model.path}")
    return 0


def prepare_models(settings: Settings, model_ids: list[str]) -> int:
    from core.weights import UnknownModel, ensure_prepared

    for model_id in model_ids:
        try:
            model = ensure_prepared(settings, model_id)
        except (UnknownModel, FileNotFoundError) as exc:
            print(f"error: cannot prepare {model_id}: {exc}", file=sys.stderr)
            return 1
        print(f"{model_id}\t{model.path}")
    return 0
