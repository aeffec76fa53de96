"""Handshake slot policy (F2) and the failed-handshake log summary (F15), without sockets."""

from __future__ import annotations

from unity_crdt.net._admission import DialBudget, FailureLog, HandshakeSlots, subnet_of


def test_subnets_are_slash_24_and_slash_64() -> None:
    assert subnet_of("10.1.2.3") == "10.1.2.0/24"
    assert subnet_of("::ffff:10.1.2.3") == "10.1.2.0/24"
    assert subnet_of("fe80::1:2:3:4%eth0") == "fe80::/64"
    assert subnet_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert subnet_of("unknown") == "unknown"


def test_f2_slots_are_shared_by_subnet_and_known_addresses_take_a_strangers_slot() -> None:
    slots = HandshakeSlots(total=8, per_ip=2, per_subnet=4)
    held = [slots.admit(f"10.0.9.{i}")[0] for i in range(1, 9)]
    assert sum(s is not None for s in held) == 4  # one /24 gets half the slots at most
    assert slots.admit("10.0.9.1") == (None, None)
    others = [slots.admit(f"10.0.{n}.1")[0] for n in (1, 2, 3, 4)]
    assert all(s is not None for s in others) and len(slots) == 8
    assert slots.admit("10.0.5.1") == (None, None)  # full, and a stranger waits
    slots.remember("10.0.9.200")
    slot, evicted = slots.admit("10.0.9.200")  # known: past the subnet cap, and in when full
    assert slot is not None and evicted == held[0]  # the oldest stranger's slot
    assert len(slots) == 8
    slots.release(evicted)  # the evicted link ending later changes nothing
    assert len(slots) == 8
    for s in [*held, *others, slot]:
        if s is not None:
            slots.release(s)
    assert len(slots) == 0 and slots.admit("10.0.9.1")[0] is not None


def test_f2_known_addresses_never_evict_each_other() -> None:
    slots = HandshakeSlots(total=2, per_ip=1, per_subnet=2)
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        slots.remember(ip)
    assert slots.admit("10.0.0.1")[0] is not None
    assert slots.admit("10.0.0.2")[0] is not None
    assert slots.admit("10.0.0.3") == (None, None)


def test_f15_one_line_per_source_per_window_then_a_count() -> None:
    log = FailureLog(window=60.0, max_sources=2)
    first = log.note("from 10.0.0.9", "handshake failed: different sync group", now=0.0)
    assert first is not None and "10.0.0.9" in first and "different sync group" in first
    assert all(
        log.note("from 10.0.0.9", "handshake failed: x", now=t) is None for t in range(1, 50)
    )
    assert log.note("to 10.0.0.9", "the peer refused our handshake", now=2.0) is not None
    assert log.flush(now=30.0) == []  # the window is still open
    [summary] = log.flush(now=60.0)
    assert summary.startswith("49 more failed handshake(s) from 10.0.0.9")
    assert "last: handshake failed: x" in summary
    log.flush(now=62.0)
    assert log.note("from 10.0.0.9", "again", now=61.0) is not None  # a new window logs at once
    # Past max_sources, new sources share one entry, so memory stays bounded.
    assert log.note("from 10.0.0.10", "r", now=61.0) is not None
    assert log.note("from 10.0.0.11", "r", now=61.0) is not None  # the shared entry, first time
    assert log.note("from 10.0.0.12", "r", now=61.0) is None
    assert len(log) == 3
    assert log.flush(62.0, everything=True) == [
        f"1 more failed handshake(s) {FailureLog.OTHERS} in the last 1 s (last: r)"
    ]


def test_f13_dial_budget_quarantines_bounds_dialers_and_paces_attempts() -> None:
    budget = DialBudget(max_dialers=2, rate=2.0, burst=3, quarantine=600.0)
    assert budget.may_dial("a", dialers=0, now=0.0)
    assert not budget.may_dial("c", dialers=2, now=0.0)  # two discovered dialers already
    budget.quarantine("a", now=10.0)
    assert not budget.may_dial("a", dialers=0, now=11.0)  # re-announcing it buys nothing
    assert not budget.may_dial("a", dialers=0, now=609.0)
    assert budget.may_dial("a", dialers=0, now=611.0)
    # Attempts share one bucket: a burst of 3, then 2 per second.
    assert [budget.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.take(0.0) == 0.5
    assert budget.take(0.5) == 0.0
