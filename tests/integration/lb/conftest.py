"""Fixtures of the lb's tests: one Pebble per module, validating HTTP-01 against a
ChallengeServer that answers from a ChallengeStore (``challenges``, also as ``store``); an
ECDSA test CA (``ca``); ``run``, a test's coroutine on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trustme
import uvloop

from corral_lb.acme import ChallengeStore
from integration.lb.pebble import ChallengeServer, Pebble, run_pebble


@pytest.fixture(scope="module")
def challenges() -> ChallengeStore:
    return ChallengeStore()


@pytest.fixture(scope="module")
def store(challenges: ChallengeStore) -> ChallengeStore:
    return challenges


@pytest.fixture(scope="module")
def answers(challenges: ChallengeStore) -> Iterator[ChallengeServer]:
    with ChallengeServer(challenges.get) as server:
        yield server


@pytest.fixture(scope="module")
def pebble(answers: ChallengeServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Pebble]:
    with run_pebble(tmp_path_factory.mktemp("pebble"), answers.port) as p:
        yield p


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A test CA with an ECDSA key (a module may define its own)."""
    return trustme.CA(key_type=trustme.KeyType.ECDSA)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[None]]], None]:
    """Runs a test's coroutine on the loop of the parameter."""
    def runner(main: Callable[[], Awaitable[None]]) -> None:
        if request.param == "uvloop":
            uvloop.run(main())  # type: ignore[arg-type]
        else:
            asyncio.run(main())  # type: ignore[arg-type]
    return runner
