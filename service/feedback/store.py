"""The feedback store: what the service answered for recent request ids, and the labels users sent back.

One schema on two databases: SQLite (a file, WAL mode: the embedded default) and PostgreSQL (psycopg 3, for a
fleet of pods sharing one store). The service writes answers and feedback (service/feedback/recorder.py);
``python -m training --feedback`` reads the labelled images back (``labelled_images``). The schema, its
migrations and backup are in docs/feedback.md. A ``Store`` is one connection: use it from one thread.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
NOT_A_DIGIT = "not_a_digit"
LABELS = (*(str(d) for d in range(10)), NOT_A_DIGIT)  # what feedback may say, and what an answer was
IMAGE_BYTES = 28 * 28

# Each entry brings the schema from the version before it to its own; applied in order, in one transaction,
# by whichever process opens the store first (the others wait on the lock). Never edit a released entry: add one.
MIGRATIONS = {
    1: [
        """CREATE TABLE answers (
            request_id TEXT NOT NULL, idx INTEGER NOT NULL, model_tag TEXT NOT NULL, digit INTEGER NOT NULL,
            looks_like_digit BOOLEAN NOT NULL, confidence REAL NOT NULL, answered_at DOUBLE PRECISION NOT NULL,
            image {blob}, PRIMARY KEY (request_id, idx))""",
        "CREATE INDEX answers_by_time ON answers (answered_at)",
        """CREATE TABLE feedback (
            id {serial}, request_id TEXT NOT NULL, idx INTEGER NOT NULL, model_tag TEXT NOT NULL,
            answered TEXT NOT NULL, label TEXT NOT NULL, correct BOOLEAN NOT NULL,
            answered_at DOUBLE PRECISION NOT NULL, labelled_at DOUBLE PRECISION NOT NULL, image {blob},
            UNIQUE (request_id, idx))""",
        "CREATE INDEX feedback_by_model ON feedback (model_tag, id)",
        "CREATE INDEX feedback_by_time ON feedback (labelled_at)",
    ],
}


class StoreError(Exception):
    """The store cannot be opened or used; the message says why."""


class UnknownAnswer(LookupError):
    """No answer with that request id and index within the feedback window."""


class DuplicateFeedback(ValueError):
    """That answer has its feedback already."""


@dataclass(frozen=True)
class AnswerRow:
    request_id: str
    idx: int
    model_tag: str
    digit: int
    looks_like_digit: bool
    confidence: float
    answered_at: float
    image: bytes | None = None  # 784 bytes, the 28x28 image the model saw as uint8, when images are kept

    @property
    def verdict(self) -> str:
        """What the user was told: the digit, or that it does not look like one."""
        return str(self.digit) if self.looks_like_digit else NOT_A_DIGIT


@dataclass(frozen=True)
class Feedback:
    id: int
    answer: AnswerRow
    label: str
    correct: bool
    labelled_at: float


@dataclass(frozen=True)
class LabelledImages:
    """The digit-labelled feedback rows that kept their image, in id order, for training."""

    ids: list[int]
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # int64 [N]
    sha256: str  # over the ids, labels and image bytes: which rows went into a model

    def describe(self) -> dict:
        return {
            "rows": len(self.ids),
            "first_id": self.ids[0] if self.ids else None,
            "last_id": self.ids[-1] if self.ids else None,
            "sha256": self.sha256,
        }


def open_store(where: str) -> Store:
    """``postgresql://...`` (or ``postgres://``) opens PostgreSQL; anything else is a SQLite file's path
    (``sqlite:///relative`` and ``sqlite:////absolute`` also work, as in SQLAlchemy). The schema is created or
    migrated on the way."""
    if where.startswith(("postgresql://", "postgres://")):
        return PostgresStore(where)
    return SqliteStore(where.removeprefix("sqlite:///"))  # sqlite:///relative, sqlite:////absolute


def redacted(where: str) -> str:
    """A store's address without its password, for logs, errors and provenance."""
    if "://" in where and "@" in where.split("://", 1)[1]:
        scheme, rest = where.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':', 1)[0]}@{host}"
    return where


