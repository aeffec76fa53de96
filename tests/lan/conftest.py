"""Fixtures of the LAN tier: namespaced LANs that are always torn down."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from netns import Lan, sweep_stale, unavailable_reason


@pytest.fixture(scope="session", autouse=True)
def _lan_machine() -> None:
    """Fail loudly (CI runs as root, so this tier must run there) and clear dead runs."""
    reason = unavailable_reason()
    if reason:
        pytest.fail(f"LAN tier cannot run: {reason}", pytrace=False)
    sweep_stale()


@pytest.fixture
def make_lan() -> Iterator[Callable[..., Lan]]:
    """Factory of Lan(hosts=...); every LAN it made is torn down after the test, pass or fail."""
    made: list[Lan] = []

    def factory(hosts: int = 0, **kwargs: object) -> Lan:
        lan = Lan(hosts, **kwargs)  # type: ignore[arg-type]
        made.append(lan)
        return lan

    try:
        yield factory
    finally:
        for lan in made:
            lan.close()
