"""HTTP/1.1 framing on bytes alone: request bodies in, request heads out, answers in."""

import pytest
from tornado.httputil import HTTPHeaders

from tornado_ollama_proxy.errors import Rejection
from tornado_ollama_proxy.framing import (
    LAST_CHUNK,
    MAX_HEAD,
    MAX_INTERIM,
    AnswerReader,
    Data,
    End,
    Head,
    IncompleteAnswer,
    MalformedAnswer,
    chunk,
    declared_body,
    request_head,
)


def read(method: str, *pieces: bytes, eof: bool = False) -> list:
    """Feed `pieces` one by one (then EOF) and return every event."""
    reader = AnswerReader(method)
    events = []
    for piece in pieces:
        events += reader.feed(piece)
    if eof:
        events += reader.feed_eof()
    return events


def body(events: list) -> bytes:
    return b"".join(event.data for event in events if isinstance(event, Data))


def every_split(raw: bytes):
    """`raw` cut in two at every position: framing must not depend on how bytes arrive."""
    for cut in range(len(raw) + 1):
        yield raw[:cut], raw[cut:]


# -- request bodies in -------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ({}, 0),
        ({"Content-Length": "12"}, 12),
        ({"Content-Length": "0"}, 0),
        ({"Transfer-Encoding": "chunked"}, None),
        ({"Transfer-Encoding": "Chunked"}, None),
    ],
)
def test_a_request_body_is_sized_chunked_or_absent(headers, length):
    assert declared_body(HTTPHeaders(headers)) == length


def test_the_largest_body_tornado_is_told_to_accept_is_a_length():
    assert declared_body(HTTPHeaders({"Content-Length": str(2**62)})) == 2**62


def test_repeated_equal_request_lengths_are_one_length():
    headers = HTTPHeaders()
    headers.add("Content-Length", "5")
    headers.add("Content-Length", "5")
    assert declared_body(headers) == 5


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [
        ([("Content-Length", "0"), ("Transfer-Encoding", "chunked")], "both Content-Length and Transfer-Encoding"),
        ([("Transfer-Encoding", "gzip, chunked")], "Transfer-Encoding 'gzip, chunked' is not supported"),
        ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], "is not supported"),
        ([("Content-Length", "ten")], "Content-Length 'ten' is not a byte count"),
        ([("Content-Length", "-1")], "is not a byte count"),
        ([("Content-Length", "\xb2")], "is not a byte count"),  # a digit to str.isdigit, not an ASCII one
        ([("Content-Length", "2"), ("Content-Length", "3")], "Content-Length '2,3' is not a byte count"),
        ([("Content-Length", str(2**62 + 1))], "is larger than any body this proxy accepts"),
        ([("Content-Length", "9" * 23)], "is larger than any body"),
        ([("Content-Length", "0" * 30 + "1")], "is larger than any body"),  # no number has that many digits
        ([("Content-Length", "9" * 5000)], "is larger than any body"),  # past Python's int() digit limit
    ],
)
def test_request_framing_tornado_would_refuse_is_a_400(pairs, reason):
    headers = HTTPHeaders()
    for name, value in pairs:
        headers.add(name, value)
    with pytest.raises(Rejection) as refused:
        declared_body(headers)
    assert refused.value.status == 400 and reason in refused.value.message


# -- request heads out ---------------------------------------------------------------


def test_request_head_with_a_known_length():
    headers = HTTPHeaders({"Host": "127.0.0.1:11434", "Content-Type": "application/json"})
    assert request_head("POST", "/api/chat", headers, 17) == (
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nContent-Type: application/json\r\n"
        b"Content-Length: 17\r\n\r\n"
    )


