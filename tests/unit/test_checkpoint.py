"""Checkpointer policy on DirectorySink: dirty tracking, sealing, verification, backoff."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from unity_crdt.checkpoint.directory import DirectorySink
from unity_crdt.checkpoint.format import (
    Manifest,
    SinkRecord,
    chunk_id,
    encode_header,
    record_aad,
)
from unity_crdt.checkpoint.policy import Checkpointer
from unity_crdt.checkpoint.sinks import open_sink
from unity_crdt.crypto.keys import GroupKeys, derive_group_keys, device_id_for, seal_blob
from unity_crdt.errors import CheckpointError, ConfigError, SecurityError
from unity_crdt.testing import check_sink


@pytest.fixture(scope="module")
def keys() -> GroupKeys:
    return derive_group_keys("unit test group secret")


def new_device() -> str:
    return device_id_for(os.urandom(32))


class Clock:
    """An injected clock for status timestamps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Device:
    """Docs held as raw bytes (no pycrdt needed for policy tests) plus a Checkpointer."""

    def __init__(self, keys: GroupKeys, sink: DirectorySink | CountingSink, **kw: object) -> None:
        self.states: dict[str, bytes] = {}
        self.broken: set[str] = set()
        self.edit_while_reading = False
        self.clock = Clock()
        self.cp = Checkpointer(keys, new_device(), sink, self.get_state, clock=self.clock, **kw)  # type: ignore[arg-type]

    def get_state(self, name: str) -> bytes:
        if name in self.broken:
            raise RuntimeError("doc unavailable")
        if self.edit_while_reading:  # an edit lands right after the state was read
            self.cp.mark_dirty(name)
        return self.states[name]

    def set(self, name: str, state: bytes) -> None:
        self.states[name] = state
        self.cp.mark_dirty(name)


class CountingSink(DirectorySink):
    """DirectorySink that records which object ids each put carried."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.puts: list[list[str]] = []

    async def put(self, tenant: str, records: Sequence[SinkRecord]) -> None:
        self.puts.append([r.manifest.doc_key for r in records])
        await super().put(tenant, records)


class RecordingSink(DirectorySink):
    """DirectorySink that records every manifest restore asked chunks for."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.asked: list[Manifest] = []

    async def chunks(self, tenant: str, manifests: Sequence[Manifest]) -> dict[str, list[bytes]]:
        self.asked.extend(manifests)
        return await super().chunks(tenant, manifests)


def manifest_file(root: Path, keys: GroupKeys, object_id: str) -> Path:
    return root / keys.tenant / "manifests" / f"{object_id}.json"


def all_bytes(root: Path) -> bytes:
    return b"\n".join(
        p.name.encode() + b"\0" + p.read_bytes() for p in root.rglob("*") if p.is_file()
    )


async def test_only_dirty_docs_are_written(tmp_path: Path, keys: GroupKeys) -> None:
    sink = CountingSink(tmp_path)
    dev = Device(keys, sink)
    dev.set("a", b"state a")
    dev.set("b", b"state b")
    report = await dev.cp.checkpoint()
    assert report.written == ("a", "b") and dev.cp.dirty == frozenset()
    assert (await dev.cp.checkpoint()).written == ()  # nothing dirty: no write at all
    assert len(sink.puts) == 1
    dev.set("b", b"state b2")
    assert (await dev.cp.checkpoint()).written == ("b",)
    assert sink.puts[-1] == [dev.cp.doc_key("b")]
    assert (await dev.cp.checkpoint(["a"], force=True)).written == ("a",)
    assert (await dev.cp.checkpoint(["a"])).written == ()
    assert dev.cp.status["b"].writes == 2 and dev.cp.status["a"].writes == 2
    assert dev.cp.status["a"].last_ok == 1000.0


async def test_edit_during_checkpoint_keeps_doc_dirty(tmp_path: Path, keys: GroupKeys) -> None:
    dev = Device(keys, DirectorySink(tmp_path))
    dev.set("a", b"v1")
    dev.edit_while_reading = True
    assert (await dev.cp.checkpoint()).written == ("a",)
    assert dev.cp.dirty == {"a"}


