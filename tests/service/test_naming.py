"""Output names: safe, bounded, deterministic, and never shared by two sources."""

from __future__ import annotations

import hashlib
import tempfile
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.ledger import Ledger
from service.naming import DEFAULT_MAX_LENGTH, disambiguated, safe_stem

FORBIDDEN = set('<>:"|?*\\/')
RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{d}{n}" for d in ("COM", "LPT") for n in "0123456789"}
# The longest thing ever added to a stem, and the file-system limit per name.
LONGEST_SUFFIX = ".matrix.png"
NAME_MAX = 255

# Any text, including lone surrogates (what undecodable file names turn into) and the usual tricks.
pieces = st.one_of(
    st.characters(),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.sampled_from([*'./\\ :*?"<>|\0\t\u202e\u200d\u0301', "CON", "..", "lpt1", "e\u0301", "ß" * 40]),
)
any_text = st.lists(pieces, max_size=120).map("".join)
relpaths = st.lists(any_text, min_size=1, max_size=5).map("/".join)


def assert_safe(stem: str, *, max_length: int = DEFAULT_MAX_LENGTH) -> None:
    assert stem, "never empty"
    encoded = stem.encode("utf-8")  # raises on lone surrogates
    assert len(encoded) <= max_length
    assert len(encoded) + len(LONGEST_SUFFIX) <= NAME_MAX
    assert not FORBIDDEN & set(stem)
    assert all(unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in stem)
    assert not stem.startswith((".", " "))
    assert not stem.endswith((".", " "))
    assert ".." not in stem
    assert stem not in (".", "..")
    assert stem.split(".", 1)[0].strip().upper() not in RESERVED
    assert unicodedata.is_normalized("NFC", stem)


@given(relpaths)
@settings(max_examples=400)
def test_any_relpath_gives_a_safe_bounded_stem(relpath: str) -> None:
    stem = safe_stem(relpath)
    assert_safe(stem)
    assert safe_stem(relpath) == stem, "deterministic"


@given(relpaths, st.integers(24, 240))
def test_the_byte_bound_is_respected_for_any_max_length(relpath: str, max_length: int) -> None:
    assert_safe(safe_stem(relpath, max_length=max_length), max_length=max_length)


@given(any_text, relpaths, st.integers(0, 10_000))
def test_disambiguated_names_are_safe_bounded_and_carry_the_path_hash(
    stem_source: str, relpath: str, counter: int
) -> None:
    stem = safe_stem(stem_source)
    name = disambiguated(stem, relpath, counter=counter)
    assert_safe(name)
    digest = hashlib.sha256(relpath.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    assert f"-{digest}" in name
    assert name == disambiguated(stem, relpath, counter=counter)


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        ("photo.png", "photo"),
        ("ComfyUI_00001_.PNG", "ComfyUI_00001_"),
        ("sub/dir/photo 1.png", "sub__dir__photo 1"),
        ("archive.tar.png", "archive.tar"),
        ("../../etc/passwd.png", "etc__passwd"),
        ("..png", "image"),
        (".hidden.png", "hidden"),
        ("  spaced  .png", "spaced"),
        ('a<b>c:d"e|f?g*h\\i.png', "a_b_c_d_e_f_g_h_i"),
        ("tab\there\nnewline.png", "tab_here_newline"),
        ("evil\u202egnp.exe.png", "evil_gnp.exe"),
        ("CON.png", "_CON"),
        ("nul.txt.png", "_nul.txt"),
        ("com1 .png", "_com1"),
        ("console.png", "console"),
        ("", "image"),
        ("....png", "image"),
        ("\udcff\udcfe.png", "__"),
    ],
)
def test_known_names(relpath: str, expected: str) -> None:
    assert safe_stem(relpath) == expected


def test_unicode_is_kept_and_nfc_normalised() -> None:
    decomposed = "cafe\u0301/Bild für Wan.png"
    assert safe_stem(decomposed) == "caf\u00e9__Bild für Wan"
    assert safe_stem(unicodedata.normalize("NFD", "Ärger.png")) == safe_stem("Ärger.png")


def test_long_names_are_cut_with_a_hash_that_keeps_them_apart() -> None:
    first = safe_stem("ö" * 200 + "-first.png")
    second = safe_stem("ö" * 200 + "-second.png")
    assert len(first.encode()) <= DEFAULT_MAX_LENGTH
    assert first != second
    assert first.rsplit("-", 1)[0] == second.rsplit("-", 1)[0], "same visible beginning"
    assert safe_stem("short.png") == "short", "short names carry no hash"


def test_disambiguated_adds_the_first_8_hex_of_the_path_hash() -> None:
    digest = hashlib.sha256(b"sub/cat.png").hexdigest()[:8]
    assert disambiguated("cat", "sub/cat.png") == f"cat-{digest}"
    assert disambiguated("cat", "sub/cat.png", counter=3) == f"cat-{digest}-3"
    long = disambiguated("x" * 200, "sub/cat.png", counter=12)
    assert len(long.encode()) == DEFAULT_MAX_LENGTH
    assert long.endswith(f"-{digest}-12")


@pytest.mark.parametrize("max_length", [0, 23, 241, 1000])
def test_max_length_outside_the_usable_range_is_refused(max_length: int) -> None:
    with pytest.raises(ValueError, match="max_length"):
        safe_stem("a.png", max_length=max_length)


# Sources that all sanitise to the same stem, in different cases and spellings.
COLLIDING = ["a/b.png", "a__b.png", "A__B.png", "a/b.jpg", "a?/b.png", " a__b .webp", "A/B.PNG"]
collision_prone = st.lists(st.one_of(st.sampled_from(COLLIDING), relpaths), min_size=1, max_size=12, unique=True)


@given(collision_prone, st.sets(st.sampled_from(["a__b", "A__B-x", "image", "b"])))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_distinct_sources_never_share_a_name_and_keep_theirs(relpaths_: list[str], foreign: set[str]) -> None:
    foreign_folded = {name.casefold() for name in foreign}
    with tempfile.TemporaryDirectory() as folder:
        with Ledger(Path(folder) / "ledger.sqlite3") as ledger:
            names = [
                ledger.name_for(rel, safe_stem(rel), exists=lambda n: n.casefold() in foreign_folded)
                for rel in relpaths_
            ]
            assert len({name.casefold() for name in names}) == len(names), "case-insensitively unique"
            assert not {name.casefold() for name in names} & foreign_folded, "foreign files are never taken over"
            for name in names:
                assert_safe(name)
            again = [ledger.name_for(rel, "ignored", exists=lambda _n: True) for rel in reversed(relpaths_)]
        assert again == names[::-1], "a source keeps its name"
