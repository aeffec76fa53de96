"""F12 and F11: the Origin allowlist of the y-websocket endpoint, and the Host checks."""

from __future__ import annotations

import pytest

from unity_crdt import NodeConfig
from unity_crdt.config import DEFAULT_YJS_ORIGINS
from unity_crdt.errors import ConfigError
from unity_crdt.frontends._origin import OriginPolicy, host_name, loopback_host, metrics_host
from unity_crdt.frontends.ywebsocket import _is_loopback


def test_f12_origin_allowlist_follows_the_spec() -> None:
    default = OriginPolicy(DEFAULT_YJS_ORIGINS)
    for ok in (
        None,  # no Origin: Node.js clients, native apps (the token is still required)
        "file://",
        "app://bundle",
        "app://-",
        "http://localhost",
        "http://localhost:5173",  # an entry without a port matches any port
        "http://127.0.0.1:8080",
        "http://[::1]:3000",
        "HTTP://LOCALHOST:1",
    ):
        assert default.allows(ok), ok
    for bad in (
        "null",  # only if listed
        "https://localhost",  # another scheme
        "http://evil.example",
        "http://localhost.evil.example",
        "http://127.0.0.2",
        "http://[::2]",
        "chrome-extension://abcdef",
        "file:///etc/passwd",  # not an Origin serialisation
        "",
        "garbage",
    ):
        assert not default.allows(bad), bad
    ported = OriginPolicy(["http://example.lan:8080", "https://app.example", "null"])
    assert ported.allows("http://example.lan:8080")
    assert not ported.allows("http://example.lan:8081") and not ported.allows("http://example.lan")
    assert ported.allows("https://app.example:443") and ported.allows("https://app.example:9")
    assert ported.allows("null") and not ported.allows("file://")
    assert OriginPolicy(["http://example.lan:80"]).allows("http://example.lan")  # default port


def test_f12_origin_entries_are_validated_in_the_config() -> None:
    base = {"name": "n", "cache_dir": "/tmp/x", "group_secret": "s" * 16}
    assert NodeConfig(**base).yjs_origins == DEFAULT_YJS_ORIGINS
    cfg = NodeConfig(**base, yjs_origins=["null", "http://localhost:5173"])
    assert cfg.yjs_origins == ("null", "http://localhost:5173")
    for bad in ("localhost", "http://x/path", "https://", "http://x:0", 5):
        with pytest.raises(ConfigError):
            NodeConfig(**base, yjs_origins=(bad,))


def test_f12_host_checks() -> None:
    assert host_name("LocalHost:8080") == "localhost"
    assert host_name("[::1]:9") == "::1" and host_name("127.0.0.1") == "127.0.0.1"
    for ok in (None, "localhost", "localhost:1234", "127.0.0.1:80", "127.8.9.10", "[::1]:5"):
        assert loopback_host(ok), ok
    for bad in ("evil.example", "evil.example:8080", "192.168.1.2", "[::2]", "localhost.evil"):
        assert not loopback_host(bad), bad
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.2")


def test_f11_metrics_host_refuses_domain_names_nobody_listed() -> None:
    for ok in (None, "localhost:9", "127.0.0.1:9100", "192.168.1.2:9100", "[fd00::2]:9100"):
        assert metrics_host(ok), ok
    assert not metrics_host("evil.example:9100")  # a DNS-rebinding page sends its own name
    assert metrics_host("Prom.Lan:9100", ["prom.lan"])
