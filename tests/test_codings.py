"""Content codings: what a request may offer when a heartbeat may answer first, and
undoing an answer's coding after a heartbeat's own head."""

import zlib

import pytest

from tornado_ollama_proxy.codings import EXPANSION_LIMIT, Decoder, coding_of, decodable
from tornado_ollama_proxy.framing import MalformedAnswer


@pytest.mark.parametrize(
    "offered, kept",
    [
        ("gzip, deflate, br, zstd", "gzip, deflate"),
        ("br;q=1.0, GZIP;q=0.5", "GZIP;q=0.5"),
        ("x-gzip", "x-gzip"),
        ("br", None),
        ("identity", None),
        ("", None),
    ],
)
def test_a_request_offers_only_codings_the_proxy_can_undo(offered, kept):
    assert decodable(offered) == kept


@pytest.mark.parametrize(
    "headers, coding",
    [
        ([("Content-Type", "application/json")], None),
        ([("Content-Encoding", "identity")], None),
        ([("content-encoding", "GZip")], "gzip"),
        ([("Content-Encoding", "gzip"), ("Content-Encoding", "br")], "gzip, br"),
    ],
)
def test_an_answers_coding_is_read_from_its_headers(headers, coding):
    assert coding_of(headers) == coding


@pytest.mark.parametrize("wbits, coding", [(31, "gzip"), (31, "x-gzip"), (15, "deflate")])
def test_gzip_and_deflate_are_undone_piece_by_piece(wbits, coding):
    text = b'{"response": "' + b"tok " * 10_000 + b'"}'
    encoded = zlib.compress(text, wbits=wbits)
    decoder = Decoder(coding)
    assert b"".join(decoder.decode(encoded[start : start + 7]) for start in range(0, len(encoded), 7)) == text


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, br"])
def test_other_codings_cannot_follow_a_heartbeat(coding):
    with pytest.raises(MalformedAnswer, match=r"encoded \(.*\), which cannot follow a heartbeat"):
        Decoder(coding)


def test_a_broken_stream_is_malformed():
    with pytest.raises(MalformedAnswer, match="encoded answer is broken"):
        Decoder("gzip").decode(b"not gzip at all")


def test_a_piece_that_would_expand_past_the_limit_is_malformed():
    bomb = zlib.compress(b"\0" * (EXPANSION_LIMIT * 2), wbits=31)
    with pytest.raises(MalformedAnswer, match="expands past"):
        Decoder("gzip").decode(bomb)


def test_several_gzip_members_are_one_answer():
    members = zlib.compress(b'{"a": ', wbits=31) + zlib.compress(b"1}", wbits=31)
    decoder = Decoder("gzip")
    assert decoder.decode(members[:7]) + decoder.decode(members[7:]) == b'{"a": 1}'
    assert decoder.complete


def test_an_encoded_answer_cut_short_is_not_complete():
    encoded = zlib.compress(b"x" * 10_000, wbits=31)
    decoder = Decoder("gzip")
    decoder.decode(encoded[: len(encoded) // 2])
    assert not decoder.complete
    decoder.decode(encoded[len(encoded) // 2 :])
    assert decoder.complete
