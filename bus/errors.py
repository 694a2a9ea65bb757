"""Error codes that travel on the wire, and the exceptions a client raises for them.

Codes are short stable strings so logs and replies stay readable across versions;
clients branch on the code, never on the message text.
"""
from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # Framing and protocol: the request could not be understood.
    BAD_HEADER = "BAD_HEADER"  # truncated or non-msgpack header, or a header of the wrong shape
    BAD_VERSION = "BAD_VERSION"  # protocol version this peer does not speak
    UNKNOWN_KIND = "UNKNOWN_KIND"  # message kind this peer does not serve
    BAD_FRAMES = "BAD_FRAMES"  # frame count does not match the tensors the header announces
    BAD_TENSOR = "BAD_TENSOR"  # bytes do not match dtype x shape, unknown dtype or codec
    TOO_LARGE = "TOO_LARGE"  # message over the size limit
    BAD_REQUEST = "BAD_REQUEST"  # well-formed, but fields missing, of the wrong type or inconsistent
    # Semantics: understood, but cannot be served here.
    WRONG_BLOCKS = "WRONG_BLOCKS"  # blocks this worker does not hold
    BAD_SHAPE = "BAD_SHAPE"  # tensor shape or dtype does not fit the span
    BAD_VALUE = "BAD_VALUE"  # NaN or Inf in an input
    UNKNOWN_SESSION = "UNKNOWN_SESSION"  # closed, expired, never opened, or another client's
    SESSION_EXISTS = "SESSION_EXISTS"
    OUT_OF_RANGE = "OUT_OF_RANGE"  # positions beyond the session's max length
    CACHE_FULL = "CACHE_FULL"  # the KV-cache budget cannot hold this session now
    BUSY = "BUSY"  # queue full; try another worker or later
    UNKNOWN_ADAPTER = "UNKNOWN_ADAPTER"
    NO_INPUT = "NO_INPUT"  # a step waited for a push from the previous worker that never came
    INTERNAL = "INTERNAL"  # a bug on the worker; the worker keeps serving
    # Raised locally by the client, never sent.
    TIMEOUT = "TIMEOUT"
    UNREACHABLE = "UNREACHABLE"


#: Codes after which another worker may well succeed: routing bans the peer for a while.
RETRYABLE = frozenset({ErrorCode.BUSY, ErrorCode.CACHE_FULL, ErrorCode.TIMEOUT, ErrorCode.UNREACHABLE,
                       ErrorCode.INTERNAL, ErrorCode.UNKNOWN_SESSION, ErrorCode.NO_INPUT})


class CorollaError(Exception):
    """Base of every error Corolla raises on purpose."""


class ProtocolError(CorollaError):
    """A frame list that cannot be decoded; carries the code the peer should be told."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteError(CorollaError):
    """A peer answered a request with an error, or did not answer in time."""

    def __init__(self, peer: str, code: ErrorCode | str, message: str):
        super().__init__(f"{peer} answered {code}: {message}")
        self.peer = peer
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class RequestTimeout(RemoteError):
    def __init__(self, peer: str, seconds: float):
        super().__init__(peer, ErrorCode.TIMEOUT, f"no reply within {seconds:g} s")


class MissingBlocksError(CorollaError):
    """No chain of known workers covers the model."""

    def __init__(self, model: str, missing: list[tuple[int, int]]):
        spans = ", ".join(f"{a}:{b}" for a, b in missing)
        super().__init__(f"no worker serves blocks {spans} of {model}")
        self.model = model
        self.missing = missing
