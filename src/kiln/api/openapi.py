"""The OpenAPI document, made to tell the truth: the sizes and LoRA adapters this server's models serve,
links between operations (a job's id → its lookup, cancel and events; an image's id → its file), the
OpenAI-shaped error body, and no FastAPI 422 that Kiln never sends (its validation errors are 400s).

It only describes; nothing here changes what a request is answered.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kiln.api.schemas import ErrorDetail, ErrorResponse
from kiln.service import image_requests as ir
from kiln.worker.registry import ModelRegistry

_JOB = {"job_id": "$response.body#/id"}
_FIRST_IMAGE = {"image_id": "$response.body#/data/0/id"}
_LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, dict[str, Any]]]] = {
    # (path, method, status) → link name → (target path, target method, the link's parameters/body)
    ("/v1/jobs", "post", "202"): {
        "GetJob": ("/v1/jobs/{job_id}", "get", {"parameters": _JOB}),
        "CancelJob": ("/v1/jobs/{job_id}", "delete", {"parameters": _JOB}),
        "JobEvents": ("/v1/jobs/{job_id}/events", "get", {"parameters": _JOB}),
    },
    ("/v1/jobs", "get", "200"): {
        "GetJob": ("/v1/jobs/{job_id}", "get", {"parameters": {"job_id": "$response.body#/data/0/id"}}),
    },
    ("/v1/jobs/{job_id}", "get", "200"): {
        "GetImage": ("/v1/images/{image_id}", "get",
                     {"parameters": {"image_id": "$response.body#/image_ids/0"}}),
        "CancelJob": ("/v1/jobs/{job_id}", "delete", {"parameters": _JOB}),
    },
    ("/v1/images/generations", "post", "200"): {
        "GetImage": ("/v1/images/{image_id}", "get", {"parameters": _FIRST_IMAGE}),
        "GetImageContent": ("/v1/images/{image_id}/content", "get", {"parameters": _FIRST_IMAGE}),
        "GetJob": ("/v1/jobs/{job_id}", "get", {"parameters": _JOB}),
    },
    ("/v1/images/edits", "post", "200"): {
        "GetImage": ("/v1/images/{image_id}", "get", {"parameters": _FIRST_IMAGE}),
        "GetJob": ("/v1/jobs/{job_id}", "get", {"parameters": _JOB}),
    },
    ("/v1/images/{image_id}", "get", "200"): {
        "GetImageContent": ("/v1/images/{image_id}/content", "get",
                            {"parameters": {"image_id": "$response.body#/id"}}),
        "GetJob": ("/v1/jobs/{job_id}", "get", {"parameters": {"job_id": "$response.body#/job_id"}}),
        # An edit of the image as a job; the rest of the body is the client's.
        "EditImage": ("/v1/jobs", "post",
                      {"requestBody": {"prompt": "an edit", "image_id": "$response.body#/id"}}),
    },
}
_IMAGE_BODIES = ("GenerationRequest", "EditRequest", "JobRequest")
_REF = "#/components/schemas/{model}"


def install_openapi(app: FastAPI, registry: ModelRegistry) -> None:
    """Serve `describe(...)` of the routes at /openapi.json, built once on first request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = describe(spec, registry)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def describe(spec: dict[str, Any], registry: ModelRegistry) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorDetail, ErrorResponse):
        schemas.setdefault(model.__name__, model.model_json_schema(ref_template=_REF))
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for path, methods in spec.get("paths", {}).items():
        for operation in methods.values():
            responses = operation.get("responses", {})
            validation = responses.get("422", {}).get("content", {}).get("application/json", {})
            if validation.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            _served_choices(operation, registry)
    _add_links(spec)
    _served_components(schemas, registry)
    return spec


def _served_choices(operation: dict[str, Any], registry: ModelRegistry) -> None:
    """The multipart edit's inline schema: the same sizes and adapters as the JSON bodies'."""
    for content in operation.get("requestBody", {}).get("content", {}).values():
        properties = content.get("schema", {}).get("properties")
        if properties is not None and "size" in properties and "prompt" in properties:
            _restrict(properties, registry, nullable=False)


def _served_components(schemas: dict[str, Any], registry: ModelRegistry) -> None:
    for name in _IMAGE_BODIES:
        if name in schemas:
            _restrict(schemas[name]["properties"], registry, nullable=True)


def _restrict(properties: dict[str, Any], registry: ModelRegistry, *, nullable: bool) -> None:
    """`size`: the sizes some model of this server draws; `loras`: only its registered adapters."""
    infos = [registry.info(name) for name in registry.names]
    sizes = list(dict.fromkeys(s for info in infos for s in ir.allowed_sizes(info)))
    size = {"type": "string", "enum": sizes}
    described = {k: v for k, v in properties["size"].items() if k in ("title", "description", "default")}
    properties["size"] = {**described, **({"anyOf": [size, {"type": "null"}]} if nullable else size)}
    adapters = sorted({name for info in infos for name, _ in info.loras})
    if "loras" in properties and not adapters:
        described = {k: v for k, v in properties["loras"].items() if k in ("title", "description")}
        empty = {"type": "array", "maxItems": 0}
        properties["loras"] = {**described, **({"anyOf": [empty, {"type": "null"}]} if nullable else empty)}


def _add_links(spec: dict[str, Any]) -> None:
    paths = spec.get("paths", {})
    for (path, method, status), links in _LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        for name, (target, target_method, fields) in links.items():
            target_id = paths.get(target, {}).get(target_method, {}).get("operationId")
            if response is not None and target_id is not None:
                response.setdefault("links", {})[name] = {"operationId": target_id, **fields}
