"""Fixtures of the contract suite: key pairs are slow to generate, so one per session."""

from __future__ import annotations

import pytest

from tests.support.keypairs import KeyPair, ec_pair, ed25519_pair, rsa_pair


@pytest.fixture(scope="session")
def rsa_keys() -> KeyPair:
    return rsa_pair()


@pytest.fixture(scope="session")
def ec_keys() -> KeyPair:
    return ec_pair()


@pytest.fixture(scope="session")
def ed25519_keys() -> KeyPair:
    return ed25519_pair()
