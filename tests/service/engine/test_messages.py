"""service/engine/messages.py: every message survives its framing over a real socket pair, blocking and on an
asyncio loop; a closed socket ends the conversation; messages are frozen."""

import asyncio
import dataclasses
import socket

import numpy as np
import pytest

from service.engine.messages import (
    HEADER,
    Batch,
    BatchDone,
    BatchStats,
    Done,
    Failed,
    Init,
    InputKind,
    Job,
    Ready,
    RuntimeInfo,
    pack,
    receive,
    receive_async,
    send,
)
from service.errors import RequestError

SIDE = 28
INFO = RuntimeInfo("onnx", "cpu", "convnet.onnx", "ab" * 32)
LOG_PROBS = np.log(np.full((2, 10), 0.1, np.float32))
INPUTS = np.random.default_rng(0).random((2, SIDE, SIDE), dtype=np.float32)
DONE = Done(LOG_PROBS, INPUTS, 1_000, 2_500_000, 3_000_000, 4_000_000, 5)
ERROR = RequestError(400, "bad_shape", "images[0] is null", retry_after=None)
STATS = BatchStats(model_images=5, decoded_images=2, decoded_pixels=9)

MESSAGES = {
    "Init": Init("/models/x", {"normalization": {"mean": 0.1, "std": 0.3}}, "onnx", {"max_batch_size": 256}),
    "RuntimeInfo": INFO,
    "Ready": Ready(INFO),
    "Failed": Failed("manifest.json is missing; re-export the model"),
    "Job, encoded": Job(1, InputKind.ENCODED, [b"\x89PNG...", b"GIF89a"], True, (784, 1024), "req-1"),
    "Job, json": Job(2, InputKind.JSON, b'{"images": []}', False, None),
    "Job, pixels": Job(3, InputKind.PIXELS, INPUTS, False, None, "req-3"),
    "Job, normalized": Job(4, InputKind.NORMALIZED, INPUTS[:, None], False, None),
    "Batch": Batch(7, [Job(1, InputKind.ENCODED, [b"x"], True, (1,)), Job(2, InputKind.PIXELS, [[0.0]], False, None)]),
    "Done": DONE,
    "Done without inputs": Done(LOG_PROBS, None, 1, 2, 3, 4, 2),
    "BatchStats": STATS,
    "BatchDone": BatchDone(7, {1: DONE, 2: ERROR}, STATS),
    "BatchDone, empty": BatchDone(8, {}, BatchStats(0)),
}


