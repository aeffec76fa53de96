"""Discovery on loopback with real zeroconf: finding peers, ignoring strangers, surviving abuse.

Everything stays on 127.0.0.1 (IPv4 only). Hostile records are injected by a second, raw
zeroconf instance that multicasts hand-made announcements on loopback.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable

import pytest
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from unity_crdt.errors import ConfigError
from unity_crdt.net._admission import allowed_networks, permitted
from unity_crdt.net.mdns import SERVICE_TYPE, Discovery, Found


def _beacon() -> str:
    """A fresh beacon per test, so parallel runs on the same loopback never mix."""
    return secrets.token_hex(8).upper()


class Recorder:
    """Collects on_found calls (the callback the node would pass)."""

    def __init__(self) -> None:
        self.found: list[Found] = []

    def __call__(self, found: Found) -> None:
        self.found.append(found)

    @property
    def urls(self) -> set[str]:
        return {f.url for f in self.found}


async def _until(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a condition on the loop; fail the test with a clear message on timeout."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def injector() -> AsyncIterator[AsyncZeroconf]:
    """A raw zeroconf on loopback only, used to send crafted announcements."""
    aiozc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    await aiozc.zeroconf.async_wait_for_start()
    yield aiozc
    await aiozc.async_close()


def _announce(
    aiozc: AsyncZeroconf,
    *,
    text: bytes,
    port: int = 9100,
    instance: str | None = None,
    address: str = "127.0.0.1",
    no_address: bool = False,
) -> str:
    """Multicast one crafted announcement (PTR, SRV, TXT, A) on loopback; returns its name."""
    label = instance or secrets.token_hex(8)
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=port,
        properties=text,
        server=f"{label}.local.",
        parsed_addresses=[address],
    )
    out = aiozc.zeroconf.generate_service_broadcast(info, None, broadcast_addresses=not no_address)
    aiozc.zeroconf.async_send(out)
    return info.name


def _txt(*entries: bytes) -> bytes:
    """Raw TXT rdata from entries (each a length-prefixed string, no validation)."""
    return b"".join(bytes([len(e)]) + e for e in entries)


def _good_txt(beacon: str) -> bytes:
    return _txt(b"v=1", b"g=" + beacon.encode())


async def test_instances_with_same_beacon_find_each_other_fast() -> None:
    beacon = _beacon()
    recs = [Recorder() for _ in range(3)]
    ds = [Discovery(beacon=beacon, port=9201 + i, on_found=recs[i]) for i in range(3)]
    t0 = time.monotonic()
    await asyncio.gather(*(d.start() for d in ds))
    try:
        everyone = {f"ws://127.0.0.1:{9201 + j}" for j in range(3)}
        await _until(
            lambda: all(
                r.urls == everyone - {f"ws://127.0.0.1:{9201 + i}"} for i, r in enumerate(recs)
            ),
            within=3.0,
        )
        elapsed = time.monotonic() - t0
        for i, rec in enumerate(recs):
            assert f"ws://127.0.0.1:{9201 + i}" not in rec.urls  # never our own service
            assert all(f.host == "127.0.0.1" for f in rec.found)
        # Cooperating responders skip ~1 s of probing; plain zeroconf needs ~1.2 s.
        assert elapsed < 1.0, elapsed
        assert ds[0].instance != ds[1].instance and len(ds[0].instance) == 16
    finally:
        await asyncio.gather(*(d.close() for d in ds))


class Clock:
    """A beacon schedule of windows set by the test (`GroupKeys.beacons` with a movable clock)."""

    def __init__(self, group: str, window: int) -> None:
        self.group, self.window = group, window

    def beacon(self, window: int) -> str:
        return f"{self.group}W{window}"

    def __call__(self, now: float) -> tuple[str, frozenset[str]]:
        return self.beacon(self.window), frozenset(self.beacon(self.window + d) for d in (-1, 0, 1))


async def test_f8_beacons_rotate_and_adjacent_windows_are_accepted() -> None:
    group = _beacon()
    a_clock, far_clock = Clock(group, 10), Clock(group, 13)
    a_rec, far_rec = Recorder(), Recorder()
    a = Discovery(beacon=a_clock, port=9601, on_found=a_rec, requery_interval=0.3)
    far = Discovery(beacon=far_clock, port=9602, on_found=far_rec, requery_interval=0.3)
    await asyncio.gather(a.start(), far.start())
    try:
        await asyncio.sleep(1.0)
        assert a_rec.urls == far_rec.urls == set()  # windows 10 and 13: too far apart
        a_clock.window = 12  # a's clock moves on: it announces the new window's beacon
        await _until(lambda: "ws://127.0.0.1:9601" in far_rec.urls, within=5.0)
        await _until(lambda: "ws://127.0.0.1:9602" in a_rec.urls, within=5.0)
    finally:
        await asyncio.gather(a.close(), far.close())


async def test_other_group_is_never_reported_either_way() -> None:
    mine, theirs = Recorder(), Recorder()
    a = Discovery(beacon=_beacon(), port=9211, on_found=mine)
    b = Discovery(beacon=_beacon(), port=9212, on_found=theirs)
    c_rec = Recorder()
    c = Discovery(beacon=a._beacon, port=9213, on_found=c_rec)
    await asyncio.gather(a.start(), b.start(), c.start())
    try:
        await _until(lambda: "ws://127.0.0.1:9213" in mine.urls)
        await asyncio.sleep(0.5)  # time for b's records to arrive and be dropped
        assert "ws://127.0.0.1:9212" not in mine.urls | c_rec.urls
        assert not theirs.urls & {"ws://127.0.0.1:9211", "ws://127.0.0.1:9213"}
        assert a.stats()["dropped"] >= 1  # b's service was seen, then ignored
    finally:
        await asyncio.gather(a.close(), b.close(), c.close())


async def test_goodbye_removes_candidate() -> None:
    beacon = _beacon()
    rec = Recorder()
    a = Discovery(beacon=beacon, port=9221, on_found=rec)
    b = Discovery(beacon=beacon, port=9222, on_found=Recorder())
    await asyncio.gather(a.start(), b.start())
    try:
        await _until(lambda: any(f.port == 9222 for f in a.candidates))
        await b.close()
        await _until(lambda: not any(f.port == 9222 for f in a.candidates))
    finally:
        await asyncio.gather(a.close(), b.close())


@pytest.mark.parametrize(
    ("case", "make_text", "port"),
    [
        ("missing v", lambda b: _txt(b"g=" + b.encode()), 9301),
        ("unknown version", lambda b: _txt(b"v=2", b"g=" + b.encode()), 9302),
        ("version without value", lambda b: _txt(b"v", b"g=" + b.encode()), 9303),
        ("2 KB of TXT", lambda b: _good_txt(b) + _txt(*[b"p=" + b"x" * 200] * 10), 9304),
        ("7.5 KB of TXT", lambda b: _good_txt(b) + _txt(*[b"p=" + b"x" * 250] * 30), 9305),
        # 10 KB exceeds zeroconf's 8,966-byte message cap: it never even reaches our parser.
        ("10 KB of TXT", lambda b: _good_txt(b) + _txt(*[b"p=" + b"x" * 250] * 40), 9311),
        ("non-UTF-8 key", lambda b: _good_txt(b) + _txt(b"\xff\xfe=1"), 9306),
        ("non-UTF-8 value", lambda b: _good_txt(b) + _txt(b"n=\xc3\x28"), 9307),
        ("truncated entry", lambda b: _good_txt(b) + b"\x40v=1", 9308),
        ("too many keys", lambda b: _good_txt(b) + _txt(*[b"k%d=1" % i for i in range(20)]), 9309),
        ("empty TXT", lambda b: b"", 9310),
        ("port 0", _good_txt, 0),
    ],
)
async def test_malformed_announcements_are_ignored(
    injector: AsyncZeroconf, case: str, make_text: Callable[[str], bytes], port: int
) -> None:
    beacon = _beacon()
    rec = Recorder()
    d = Discovery(beacon=beacon, port=9300, on_found=rec)
    await d.start()
    try:
        _announce(injector, text=make_text(beacon), port=port)
        # A well-formed announcement sent right after proves the bad one had time to arrive.
        _announce(injector, text=_good_txt(beacon), port=9399)
        await _until(lambda: "ws://127.0.0.1:9399" in rec.urls)
        await asyncio.sleep(0.1)
        assert rec.urls == {"ws://127.0.0.1:9399"}, case
        assert len(d.candidates) == 1
        if case != "10 KB of TXT":
            assert d.stats()["dropped"] >= 1, "the bad record must have arrived and been dropped"
    finally:
        await d.close()


async def test_bad_addresses_are_not_reported(injector: AsyncZeroconf) -> None:
    beacon = _beacon()
    rec = Recorder()
    d = Discovery(beacon=beacon, port=9400, on_found=rec)
    await d.start()
    try:
        for i, addr in enumerate(["0.0.0.0", "224.0.0.251", "255.255.255.255"]):
            _announce(injector, text=_good_txt(beacon), port=9401 + i, address=addr)
        _announce(injector, text=_good_txt(beacon), port=9499)
        await _until(lambda: "ws://127.0.0.1:9499" in rec.urls)
        await asyncio.sleep(0.1)
        assert rec.urls == {"ws://127.0.0.1:9499"}
    finally:
        await d.close()


async def test_f13_addresses_outside_the_allowed_networks_are_not_reported(
    injector: AsyncZeroconf,
) -> None:
    beacon = _beacon()
    rec = Recorder()
    d = Discovery(beacon=beacon, port=9500, on_found=rec, allow=["127.0.0.0/24"])
    await d.start()
    try:
        _announce(injector, text=_good_txt(beacon), port=9501, address="127.0.5.5")
        _announce(injector, text=_good_txt(beacon), port=9502, address="127.0.0.7")
        await _until(lambda: "ws://127.0.0.7:9502" in rec.urls)
        await asyncio.sleep(0.2)
        assert rec.urls == {"ws://127.0.0.7:9502"}
    finally:
        await d.close()


def test_f13_allowed_networks_default_to_the_interfaces_subnets_never_loopback() -> None:
    lan = allowed_networks(["192.168.1.10"], None, [("192.168.1.10", 24), ("127.0.0.1", 8)])
    assert [str(n) for n in lan] == ["192.168.1.0/24"]
    assert permitted("192.168.1.77", lan, loopback_ok=False)
    assert not permitted("192.168.2.77", lan, loopback_ok=False)
    # A replayed record pointing at this host's own services is refused on a LAN, even when
    # the user's allow list would cover it; discovery on loopback (tests, one machine) allows it.
    wide = allowed_networks(["192.168.1.10"], ["0.0.0.0/0"], [])
    assert not permitted("127.0.0.1", wide, loopback_ok=False)
    assert permitted("127.0.0.1", allowed_networks(["127.0.0.1"], None, []), loopback_ok=True)
    # An interface address the host does not list stands for itself alone.
    assert [str(n) for n in allowed_networks(["10.1.2.3"], None, [])] == ["10.1.2.3/32"]
    with pytest.raises(ConfigError):
        allowed_networks(["10.1.2.3"], ["not a network"], [])


async def _flood(aiozc: AsyncZeroconf, texts: Callable[[int], bytes], n: int = 1000) -> float:
    """Send n announcements with distinct names and ports within about a second."""
    t0 = time.monotonic()
    for i in range(n):
        _announce(aiozc, text=texts(i), port=10000 + i)
        if i % 50 == 49:  # paced so the loopback socket buffer does not drop them
            await asyncio.sleep(0.04)
    return time.monotonic() - t0


async def test_flood_of_foreign_announcements_keeps_memory_bounded(
    injector: AsyncZeroconf,
) -> None:
    rec = Recorder()
    d = Discovery(beacon=_beacon(), port=9500, on_found=rec, max_candidates=50)
    await d.start()
    try:
        other = _good_txt(_beacon())
        elapsed = await _flood(injector, lambda i: other)
        assert elapsed < 2.0
        await _until(lambda: d.stats()["dropped"] >= 900, within=5.0)
        stats = d.stats()
        assert rec.found == []
        assert stats["known"] == 0 and stats["due"] == 0
        assert stats["pending"] <= 50
    finally:
        await d.close()


async def test_flood_of_valid_looking_announcements_is_rate_limited(
    injector: AsyncZeroconf,
) -> None:
    beacon = _beacon()
    rec = Recorder()
    d = Discovery(beacon=beacon, port=9600, on_found=rec, max_candidates=100)
    await d.start()
    try:
        t0 = time.monotonic()
        await _flood(injector, lambda i: _good_txt(beacon))
        await asyncio.sleep(0.3)
        elapsed = time.monotonic() - t0
        stats = d.stats()
        # Token bucket: a burst of 64 then 16 per second, never 1,000 calls.
        assert 64 <= len(rec.found) <= 64 + 16 * elapsed + 1, (len(rec.found), elapsed)
        assert stats["known"] <= 100 and stats["due"] <= 100 and stats["last_report"] <= 100
        assert len(rec.urls) == len(rec.found)  # no url reported twice
    finally:
        await d.close()
    assert d.stats()["due"] == 0


async def test_repeated_announcement_is_reported_once_until_refresh(
    injector: AsyncZeroconf,
) -> None:
    beacon = _beacon()
    rec = Recorder()
    d = Discovery(beacon=beacon, port=9700, on_found=rec, requery_interval=0.2)
    await d.start()
    try:
        for i in range(20):
            # Same service, changing TXT: each is an update that re-validates it.
            text = _good_txt(beacon) + _txt(b"x=%d" % i)
            _announce(injector, text=text, port=9701, instance="repeated0000")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.6)  # also spans a few periodic re-queries that replay the cache
        assert [f.url for f in rec.found] == ["ws://127.0.0.1:9701"]
        await d.refresh()
        await _until(lambda: len(rec.found) == 2)
        assert rec.found[1] == rec.found[0]
    finally:
        await d.close()


async def test_exceptions_in_on_found_do_not_escape() -> None:
    beacon = _beacon()
    calls: list[Found] = []

    def explode(found: Found) -> None:
        calls.append(found)
        raise RuntimeError("callback bug")

    a = Discovery(beacon=beacon, port=9801, on_found=explode)
    b = Discovery(beacon=beacon, port=9802, on_found=Recorder())
    c = Discovery(beacon=beacon, port=9803, on_found=Recorder())
    await asyncio.gather(a.start(), b.start(), c.start())
    try:
        await _until(lambda: {f.port for f in calls} == {9802, 9803})
        await a.refresh()  # the loop and the browser still work after the errors
        await _until(lambda: len(calls) >= 4)
    finally:
        await asyncio.gather(a.close(), b.close(), c.close())


async def test_close_cancels_pending_queries_and_timers(injector: AsyncZeroconf) -> None:
    beacon = _beacon()
    rec = Recorder()
    before = asyncio.all_tasks()
    d = Discovery(beacon=beacon, port=9900, on_found=rec)
    await d.start()
    for _ in range(5):  # services without an address: each starts a 3 s network resolution
        _announce(injector, text=_good_txt(beacon), no_address=True)
    await _until(lambda: d.stats()["pending"] == 5)
    t0 = time.monotonic()
    await d.close()
    assert time.monotonic() - t0 < 1.0
    assert d.stats()["pending"] == 0
    await asyncio.sleep(0)
    leftover = {t for t in asyncio.all_tasks() - before if not t.done()}
    assert leftover == set()
    await d.close()  # idempotent
    await d.refresh()  # a no-op once closed
    assert rec.found == []


async def test_start_twice_is_refused() -> None:
    d = Discovery(beacon=_beacon(), port=9950, on_found=Recorder())
    await d.start()
    try:
        with pytest.raises(RuntimeError):
            await d.start()
    finally:
        await d.close()


async def test_interface_address_not_on_this_host_fails_clearly() -> None:
    before = asyncio.all_tasks()
    # 192.0.2.1 (TEST-NET-1) is on no interface: no socket opens, nothing is sent.
    d = Discovery(beacon=_beacon(), port=9951, on_found=Recorder(), interfaces=["192.0.2.1"])
    with pytest.raises(OSError, match=r"mDNS cannot open interfaces \['192.0.2.1'\]"):
        await d.start()
    await d.close()
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 0},
        {"port": 65536},
        {"interfaces": "127.0.0.1"},
        {"interfaces": ["all"]},
        {"interfaces": []},
        {"advertise_addresses": ["host.example"]},
        {"beacon": ""},
        {"beacon": "x" * 65},
        {"instance": "a.b"},
        {"requery_interval": 0},
        {"max_candidates": 0},
    ],
)
def test_invalid_configuration_is_rejected(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"beacon": "ABC", "port": 9000, "on_found": Recorder()}
    args.update(kwargs)
    with pytest.raises(ConfigError):
        Discovery(**args)  # type: ignore[arg-type]