def test_request_head_for_a_chunked_body_drops_a_stale_length():
    headers = HTTPHeaders({"Host": "h", "Content-Length": "99"})
    assert request_head("POST", "/api/blobs/x", headers, None) == (
        b"POST /api/blobs/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("method", "length", "line"),
    [
        ("GET", 0, None),
        ("DELETE", 0, None),
        ("HEAD", 0, None),
        ("POST", 0, b"Content-Length: 0"),  # Ollama answers a body-less POST with a JSON error
        ("PUT", 0, b"Content-Length: 0"),
        ("DELETE", 12, b"Content-Length: 12"),
    ],
)
def test_request_head_states_a_length_only_where_it_means_something(method, length, line):
    head = request_head(method, "/", HTTPHeaders({"Host": "h"}), length)
    lines = head.split(b"\r\n")
    assert lines[0] == method.encode() + b" / HTTP/1.1"
    assert [x for x in lines if x.lower().startswith(b"content-length")] == ([line] if line else [])


def test_chunks_of_a_request_body():
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 300) == b"12c\r\n" + b"x" * 300 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"


# -- answer heads ------------------------------------------------------------------------


def test_a_head_with_its_lines_and_headers():
    [head, end] = read(
        "GET",
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nX-A: 1\r\nX-A: 2\r\nContent-Length: 0\r\n\r\n",
    )
    assert (head.version, head.code, head.reason, head.length) == ("HTTP/1.1", 404, "Not Found", 0)
    assert head.lines() == [
        "HTTP/1.1 404 Not Found\r\n",
        "Content-Type: application/json\r\n",
        "X-A: 1\r\n",
        "X-A: 2\r\n",
        "Content-Length: 0\r\n",
        "\r\n",
    ]
    assert head.http_headers().get_list("X-A") == ["1", "2"]
    assert end == End(reusable=True)


@pytest.mark.parametrize("status", [b"HTTP/1.1 200 ", b"HTTP/1.1 200"])
def test_a_reason_may_be_empty_or_absent_and_values_are_trimmed(status):
    [head, end] = read("GET", status + b"\r\nX:   padded \t\r\nY: caf\xe9\r\nContent-Length: 0\r\n\r\n")
    assert (head.code, head.reason) == (200, "")
    assert head.headers == [("X", "padded"), ("Y", "caf\xe9"), ("Content-Length", "0")]
    assert end == End(True)


