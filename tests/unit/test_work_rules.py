"""The rules of collective work (sans-IO): claim winners, expiry by a local clock, owners,
retries, lease holders and fencing. Plain values in, decisions out; no sockets, no sleeps."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unity_crdt.work import rules
from unity_crdt.work.board import JobSpec
from unity_crdt.work.rules import ERR, LOST, OK, RUN, Claim, Fence, LeaseClaim, State

A, B, C = "a" * 26, "b" * 26, "c" * 26


def judge(  # type: ignore[no-untyped-def]
    claims: list[Claim], now: float = 100.0, alive: float = 100.0, seen: float = 40.0, **kw: object
):
    opts = {"me": C, "now": now, "lease": 10.0, "max_attempts": 3} | kw
    return rules.judge(claims, last_alive=lambda c: alive, seen_at=lambda c: seen, **opts)  # type: ignore[arg-type]


def test_task_keys_round_trip_and_reject_junk() -> None:
    assert rules.task_key(7, 0, 1) == "7" and rules.task_key(7, 2, 3) == "7.2"
    assert rules.task_position("7") == (7, 0) and rules.task_position("7.2") == (7, 2)
    for bad in ("", "-1", "07", "1.02", "x", "1.", "1.2.3"):
        with pytest.raises(ValueError):
            rules.task_position(bad)


def test_concurrent_claims_of_one_attempt_go_to_the_smaller_device() -> None:
    a, b = Claim("1", 1, A, 1, RUN), Claim("1", 1, B, 1, RUN)
    for order in itertools.permutations([a, b]):
        v = judge(list(order))
        assert v.state == State.RUNNING and v.current == a
    assert rules.is_lost(b, [a, b]) and not rules.is_lost(a, [a, b])


def test_a_later_attempt_outranks_and_a_result_ends_the_task() -> None:
    old, new = Claim("1", 1, A, 1, RUN), Claim("1", 2, B, 2, RUN)
    assert judge([old, new]).current == new
    assert rules.is_lost(old, [old, new])
    done = Claim("1", 1, A, 1, OK)
    v = judge([done, new])
    assert v.state == State.DONE and v.current == done
    assert rules.is_lost(new, [done, new])  # someone already produced the result
    # A dropped claim counts as an attempt but holds nothing.
    v = judge([Claim("1", 1, A, 1, LOST)])
    assert v.state == State.PENDING and v.attempts == 1


def test_the_highest_ranked_result_is_the_one_counted() -> None:
    a, b = Claim("1", 1, A, 1, OK), Claim("1", 2, B, 2, OK)
    assert judge([a, b]).current == b and judge([b, a]).current == b


def test_expiry_is_judged_by_the_local_clock_since_the_last_sign_of_life() -> None:
    c = Claim("1", 1, A, 1, RUN)
    assert judge([c], now=109.9, alive=100.0).state == State.RUNNING
    v = judge([c], now=110.1, alive=100.0)
    assert v.state == State.EXPIRED and v.attempts == 1
    # The judge's own claims never expire in its own eyes.
    assert judge([Claim("1", 1, C, 1, RUN)], now=1e9, alive=0.0).state == State.RUNNING
    # The last attempt expiring fails the task.
    last = Claim("1", 3, A, 3, RUN)
    assert judge([last], now=200.0, alive=100.0).state == State.FAILED


def test_errors_retry_with_backoff_then_fail() -> None:
    e1 = Claim("1", 1, A, 1, ERR)
    v = judge([e1], alive=99.0, seen=50.0)  # the holder's liveness does not move the retry
    assert v.state == State.RETRY and v.at == 50.0 + rules.backoff(1)
    e3 = Claim("1", 3, A, 3, ERR)
    assert judge([e1, e3]).state == State.FAILED
    assert rules.backoff(1) < rules.backoff(2) < rules.backoff(3) <= rules.BACKOFF_MAX
    assert rules.backoff(40) == rules.BACKOFF_MAX


@given(st.lists(st.sampled_from([A, B, C]), min_size=1, max_size=3, unique=True))
def test_owners_are_the_same_whatever_the_order_the_workers_are_listed(workers: list[str]) -> None:
    for index in range(20):
        first = rules.owners("jobid", index, workers)
        assert sorted(first) == sorted(workers)
        assert rules.owners("jobid", index, list(reversed(workers))) == first


def test_owners_spread_inputs_over_workers() -> None:
    counts = {A: 0, B: 0, C: 0}
    for index in range(3000):
        counts[rules.owners("j", index, [A, B, C])[0]] += 1
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_an_owner_hands_work_only_to_an_idle_peer_and_keeps_its_share() -> None:
    keep = 2 * 4 + rules.HANDOFF_KEEP
    assert rules.handoff(keep, 4, 0, 0, 4) == 0  # nothing to spare
    assert rules.handoff(keep + 100, 4, 0, 0, 4) == 8  # at most twice the peer's concurrency
    assert rules.handoff(keep + 6, 4, 0, 0, 4) == 3  # at most half of what is spare
    assert rules.handoff(keep + 100, 4, 1, 0, 4) == 0  # the peer still has queued work
    assert rules.handoff(keep + 100, 4, 0, 4, 4) == 0  # ... or no free slot


def test_only_a_closed_entry_whose_holder_gave_up_may_be_replaced() -> None:
    gave_up = [Claim("3", 1, "a", 40, LOST, strict=True)]
    closed = {"d": "a", "a": 1, "s": OK}
    assert rules.given_up(closed, gave_up)
    assert rules.given_up({**closed, "s": ERR}, gave_up)
    # A live entry passes on only when the server says so, whatever the doc claims.
    assert not rules.given_up({"d": "a", "a": 1}, gave_up)
    # Another attempt, another device, a claim not given up, a LAN claim: kept.
    assert not rules.given_up({**closed, "a": 2}, gave_up)
    assert not rules.given_up({**closed, "d": "b"}, gave_up)
    assert not rules.given_up(closed, [Claim("3", 1, "a", 40, OK, strict=True)])
    assert not rules.given_up(closed, [Claim("3", 1, "a", 1, LOST)])
    assert not rules.given_up(closed, [])


def test_lease_holder_is_the_highest_token_among_live_holders() -> None:
    def holder(entries: list[LeaseClaim], now: float = 100.0, alive: float = 100.0):  # type: ignore[no-untyped-def]
        return rules.lease_holder(entries, me=C, now=now, last_alive=lambda e: alive)

    a1, b2 = LeaseClaim("x", A, 1, True, 5.0), LeaseClaim("x", B, 2, True, 5.0)
    assert holder([a1, b2]) == b2
    released = LeaseClaim("x", B, 2, False, 5.0)
    assert holder([a1, released]) == a1
    assert holder([a1], now=106.0) is None  # its holder went quiet for longer than the ttl
    tie = LeaseClaim("x", B, 1, True, 5.0)
    assert holder([tie, a1]) == a1  # same token after a partition: the smaller device id
    assert rules.next_lease_token([a1, released]) == 3


def test_fence_refuses_a_stale_token() -> None:
    fence = Fence()
    assert fence.check("doc", 5) and fence.check("doc", 5) and fence.check("doc", 9)
    assert not fence.check("doc", 5)
    assert fence.newest("doc") == 9 and fence.check("other", 1)


def test_job_spec_parse_refuses_what_does_not_add_up() -> None:
    good = {"kind": "k", "n": 2, "k": 1, "lease": 5.0, "max": 3, "by": A, "at": 1.0}
    spec = JobSpec.parse("j" * 16, good, [1, 2])
    assert spec.total == 2 and spec.task_keys() == ["0", "1"]
    for bad in ({**good, "n": 3}, {**good, "k": 0}, {**good, "max": 0}, {**good, "lease": 0}):
        with pytest.raises(ValueError):
            JobSpec.parse("j" * 16, bad, [1, 2])
