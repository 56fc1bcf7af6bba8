"""GET /v1/models: the loaded models and their aliases, OpenAI-shaped."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
async def list_models(request: Request) -> dict:
    registry = request.app.state.kiln.registry
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "kiln"} for name in registry.names]
    data += [
        {"id": alias, "object": "model", "created": 0, "owned_by": "kiln", "alias_of": target}
        for alias, target in registry.aliases.items()
    ]
    return {"object": "list", "data": data}
