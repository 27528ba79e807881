"""POST /feedback's body, parsed in process: what is accepted, and the 400 for everything else."""

from __future__ import annotations

import json

import pytest

from service.errors import RequestError
from service.protocols.feedback import parse_feedback


def parse(doc, max_index=64):
    return parse_feedback(doc if isinstance(doc, bytes) else json.dumps(doc).encode(), max_index)


@pytest.mark.parametrize(
    "doc, expected",
    [
        ({"request_id": "abc", "digit": 7}, ("abc", 0, "7")),
        ({"request_id": "abc", "digit": 0, "index": 63}, ("abc", 63, "0")),
        ({"request_id": "a-b.c:d+e=f/g@h", "digit": "not_a_digit"}, ("a-b.c:d+e=f/g@h", 0, "not_a_digit")),
    ],
)
def test_accepted(doc, expected):
    assert parse(doc) == expected


@pytest.mark.parametrize(
    "doc, fragment",
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"[" * 100_000, "nests too deep"),
        (b"\xff\xfe", "not JSON"),
        ([1, 2], "JSON object"),
        ("7", "JSON object"),
        ({"digit": 7}, "request_id is missing"),
        ({"request_id": "", "digit": 7}, "request_id is missing"),
        ({"request_id": 12, "digit": 7}, "request_id is missing"),
        ({"request_id": "has space", "digit": 7}, "not a request id"),
        ({"request_id": "x" * 129, "digit": 7}, "not a request id"),
        ({"request_id": "é", "digit": 7}, "not a request id"),
        ({"request_id": "abc"}, "digit is missing"),
        ({"request_id": "abc", "digit": 10}, "0-9, got 10"),
        ({"request_id": "abc", "digit": -1}, "0-9, got -1"),
        ({"request_id": "abc", "digit": 7.0}, "whole number"),
        ({"request_id": "abc", "digit": True}, "whole number"),
        ({"request_id": "abc", "digit": "7"}, "whole number"),
        ({"request_id": "abc", "digit": None}, "whole number"),
        ({"request_id": "abc", "digit": [7]}, "whole number"),
        ({"request_id": "abc", "digit": "not a digit"}, "whole number"),
        ({"request_id": "abc", "digit": 7, "index": 64}, "index must be"),
        ({"request_id": "abc", "digit": 7, "index": -1}, "index must be"),
        ({"request_id": "abc", "digit": 7, "index": "0"}, "index must be"),
        ({"request_id": "abc", "digit": 7, "label": 3}, "unknown field 'label'"),
    ],
)
def test_refused_with_a_400_that_says_why(doc, fragment):
    with pytest.raises(RequestError) as caught:
        parse(doc)
    assert caught.value.status == 400 and fragment in caught.value.message, caught.value.message
