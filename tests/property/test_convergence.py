"""Convergence under a hostile network: every replica ends identical and no accepted edit is lost.

A hypothesis state machine drives 3-5 nodes (Replica + one SyncSession per link, the node's
relay rule `sync.router.Router`, a per-node update log as the local cache) over simulated
links that drop, duplicate and reorder frames, go down (partition) and come back (heal), in a
full mesh or a line (A-B-C-...: the ends never talk). Nodes edit 1-3 docs holding a Text, a
Map and an Array, including deletions, and restart from their logs. A session that raises
ProtocolError loses its link, which is re-dialled, as the peer driver does. Every edit
inserts a unique marker, so the final check knows exactly which content must be present and
which must be gone.

After heal + quiesce (deliver until nothing is in flight, then one anti-entropy tick and deliver
again) every replica must hold the same state vector, digest and content, equal to the set of
accepted inserts minus accepted deletions.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from pycrdt import Array, Map, Text

from unity_crdt.errors import ProtocolError
from unity_crdt.sync import codec
from unity_crdt.sync.codec import Message
from unity_crdt.sync.nodewide import PullGate, SeenFilter
from unity_crdt.sync.outbox import Outbox
from unity_crdt.sync.replica import Replica
from unity_crdt.sync.router import Router
from unity_crdt.sync.session import PART_SIZE, Reply, SyncSession
from unity_crdt.sync.yjs import read_state_vector

pytestmark = pytest.mark.slow

DOC_NAMES = ["notes", "ドキュメント/ü", "plan"]
NODE_NAMES = "ABCDE"
ANTI_ENTROPY = 30.0
BUDGET = 256 * 1024  # small, so a burst sometimes overloads a link and it is redialled
WINDOW = 4  # payloads in flight per direction: the rest wait in the outbox
TEXT_MARK = re.compile(r"\[(\d+)ü·*\]")  # a paste is one marker with a long filler
KINDS = ("text", "map", "array")

Link = tuple[str, str]


class SimNode:
    """A node without I/O: replica, sessions, a shared SeenFilter, and its update log."""

    def __init__(self, name: str, log: list[tuple[str, bytes]], ids: Iterator[int]) -> None:
        self.name = name
        self.log = log
        self.replica = Replica(self._on_update, client_id_factory=lambda: next(ids))
        self.seen = SeenFilter(capacity=64)  # small, so eviction happens in the test
        self.pulls = PullGate(ANTI_ENTROPY)
        self.sessions: dict[str, SyncSession] = {}
        self.router = Router()
        docs = sorted({doc for doc, _ in log})
        for doc in docs:  # a restart: replay the cache, which must not be reported again
            self.replica.load(doc, [u for d, u in log if d == doc])

    def _on_update(self, doc: str, update: bytes, origin: object | None) -> None:
        self.log.append((doc, update))  # the cache: every reported update, local or remote
        self.router.add(doc, update, origin)

    def text(self, doc: str) -> Text:
        text: Text = self.replica.doc(doc).get("text", type=Text)
        return text

    def map(self, doc: str) -> Map[Any]:
        map_: Map[Any] = self.replica.doc(doc).get("map", type=Map)
        return map_

    def array(self, doc: str) -> Array[Any]:
        array: Array[Any] = self.replica.doc(doc).get("array", type=Array)
        return array

    def markers(self, doc: str) -> dict[str, list[int]]:
        """The markers each shared type holds, in document order."""
        text = str(self.text(doc))
        found = [int(m) for m in TEXT_MARK.findall(text)]
        assert TEXT_MARK.sub("", text) == "", f"{self.name}: text is not whole markers: {text!r}"
        return {
            "text": found,
            "map": sorted(int(k[1:]) for k in self.map(doc).to_py() or {}),
            "array": [int(v[1:]) for v in self.array(doc).to_py() or []],
        }


class Convergence(RuleBasedStateMachine):
    """Random edits, faults and restarts; the final check runs in `teardown`."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, SimNode] = {}
        self.logs: dict[str, list[tuple[str, bytes]]] = {}
        self.links: list[Link] = []
        self.up: set[Link] = set()
        self.queues: dict[tuple[str, str], list[bytes]] = {}
        self.outboxes: dict[tuple[str, str], Outbox] = {}
        self.pastes = 0
        self.now = 0.0
        self.ids = itertools.count(1)
        self.marker = itertools.count(1)
        self.inserted: dict[tuple[str, str], set[int]] = {}
        self.deleted: dict[tuple[str, str], set[int]] = {}
        self.docs: list[str] = []
        self.delivered = 0

    @initialize(n=st.integers(3, 5), ndocs=st.integers(1, 3), line=st.booleans())
    def setup(self, n: int, ndocs: int, line: bool) -> None:
        names = NODE_NAMES[:n]
        self.docs = DOC_NAMES[:ndocs]
        for name in names:
            self.logs[name] = []
            self.nodes[name] = SimNode(name, self.logs[name], self.ids)
        pairs = itertools.pairwise(names) if line else itertools.combinations(names, 2)
        self.links = [(a, b) for a, b in pairs]
        for link in self.links:
            self._connect(link)
        for key in itertools.product(self.docs, KINDS):
            self.inserted[key] = set()
            self.deleted[key] = set()

    # -- the network ------------------------------------------------------------------------

    def _connect(self, link: Link) -> None:
        a, b = link
        self.up.add(link)
        for x, y in ((a, b), (b, a)):
            node = self.nodes[x]
            node.sessions[y] = SyncSession(
                node.replica,
                peer=y,
                now=self.now,
                seen=node.seen,
                pulls=node.pulls,
                anti_entropy_interval=ANTI_ENTROPY,
                ping_interval=10.0,
                idle_timeout=60.0,
            )
            self.queues[(x, y)] = []
            # The link's real send queue: its budget, batch limits and late replies.
            self.outboxes[(x, y)] = Outbox(node.sessions[y].reply, budget=BUDGET)
        for x, y in ((a, b), (b, a)):
            self._send(x, y, self.nodes[x].sessions[y].start(self.now))

    def _disconnect(self, link: Link) -> None:
        a, b = link
        self.up.discard(link)
        for x, y in ((a, b), (b, a)):
            session = self.nodes[x].sessions.pop(y, None)
            if session is not None:
                session.close()
            self.queues.pop((x, y), None)
            self.outboxes.pop((x, y), None)

    def _reset(self, link: Link) -> None:
        """A link that failed is closed, then re-dialled (the peer driver's behaviour)."""
        self._disconnect(link)
        self._connect(link)

    def _link(self, x: str, y: str) -> Link:
        return (x, y) if (x, y) in self.links else (y, x)

    def _send(self, src: str, dst: str, msgs: Sequence[Message | Reply]) -> None:
        outbox = self.outboxes.get((src, dst))
        if outbox is None:
            return
        try:
            outbox.put(msgs)
        except ProtocolError:  # over budget: the driver closes the link; it is redialled
            self._reset(self._link(src, dst))
            return
        self._fill(src, dst)

    def _fill(self, src: str, dst: str) -> None:
        """Move payloads from the outbox onto the wire while the window has room."""
        outbox, queue = self.outboxes.get((src, dst)), self.queues.get((src, dst))
        while outbox is not None and queue is not None and len(queue) < WINDOW:
            payload = outbox.next_payload()
            if payload is None:
                return
            queue.append(payload)

    def _relay(self, node: SimNode) -> None:
        """The node's own rule: `Router.drain` once per turn, then `fan_out` to the links."""
        for routed in node.router.drain():
            for peer, msgs in Router.fan_out(routed, node.sessions).items():
                self._send(node.name, peer, msgs)

    def _deliver(self, key: tuple[str, str], index: int) -> None:
        src, dst = key
        data = self.queues[key].pop(index)
        self._fill(src, dst)
        node = self.nodes[dst]
        self.delivered += 1
        try:
            replies = node.sessions[src].receive(codec.decode(data), self.now)
        except ProtocolError:
            self._reset(self._link(src, dst))  # what was applied before the error is relayed
            return
        finally:
            self._relay(node)
        self._send(dst, src, replies)

    def _busy(self) -> list[tuple[str, str]]:
        for key in list(self.outboxes):
            self._fill(*key)
        return sorted(k for k, q in self.queues.items() if q)

    def _pump(self, limit: int = 50_000) -> None:
        budget = limit
        while busy := self._busy():
            for key in busy:
                if self.queues.get(key):
                    self._deliver(key, 0)
                    budget -= 1
            assert budget > 0, "gossip did not terminate"

    def _tick(self, dt: float) -> None:
        self.now += dt
        for link in sorted(self.up):
            for x, y in (link, link[::-1]):
                session = self.nodes[x].sessions.get(y)
                if session is None:
                    continue
                try:
                    self._send(x, y, session.tick(self.now))
                except ProtocolError:
                    self._reset(link)
                    break

    # -- rules ------------------------------------------------------------------------------

    @rule(
        node=st.integers(0, 4),
        doc=st.integers(0, 2),
        kind=st.sampled_from(KINDS),
        delete=st.booleans(),
        pos=st.integers(0, 10_000),
        span=st.integers(1, 3),
    )
    def edit(self, node: int, doc: int, kind: str, delete: bool, pos: int, span: int) -> None:
        n = self.nodes[NODE_NAMES[node % len(self.nodes)]]
        name = self.docs[doc % len(self.docs)]
        present = n.markers(name)[kind]
        if delete:
            if not present:
                return
            start = pos % len(present)
            gone = present[start : start + span]
            self._delete(n, name, kind, gone)
            self.deleted[(name, kind)].update(gone)
        else:
            mark = next(self.marker)
            self._insert(n, name, kind, mark, pos)
            self.inserted[(name, kind)].add(mark)
        self._relay(n)

    @precondition(lambda self: self.pastes < 2)
    @rule(node=st.integers(0, 4), doc=st.integers(0, 2))
    def paste(self, node: int, doc: int) -> None:
        """One insert bigger than a PART: it is advertised, pulled and streamed in parts."""
        n = self.nodes[NODE_NAMES[node % len(self.nodes)]]
        name = self.docs[doc % len(self.docs)]
        mark = next(self.marker)
        n.text(name).insert(0, f"[{mark}ü" + "·" * (PART_SIZE // 2 + 10) + "]")
        self.inserted[(name, "text")].add(mark)
        self.pastes += 1
        self._relay(n)

    @staticmethod
    def _insert(n: SimNode, doc: str, kind: str, mark: int, pos: int) -> None:
        if kind == "text":
            text = str(n.text(doc))
            bounds = [0, *(m.end() for m in TEXT_MARK.finditer(text))]
            at = bounds[pos % len(bounds)]
            # Text indices count UTF-8 bytes, and markers hold a two-byte character.
            n.text(doc).insert(len(text[:at].encode()), f"[{mark}ü]")
        elif kind == "map":
            n.map(doc)[f"m{mark}"] = f"v{mark}ü"
        else:
            array = n.array(doc)
            array.insert(pos % (len(array) + 1), f"a{mark}")

    @staticmethod
    def _delete(n: SimNode, doc: str, kind: str, gone: list[int]) -> None:
        if kind == "text":
            text = str(n.text(doc))
            spans = [m.span() for m in TEXT_MARK.finditer(text) if int(m.group(1)) in gone]
            begin, end = spans[0][0], spans[-1][1]
            del n.text(doc)[len(text[:begin].encode()) : len(text[:end].encode())]
        elif kind == "map":
            with n.replica.doc(doc).transaction():
                for mark in gone:
                    del n.map(doc)[f"m{mark}"]
        else:
            values = n.array(doc).to_py() or []
            first = values.index(f"a{gone[0]}")
            del n.array(doc)[first : first + len(gone)]

    @precondition(lambda self: bool(self._busy()))
    @rule(count=st.integers(1, 12), which=st.integers(0, 100))
    def deliver_in_order(self, count: int, which: int) -> None:
        for _ in range(count):
            busy = self._busy()
            if not busy:
                return
            self._deliver(busy[which % len(busy)], 0)

    @precondition(lambda self: bool(self._busy()))
    @rule(which=st.integers(0, 100), index=st.integers(0, 100))
    def deliver_out_of_order(self, which: int, index: int) -> None:
        busy = self._busy()
        key = busy[which % len(busy)]
        self._deliver(key, index % len(self.queues[key]))

    @precondition(lambda self: bool(self._busy()))
    @rule(which=st.integers(0, 100), index=st.integers(0, 100))
    def drop(self, which: int, index: int) -> None:
        busy = self._busy()
        queue = self.queues[busy[which % len(busy)]]
        queue.pop(index % len(queue))

    @precondition(lambda self: bool(self._busy()))
    @rule(which=st.integers(0, 100), index=st.integers(0, 100))
    def duplicate(self, which: int, index: int) -> None:
        busy = self._busy()
        queue = self.queues[busy[which % len(busy)]]
        queue.append(queue[index % len(queue)])

    @rule(which=st.integers(0, 100))
    def partition(self, which: int) -> None:
        link = self.links[which % len(self.links)]
        if link in self.up:
            self._disconnect(link)

    @rule(which=st.integers(0, 100))
    def heal(self, which: int) -> None:
        link = self.links[which % len(self.links)]
        if link not in self.up:
            self._connect(link)

    @rule(node=st.integers(0, 4))
    def restart(self, node: int) -> None:
        name = NODE_NAMES[node % len(self.nodes)]
        links = [lk for lk in sorted(self.up) if name in lk]
        for link in links:
            self._disconnect(link)
        self.nodes[name] = SimNode(name, self.logs[name], self.ids)
        for link in links:
            self._connect(link)

    @rule(dt=st.sampled_from([1.0, 10.0, ANTI_ENTROPY]))
    def tick(self, dt: float) -> None:
        self._tick(dt)

    # -- the final check --------------------------------------------------------------------

    def _converged(self, nodes: list[SimNode]) -> bool:
        return not self._busy() and all(
            len({n.replica.digest(doc) for n in nodes}) == 1 for doc in self.docs
        )

    def teardown(self) -> None:
        if not self.nodes:
            return
        for link in self.links:
            if link not in self.up:
                self._connect(link)
        # Anti-entropy repairs whatever was dropped; what a node pulled reaches the next hop
        # by that node's SUMMARY (pulled history is not pushed), so a line of n nodes needs up
        # to n rounds.
        nodes = list(self.nodes.values())
        for _ in range(2 * len(nodes)):
            self._pump()
            self._tick(ANTI_ENTROPY)
            self._pump()
            self._tick(1.0)
            if self._converged(nodes):
                break
        self._pump()
        for doc in self.docs:
            states = {n.name: read_state_vector(n.replica.state_vector(doc)) for n in nodes}
            assert len({repr(sorted(s.items())) for s in states.values()}) == 1, states
            assert len({n.replica.digest(doc) for n in nodes}) == 1
            first = nodes[0]
            contents = [
                (str(n.text(doc)), n.map(doc).to_py() or {}, n.array(doc).to_py() or [])
                for n in nodes
            ]
            assert all(c == contents[0] for c in contents), contents
            for kind in KINDS:
                live = self.inserted[(doc, kind)] - self.deleted[(doc, kind)]
                got = first.markers(doc)[kind]
                assert len(got) == len(set(got)), f"{kind} of {doc} holds duplicates: {got}"
                assert set(got) == live, (doc, kind, sorted(set(got) ^ live))
        # Live updates are acknowledged by the next summary exchange, not before.
        self._tick(ANTI_ENTROPY)
        self._pump()
        for n in nodes:
            for session in n.sessions.values():
                assert session.synced_docs >= set(n.replica.inventory()), n.name


Convergence.TestCase.settings = settings(settings(), stateful_step_count=150)
TestConvergence = Convergence.TestCase