def same(a, b) -> bool:
    """Equality that looks inside arrays, RequestErrors and dataclasses."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return type(a) is type(b) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, RequestError):
        fields = ("status", "reason", "message", "retry_after", "allow")
        return type(b) is RequestError and all(getattr(a, f) == getattr(b, f) for f in fields)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_same_is_not_trivially_true():
    assert not same(MESSAGES["Done"], Done(LOG_PROBS, INPUTS + 1, 1_000, 2_500_000, 3_000_000, 4_000_000, 5))
    assert not same(ERROR, RequestError(400, "bad_shape", "images[1] is null"))
    assert not same(MESSAGES["Job, encoded"], dataclasses.replace(MESSAGES["Job, encoded"], kind=InputKind.JSON))


@pytest.mark.parametrize("name", list(MESSAGES))
def test_each_message_round_trips(pair, name):
    a, b = pair
    message = MESSAGES[name]
    a.sendall(pack(message))
    got = receive(b)
    assert got is not message and same(got, message)


def test_a_frame_is_its_length_then_its_pickle():
    data = pack(MESSAGES["Failed"])
    (size,) = HEADER.unpack(data[: HEADER.size])
    assert size == len(data) - HEADER.size > 0


def test_details_survive_the_trip(pair):
    a, b = pair
    send(a, MESSAGES["BatchDone"])
    got = receive(b)
    assert got.answers[1].log_probs.dtype == np.float32 and got.answers[1].inputs.shape == (2, SIDE, SIDE)
    error = got.answers[2]
    assert isinstance(error, RequestError) and (error.status, error.reason) == (400, "bad_shape")
    send(a, MESSAGES["Job, encoded"])
    assert receive(b).kind is InputKind.ENCODED  # the member itself, so `is` comparisons keep working


def test_messages_arrive_in_order(pair):
    a, b = pair
    names = list(MESSAGES)
    a.sendall(b"".join(pack(MESSAGES[n]) for n in names))
    for n in names:
        assert same(receive(b), MESSAGES[n])


def test_a_large_message_arrives_whole(pair):
    """Larger than a socket buffer: sent from a thread while the other end reads it in pieces."""
    import threading

    a, b = pair
    big = Job(9, InputKind.ENCODED, [bytes(range(256)) * 40_000], False, (1,))
    sender = threading.Thread(target=send, args=(a, big))
    sender.start()
    got = receive(b)
    sender.join(5)
    assert same(got, big)


@pytest.mark.parametrize(
    "sent",
    [b"", b"\x05\x00", pack(MESSAGES["Done"])[: HEADER.size], pack(MESSAGES["Done"])[:-1]],
    ids=["nothing", "half a header", "a header only", "all but the last byte"],
)
def test_receive_is_none_when_the_other_end_closes(pair, sent):
    a, b = pair
    a.sendall(sent)
    a.close()
    assert receive(b) is None


def test_receive_after_a_message_then_close(pair):
    a, b = pair
    send(a, MESSAGES["Failed"])
    a.close()
    assert same(receive(b), MESSAGES["Failed"])
    assert receive(b) is None


def _receive_all_async(sock, count):
    async def main():
        loop = asyncio.get_running_loop()
        return [await receive_async(loop, sock) for _ in range(count)]

    return asyncio.run(main())


def test_receive_async_gives_the_same_messages(pair):
    a, b = pair
    b.setblocking(False)
    names = list(MESSAGES)
    a.sendall(b"".join(pack(MESSAGES[n]) for n in names))
    got = _receive_all_async(b, len(names))
    assert all(same(g, MESSAGES[n]) for g, n in zip(got, names))


@pytest.mark.parametrize(
    "sent",
    [b"", b"\x05\x00", pack(MESSAGES["Done"])[:-1]],
    ids=["nothing", "half a header", "all but the last byte"],
)
def test_receive_async_raises_eof_when_the_other_end_closes(pair, sent):
    a, b = pair
    b.setblocking(False)
    a.sendall(sent)
    a.close()
    with pytest.raises(EOFError):
        _receive_all_async(b, 1)


def test_receive_async_waits_for_a_message_sent_later(pair):
    a, b = pair
    b.setblocking(False)

    async def main():
        loop = asyncio.get_running_loop()
        pending = asyncio.ensure_future(receive_async(loop, b))
        await asyncio.sleep(0.01)
        assert not pending.done()
        data = pack(MESSAGES["Ready"])
        a.sendall(data[:3])
        await asyncio.sleep(0.01)
        assert not pending.done()
        a.sendall(data[3:])
        return await asyncio.wait_for(pending, 5)

    assert same(asyncio.run(main()), MESSAGES["Ready"])


@pytest.mark.parametrize("name", list(MESSAGES))
def test_messages_are_frozen(name):
    message = MESSAGES[name]
    field = dataclasses.fields(message)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(message, field, None)


@pytest.mark.parametrize(
    "start, end, seconds",
    [(0, 0, 0.0), (1_000, 2_500_000, 0.002499), (5, 1_000_000_005, 1.0), (10**18, 10**18 + 3 * 10**9, 3.0)],
)
def test_done_prepare_s(start, end, seconds):
    done = Done(LOG_PROBS, None, start, end, end, end, 2)
    assert done.prepare_s == pytest.approx(seconds)


def test_input_kinds_are_the_four_kinds():
    assert {k.value for k in InputKind} == {"encoded", "json", "pixels", "normalized"}
    assert InputKind("json") is InputKind.JSON
