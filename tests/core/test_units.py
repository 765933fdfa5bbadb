"""Sizes, listen addresses and file modes as settings spell them (kvd.core.units)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvd.core.units import check_listen_addr, parse_mode, parse_size

GiB = 1 << 30


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("16G", 16 * GiB), ("16g", 16 * GiB), ("16GiB", 16 * GiB), ("16Gi", 16 * GiB),
    ("16GB", 16 * 10**9), ("512MiB", 512 << 20), ("512M", 512 << 20), ("2KB", 2000), ("1.5GiB", 3 * GiB // 2),
    (" 8 GiB ", 8 * GiB), ("1T", 1 << 40), ("10B", 10),
])
def test_sizes_binary_by_default_decimal_when_spelt_so(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["16X", "GiB", "-1G", "1.5", "0.3B", "16 GiBs", ""])
def test_bad_sizes_say_how_to_write_one(text):
    with pytest.raises(ValueError, match="not a (size|whole number)"):
        parse_size(text)


@pytest.mark.parametrize("value", [-5, -1.0])
def test_a_negative_number_of_bytes_says_so(value):
    """``capacity_bytes = -5`` in TOML was refused as "could not parse value and unit from byte
    string" (pydantic's words for a string), though it is a number and the fault is its sign."""
    with pytest.raises(ValueError, match="negative"):
        parse_size(value)


@given(st.integers(min_value=0, max_value=1 << 50), st.sampled_from(["K", "KiB", "M", "MiB", "G", "GiB"]))
def test_binary_suffixes_round_trip(n, unit):
    assert parse_size(f"{n}{unit}") == n * 1024 ** (1 + "KMG".index(unit[0]))


@pytest.mark.parametrize("value, expected", [("0660", "0660"), ("660", "0660"), ("0o640", "0640"),
                                             (0o660, "0660"), (0, "0000"), ("0o777", "0777")])
def test_modes_octal_in_every_spelling(value, expected):
    assert parse_mode(value) == expected


@pytest.mark.parametrize("value", ["rw", "0o1777", 0o1000, "0689", True, 6.6, ""])
def test_bad_modes_are_refused(value):
    with pytest.raises(ValueError, match="mode"):
        parse_mode(value)


@pytest.mark.parametrize("addr", [":9464", "127.0.0.1:9464", "[::1]:9464", "localhost:0", ""])
def test_listen_addresses(addr):
    assert check_listen_addr(addr) == addr


@pytest.mark.parametrize("addr", ["nowhere", "127.0.0.1", "::1:9464", "h:99999", "[::1:9464"])
def test_bad_listen_addresses(addr):
    with pytest.raises(ValueError):
        check_listen_addr(addr)
