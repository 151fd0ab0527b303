"""The record as a part a service is built with: a :class:`Store` opened when its process starts.

Services are built by the composition root before the process starts, and the record is opened at
start (and closed at stop), so a service holds this handle, typed, and reads :attr:`Store.db` when
it acts; it never reaches for a database through another object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import sqlite_utils

from controlplane.core.errors import StoreError
from controlplane.store import db as store_db


class Store:
    """The process's record (SQLite today), opened by :meth:`open` and closed by :meth:`close`."""

    def __init__(self, path: Path | str, *,
                 opener: Callable[[], Awaitable[sqlite_utils.Database]] | None = None) -> None:
        self.path = path
        self._db: sqlite_utils.Database | None = None
        self._opener = opener
        """Opens the record another way (the replicated record's projection, ``record = "nats"``)."""

    def __repr__(self) -> str:
        return f"<Store {self.path} {'open' if self._db is not None else 'closed'}>"

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def db(self) -> sqlite_utils.Database:
        """The open database.

        Raises:
            StoreError: the record is not open (the process has not started or has stopped).
        """
        if self._db is None:
            raise StoreError(f"the record {self.path} is not open")
        return self._db

    def open(self) -> sqlite_utils.Database:
        """Open the record (migrations applied) unless it is open already."""
        if self._db is None:
            self._db = store_db.open_db(self.path)
        return self._db

    async def start(self) -> sqlite_utils.Database:
        """Open the record the way this process keeps it (:meth:`open`, or the opener it was given)."""
        if self._db is None and self._opener is not None:
            self._db = await self._opener()
        return self.open()

    async def record_answers(self) -> bool:
        """Whether the record answers now (always True for a file of its own; for the replicated
        record: :meth:`controlplane.store.replica.Replica.answers`)."""
        hook = getattr(self._db, "write_hook", None) if self._db is not None else None
        if hook is None:
            return self._db is not None
        return bool(await hook.answers())

    def close(self) -> None:
        if self._db is not None:
            store_db.close(self._db)
            self._db = None
