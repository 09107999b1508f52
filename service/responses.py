"""Responses encoded straight from their wire models.

FastAPI, given a model to return, validates it again against the route's `response_model` and encodes it
through `jsonable_encoder`: about 80 us for one job, more than the database read behind it. The wire models
are built and validated once (by `to_openai()`), so the hot read routes encode them with pydantic-core's JSON
encoder and return the bytes; the route keeps its `response_model` for the OpenAPI document.
"""

from __future__ import annotations

from fastapi import Response
from pydantic import BaseModel
from pydantic_core import to_json


def wire(model: BaseModel) -> Response:
    """`model` as an `application/json` response, encoded as FastAPI would (every field, `None` as null)."""
    return Response(to_json(model), media_type="application/json")