async def test_unreadable_doc_is_reported_and_others_written(
    tmp_path: Path, keys: GroupKeys
) -> None:
    dev = Device(keys, DirectorySink(tmp_path))
    dev.set("ok", b"fine")
    dev.set("bad", b"x")
    dev.broken.add("bad")
    report = await dev.cp.checkpoint()
    assert report.written == ("ok",)
    assert "doc unavailable" in report.failed["bad"]
    assert dev.cp.dirty == {"bad"} and dev.cp.status["bad"].last_error is not None


async def test_devices_each_write_own_object_and_restore_merges(
    tmp_path: Path, keys: GroupKeys
) -> None:
    sink = DirectorySink(tmp_path)
    devices = [Device(keys, sink) for _ in range(3)]
    docs = []
    for n, dev in enumerate(devices):
        doc: Doc = Doc()
        doc["t"] = text = Text()
        text += f"device {n} "
        docs.append(doc)
        dev.set("shared", doc.get_update())
        await dev.cp.checkpoint()
    assert len(list((tmp_path / keys.tenant / "manifests").iterdir())) == 3
    restored = await Device(keys, sink).cp.restore()
    assert len(restored["shared"]) == 3
    merged: Doc = Doc()
    merged["t"] = text = Text()
    for state in restored["shared"]:
        merged.apply_update(state)
    assert sorted(str(text).split("device ")[1:]) == ["0 ", "1 ", "2 "]


async def test_chunked_roundtrip_and_older_objects_removed(tmp_path: Path, keys: GroupKeys) -> None:
    dev = Device(keys, DirectorySink(tmp_path), chunk_size=1000)
    doc: Doc = Doc()
    doc["t"] = text = Text()
    text += os.urandom(5_250).hex()
    big = doc.get_update()
    dev.set("big", big)
    await dev.cp.checkpoint()
    chunk_root = tmp_path / keys.tenant / "chunks"
    (first,) = chunk_root.iterdir()
    assert len(list(first.iterdir())) == len(big) // 1000 + 1
    assert (await dev.cp.restore())["big"] == [big]
    del text[100:]
    small = doc.get_update()
    dev.set("big", small)
    report = await dev.cp.checkpoint()
    assert report.written == ("big",) and report.pruned == 1
    (second,) = chunk_root.iterdir()  # the older object, dominated, is gone whole
    assert second != first and len(list(second.iterdir())) == len(small) // 1000 + 1
    assert (await Device(keys, DirectorySink(tmp_path)).cp.restore())["big"] == [small]
    dev.set("empty", b"")
    await dev.cp.checkpoint()
    assert (await dev.cp.restore(["empty"]))["empty"] == [b""]


async def test_files_hold_no_doc_names_or_private_text(tmp_path: Path, keys: GroupKeys) -> None:
    states = {"Quarterly plan ñ": b"zanzibar secret", "recipes": b"pancakes"}
    searchable = {"recipes"}
    dev = Checkpointer(
        keys,
        new_device(),
        DirectorySink(tmp_path),
        states.__getitem__,
        lambda n: "pancakes with flour" if n in searchable else None,
    )
    for name in states:
        dev.mark_dirty(name)
    await dev.checkpoint()
    raw = all_bytes(tmp_path)
    for secret in ("Quarterly", "recipes", "zanzibar", dev.device_id):
        assert secret.encode() not in raw
    assert b"pancakes with flour" in raw  # the searchable projection, as documented
    hits = await dev.search("flour")
    assert [h.doc for h in hits] == ["recipes"]


async def test_flipped_byte_refused_with_object_id_others_kept(
    tmp_path: Path, keys: GroupKeys, caplog: pytest.LogCaptureFixture
) -> None:
    sink = DirectorySink(tmp_path)
    a, b = Device(keys, sink), Device(keys, sink)
    a.set("notes", b"from a")
    b.set("notes", b"from b")
    await a.cp.checkpoint()
    await b.cp.checkpoint()
    (victim,) = [
        m.object_id
        for m in await sink.manifests(keys.tenant)
        if m.device == a.cp.device_tag(a.cp.device_id)
    ]
    (chunk,) = (tmp_path / keys.tenant / "chunks" / victim).iterdir()
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0x40
    chunk.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="unity_crdt.checkpoint"):
        restored = await Device(keys, sink).cp.restore()
    assert restored == {"notes": [b"from b"]}
    (line,) = [r.getMessage() for r in caplog.records]
    assert victim in line and "refused" in line and "notes" not in line