class Store:
    """The queries, written once with ``?`` placeholders; a subclass connects and names its SQL dialect."""

    name = "store"
    blob, serial, placeholder = "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT", "?"

    def __init__(self):
        self.conn = None

    # ---- the two ways in of the service ----
    def record_answers(self, rows: list[AnswerRow]) -> None:
        """Remember answers (one transaction; a later answer under the same id and index replaces an earlier
        one). Not flushed to disk before returning: an answer lost in a crash only cannot take feedback."""
        sql = (
            "INSERT INTO answers (request_id, idx, model_tag, digit, looks_like_digit, confidence, answered_at, "
            "image) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id, idx) DO UPDATE SET "
            "model_tag = excluded.model_tag, digit = excluded.digit, looks_like_digit = excluded.looks_like_digit, "
            "confidence = excluded.confidence, answered_at = excluded.answered_at, image = excluded.image"
        )
        values = [
            (r.request_id, r.idx, r.model_tag, r.digit, r.looks_like_digit, r.confidence, r.answered_at, r.image)
            for r in rows
        ]
        with self._transaction(durable=False) as cur:
            cur.executemany(self._sql(sql), values)

    def add_feedback(self, request_id: str, idx: int, label: str, since: float, now: float | None = None) -> Feedback:
        """Store the label of an answer given at or after ``since``; committed to disk before it returns."""
        (result,) = self.add_feedbacks([(request_id, idx, label)], since, now)
        if isinstance(result, Exception):
            raise result
        return result

    def add_feedbacks(
        self, labels: list[tuple[str, int, str]], since: float, now: float | None = None
    ) -> list[Feedback | UnknownAnswer | DuplicateFeedback]:
        """Several labels ``(request_id, idx, label)`` in one transaction, committed to disk before it returns
        (one sync for all: a burst of feedback costs a sync per batch, not per label). Each one's Feedback, or
        the error it ends in; an error leaves nothing behind and does not stop the others."""
        now = time.time() if now is None else now
        select = self._sql(
            "SELECT request_id, idx, model_tag, digit, looks_like_digit, confidence, answered_at, image "
            "FROM answers WHERE request_id = ? AND idx = ? AND answered_at >= ?"
        )
        insert = self._sql(
            "INSERT INTO feedback (request_id, idx, model_tag, answered, label, correct, answered_at, labelled_at, "
            "image) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id, idx) DO NOTHING RETURNING id"
        )
        results: list = []
        with self._transaction(durable=True) as cur:
            for request_id, idx, label in labels:
                cur.execute(select, (request_id, idx, since))
                found = cur.fetchone()
                if found is None:
                    results.append(UnknownAnswer(request_id))
                    continue
                answer = AnswerRow(*found[:4], bool(found[4]), *found[5:7], _bytes(found[7]))
                correct = answer.verdict == label
                values = (request_id, idx, answer.model_tag, answer.verdict, label, correct, answer.answered_at, now)
                cur.execute(insert, (*values, answer.image))
                row = cur.fetchone()
                results.append(
                    DuplicateFeedback(request_id) if row is None else Feedback(int(row[0]), answer, label, correct, now)
                )
        return results

    # ---- what operators and training read ----
    def stats(self, since: float, model_tag: str | None = None) -> dict[str, dict]:
        """Per model tag: the labels given at or after ``since``, how many were right, and the confusion counts
        ``{label: {answered: n}}``."""
        sql = "SELECT model_tag, label, answered, COUNT(*) FROM feedback WHERE labelled_at >= ?"
        args: tuple = (since,)
        if model_tag is not None:
            sql, args = sql + " AND model_tag = ?", (since, model_tag)
        models: dict[str, dict] = {}
        with self._transaction(durable=False) as cur:
            cur.execute(self._sql(sql + " GROUP BY model_tag, label, answered"), args)
            for tag, label, answered, n in cur.fetchall():
                entry = models.setdefault(tag, {"labels": 0, "correct": 0, "confusion": {}})
                entry["labels"] += n
                entry["correct"] += n if label == answered else 0
                entry["confusion"].setdefault(label, {})[answered] = n
        return models

    def recent(self, last: int, model_tag: str) -> tuple[int, int]:
        """(correct, labels) over the last ``last`` labels of a model tag."""
        with self._transaction(durable=False) as cur:
            cur.execute(
                self._sql(
                    "SELECT COUNT(*), SUM(CASE WHEN correct THEN 1 ELSE 0 END) FROM "
                    "(SELECT correct FROM feedback WHERE model_tag = ? ORDER BY id DESC LIMIT ?) AS latest"
                ),
                (model_tag, last),
            )
            labels, correct = cur.fetchone()
        return int(correct or 0), int(labels)

    def labelled_images(self, model_tag: str | None = None) -> LabelledImages:
        sql = "SELECT id, label, image FROM feedback WHERE image IS NOT NULL AND label <> ?"
        args: tuple = (NOT_A_DIGIT,)
        if model_tag is not None:
            sql, args = sql + " AND model_tag = ?", (NOT_A_DIGIT, model_tag)
        with self._transaction(durable=False) as cur:
            cur.execute(self._sql(sql + " ORDER BY id"), args)
            rows = [(int(i), int(label), _bytes(image)) for i, label, image in cur.fetchall()]
        rows = [r for r in rows if len(r[2]) == IMAGE_BYTES]
        digest = hashlib.sha256()
        for i, label, image in rows:
            digest.update(f"{i}:{label}:".encode() + image)
        images = np.frombuffer(b"".join(r[2] for r in rows), np.uint8).reshape(-1, 28, 28)
        return LabelledImages(
            [r[0] for r in rows], images.copy(), np.array([r[1] for r in rows], np.int64), digest.hexdigest()
        )

    # ---- retention ----
    def prune(self, now: float, answer_s: float, image_rows: int, image_days: float) -> None:
        """Forget answers past the feedback window, and the images of feedback past the retention bounds (the
        labels stay: they are the online accuracy)."""
        with self._transaction(durable=False) as cur:
            cur.execute(self._sql("DELETE FROM answers WHERE answered_at < ?"), (now - answer_s,))
            cur.execute(
                self._sql("UPDATE feedback SET image = NULL WHERE image IS NOT NULL AND labelled_at < ?"),
                (now - image_days * 86400,),
            )
            cur.execute(
                self._sql(
                    "UPDATE feedback SET image = NULL WHERE image IS NOT NULL AND id <= "
                    "(SELECT id FROM feedback WHERE image IS NOT NULL ORDER BY id DESC LIMIT 1 OFFSET ?)"
                ),
                (image_rows,),
            )

    def counts(self) -> dict[str, int]:
        with self._transaction(durable=False) as cur:
            cur.execute("SELECT (SELECT COUNT(*) FROM answers), (SELECT COUNT(*) FROM feedback)")
            answers, feedback = cur.fetchone()
        return {"answers": int(answers), "feedback": int(feedback)}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # ---- the dialect ----
    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _migrate(self) -> None:
        with self._transaction(durable=True, exclusive=True) as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT MAX(version) FROM schema_version")
            version = cur.fetchone()[0] or 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the {self.name} store has schema version {version}, newer than this service's "
                    f"{SCHEMA_VERSION}: upgrade the service (a store is never migrated down)"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    cur.execute(statement.format(blob=self.blob, serial=self.serial))
                cur.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (step,))

    def _transaction(self, durable: bool, exclusive: bool = False):
        raise NotImplementedError


