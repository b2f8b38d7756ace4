"""Ownership: x31 (khash's X31 string hash), owner(id, W) and valid_id, against the SPEC."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server import owner, valid_id, x31

# (id, x31(id), owner with W = 8), from SPEC.md
VECTORS = [
    (b"a0", 3055, 7),
    (b"a1", 3056, 0),
    (b"Sue", 83491, 3),
    (b"alice", 92903040, 0),
    (b"b12345", 2852449553, 1),
]


@pytest.mark.parametrize(("id_", "h", "w8"), VECTORS)
def test_spec_vectors(id_, h, w8):
    assert x31(id_) == h
    assert owner(id_, 8) == w8


def test_x31_single_byte_and_empty():
    assert x31(b"a") == 97
    assert x31(b"") == 0


@given(st.binary(min_size=1, max_size=200))
def test_x31_matches_reference_and_fits_32_bits(data):
    h = data[0]
    for c in data[1:]:
        h = (h * 31 + c) % 2**32
    assert x31(data) == h
    assert 0 <= x31(data) < 2**32


@given(st.binary(min_size=1, max_size=50), st.integers(min_value=1, max_value=64))
def test_owner_is_in_range(data, workers):
    assert owner(data, workers) == x31(data) % workers
    assert 0 <= owner(data, workers) < workers


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_~-"


@pytest.mark.parametrize("id_", [b"a", b"A", b"0", b"_", b"~", b"-", b"a" * 128,
                                 ALPHABET.encode(), b"user_42~x-y"])
def test_valid_ids(id_):
    assert valid_id(id_)


@pytest.mark.parametrize("id_", [b"", b"a" * 129, b"a/b", b"/", b"a.b", b".", b"a%20",
                                 b"a b", b" ", "caf\u00e9".encode(), b"\xff", b"a\x00",
                                 b"a\n", b"a?b", b"a+b", b"a\tb", b"a*"])
def test_invalid_ids(id_):
    assert not valid_id(id_)


@given(st.text(alphabet=ALPHABET, min_size=1, max_size=128))
def test_every_id_of_the_alphabet_is_valid(text):
    assert valid_id(text.encode())


@given(st.binary(max_size=140))
def test_valid_id_is_exactly_the_grammar(data):
    expected = 1 <= len(data) <= 128 and all(chr(b) in ALPHABET for b in data)
    assert valid_id(data) == expected
