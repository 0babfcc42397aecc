"""Opening an Optuna storage, and the content hash that keys what is stored in it.

Storage is Optuna's: ``None`` or ``"memory"`` keeps nothing after the process, an RDB URL such as
``sqlite:///run.db`` or ``postgresql://...`` persists, and a path ending in ``.log`` is a journal
file.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import optuna

HEARTBEAT_SECONDS = 2  # how often a worker beats for the jobs it holds (see ape/jobs.py)
GRACE_SECONDS = 10  # a job whose worker has not beaten for this long is failed and re-queued

optuna.logging.set_verbosity(optuna.logging.WARNING)


def content_hash(value: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-serialisable value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:length]


def open_storage(storage: str | None) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL, a journal file path (``*.log``), or None/"memory"."""
    if storage is None or storage == "memory":
        return optuna.storages.InMemoryStorage()
    if storage.endswith(".log") and "://" not in storage:
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(storage)
        return optuna.storages.JournalStorage(backend)
    sqlite = storage.startswith("sqlite:///")
    if sqlite:
        # SQLite will not create the folder the database file lives in.
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():  # heartbeats and their retry callback are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                storage,
                engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
                # Workers beat while they hold a job; a job whose worker stopped beating for
                # GRACE_SECONDS is failed and re-queued (see ape/jobs.py).
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=None
                ),
            )
    except Exception as err:  # SQLAlchemy raises many types for a bad URL or driver
        raise ValueError(f"cannot open storage {storage!r}: {err}") from err
    if sqlite:
        _serialize_sqlite(rdb.engine)
    return rdb


def _serialize_sqlite(engine) -> None:
    """Make every SQLite transaction take the write lock up front (BEGIN IMMEDIATE).

    Python's sqlite3 driver otherwise opens a transaction only at the first write, after the
    read, so two workers could both read a job as waiting and both claim it. PostgreSQL and MySQL
    lock the row (SELECT ... FOR UPDATE) and need nothing.
    """
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_transactions(connection, _record) -> None:
        connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections were opened before the hooks
