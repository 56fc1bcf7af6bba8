"""The refusal gate: the outermost layer of the API, answering from memory alone the requests that
memory is sure to refuse — a key known to be bad (401), a used-up quota or full concurrency cap (429),
the scheduler's recent "overloaded" (503) — before routing, body parsing or validation cost anything.

It only ever answers what the route would answer (the same `KeyCache`, `PlanCache` and `Refusals`,
the same error bodies and headers); whatever it is unsure of (a stale entry, a plan to re-read, an
Idempotency-Key, which must find its earlier job) goes on to the app.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.api.errors import kiln_error_response
from kiln.errors import AuthenticationFailed, KilnError, RetryLater
from kiln.service.admission import headers_for, refusal_reason

GATED = frozenset({("POST", "/v1/jobs"), ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits")})


class RefusalGate:
    def __init__(self, app: ASGIApp, state: object) -> None:
        self.app = app
        self.state = state
        self.answered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) not in GATED:
            await self.app(scope, receive, send)
            return
        refusal = await self._refusal(scope["headers"])
        if refusal is None:
            await self.app(scope, receive, send)
            return
        self.answered += 1
        await kiln_error_response(refusal)(scope, receive, send)  # the one mapping of errors to HTTP

    async def _refusal(self, headers: list[tuple[bytes, bytes]]) -> KilnError | None:
        authorization = None
        for name, value in headers:
            if name == b"authorization":
                authorization = value
            elif name == b"idempotency-key":
                return None
        if authorization is None or not authorization[:7].lower() == b"bearer ":
            return None
        state = self.state
        try:
            account = await state.keys.authenticate(authorization[7:].decode("latin-1").strip())  # type: ignore[attr-defined]
        except AuthenticationFailed as refused:
            return refused
        plan = state.plans.peek(account.plan_name)  # type: ignore[attr-defined]
        if plan is None:
            return None
        now = state.clock.now()  # type: ignore[attr-defined]
        refusal: RetryLater | None = state.refusals.refusal(account.user_id, plan, 1, now)  # type: ignore[attr-defined]
        usage = state.refusals.usage(account.user_id, plan, now)  # type: ignore[attr-defined]
        if refusal is None or usage is None:
            return None
        state.metrics.refused(plan.name, refusal_reason(refusal))  # type: ignore[attr-defined]
        refusal.headers = headers_for(usage, now)  # type: ignore[attr-defined]
        return refusal