@pytest.mark.parametrize(
    "status",
    [b"SPDY/9 banana", b"HTTP/2 200 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 abc OK", b"HTTP/1.1", b""],
)
def test_a_status_line_that_is_not_http_1(status):
    with pytest.raises(MalformedAnswer, match="invalid HTTP/1.1 answer"):
        read("GET", status + b"\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("code", [b"000", b"099"])
def test_a_status_below_100_is_refused(code):
    with pytest.raises(MalformedAnswer, match=f"invalid status code {code.decode()}"):
        read("GET", b"HTTP/1.1 " + code + b" X\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("reason", [b"O\x01K", b"O\x7fK", b"O\x00K"])
def test_a_reason_with_control_characters_is_refused(reason):
    with pytest.raises(MalformedAnswer):
        read("GET", b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize(
    "line",
    [
        b"no colon",
        b": no name",
        b"Space Before : x",
        b"Bad Name: x",
        b" folded: x",
        b"\tfolded: x",
        b"X: a\rb",
        b"X: a\x00b",
        b"X: a\x01b",
    ],
)
def test_a_malformed_header_line(line):
    with pytest.raises(MalformedAnswer, match="invalid HTTP/1.1 answer"):
        read("GET", b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")


def test_a_tab_inside_a_value_is_legal():
    [head, _] = read("GET", b"HTTP/1.1 200 OK\r\nX: a\tb\r\nContent-Length: 0\r\n\r\n")
    assert head.headers[0] == ("X", "a\tb")


def test_a_head_arriving_a_byte_at_a_time():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    events = read("GET", *(raw[i : i + 1] for i in range(len(raw))))
    assert [type(e) for e in events] == [Head, Data, Data, End]
    assert body(events) == b"ok"


def test_a_head_too_large_to_hold():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(MalformedAnswer, match=f"head is larger than {MAX_HEAD} bytes"):
        for _ in range(MAX_HEAD // 1000 + 1):
            reader.feed(b"X-Pad: " + b"p" * 991 + b"\r\n")


def test_an_endless_header_value_is_refused_before_it_is_complete():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nX-Pad: ")
    with pytest.raises(MalformedAnswer, match=f"head is larger than {MAX_HEAD} bytes"):
        for _ in range(MAX_HEAD // 4096 + 1):
            reader.feed(b"p" * 4096)


def test_a_complete_head_too_large_in_one_read():
    raw = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * MAX_HEAD + b"\r\nContent-Length: 2\r\n\r\nok"
    with pytest.raises(MalformedAnswer, match=f"head is larger than {MAX_HEAD} bytes"):
        read("GET", raw)


def test_interim_answers_are_skipped():
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    for first, second in every_split(raw):
        events = read("POST", first, second)
        assert [e.code for e in events if isinstance(e, Head)] == [200]
        assert body(events) == b"ok" and events[-1] == End(True)


def test_interim_answers_are_capped():
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert read("GET", interim * MAX_INTERIM + final)[-1] == End(True)
    with pytest.raises(MalformedAnswer, match=f"more than {MAX_INTERIM} interim"):
        read("GET", interim * (MAX_INTERIM + 1) + final)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
def test_switching_protocols_is_refused(raw):
    with pytest.raises(MalformedAnswer, match="switched protocols"):
        read("GET", raw)


# -- bodies -----------------------------------------------------------------------


def test_the_body_bytes_of_one_read_are_one_piece():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{a}\r\n3\r\n{b}\r\n"
    [_, data] = read("POST", raw)
    assert data == Data(b"{a}{b}")


ANSWERS = {
    "sized": (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", b"hello world", True),
    "chunked, extensions, trailers": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'c\r\n{"a":"tok"}\n\r\n'
        b"A;name=value\r\n0123456789\r\n"
        b"0\r\nX-Trailer: t\r\n\r\n",
        b'{"a":"tok"}\n0123456789',
        True,
    ),
    "empty": (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"", True),
    "after an interim one": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"ok",
        True,
    ),
    "closing": (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    "chunked with a length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"ok",
        False,
    ),
    "no content": (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b"", True),
}


@pytest.mark.parametrize("name", ANSWERS)
def test_every_answer_cut_at_every_byte(name):
    raw, expected, reusable = ANSWERS[name]
    for first, second in every_split(raw):
        events = read("GET", first, second)
        assert body(events) == expected
        assert events[-1] == End(reusable)
        assert sum(isinstance(e, End) for e in events) == 1
        assert sum(isinstance(e, Head) for e in events) == 1


@pytest.mark.parametrize("name", ANSWERS)
def test_every_answer_cut_short_is_incomplete(name):
    raw, _, _ = ANSWERS[name]
    for cut in range(len(raw)):
        reader = AnswerReader("GET")
        events = reader.feed(raw[:cut])
        assert not any(isinstance(e, End) for e in events)
        with pytest.raises(IncompleteAnswer):
            reader.feed_eof()


def test_chunked_wins_over_a_content_length_and_the_connection_is_not_reused():
    [head, data, end] = read("GET", ANSWERS["chunked with a length"][0])
    assert head.length is None  # the relay must not announce the stale length
    assert (data, end) == (Data(b"ok"), End(False))


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"chunked, gzip"])
def test_a_transfer_coding_other_than_chunked_is_refused(coding):
    with pytest.raises(MalformedAnswer, match="unsupported Transfer-Encoding"):
        read("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\nraw")


def test_two_transfer_encoding_lines_are_refused():
    with pytest.raises(MalformedAnswer, match="unsupported Transfer-Encoding"):
        read("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")


def test_no_length_means_until_close():
    events = read("GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"a", b"b", eof=True)
    assert body(events) == b"ab" and events[-1] == End(False)
    assert events[0].length is None


def test_a_reset_is_not_the_end_of_a_body_that_ends_at_close():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\npartial")
    with pytest.raises(IncompleteAnswer):
        reader.feed_eof(reset=True)


def test_a_reset_after_a_complete_answer_ends_nothing_more():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert reader.feed_eof(reset=True) == []


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_answers_without_a_body_ignore_their_length(status):
    events = read("GET", b"HTTP/1.1 " + status + b"\r\nContent-Length: 1234\r\n\r\n")
    assert [type(e) for e in events] == [Head, End] and events[-1].reusable


@pytest.mark.parametrize(
    "lengths", [[b"2", b"3"], [b"2", b"2"], [b"-1"], [b"2x"], [b"\xd9\xa3"], [b"99999999999999999999"], [b"2, 2"]]
)
def test_repeated_or_invalid_lengths_are_refused(lengths):
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"Content-Length: " + value + b"\r\n" for value in lengths) + b"\r\n"
    with pytest.raises(MalformedAnswer, match="invalid HTTP/1.1 answer"):
        read("GET", head)


@pytest.mark.parametrize("size", [b"zz", b"", b"-1", b"1" * 17])
def test_an_invalid_chunk_size(size):
    with pytest.raises(MalformedAnswer, match="invalid HTTP/1.1 answer"):
        read("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\n")


def test_a_chunk_longer_than_its_size():
    with pytest.raises(MalformedAnswer, match="invalid HTTP/1.1 answer"):
        read("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokay\r\n")


def test_an_endless_chunk_size_line():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(MalformedAnswer, match=f"chunk framing or trailers are larger than {MAX_HEAD} bytes"):
        reader.feed(b"1;" + b"e" * MAX_HEAD)


def test_an_endless_trailer():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    with pytest.raises(MalformedAnswer, match=f"larger than {MAX_HEAD} bytes"):
        reader.feed(b"X-T: " + b"t" * MAX_HEAD)


def test_too_many_trailers():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    with pytest.raises(MalformedAnswer, match=f"trailers are larger than {MAX_HEAD} bytes"):
        reader.feed(b"X-T: t\r\n" * (MAX_HEAD // 8 + 1))


# -- HEAD answers --------------------------------------------------------------------


def test_a_head_answer_ends_with_its_head():
    events = read("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [type(e) for e in events] == [Head, End] and events[-1] == End(True)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n",  # Ollama's HEAD / announces its text
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
    ],
)
def test_a_head_answer_announcing_a_body_is_not_followed_by_another_request(head):
    # A broken upstream's body could arrive after the next request was sent on
    # the connection, and be taken for that request's answer.
    [got, end] = read("HEAD", head)
    assert end == End(False)
    assert got.length == (17 if b"17" in head else None)


@pytest.mark.parametrize("length", [b"0", b"5"])
@pytest.mark.parametrize("stray", [b"x", b"hello", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
def test_bytes_after_a_head_answer_make_the_connection_unusable(length, stray):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\n"
    events = read("HEAD", head + stray)
    assert [type(e) for e in events] == [Head, End] and events[-1] == End(False)


# -- endings and reuse --------------------------------------------------------------


def test_connection_close_or_http_1_0_is_not_reusable():
    closing = read("GET", b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n")
    old = read("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert closing[-1] == End(False) and old[-1] == End(False)
    assert old[0].version == "HTTP/1.0"


@pytest.mark.parametrize("extra", [b"EXTRA", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
def test_bytes_after_the_end_make_the_connection_unusable(extra):
    events = read("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
    assert body(events) == b"ok" and events[-1] == End(False)


def test_nothing_after_the_end_is_read():
    reader = AnswerReader("GET")
    assert reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")[-1] == End(True)
    assert reader.done
    assert reader.feed(b"late bytes") == []
    assert reader.feed_eof() == []


def test_closing_before_the_end_is_incomplete():
    for raw in (
        b"",
        b"HTTP/1.1 200",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
    ):
        reader = AnswerReader("GET")
        reader.feed(raw)
        with pytest.raises(IncompleteAnswer):
            reader.feed_eof()


def test_started_says_whether_any_byte_arrived():
    reader = AnswerReader("GET")
    reader.feed(b"")
    assert not reader.started
    reader.feed(b"H")
    assert reader.started
