"""Balanced accepts (service/http/listener.py): the load table, the turn rule, and listeners sharing one real
listening socket in one event loop, as two workers share theirs."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from service.http import listener
from service.http.listener import BalancedListener, LoadTable, my_turn


@pytest.fixture
def table_file(tmp_path):
    return str(tmp_path / "listener.load")


def test_each_worker_sees_the_fewest_connections_of_the_others(table_file):
    a, b, c = (LoadTable(table_file, pid=p) for p in (101, 102, 103))
    assert a.least_of_others() == 0
    a.publish(5)
    b.publish(3)
    c.publish(7)
    assert (a.least_of_others(), b.least_of_others(), c.least_of_others()) == (3, 5, 3)
    b.release()
    assert a.least_of_others() == 7
    c.release()
    assert a.least_of_others() is None  # alone


def test_a_slot_not_refreshed_for_a_while_is_ignored_and_taken_again(table_file, monkeypatch):
    a, b = LoadTable(table_file, pid=101), LoadTable(table_file, pid=102)
    b.publish(1)
    now = listener.time.monotonic()
    monkeypatch.setattr(listener.time, "monotonic", lambda: now + listener.STALE_S + 1)
    assert a.least_of_others() is None  # b's worker was killed, or its loop is stuck
    a.publish(0)  # a's own refresh
    c = LoadTable(table_file, pid=103)
    assert c._offset == b._offset  # the stale slot is reused


def test_a_worker_restarted_under_the_same_pid_keeps_its_slot(table_file):
    first = LoadTable(table_file, pid=101)
    again = LoadTable(table_file, pid=101)
    assert again._offset == first._offset


def test_a_full_table_is_an_oserror_so_the_worker_falls_back_to_plain_accepts(table_file):
    for pid in range(1, listener.SLOTS + 1):
        LoadTable(table_file, pid=pid)
    with pytest.raises(OSError, match="slots"):
        LoadTable(table_file, pid=listener.SLOTS + 1)


def test_the_table_file_is_never_followed_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, tmp_path / "listener.load")
    with pytest.raises(OSError):
        LoadTable(str(tmp_path / "listener.load"), pid=1)
    assert target.read_bytes() == b""


@pytest.mark.parametrize(
    ("mine", "least", "expected"), [(0, None, True), (9, None, True), (3, 3, True), (4, 3, False), (2, 3, True)]
)
def test_a_worker_accepts_while_it_has_no_more_than_the_least_loaded_other(mine, least, expected):
    assert my_turn(mine, least) is expected


class _Conn(asyncio.Protocol):
    def __init__(self, connections: set):
        self.connections = connections

    def connection_made(self, transport):
        self.connections.add(self)

    def connection_lost(self, exc):
        self.connections.discard(self)


async def _workers(table_file: str, count: int, sock: socket.socket, pids=(201, 202)):
    """``count`` listeners on copies of one listening socket, each with its own table slot and connections."""
    workers = []
    for pid in pids[:count]:
        conns: set = set()
        copy = socket.socket(fileno=os.dup(sock.fileno()))
        workers.append(BalancedListener(copy, lambda c=conns: _Conn(c), conns, LoadTable(table_file, pid=pid)))
    return workers


async def _connect_all(port: int, n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        clients.append(c)
    return clients


async def _until(condition, limit_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not condition():
        assert loop.time() < deadline, "the listeners never accepted every connection"
        await asyncio.sleep(0.005)


@pytest.fixture
def listening():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    yield sock
    sock.close()


def test_a_burst_of_connections_is_split_evenly_between_two_workers(table_file, listening):
    async def main():
        workers = await _workers(table_file, 2, listening)
        clients = await _connect_all(listening.getsockname()[1], 8)  # all queued before either loop turn
        await _until(lambda: sum(w.load for w in workers) == 8)
        loads = sorted(w.load for w in workers)
        for w in workers:
            w.close()
        for c in clients:
            c.close()
        return loads

    assert asyncio.run(main()) == [4, 4]


def test_a_worker_takes_connections_another_leaves_queued(table_file, listening):
    """A slot that says it has fewer connections but whose loop never accepts (stuck, or its worker busy):
    every connection is still taken, after a bounded wait each."""

    async def main():
        idle = LoadTable(table_file, pid=999)
        idle.publish(0)
        (worker,) = await _workers(table_file, 1, listening)
        clients = await _connect_all(listening.getsockname()[1], 6)
        await _until(lambda: worker.load == 6)
        worker.close()
        for c in clients:
            c.close()
        return worker.load

    assert asyncio.run(main()) == 6


def test_closing_stops_accepting_releases_the_slot_and_closes_its_socket(table_file, listening):
    async def main():
        a, b = await _workers(table_file, 2, listening)
        a.close()
        a.close()  # uvicorn's shutdown closes what the drain already closed
        assert a.sockets[0].fileno() == -1
        assert b._table.least_of_others() is None
        clients = await _connect_all(listening.getsockname()[1], 3)
        await _until(lambda: b.load == 3)
        await a.wait_closed()
        b.close()
        for c in clients:
            c.close()
        return a.load

    assert asyncio.run(main()) == 0
