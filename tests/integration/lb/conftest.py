"""Fixtures of the lb's certificate tests: one Pebble per module, validating HTTP-01 against a
ChallengeServer that answers from a ChallengeStore (``challenges``, also as ``store``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
