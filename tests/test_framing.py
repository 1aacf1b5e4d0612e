"""The upstream side's HTTP/1.1 framing, on bytes alone."""

import pytest
from tornado.httputil import HTTPHeaders

from tornado_ollama_proxy.framing import (
    LAST_CHUNK,
    MAX_CHUNK_LINE,
    MAX_HEAD,
    AnswerReader,
    Data,
    End,
    Head,
    IncompleteAnswer,
    MalformedAnswer,
    chunk,
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


# -- request heads ---------------------------------------------------------------


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


# -- heads ------------------------------------------------------------------------


def test_a_head_with_its_lines_and_headers():
    [head, end] = read("GET", b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nX-A: 1\r\nX-A: 2\r\nContent-Length: 0\r\n\r\n")
    assert (head.version, head.code, head.reason) == ("HTTP/1.1", 404, "Not Found")
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


def test_a_reason_may_be_empty_and_values_are_trimmed():
    [head, _] = read("GET", b"HTTP/1.1 200 \r\nX:   padded \t\r\nContent-Length: 0\r\n\r\n")
    assert (head.code, head.reason, head.headers) == (200, "", [("X", "padded"), ("Content-Length", "0")])


@pytest.mark.parametrize(
    "status",
    [b"SPDY/9 banana", b"HTTP/2 200 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 abc OK", b"HTTP/1.1", b""],
)
def test_a_status_line_that_is_not_http_1(status):
    with pytest.raises(MalformedAnswer, match="not an HTTP/1.x status line"):
        read("GET", status + b"\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("line", [b"no colon", b": no name", b"Space Before : x", b" folded: x", b"\tfolded: x"])
def test_a_malformed_header_line(line):
    with pytest.raises(MalformedAnswer, match="malformed header line"):
        read("GET", b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")


def test_a_head_arriving_a_byte_at_a_time():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    events = read("GET", *(raw[i : i + 1] for i in range(len(raw))))
    assert [type(e) for e in events] == [Head, Data, Data, End]
    assert body(events) == b"ok"


def test_a_head_too_large_to_hold():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(MalformedAnswer, match=f"head exceeds {MAX_HEAD} bytes"):
        for _ in range(MAX_HEAD // 1000 + 1):
            reader.feed(b"X-Pad: " + b"p" * 991 + b"\r\n")


def test_a_complete_head_too_large_in_one_read():
    raw = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * MAX_HEAD + b"\r\n\r\n"
    with pytest.raises(MalformedAnswer, match=f"head exceeds {MAX_HEAD} bytes"):
        read("GET", raw)


def test_interim_answers_are_skipped():
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for first, second in every_split(raw):
        events = read("POST", first, second)
        assert [e.code for e in events if isinstance(e, Head)] == [200]
        assert body(events) == b"ok" and events[-1] == End(True)


def test_switching_protocols_is_refused():
    with pytest.raises(MalformedAnswer, match="switched protocols"):
        read("GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")


# -- bodies -----------------------------------------------------------------------


def test_content_length_body_in_any_split():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"
    for first, second in every_split(raw):
        events = read("GET", first, second)
        assert body(events) == b"hello world"
        assert events[-1] == End(True)


def test_the_body_bytes_of_one_read_are_one_piece():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{a}\r\n3\r\n{b}\r\n"
    [_, data] = read("POST", raw)
    assert data == Data(b"{a}{b}")


def test_chunked_body_in_any_split():
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"c\r\n{\"a\":\"tok\"}\n\r\n"
        b"A;name=value\r\n0123456789\r\n"
        b"0\r\nX-Trailer: t\r\n\r\n"
    )
    for first, second in every_split(raw):
        events = read("POST", first, second)
        assert body(events) == b'{"a":"tok"}\n0123456789'
        assert events[-1] == End(True)
        assert sum(isinstance(e, End) for e in events) == 1


def test_chunked_wins_over_a_content_length():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    events = read("GET", raw)
    assert body(events) == b"ok" and events[-1] == End(True)


def test_a_transfer_coding_other_than_chunked_runs_until_close():
    events = read("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw", b"more", eof=True)
    assert body(events) == b"rawmore"
    assert events[-1] == End(reusable=False)


def test_no_length_means_until_close():
    events = read("GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"a", b"b", eof=True)
    assert body(events) == b"ab" and events[-1] == End(False)


@pytest.mark.parametrize(
    ("method", "status"), [("HEAD", b"200 OK"), ("GET", b"204 No Content"), ("GET", b"304 Not Modified")]
)
def test_answers_without_a_body_ignore_their_length(method, status):
    events = read(method, b"HTTP/1.1 " + status + b"\r\nContent-Length: 1234\r\n\r\n")
    assert [type(e) for e in events] == [Head, End] and events[-1].reusable


def test_a_zero_length_body():
    events = read("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [type(e) for e in events] == [Head, End]


def test_repeated_equal_lengths_are_one_length():
    events = read("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
    assert body(events) == b"ok"


@pytest.mark.parametrize("lengths", [[b"2", b"3"], [b"-1"], [b"2x"], [b"\xd9\xa3"]])
def test_conflicting_or_invalid_lengths(lengths):
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"Content-Length: " + value + b"\r\n" for value in lengths) + b"\r\n"
    with pytest.raises(MalformedAnswer, match="invalid Content-Length"):
        read("GET", head)


@pytest.mark.parametrize("size", [b"zz", b"", b"-1", b"1" * 17, b" "])
def test_an_invalid_chunk_size(size):
    with pytest.raises(MalformedAnswer, match="invalid chunk size"):
        read("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\n")


def test_a_chunk_longer_than_its_size():
    with pytest.raises(MalformedAnswer, match="longer than its size"):
        read("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokay\r\n")


def test_an_endless_chunk_size_line():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(MalformedAnswer, match=f"chunk-size line exceeds {MAX_CHUNK_LINE} bytes"):
        reader.feed(b"1;" + b"e" * MAX_CHUNK_LINE)


def test_an_endless_trailer():
    reader = AnswerReader("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    with pytest.raises(MalformedAnswer, match="trailers exceed"):
        reader.feed(b"X-T: " + b"t" * MAX_HEAD)


# -- endings and reuse --------------------------------------------------------------


def test_connection_close_or_http_1_0_is_not_reusable():
    closing = read("GET", b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n")
    old = read("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert closing[-1] == End(False) and old[-1] == End(False)


def test_bytes_after_the_end_make_the_connection_unusable():
    events = read("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert body(events) == b"ok" and events[-1] == End(False)


def test_nothing_after_the_end_is_read():
    reader = AnswerReader("GET")
    assert reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")[-1] == End(True)
    assert reader.done
    assert reader.feed(b"late bytes") == []
    assert reader.feed_eof() == []


def test_closing_before_the_end_is_incomplete():
    for raw in (b"", b"HTTP/1.1 200", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"):
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
