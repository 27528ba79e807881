"""The feedback store on both its databases: SQLite in a temp file, and a real PostgreSQL server."""

from __future__ import annotations

import itertools
import sqlite3
import time

import numpy as np
import pytest

from service.feedback.store import (
    NOT_A_DIGIT,
    SCHEMA_VERSION,
    AnswerRow,
    DuplicateFeedback,
    StoreError,
    UnknownAnswer,
    open_store,
    redacted,
)

_databases = itertools.count()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def where(request, tmp_path):
    """A new, empty store's address."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.sqlite3")
    import psycopg

    server = request.getfixturevalue("postgres")
    name = f"store_{next(_databases)}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def store(where):
    s = open_store(where)
    yield s
    s.close()


def image(value: int) -> bytes:
    return np.full((28, 28), value, np.uint8).tobytes()


def answer(rid="r1", idx=0, digit=7, looks=True, at=None, pixels=None, tag="mnist-convnet:a"):
    return AnswerRow(rid, idx, tag, digit, looks, 0.9, time.time() if at is None else at, pixels)


def test_feedback_on_an_answer_is_stored_with_what_was_answered(store):
    store.record_answers([answer(digit=7), answer(idx=1, digit=3, looks=False)])
    right = store.add_feedback("r1", 0, "7", since=0)
    wrong = store.add_feedback("r1", 1, "3", since=0)  # the user saw "not a digit" for a 3
    assert (right.correct, right.answer.verdict) == (True, "7")
    assert (wrong.correct, wrong.answer.verdict) == (False, NOT_A_DIGIT)
    assert wrong.id > right.id
    assert store.counts() == {"answers": 2, "feedback": 2}


def test_unknown_expired_and_duplicate_feedback_are_refused(store):
    now = time.time()
    store.record_answers([answer(at=now - 100)])
    with pytest.raises(UnknownAnswer):
        store.add_feedback("nobody", 0, "7", since=0)
    with pytest.raises(UnknownAnswer):
        store.add_feedback("r1", 1, "7", since=0)  # another image of the request
    with pytest.raises(UnknownAnswer):
        store.add_feedback("r1", 0, "7", since=now - 50)  # answered before the window
    store.add_feedback("r1", 0, "1", since=0)
    with pytest.raises(DuplicateFeedback):
        store.add_feedback("r1", 0, "7", since=0)
    assert store.stats(0)["mnist-convnet:a"]["labels"] == 1  # the refused ones left nothing behind


def test_a_later_answer_under_the_same_id_replaces_the_earlier(store):
    store.record_answers([answer(digit=1)])
    store.record_answers([answer(digit=2)])
    assert store.add_feedback("r1", 0, "2", since=0).correct


def test_stats_and_recent_accuracy_per_model_tag(store):
    store.record_answers([answer(rid=f"a{i}", digit=i % 10) for i in range(10)])
    store.record_answers([answer(rid=f"b{i}", digit=5, tag="mnist-convnet:b") for i in range(4)])
    for i in range(10):
        store.add_feedback(f"a{i}", 0, str(i if i < 8 else 0), since=0)  # 8 right, 2 wrong (8 and 9 were 0s)
    for i in range(4):
        store.add_feedback(f"b{i}", 0, "5", since=0)
    stats = store.stats(0)
    assert (stats["mnist-convnet:a"]["labels"], stats["mnist-convnet:a"]["correct"]) == (10, 8)
    assert stats["mnist-convnet:a"]["confusion"]["0"] == {"0": 1, "8": 1, "9": 1}
    assert set(store.stats(0, "mnist-convnet:b")) == {"mnist-convnet:b"}
    assert store.stats(time.time() + 10) == {}
    assert store.recent(200, "mnist-convnet:a") == (8, 10)
    assert store.recent(2, "mnist-convnet:a") == (0, 2)  # the last two labels were the wrong ones
    assert store.recent(200, "mnist-convnet:none") == (0, 0)


def test_labelled_images_for_training(store):
    store.record_answers([answer(rid=f"r{i}", digit=i, pixels=image(i * 10)) for i in range(4)])
    store.record_answers([answer(rid="plain", digit=1)])  # kept no image
    for i, label in enumerate(["0", "5", NOT_A_DIGIT, "3"]):
        store.add_feedback(f"r{i}", 0, label, since=0)
    store.add_feedback("plain", 0, "1", since=0)
    found = store.labelled_images()
    assert found.labels.tolist() == [0, 5, 3]  # not-a-digit labels and imageless rows are not training digits
    assert found.images.shape == (3, 28, 28) and found.images.dtype == np.uint8
    assert found.images[1, 0, 0] == 10 and found.images[2, 27, 27] == 30
    assert found.describe()["rows"] == 3 and found.describe()["first_id"] == found.ids[0]
    assert found.sha256 == store.labelled_images().sha256
    assert store.labelled_images("mnist-convnet:none").ids == []


def test_retention_erases_old_answers_and_images_keeps_labels(store):
    now = time.time()
    store.record_answers([answer(rid=f"r{i}", pixels=image(1), at=now) for i in range(5)])
    for i in range(5):
        store.add_feedback(f"r{i}", 0, "7", since=0, now=now - (40 * 86400 if i == 0 else 0))
    store.record_answers([answer(rid="old", at=now - 7200)])
    store.prune(now, answer_s=3600, image_rows=3, image_days=30)
    assert store.counts() == {"answers": 5, "feedback": 5}  # "old" answer gone; every label kept
    assert len(store.labelled_images().ids) == 3  # the newest three images only
    store.prune(now + 7200, answer_s=3600, image_rows=3, image_days=30)
    assert store.counts()["answers"] == 0


def test_reopening_keeps_everything_and_does_not_migrate_again(where):
    first = open_store(where)
    first.record_answers([answer()])
    first.add_feedback("r1", 0, "7", since=0)
    first.close()
    again = open_store(where)
    assert again.counts() == {"answers": 1, "feedback": 1}
    with again._transaction(durable=False) as cur:
        cur.execute("SELECT version FROM schema_version")
        assert [v for (v,) in cur.fetchall()] == [SCHEMA_VERSION]
    again.close()


def test_a_store_from_a_newer_service_is_refused(tmp_path):
    path = tmp_path / "f.sqlite3"
    open_store(str(path)).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(StoreError, match="schema version 99, newer"):
        open_store(str(path))


def test_unusable_addresses_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot be opened"):
        open_store(str(tmp_path / "file" / "under-a-file.sqlite3"))
    (tmp_path / "garbage.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="cannot be opened"):
        open_store(str(tmp_path / "garbage.sqlite3"))
    with pytest.raises(StoreError, match=r"postgresql://u@127\.0\.0\.1:1/db cannot be used") as caught:
        open_store("postgresql://u:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(caught.value)


def test_sqlite_url_form_and_wal_mode(tmp_path):
    path = tmp_path / "f.sqlite3"
    store = open_store(f"sqlite:///{path}")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    assert path.is_file()


def test_redacted():
    assert redacted("postgresql://me:pw@db:5432/x") == "postgresql://me@db:5432/x"
    assert redacted("postgresql://db/x") == "postgresql://db/x"
    assert redacted("/var/lib/f.sqlite3") == "/var/lib/f.sqlite3"
