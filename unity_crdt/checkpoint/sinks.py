"""Checkpoint sinks opened by URL scheme.

`open_sink(url, config)` returns the `CheckpointSink` for a URL: `dir:///path` (plain files),
`weaviate://host:port?grpc=PORT` (Weaviate over HTTP; `http://` and `https://` URLs, what
`NodeConfig.weaviate_url` always took, mean Weaviate too). A tuple of URLs is one deployment
with several servers (a Weaviate cluster): the sink fails over between them. A new backend is
one module with a class meeting `CheckpointSink` (checked by `unity_crdt.testing.check_sink`)
and one `register_sink(scheme, factory)` call; or pass the sink itself to `Node(sink=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from ..config import NodeConfig
from ..errors import ConfigError
from ..ids import check_scheme
from .format import CheckpointSink

__all__ = ["SinkFactory", "open_sink", "register_sink", "registered_schemes"]

SinkFactory = Callable[["str | tuple[str, ...]", "NodeConfig | None"], CheckpointSink]
"""Build a sink from its URL (or URLs, one per server); the node's config carries backend
settings (API keys, ports)."""


def _directory(url: str | tuple[str, ...], config: NodeConfig | None) -> CheckpointSink:
    from .directory import DirectorySink

    if not isinstance(url, str):
        raise ConfigError("a directory sink takes one URL, not several")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path:
        raise ConfigError(f"a directory sink URL looks like dir:///absolute/path, got {url!r}")
    return DirectorySink(parts.path)


def _weaviate(url: str | tuple[str, ...], config: NodeConfig | None) -> CheckpointSink:
    from .weaviate import WeaviateSink  # the weaviate client loads only when it is used

    grpc = config.weaviate_grpc_port if config is not None else 50051
    api_key = config.weaviate_api_key if config is not None else None
    return WeaviateSink(url, grpc, api_key)


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


def open_sink(url: str | Sequence[str], config: NodeConfig | None = None) -> CheckpointSink:
    """The checkpoint sink for `url` (or several URLs of one deployment); ConfigError for a
    scheme nobody registered."""
    urls = (url,) if isinstance(url, str) else tuple(url)
    if not urls:
        raise ConfigError("no checkpoint URL given")
    schemes = [urlsplit(u).scheme.lower() for u in urls]
    for scheme in schemes:
        if scheme not in _REGISTRY:
            raise ConfigError(
                f"no checkpoint sink for {scheme or 'a URL without a scheme'}:// in {url!r} "
                f"(known: {', '.join(registered_schemes())})"
            )
    factory = _REGISTRY[schemes[0]]
    if any(_REGISTRY[s] is not factory for s in schemes):
        raise ConfigError(f"the URLs of one checkpoint store must share a scheme: {urls!r}")
    return factory(urls[0] if len(urls) == 1 else urls, config)
