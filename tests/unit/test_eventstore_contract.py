"""The in-memory event store twin passes the event store contract."""

from __future__ import annotations

import pytest

from libs.eventbus.memory import InMemoryEventStore
from tests.contract.eventstore import EventStoreContract

pytestmark = pytest.mark.unit


class TestInMemoryEventStore(EventStoreContract):
    @pytest.fixture
    def store(self) -> InMemoryEventStore:
        return InMemoryEventStore()
