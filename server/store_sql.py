"""The database under the feedback store: SQLite (the embedded default) or PostgreSQL, one schema, one set of
statements.

SQLite in WAL mode is the default: many readers beside one writer, all on one host (several server processes
of one machine share its file; never put it on a network filesystem). PostgreSQL (``postgresql://...``, through
psycopg 3) is for state shared across machines: the servers of several hosts, or the replicas of a Ray Serve
deployment, record what they served and the references posted for it in one place, and read the served
model's generation from it.

Statements are written once with ``?`` placeholders; :class:`Database` runs them on either. What differs is
the schema's types, how a transaction takes the write lock and how a connection opens.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS served (
    request_id TEXT NOT NULL, idx INTEGER NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    caption TEXT NOT NULL, fallback_reason TEXT, image BLOB NOT NULL, ext TEXT NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (request_id, idx)
);
CREATE INDEX IF NOT EXISTS served_created ON served (created);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, idx INTEGER NOT NULL,
    reference TEXT NOT NULL, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_item ON feedback (request_id, idx);
CREATE TABLE IF NOT EXISTS serving (
    configured TEXT PRIMARY KEY, generation INTEGER NOT NULL, target TEXT NOT NULL, manifest TEXT,
    name TEXT, version TEXT, updated REAL NOT NULL
);
"""
# The same tables in PostgreSQL's types (an index up to 2^63 as SQLite allows; bytes as bytea).
POSTGRES_SCHEMA = (
    SQLITE_SCHEMA.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    .replace("idx INTEGER", "idx BIGINT")
    .replace("generation INTEGER", "generation BIGINT")
    .replace("BLOB", "BYTEA")
    .replace("REAL", "DOUBLE PRECISION")
)

SERVED_UPSERT = (
    "INSERT INTO served VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (request_id, idx) DO UPDATE SET "
    + ", ".join(
        f"{c} = excluded.{c}"
        for c in ("model", "version", "caption", "fallback_reason", "image", "ext", "width", "height", "created")
    )
)
PRUNE = (
    "DELETE FROM served WHERE created < (SELECT created FROM served ORDER BY created DESC LIMIT 1 OFFSET ?) "
    "AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.request_id = served.request_id AND f.idx = served.idx)"
)
# The generation record: one row per configured primary, bumped by each reload the gate accepted.
PUBLISH = (
    "INSERT INTO serving (configured, generation, target, manifest, name, version, updated) "
    "VALUES (?, 1, ?, ?, ?, ?, ?) ON CONFLICT (configured) DO UPDATE SET generation = serving.generation + 1, "
    "target = excluded.target, manifest = excluded.manifest, name = excluded.name, version = excluded.version, "
    "updated = excluded.updated RETURNING generation"
)
READ_SERVING = "SELECT generation, target, manifest, name, version, updated FROM serving WHERE configured = ?"
_DSN = re.compile(r"^postgres(ql)?://", re.IGNORECASE)
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


class DatabaseError(Exception):
    """Any failure of the database driver, whichever driver it is (the store turns it into a typed error)."""


def is_dsn(where: str | Path) -> bool:
    """Whether ``where`` names a PostgreSQL database (``postgresql://...``) rather than a SQLite file."""
    return isinstance(where, str) and bool(_DSN.match(where))


def redacted(dsn: str) -> str:
    """A DSN without its password, for messages and logs."""
    return _PASSWORD.sub(r"\1***@", dsn)


