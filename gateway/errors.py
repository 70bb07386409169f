"""Every error the gateway raises on purpose, and what the caller should do next.

::

    GatewayError
    ├── ConfigError            a key or value in configuration is wrong: fix it, start again
    ├── InputError             an advisory or recipient is unusable: report it, keep the rest
    │   ├── DecodeError        not JSON / YAML / XML we can read
    │   ├── SchemaError        decoded, but a field is missing or wrong (names the field)
    │   ├── SignatureError     unsigned, unknown sender, or the signature does not verify
    │   ├── ExpiredError       expires_at is already past
    │   ├── ContentError       unknown template, missing language content, render failure
    │   ├── AuthorityError     a cancel or update of another sender's advisory, without authority
    │   ├── AuthError          a partner's webhook call is not signed by that partner (HTTP 401)
    │   └── NotFoundError      names an advisory (or version) the store does not hold (HTTP 404)
    ├── DecisionError          an approval, rejection, return or cancel the advisory's state or the
    │                          two-person rule does not allow (HTTP 409, or 403 for self-approval)
    └── ChannelError           a channel could not take a message
        ├── RetryableError     try again later (optionally not before ``retry_after`` seconds)
        │   └── ThrottledError the partner is up but asks us to slow down (HTTP 429): it does not
        │                      count against the partner's circuit breaker
        └── PermanentError     the partner will never take it: mark the delivery failed

    Withdrawn                  not an error of the channel: the advisory was cancelled, superseded
                               or expired while a batch waited; the batch is not sent

Retry is decided by class, never by parsing a message.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """Configuration is invalid; the message names the key."""


class InputError(GatewayError):
    """Bad input: goes to a dead-letter place with this message as its reason."""

    kind = "invalid"


class DecodeError(InputError):
    kind = "decode"


class SchemaError(InputError):
    kind = "schema"


class SignatureError(InputError):
    kind = "signature"


class ExpiredError(InputError):
    kind = "expired"


class ContentError(InputError):
    kind = "content"


class UnreadableError(InputError):
    """A record the Kafka client cannot read at all: its batch fails its CRC check (damaged between
    producer and broker; the embedded broker stores what it is sent) or needs a codec the client
    lacks. Dead-lettered by its place, with no bytes."""

    kind = "unreadable"


class AuthorityError(InputError):
    kind = "authority"


class AuthError(InputError):
    kind = "auth"


class NotFoundError(InputError):
    kind = "not_found"


class DecisionError(GatewayError):
    """A decision on an advisory that is not allowed; ``status`` is the HTTP status that says why."""

    def __init__(self, reason: str, status: int = 409) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ChannelError(GatewayError):
    """A channel could not take a message."""


class RetryableError(ChannelError):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class ThrottledError(RetryableError):
    """The partner is healthy but rate-limits us; its Retry-After is honoured."""


class PermanentError(ChannelError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Withdrawn(GatewayError):
    """The advisory of a batch about to be sent was cancelled, superseded or has expired."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
