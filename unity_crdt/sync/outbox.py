"""What one link sends next, sans-IO: a budgeted queue, replies computed late, bounded batches.

The link driver `put`s everything its session and the router produce, and its writer asks
`next_payload()` for the next plaintext to seal whenever the socket has drained. Three rules:

* Live messages (updates, pages, pings, presence) are encoded once, queued, and counted
  against `budget` bytes. A peer that does not read makes the queue grow; past the budget
  `put` raises ProtocolError(OVERLOADED) and the driver closes the link, rather than holding
  memory without bound. The peer re-syncs when it comes back (pull by digest loses nothing).
* Replies (`Reply`, a SYNC_STEP_2 owed) are kept as markers, one per doc (a later request for
  the same doc replaces the earlier one), and computed by `make_reply` only when the queue has
  room: a peer asking for 20,000 docs costs 20,000 names, and a 50 MB doc one diff at a time.
  A large reply comes back as PART messages, sent one per payload, alternating with live
  batches so updates and pings keep flowing during a long transfer.
* A batch holds at most `batch_count` messages and `batch_bytes` bytes (a message larger than
  that goes alone), so the receiver's per-batch limits are never hit however many docs sync.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from ..errors import ErrorCode, ProtocolError
from .codec import Message, Part, encode, encode_batch
from .session import Reply
from .wire import DEFAULT_LIMITS

BATCH_BYTES = 256 * 1024
# Under the receiver's Limits.max_batch (10,000), whatever the mix of messages.
BATCH_COUNT = DEFAULT_LIMITS.max_batch // 2
_REPLY_COST = 64  # bytes charged per owed reply besides its doc name and state vector


class Outbox:
    """The send queue of one link (see the module docstring)."""

    def __init__(
        self,
        make_reply: Callable[[Reply], list[Message]],
        *,
        budget: int = 8 * 2**20,
        batch_bytes: int = BATCH_BYTES,
        batch_count: int = BATCH_COUNT,
    ) -> None:
        self._make_reply = make_reply
        self.budget = budget
        self._batch_bytes = batch_bytes
        self._batch_count = batch_count
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._replies: OrderedDict[str, Reply] = OrderedDict()
        self._reply_bytes = 0
        self._stream: deque[bytes] = deque()
        self._stream_turn = False
        self.peak = 0  # the most bytes ever held against the budget

    @property
    def queued_bytes(self) -> int:
        """Bytes held against the budget: queued messages and owed replies."""
        return self._queued + self._reply_bytes

    @property
    def streaming_bytes(self) -> int:
        """Bytes of the one large reply being sent in parts."""
        return sum(map(len, self._stream))

    def __bool__(self) -> bool:
        return bool(self._queue or self._replies or self._stream)

    def put(self, items: Iterable[Message | Reply]) -> None:
        """Queue messages and owed replies; ProtocolError(OVERLOADED) past the budget."""
        for item in items:
            if isinstance(item, Reply):
                old = self._replies.pop(item.doc, None)
                if old is not None:
                    self._reply_bytes -= _reply_cost(old)
                self._replies[item.doc] = item
                self._reply_bytes += _reply_cost(item)
            else:
                data = encode(item)
                self._queue.append(data)
                self._queued += len(data)
            self._check_budget()

    def next_payload(self) -> bytes | None:
        """The next plaintext to seal and send (one message or a BATCH), or None if idle."""
        if self._stream and (self._stream_turn or not self._queue):
            self._stream_turn = False
            return self._stream.popleft()
        self._stream_turn = True
        self._fill_from_replies()
        if not self._queue:
            return self._stream.popleft() if self._stream else None
        parts = [self._queue.popleft()]
        size = len(parts[0])
        while (
            self._queue
            and len(parts) < self._batch_count
            and size + len(self._queue[0]) <= self._batch_bytes
        ):
            part = self._queue.popleft()
            parts.append(part)
            size += len(part)
        self._queued -= size
        return parts[0] if len(parts) == 1 else encode_batch(parts)

    def _fill_from_replies(self) -> None:
        # Compute owed replies only while a batch's worth of room is free, and never while a
        # large one is still streaming: memory holds one big diff at a time.
        while self._replies and not self._stream and self._queued < self._batch_bytes:
            _, reply = self._replies.popitem(last=False)
            self._reply_bytes -= _reply_cost(reply)
            messages = self._make_reply(reply)
            if messages and isinstance(messages[0], Part):
                self._stream.extend(encode(m) for m in messages)
            else:
                for msg in messages:
                    data = encode(msg)
                    self._queue.append(data)
                    self._queued += len(data)

    def _check_budget(self) -> None:
        held = self.queued_bytes
        self.peak = max(self.peak, held)
        if held > self.budget:
            raise ProtocolError(
                f"peer is not reading: {held} bytes queued, over the budget of {self.budget}",
                ErrorCode.OVERLOADED,
            )


def _reply_cost(reply: Reply) -> int:
    return _REPLY_COST + len(reply.doc.encode("utf-8")) + len(reply.state_vector)
