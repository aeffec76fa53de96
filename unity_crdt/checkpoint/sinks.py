"""Checkpoint sinks opened by URL scheme.

`open_sink(url, config)` returns the `CheckpointSink` for a URL: `dir:///path` (plain files),
`weaviate://host:port?grpc=PORT` (Weaviate over HTTP; `http://` and `https://` URLs, what
`NodeConfig.weaviate_url` always took, mean Weaviate too). A new backend is one module with a
class meeting `CheckpointSink` (checked by `unity_crdt.testing.check_sink`) and one
`register_sink(scheme, factory)` call; or pass the sink itself to `Node(sink=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from ..config import NodeConfig
from ..errors import ConfigError
from ..ids import check_scheme
from .format import CheckpointSink

__all__ = ["SinkFactory", "open_sink", "register_sink", "registered_schemes"]

SinkFactory = Callable[[str, "NodeConfig | None"], CheckpointSink]
"""Build a sink from its URL; the node's config carries backend settings (API keys, ports)."""


def _directory(url: str, config: NodeConfig | None) -> CheckpointSink:
    from .directory import DirectorySink

    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path:
        raise ConfigError(f"a directory sink URL looks like dir:///absolute/path, got {url!r}")
    return DirectorySink(parts.path)


def _weaviate(url: str, config: NodeConfig | None) -> CheckpointSink:
    from .weaviate import WeaviateSink  # the weaviate client loads only when it is used

    parts = urlsplit(url)
    grpc = config.weaviate_grpc_port if config is not None else 50051
    query = parse_qs(parts.query)
    if "grpc" in query:
        try:
            grpc = int(query["grpc"][-1])
        except ValueError:
            raise ConfigError(f"grpc port must be a number in {url!r}") from None
    scheme = "https" if parts.scheme == "https" else "http"
    api_key = config.weaviate_api_key if config is not None else None
    return WeaviateSink(f"{scheme}://{parts.netloc}", grpc, api_key)


_REGISTRY: dict[str, SinkFactory] = {
    "dir": _directory,
    "weaviate": _weaviate,
    "http": _weaviate,
    "https": _weaviate,
}


def register_sink(scheme: str, factory: SinkFactory) -> None:
    """Make `scheme://...` checkpoint URLs open with `factory` (for nodes created afterwards)."""
    _REGISTRY[check_scheme(scheme)] = factory


def registered_schemes() -> list[str]:
    """The schemes `open_sink` understands, sorted."""
    return sorted(_REGISTRY)


def open_sink(url: str, config: NodeConfig | None = None) -> CheckpointSink:
    """The checkpoint sink for `url`; ConfigError for a scheme nobody registered."""
    scheme = urlsplit(url).scheme.lower()
    factory = _REGISTRY.get(scheme)
    if factory is None:
        raise ConfigError(
            f"no checkpoint sink for {scheme or 'a URL without a scheme'}:// in {url!r} "
            f"(known: {', '.join(registered_schemes())})"
        )
    return factory(url, config)
