"""The PostgreSQL event store passes the event store contract (the twin passes the same)."""

from __future__ import annotations

import pytest
from psycopg_pool import AsyncConnectionPool

from libs.eventbus.store import EventStore
from tests.contract.eventstore import EventStoreContract

pytestmark = pytest.mark.integration


class TestPostgresEventStore(EventStoreContract):
    @pytest.fixture
    def store(self, pool: AsyncConnectionPool) -> EventStore:
        return EventStore(pool)