class Database:
    """One connection and its dialect. Callers serialise use with :attr:`lock`; statements use ``?``."""

    kind = "database"
    schema = ""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._conn: Any = None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run one statement; the rows it returns (none for most writes)."""
        self._ready()
        try:
            cursor = self._conn.execute(self._sql(sql), tuple(params))
            return cursor.fetchall() if cursor.description else []
        except self._errors as exc:
            raise DatabaseError(str(exc).strip()) from exc

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._ready()
        try:
            self._many(self._sql(sql), rows)
        except self._errors as exc:
            raise DatabaseError(str(exc).strip()) from exc

    @contextlib.contextmanager
    def transaction(self, write: bool = False, exclusive: bool = False) -> Iterator[None]:
        """One transaction. ``write``: it will write, so it takes the write lock where the database has one (SQLite
        then waits its turn at the start instead of failing mid-way). ``exclusive``: no other transaction of the
        same kind runs at once on any connection, so what it read stays true until it commits, and ids it
        assigns follow commit order (the feedback store reads new references by id)."""
        self._ready()
        self._begin(write or exclusive, exclusive)
        try:
            yield
        except BaseException:
            with contextlib.suppress(*self._errors):
                self._conn.execute("ROLLBACK")
            raise
        try:
            self._conn.execute("COMMIT")
        except self._errors as exc:
            raise DatabaseError(str(exc).strip()) from exc

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self._conn.close()

    # ---- dialect hooks ----------------------------------------------------------------------

    _errors: tuple[type[BaseException], ...] = ()

    def _ready(self) -> None:
        """Make sure the connection is usable (a lost PostgreSQL connection is opened again)."""

    def _sql(self, sql: str) -> str:
        return sql

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def _begin(self, write: bool, exclusive: bool) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    """A SQLite file in WAL mode with ``synchronous=NORMAL`` (durable across a process crash, and a commit costs no
    fsync); several processes on one host may open it at once."""

    kind = "sqlite"
    schema = SQLITE_SCHEMA
    _errors = (sqlite3.Error,)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.where = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit at the driver: this class says where transactions begin (BEGIN IMMEDIATE for writes).
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(self.schema)
            self._conn.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or directory
            self._conn.execute("CREATE TABLE reefcap_write_probe (x)")
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._conn.close()
            raise

    @property
    def raw(self) -> sqlite3.Connection:
        """The sqlite3 connection (the tests trace its commits)."""
        return self._conn

    def _begin(self, write: bool, exclusive: bool) -> None:
        # SQLite has one writer at a time: a write transaction is already exclusive.
        # IMMEDIATE: a read-then-write transaction that began deferred would fail at once (SQLITE_BUSY, no
        # busy wait) if another process committed in between; taking the lock first waits its turn instead.
        try:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise DatabaseError(str(exc).strip()) from exc


class PostgresDatabase(Database):
    """A PostgreSQL database through psycopg 3 (the ``postgres`` extra), in autocommit with explicit transactions."""

    kind = "postgresql"
    schema = POSTGRES_SCHEMA

    def __init__(self, dsn: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError:
            raise DatabaseError("PostgreSQL needs psycopg: pip install 'reefcap[postgres]'") from None
        self._errors = (psycopg.Error,)
        self._psycopg, self._dsn, self.where = psycopg, dsn, redacted(dsn)
        self._connect()
        with self.transaction(write=True):
            # Servers starting together would otherwise race on CREATE TABLE IF NOT EXISTS (a duplicate-type error).
            self._conn.execute("SELECT pg_advisory_xact_lock(725300024)")
            for statement in filter(str.strip, self.schema.split(";")):
                self._conn.execute(statement)

    def _connect(self) -> None:
        try:
            self._conn = self._psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
        except self._psycopg.Error as exc:  # its message may quote the DSN: never the password
            raise DatabaseError(redacted(str(exc).strip().splitlines()[0])) from None

    def _ready(self) -> None:
        # A restarted database server breaks the connection: the next use opens a new one (the request that
        # met the break got a 503 feedback_unavailable; nothing acknowledged was lost).
        if self._conn.closed or self._conn.broken:
            self._connect()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(sql, rows)

    def _begin(self, write: bool, exclusive: bool) -> None:
        try:
            self._conn.execute("BEGIN")
            if exclusive:  # held until the commit; other writes (served images) are not held up by it
                self._conn.execute("SELECT pg_advisory_xact_lock(725300025)")
        except self._errors as exc:
            raise DatabaseError(str(exc).strip()) from exc


def open_database(where: str | Path) -> Database:
    """The database at ``where``: a ``postgresql://`` DSN, else a SQLite file path. Raises :class:`DatabaseError`
    or :class:`OSError` when it cannot be opened and written."""
    if is_dsn(where):
        return PostgresDatabase(str(where))
    try:
        return SqliteDatabase(Path(where))
    except sqlite3.Error as exc:
        raise DatabaseError(str(exc).strip()) from None
