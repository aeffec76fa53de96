"""One exception hierarchy for the library, and the wire error codes that map onto it."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Reason codes carried by ERROR and BYE messages and CLOSE frames."""

    NORMAL = 0
    MALFORMED = 1
    TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    BAD_UPDATE = 4
    AUTH_FAILED = 5
    TIMEOUT = 6
    OVERLOADED = 7
    DUPLICATE_LINK = 8
    SHUTDOWN = 9
    INTERNAL = 10
    REVOKED = 11  # the device was revoked from the group's roster
    NOT_MEMBER = 12  # the device is on no roster: the group secret admits no one new
    INVITE_USED = 13  # the invitation was already redeemed
    INVITE_EXPIRED = 14  # the invitation expired, or its epoch ended

    @classmethod
    def parse(cls, value: int) -> ErrorCode:
        """Map an unknown wire value to INTERNAL instead of failing."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL


class UnityCrdtError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(UnityCrdtError, ValueError):
    """A configuration value is missing or invalid."""


class ProtocolError(UnityCrdtError):
    """A peer broke the sync protocol; the link that carried it is closed."""

    code: ErrorCode = ErrorCode.MALFORMED

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class DecodeError(ProtocolError):
    """Bytes that are not a well-formed message (truncated, bad tag, bad length)."""


class LimitExceeded(ProtocolError):
    """A message, count or length is over a configured limit."""

    code = ErrorCode.TOO_LARGE


class SecurityError(ProtocolError):
    """Authentication or integrity failed: wrong group secret, tampered or replayed frame."""

    code = ErrorCode.AUTH_FAILED


class HandshakeError(SecurityError):
    """The Noise handshake failed or broke its rules (deadline, order, size)."""


class FrameError(SecurityError):
    """A transport frame failed authentication, order or size checks."""


class Refused(SecurityError):
    """A peer that completed the handshake is not let in (revoked, not a member, ...)."""


class MembershipError(UnityCrdtError):
    """A roster change was refused: this device may not make it, or it names no member."""


class ChannelClosed(UnityCrdtError):
    """The underlying connection is gone."""


class StoreError(UnityCrdtError):
    """The local cache could not be read or written."""


class CacheLockedError(StoreError):
    """Another process holds the local cache."""


class CorruptCacheError(StoreError):
    """The local cache file is damaged (the store salvages it and reports what was lost)."""


class CheckpointError(UnityCrdtError):
    """A checkpoint could not be written, read or verified."""


class ControlError(UnityCrdtError):
    """The control API refused a request or could not be reached."""


class NoNodeRunning(ControlError):
    """Nobody listens on the control socket of this cache dir."""


class NodeAlreadyRunning(ControlError):
    """A live node already serves this cache dir's control socket."""


class RelayError(UnityCrdtError):
    """The cloud channel (NATS) could not be reached, refused us, or broke its contract."""


class JobFailed(UnityCrdtError):
    """Some tasks of a job failed for good (after `max_attempts`); `failures` says which and why."""

    def __init__(self, job_id: str, failures: dict[int, str], results: list[object]) -> None:
        shown = "; ".join(f"input {i}: {err}" for i, err in sorted(failures.items())[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"job {job_id}: {len(failures)} failed: {shown}{more}")
        self.job_id = job_id
        self.failures = failures  # input index -> the handler's error (the last attempt's)
        self.results = results  # input order; None where an input has no result


class CoordinationError(UnityCrdtError):
    """The coordination engine (NATS JetStream key-value) refused or could not answer."""
