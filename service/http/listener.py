"""Balanced accepts: the HTTP workers of one server share its listening socket, and each accepts a connection only
while it holds no more connections than the least loaded of the others.

Left to the event loop, a worker woken by a burst of connections accepts all that are queued, so 8 clients that
connect at once may all land on one worker, whose work process then does all the work while the other idles.
Each worker publishes its count of open connections (and when it last did) in a small table shared by every
process that holds the socket (``LoadTable``: a file mapped into memory, beside the drain's lock file, one slot
per worker). A worker with more connections than another leaves a queued connection to it for ``DEFER_S``; one
left for ``MAX_DEFERRALS`` times running is taken anyway (the other worker's loop may be busy), so balancing
never costs a client more than about ``DEFER_S * MAX_DEFERRALS``. A worker's slot is ignored once it has not
been refreshed for ``STALE_S`` (a worker killed, or its loop stuck).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import socket
import struct
import tempfile
import time

log = logging.getLogger("service.http")

DEFER_S = 0.002
MAX_DEFERRALS = 5
REFRESH_S = 1.0
STALE_S = 3.0
ACCEPT_PAUSE_S = 1.0  # after the process ran out of file descriptors (what asyncio and uvloop do)

SLOTS = 64
_SLOT = struct.Struct("=qqd")  # pid, open connections, when published (CLOCK_MONOTONIC: one clock machine-wide)
TABLE_BYTES = SLOTS * _SLOT.size


def table_path(sock: socket.socket) -> str:
    """One table per listening socket: every worker that shares the socket (inherited from ``bentoml serve``)
    finds the same file, and another server's socket a different one."""
    stat = os.fstat(sock.fileno())
    return os.path.join(tempfile.gettempdir(), f"mnist-serving-listener-{stat.st_dev}-{stat.st_ino}.load")


class LoadTable:
    """This process's slot in the table of open connections per worker."""

    def __init__(self, path: str, pid: int | None = None):
        self.pid = os.getpid() if pid is None else pid
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two workers starting at once must not take the same slot
            if os.fstat(fd).st_size < TABLE_BYTES:
                os.ftruncate(fd, TABLE_BYTES)
            self._map = mmap.mmap(fd, TABLE_BYTES)
            self._offset = self._claim()
            self.publish(0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: the mapping keeps a copy of fd, and with it the lock
            os.close(fd)

    def _claim(self) -> int:
        now = time.monotonic()
        free = None
        for i, (pid, _, stamp) in enumerate(_SLOT.iter_unpack(self._map)):
            if pid == self.pid:
                return i * _SLOT.size
            if free is None and (pid == 0 or now - stamp > STALE_S):
                free = i * _SLOT.size
        if free is None:
            raise OSError(errno.ENOSPC, f"all {SLOTS} slots of the listener's load table are in use")
        return free

    def publish(self, connections: int) -> None:
        _SLOT.pack_into(self._map, self._offset, self.pid, connections, time.monotonic())

    def least_of_others(self) -> int | None:
        """The fewest open connections of any other live worker, or None when this worker is alone."""
        now, least = time.monotonic(), None
        for pid, connections, stamp in _SLOT.iter_unpack(self._map):
            if pid and pid != self.pid and now - stamp <= STALE_S and (least is None or connections < least):
                least = connections
        return least

    def release(self) -> None:
        with contextlib.suppress(ValueError):  # already closed
            _SLOT.pack_into(self._map, self._offset, 0, 0, 0.0)
            self._map.close()


def my_turn(mine: int, least_of_others: int | None) -> bool:
    """Whether a worker with ``mine`` connections should accept the next one."""
    return least_of_others is None or mine <= least_of_others


class BalancedListener:
    """Accepts from one listening socket for this worker, in turn with the others; in uvicorn's ``servers``
    list in place of the event loop's own server (``close``, ``wait_closed`` and ``sockets`` as it has them).

    ``protocol_factory()`` makes the protocol of a new connection; ``connections`` is the set of this worker's
    open connections (uvicorn's ``server_state.connections``, kept by the protocols)."""

    def __init__(self, sock: socket.socket, protocol_factory, connections: set, table: LoadTable):
        self.loop = asyncio.get_running_loop()
        self.sockets = [sock]
        self._sock = sock
        self._fd = sock.fileno()
        self._factory = protocol_factory
        self._connections = connections
        self._table = table
        self._starting = 0  # accepted, its protocol not made yet
        self._deferrals = 0
        self._watching = False
        self._timer = None
        self._closed = False
        sock.setblocking(False)
        self._watch()
        self._refresh()

    @property
    def load(self) -> int:
        return len(self._connections) + self._starting

    def publish(self) -> None:
        """Called whenever this worker's connections change."""
        if not self._closed:
            self._table.publish(self.load)

    def _refresh(self) -> None:
        self.publish()
        self._refresher = self.loop.call_later(REFRESH_S, self._refresh)

    def _watch(self) -> None:
        self._timer = None
        if not self._closed and not self._watching:
            self.loop.add_reader(self._fd, self._readable)
            self._watching = True

    def _pause(self, seconds: float) -> None:
        if self._watching:
            self.loop.remove_reader(self._fd)
            self._watching = False
        self._timer = self.loop.call_later(seconds, self._watch)

    def _readable(self) -> None:
        while not self._closed:
            if self._deferrals < MAX_DEFERRALS and not my_turn(self.load, self._table.least_of_others()):
                self._deferrals += 1
                self._pause(DEFER_S)
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                self._deferrals = 0  # taken by another worker, or given up by its client
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                log.error("accepting connections paused for %g s: %s", ACCEPT_PAUSE_S, exc.strerror)
                self._pause(ACCEPT_PAUSE_S)
                return
            self._deferrals = 0
            self._start(conn)

    def _start(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._starting += 1
        self.publish()
        task = self.loop.create_task(self.loop.connect_accepted_socket(self._factory, conn))
        task.add_done_callback(lambda t, conn=conn: self._started(t, conn))

    def _started(self, task: asyncio.Task, conn: socket.socket) -> None:
        self._starting -= 1
        if task.cancelled() or task.exception() is not None:
            conn.close()  # reset before the protocol saw it: nothing to answer
        self.publish()

    def close(self) -> None:
        if self._closed:
            return
        if self._watching:
            self.loop.remove_reader(self._fd)
            self._watching = False
        for timer in (self._timer, self._refresher):
            if timer is not None:
                timer.cancel()
        self._closed = True
        self._table.release()
        self._sock.close()  # as the event loop's server does: the drain works on its own copy of the socket

    async def wait_closed(self) -> None:
        return None