async def test_swapped_chunks_and_headers_are_detected(tmp_path: Path, keys: GroupKeys) -> None:
    dev = Device(keys, DirectorySink(tmp_path))
    rec_a = dev.cp.seal("a", b"state of a")
    rec_b = dev.cp.seal("b", b"state of b")
    ma, mb = rec_a.manifest, rec_b.manifest
    assert dev.cp.open(ma, rec_a.chunks) == ("a", b"state of a")
    with pytest.raises(SecurityError):  # b's chunk under a's manifest
        dev.cp.open(ma, rec_b.chunks)
    with pytest.raises(SecurityError):  # a's header moved onto b's object id
        dev.cp.open(Manifest(mb.object_id, *_rest(ma)), rec_a.chunks)
    other = Device(derive_group_keys("another group secret"), DirectorySink(tmp_path))
    with pytest.raises(SecurityError):  # another group's key
        other.cp.open(ma, rec_a.chunks)
    with pytest.raises(CheckpointError, match="incomplete"):
        dev.cp.open(ma, [])


def _rest(m: Manifest) -> tuple[str, str, str, int, int, bytes]:
    return m.doc_key, m.device, m.generation, m.parts, m.nbytes, m.header


async def test_missing_chunk_is_refused(
    tmp_path: Path, keys: GroupKeys, caplog: pytest.LogCaptureFixture
) -> None:
    dev = Device(keys, DirectorySink(tmp_path), chunk_size=4)
    dev.set("a", b"0123456789")
    dev.set("b", b"fine")
    await dev.cp.checkpoint()
    m = next(
        x for x in await dev.cp.sink.manifests(keys.tenant) if x.doc_key == dev.cp.doc_key("a")
    )
    (tmp_path / keys.tenant / "chunks" / m.object_id / f"{m.generation}.1").unlink()
    with caplog.at_level(logging.WARNING, logger="unity_crdt.checkpoint"):
        assert await dev.cp.restore() == {"b": [b"fine"]}
    assert any("incomplete" in r.getMessage() for r in caplog.records)
    assert chunk_id(m.object_id, m.generation, 0) != chunk_id(m.object_id, m.generation, 1)


async def test_changed_only_restore_returns_new_generations(
    tmp_path: Path, keys: GroupKeys
) -> None:
    sink = DirectorySink(tmp_path)
    me, peer = Device(keys, sink), Device(keys, sink)
    me.set("n", b"mine")
    peer.set("n", b"theirs v1")
    await me.cp.checkpoint()
    await peer.cp.checkpoint()
    assert await me.cp.restore(changed_only=True, include_own=False) == {"n": [b"theirs v1"]}
    assert await me.cp.restore(changed_only=True, include_own=False) == {}
    peer.set("n", b"theirs v2")
    await peer.cp.checkpoint()
    assert await me.cp.restore(changed_only=True, include_own=False) == {"n": [b"theirs v2"]}


