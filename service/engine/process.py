"""One work process (``python -m service.engine.work``) seen from its HTTP worker: started, handed batches,
closed. Starting blocks until the process has loaded the model and answered ``Ready``."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

from service.engine.messages import (
    Batch,
    BatchDone,
    Check,
    Init,
    Ready,
    RuntimeInfo,
    pack,
    receive,
    receive_async,
    send,
)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # where `python -m service.engine.work` finds the package
PYTHONPATH = os.environ.get("PYTHONPATH", "")
START_TIMEOUT_S = 300  # importing onnxruntime or torch and loading the model, on a slow disk


class WorkerFailed(Exception):
    """A work process could not start, died, or stopped answering."""


class WorkProcess:
    def __init__(self, init: Init):
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.engine.work", "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            cwd=PACKAGE_ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), PYTHONPATH]))},
        )
        theirs.close()
        ours.settimeout(START_TIMEOUT_S)
        try:
            send(ours, init)
            reply = receive(ours)
        except OSError as exc:
            reply = f"no answer ({exc})"
        if not isinstance(reply, Ready):
            ours.close()
            self.proc.kill()
            code = self.proc.wait()
            reason = getattr(reply, "reason", reply)
            raise WorkerFailed(reason or f"the work process exited with code {code} while starting")
        self.info: RuntimeInfo = reply.info
        self.checked = reply.checked  # its golden-set check at start-up
        ours.setblocking(False)
        self.sock = ours  # the process exits when its end reads end-of-file, after close()

    async def run(self, batch: Batch) -> BatchDone:
        """One batch there and its answers back. The loop's socket calls keep no state between calls, so an
        in-process caller may use one event loop after another."""
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self.sock, pack(batch))
            done = await receive_async(loop, self.sock)
        except (EOFError, ConnectionError) as exc:
            raise WorkerFailed(f"the work process {self.proc.pid} exited ({type(exc).__name__})") from None
        if done.id != batch.id:
            raise WorkerFailed(f"the work process {self.proc.pid} answered batch {done.id} for {batch.id}")
        return done

    async def check(self):
        """The golden set through this process's serving path: a service.model.golden.CheckResult."""
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self.sock, pack(Check()))
            return await receive_async(loop, self.sock)
        except (EOFError, ConnectionError) as exc:
            raise WorkerFailed(f"the work process {self.proc.pid} exited ({type(exc).__name__})") from None

    def close(self, kill: bool = False) -> None:
        """Closing the socket tells the process to exit once its batch is done; ``kill`` does not wait."""
        if kill:
            self.proc.kill()
        try:  # the process reads end-of-file now, even while the event loop still holds the socket for a
            # read (uvloop defers close() until its reader is removed: a process blocked on it held shutdown 60 s)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()
