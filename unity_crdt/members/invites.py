"""Invite codes: what `node.invite()` prints and a new device takes as its group secret.

    "uci1." + base64url(group_id 16 | psk 32 | beacon_key 32 | expires u64 ms)   (123 chars)

The code is a bearer secret for one handshake: its PSK (derived from the epoch secret and the
invitation's nonce, `crypto.epochs.invite_psk`) lets the new device complete a handshake with a
member of the group, and nothing else; the beacon key lets it recognise members' mDNS
announcements of the current epoch; the expiry lets it refuse a stale code before trying.
Members decide: single use and expiry are rules of the roster (`members.roster`). Sans-IO.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = ["INVITE_PREFIX", "InviteCode", "parse_invite"]

INVITE_PREFIX = "uci1."
_LAYOUT = struct.Struct(">16s32s32sQ")


@dataclass(frozen=True)
class InviteCode:
    """A parsed invite code; the repr shows no key material."""

    group_id: bytes = field(repr=False)
    psk: bytes = field(repr=False)
    beacon_key: bytes = field(repr=False)
    expires: int  # ms since the Unix epoch

    def encode(self) -> str:
        """The code as text."""
        raw = _LAYOUT.pack(self.group_id, self.psk, self.beacon_key, self.expires)
        return INVITE_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def parse_invite(secret: str | bytes) -> InviteCode | None:
    """The invite code in `secret`, None if it is not one (a group secret); ConfigError if it
    starts like one but is damaged."""
    text = secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
    if not text.startswith(INVITE_PREFIX):
        return None
    body = text[len(INVITE_PREFIX) :].strip()
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _LAYOUT.size:
        raise ConfigError("this invite code is damaged (copy it again, whole)")
    group_id, psk, beacon_key, expires = _LAYOUT.unpack(raw)
    return InviteCode(group_id, psk, beacon_key, expires)