def test_backoff_schedule() -> None:
    delays = [Checkpointer.next_delay(1.0, f, 60.0) for f in range(9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert Checkpointer.next_delay(90.0, 3, 60.0) == 90.0  # never below the interval


class Stop(Exception):
    pass


async def test_run_backs_off_while_sink_fails_and_recovers(tmp_path: Path, keys: GroupKeys) -> None:
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store directory should be")
    dev = Device(keys, DirectorySink(blocker))
    dev.set("a", b"payload")
    slept: list[float] = []
    seen_failures: list[int] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        seen_failures.append(dev.cp.failures)
        if len(slept) == 5:  # the store comes back
            blocker.unlink()
        if len(slept) == 7:
            raise Stop

    with pytest.raises(Stop):
        await dev.cp.run(0.5, max_backoff=3.0, sleep=sleep)
    assert slept == [0.5, 1.0, 2.0, 3.0, 3.0, 0.5, 0.5]
    assert seen_failures == [0, 1, 2, 3, 4, 0, 0]
    assert dev.cp.dirty == frozenset()
    assert dev.cp.status["a"].last_error is None and dev.cp.status["a"].writes == 1
    assert (await dev.cp.restore())["a"] == [b"payload"]


async def test_failed_checkpoint_raises_and_records_status(tmp_path: Path, keys: GroupKeys) -> None:
    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    dev = Device(keys, DirectorySink(blocker))
    dev.set("a", b"payload")
    with pytest.raises(CheckpointError, match="checkpoint directory failed"):
        await dev.cp.checkpoint()
    assert dev.cp.dirty == {"a"}
    assert "checkpoint directory failed" in (dev.cp.status["a"].last_error or "")
    assert dev.cp.status["a"].last_ok is None


async def test_run_pull_hands_new_states_to_apply(tmp_path: Path, keys: GroupKeys) -> None:
    sink = DirectorySink(tmp_path)
    me, peer = Device(keys, sink), Device(keys, sink)
    peer.set("n", b"theirs")
    await peer.cp.checkpoint()
    applied: list[dict[str, list[bytes]]] = []
    rounds = 0

    async def sleep(_: float) -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 3:
            raise Stop

    with pytest.raises(Stop):
        await me.cp.run_pull(1.0, applied.append, sleep=sleep)
    assert applied == [{"n": [b"theirs"]}]  # the second round found nothing new


async def test_directory_sink_meets_the_sink_contract_by_url(tmp_path: Path) -> None:
    await check_sink(lambda: open_sink(f"dir://{tmp_path}/sink"))


def test_sink_urls_pick_their_backend_and_unknown_schemes_are_clear(tmp_path: Path) -> None:
    assert isinstance(open_sink(f"dir://{tmp_path}"), DirectorySink)
    with pytest.raises(ConfigError, match="no checkpoint sink for ftp://"):
        open_sink("ftp://host/x")
    with pytest.raises(ConfigError, match="dir:///absolute/path"):
        open_sink("dir://")


async def _manifest_path(
    root: Path, sink: DirectorySink, keys: GroupKeys, cp: Checkpointer, doc: str
) -> Path:
    """The manifest file of the one stored object of `doc`."""
    [m] = [m for m in await sink.manifests(keys.tenant) if m.doc_key == cp.doc_key(doc)]
    return manifest_file(root, keys, m.object_id)


def _text_states(*texts: str) -> list[bytes]:
    """The full states of one doc after each text is appended: a device's states only grow."""
    doc: Doc = Doc()
    text = doc.get("t", type=Text)
    out = []
    for t in texts:
        text += t
        out.append(doc.get_update())
    return out


async def test_f9_clear_parts_are_checked_against_the_sealed_header_before_any_fetch(
    tmp_path: Path, keys: GroupKeys, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RecordingSink(tmp_path)
    dev = Device(keys, sink, chunk_size=4)
    dev.set("big", b"0123456789")
    dev.set("ok", b"fine")
    await dev.cp.checkpoint()
    path = await _manifest_path(tmp_path, sink, keys, dev.cp, "big")
    ok_id = (await _manifest_path(tmp_path, sink, keys, dev.cp, "ok")).stem
    honest = json.loads(path.read_bytes())
    assert honest["parts"] == 3
    # The store rewrites the clear fields sinks fetch by: a huge part count, a huge size.
    for lie in ({"parts": 10**12}, {"nbytes": 10**15}, {"parts": 4, "nbytes": 10 + 4 * 29}):
        path.write_text(json.dumps({**honest, **lie}))
        sink.asked.clear()
        with caplog.at_level(logging.WARNING, logger="unity_crdt.checkpoint"):
            assert await Device(keys, sink).cp.restore() == {"ok": [b"fine"]}
        assert [m.object_id for m in sink.asked] == [ok_id], lie
        assert any("refused" in r.getMessage() for r in caplog.records)
    # A member can seal a header whose part count disagrees with its size: refused as well.
    doc_key, device, gen, n = (
        dev.cp.doc_key("forged"),
        dev.cp.device_tag(dev.cp.device_id),
        "ab",
        10**6,
    )
    header = encode_header("forged", dev.cp.device_id, b"0123456789", seq=1, chunk=4)
    aad = record_aad(keys.tenant, b"H", doc_key, device, gen, -1, n)
    forged = Manifest(
        dev.cp.object_id("forged", dev.cp.device_id, gen),
        doc_key,
        device,
        gen,
        n,
        10 + n * 29,
        seal_blob(keys.checkpoint_key, header, aad),
    )
    await sink.put(keys.tenant, [SinkRecord(forged, (b"junk",))])
    path.write_text(json.dumps(honest))
    sink.asked.clear()
    assert await Device(keys, sink).cp.restore() == {"big": [b"0123456789"], "ok": [b"fine"]}
    assert forged.object_id not in {m.object_id for m in sink.asked}


async def test_f10_an_older_or_lost_checkpoint_is_detected_and_remembered(
    tmp_path: Path, keys: GroupKeys
) -> None:
    v1, v2, v3 = _text_states("one ", "two ", "three")
    store = tmp_path / "store"
    sink = DirectorySink(store)
    writer = Device(keys, sink, ledger_path=tmp_path / "writer.json")
    writer.set("d", v1)
    await writer.cp.checkpoint()
    ledger = tmp_path / "reader.json"
    reader = Device(keys, sink, ledger_path=ledger)
    assert await reader.cp.restore() == {"d": [v1]}
    old = tmp_path / "old"
    shutil.copytree(store, old)
    writer.clock.now += 1
    writer.set("d", v2)
    await writer.cp.checkpoint()  # the new write holds the old one, which is pruned
    assert len(await sink.manifests(keys.tenant)) == 1
    assert await reader.cp.restore() == {"d": [v2]}
    assert reader.cp.warnings == ()
    assert ledger.stat().st_mode & 0o777 == 0o600
    # The store serves the first write again (its own consistent, sealed copy of it).
    shutil.rmtree(store)
    shutil.copytree(old, store)
    again = Device(keys, sink, ledger_path=ledger)  # the reader, restarted from its cache
    assert await again.cp.restore() == {}
    assert any("older checkpoint of doc 'd'" in w and "refused" in w for w in again.cp.warnings)
    assert any("gone from the store" in w for w in again.cp.warnings)
    # A device with no memory of the newer write cannot tell (docs/security.md says so).
    assert await Device(keys, sink).cp.restore() == {"d": [v1]}
    # The store drops everything: the reader says so; the writer, seeing its own gone,
    # writes it again.
    shutil.rmtree(store)
    assert await again.cp.restore() == {}
    assert any("gone from the store" in w for w in again.cp.warnings)
    writer.cp._dirty.clear()
    await writer.cp.restore()
    assert "d" in writer.cp.dirty and any("gone" in w for w in writer.cp.warnings)
    # The writer's counter keeps rising across restarts, even if its clock stands still.
    restarted = Device(keys, sink, ledger_path=tmp_path / "writer.json")
    restarted.cp.device_id = writer.cp.device_id
    restarted.clock.now = writer.clock.now - 100
    restarted.set("d", v3)
    await restarted.cp.checkpoint()
    assert await again.cp.restore() == {"d": [v3]}
    assert not any("gone" in w for w in again.cp.warnings)


def test_a_cluster_is_a_tuple_of_urls_each_with_its_grpc_port(tmp_path: Path) -> None:
    from unity_crdt.checkpoint.weaviate import WeaviateSink
    from unity_crdt.config import NodeConfig

    urls = ("http://10.0.0.1:8080?grpc=50051", "weaviate://10.0.0.2:8081", "https://db.example")
    cfg = NodeConfig(name="n", cache_dir=tmp_path, group_secret="s" * 16, weaviate_url=list(urls))  # type: ignore[arg-type]
    assert cfg.checkpoint_url == cfg.weaviate_url == urls  # lists from TOML become tuples
    sink = open_sink(urls, cfg)
    assert isinstance(sink, WeaviateSink)
    assert [(e.url, e.port, e.grpc_port, e.secure) for e in sink.endpoints] == [
        ("http://10.0.0.1:8080", 8080, 50051, False),
        ("http://10.0.0.2:8081", 8081, cfg.weaviate_grpc_port, False),
        ("https://db.example", 443, cfg.weaviate_grpc_port, True),
    ]
    single = NodeConfig(name="n", cache_dir=tmp_path, group_secret="s" * 16, weaviate_url=[urls[0]])  # type: ignore[arg-type]
    assert single.checkpoint_url == urls[0]
    with pytest.raises(ConfigError, match="non-empty list"):
        NodeConfig(name="n", cache_dir=tmp_path, group_secret="s" * 16, weaviate_url=())
    with pytest.raises(ConfigError, match="grpc port must be a number"):
        open_sink(("http://h:1?grpc=x", "http://h:2"))
    with pytest.raises(ConfigError, match="share a scheme"):
        open_sink(("http://h:1", f"dir://{tmp_path}"))
    env = NodeConfig.from_env(
        prefix="UC_TEST_", name="n", cache_dir=tmp_path, group_secret="s" * 16
    )
    assert env.checkpoint_url is None