def _bytes(value) -> bytes | None:
    return None if value is None else bytes(value)


class _SqliteTransaction:
    def __init__(self, store: SqliteStore, durable: bool, exclusive: bool):
        self.store, self.durable, self.exclusive = store, durable, exclusive

    def __enter__(self):
        conn = self.store.conn
        # FULL: a commit reaches the disk (the WAL is synced) before it returns, so that an acknowledged feedback
        # survives a power cut; NORMAL for answers, which may be lost (they only could have taken feedback)
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
        conn.execute("BEGIN IMMEDIATE" if self.exclusive or self.durable else "BEGIN")
        self.cur = conn.cursor()
        return self.cur

    def __exit__(self, kind, exc, tb):
        self.cur.close()
        if kind is None:
            self.store.conn.execute("COMMIT")
        else:
            self.store.conn.execute("ROLLBACK")
        return False


class SqliteStore(Store):
    name = "SQLite"

    def __init__(self, path: str):
        super().__init__()
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"SQLite at {path} cannot use WAL mode (it reports {mode}); put it on a local disk")
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise StoreError(f"the SQLite feedback store at {path} cannot be opened: {exc}") from None

    def _transaction(self, durable: bool, exclusive: bool = False):
        return _SqliteTransaction(self, durable, exclusive)


class PostgresStore(Store):
    name = "PostgreSQL"
    blob, serial, placeholder = "BYTEA", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "%s"
    MIGRATION_LOCK = 20_201  # pg_advisory_xact_lock key: one process migrates, the others wait

    def __init__(self, url: str):
        super().__init__()
        import psycopg  # only where PostgreSQL is used

        self.url = url
        self._errors = psycopg.Error
        try:
            self.conn = psycopg.connect(url, autocommit=False, connect_timeout=10)
            self._migrate()
        except psycopg.Error as exc:
            self.close()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreError(f"the PostgreSQL feedback store at {redacted(url)} cannot be used: {message}") from None

    def _transaction(self, durable: bool, exclusive: bool = False):
        return _PostgresTransaction(self, durable, exclusive)


class _PostgresTransaction:
    def __init__(self, store: PostgresStore, durable: bool, exclusive: bool):
        self.store, self.durable, self.exclusive = store, durable, exclusive

    def __enter__(self):
        self.cur = self.store.conn.cursor()
        if not self.durable:  # answers: the commit need not wait for the WAL flush (feedback always does)
            self.cur.execute("SET LOCAL synchronous_commit TO OFF")
        if self.exclusive:
            self.cur.execute("SELECT pg_advisory_xact_lock(%s)", (PostgresStore.MIGRATION_LOCK,))
        return self.cur

    def __exit__(self, kind, exc, tb):
        self.cur.close()
        if kind is None:
            self.store.conn.commit()
        else:
            self.store.conn.rollback()
        return False
