"""Every failure Kiln reports, in one tree. One handler at the HTTP edge maps them to responses.

    KilnError
    ├── InvalidRequest        400  invalid_request_error (param names the field)
    │   ├── ModerationBlocked 400  image_generation_user_error / moderation_blocked
    │   └── IdempotencyMismatch 422 same Idempotency-Key, another body
    ├── AuthenticationFailed  401  invalid_api_key
    ├── NotFound              404  not_found (also for objects that are someone else's)
    │   └── ModelNotFound     404  model_not_found
    ├── ImageGone             410  image_gone (its record is there, the image store lost the file)
    ├── JobCancelled          409  job_cancelled (the job a request waited on was cancelled)
    ├── PayloadTooLarge       413  payload_too_large
    ├── QuotaExceeded         429  quota_exceeded, Retry-After = seconds to the quota reset
    ├── RateLimited           429  rate_limit_exceeded (plan's concurrency cap)
    ├── Overloaded            503  server_is_overloaded, Retry-After from the real queue
    └── GenerationFailed      500  the pipeline failed; the charge was refunded
"""

from __future__ import annotations


class KilnError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(KilnError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class ModerationBlocked(InvalidRequest):
    error_type = "image_generation_user_error"
    code = "moderation_blocked"


class IdempotencyMismatch(InvalidRequest):
    status_code = 422
    code = "idempotency_key_reused"


class AuthenticationFailed(KilnError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(KilnError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ImageGone(KilnError):
    """The image's row exists (and is the caller's) but its file is no longer in the image store
    (deleted behind Kiln's back, or a store that was not backed up)."""

    status_code = 410
    error_type = "invalid_request_error"
    code = "image_gone"


class JobCancelled(KilnError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "job_cancelled"


class PayloadTooLarge(KilnError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class RetryLater(KilnError):
    """A refusal that tells the caller when to come back."""

    def __init__(self, message: str, *, retry_after_s: float, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = max(0.0, retry_after_s)


class QuotaExceeded(RetryLater):
    status_code = 429
    error_type = "insufficient_quota"
    code = "quota_exceeded"


class RateLimited(RetryLater):
    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class Overloaded(RetryLater):
    status_code = 503
    error_type = "server_error"
    code = "server_is_overloaded"


class GenerationFailed(KilnError):
    status_code = 500
    error_type = "server_error"
    code = "generation_failed"


class ConfigError(KilnError):
    """Bad settings or a missing model path: reported by the CLI as one line."""
