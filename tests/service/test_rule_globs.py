"""service.rule_globs: the ``match`` glob grammar, its corner cases, and matching that cannot blow up.

The glob semantics of the existing table test live in test_rules.py
(``test_glob_semantics``); here: what a glob may not say, classes, and the
shape of the regular expression (rule selection runs on the daemon's main
thread for every file name).
"""

from __future__ import annotations

import random
import re
import warnings
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pytest

from service.errors import RuleError
from service.rules import DEFAULT_RULE, Rule, RuleSet, compile_glob, load_rule_file, load_rules

# The parser and its opcodes: the only way to look at a regex's structure. typeshed stubs them only
# under their deprecated names, which re-export these modules.
if TYPE_CHECKING:
    import sre_constants as sre
    import sre_parse
else:
    from re import _constants as sre
    from re import _parser as sre_parse


def rule_file_error(tmp_path: Path, glob: str) -> RuleError:
    path = tmp_path / "globs.toml"
    path.write_text(f"name = \"globs\"\nmatch = ['*.webp', '{glob}']\n", encoding="utf-8")
    with pytest.raises(RuleError) as caught:
        load_rule_file(path)
    assert caught.value.file == str(path) and caught.value.field == "match[1]"
    assert repr(glob) in str(caught.value), "the message names the glob"
    return caught.value


def matches(glob: str, path: str) -> bool:
    return Rule(name="r", match=(glob,)).matches(path)


# -- what a glob may not say ---------------------------------------------------------------


@pytest.mark.parametrize("glob", ["[z-a].png", "portrait_[z-a]*.png", "[a--b].png", "x/[9-0]/*.png", "[!b-a]x"])
def test_a_reversed_range_is_a_rule_error_naming_file_field_and_glob(tmp_path: Path, glob: str) -> None:
    assert "reversed range" in str(rule_file_error(tmp_path, glob))


def test_a_reversed_range_in_a_rule_folder_fails_the_folder_with_a_rule_error(tmp_path: Path) -> None:
    (tmp_path / "default.toml").write_text('name = "default"\n', encoding="utf-8")
    (tmp_path / "portraits.toml").write_text('name = "p"\nmatch = ["portrait_[z-a]*.png"]\n', encoding="utf-8")
    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path)
    assert caught.value.file == str(tmp_path / "portraits.toml") and caught.value.field == "match[0]"


@pytest.mark.parametrize(
    ("glob", "suggested"),
    [
        ("*.{png,jpg}", '"*.png", "*.jpg"'),
        ("shots/{a,b,c}_*.png", '"shots/a_*.png", "shots/b_*.png", "shots/c_*.png"'),
        ("x}.png", '"*.png", "*.jpg"'),  # nothing to expand: a generic example
    ],
)
def test_braces_are_refused_with_the_globs_to_write_instead(tmp_path: Path, glob: str, suggested: str) -> None:
    message = str(rule_file_error(tmp_path, glob))
    assert "braces are not supported" in message and suggested in message


def test_a_literal_brace_is_a_class() -> None:
    assert matches("[{]draft[}]*.png", "{draft}_01.png")
    assert not matches("[{]draft[}]*.png", "draft_01.png")


# -- classes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "yes", "no"),
    [
        ("[]]x", ["]x"], ["ax", "x"]),
        ("[!]]x", ["ax", "!x"], ["]x", "x"]),
        ("[]a]x", ["]x", "ax"], ["bx"]),
        ("[a-]x", ["ax", "-x"], ["bx"]),
        ("[-a]x", ["ax", "-x"], ["bx"]),
        ("[!a-c]x", ["dx", "-x"], ["bx", "Bx"]),  # case-insensitive, negated too
    ],
)
def test_a_bracket_or_dash_at_the_edge_of_a_class_is_a_member(glob: str, yes: list[str], no: list[str]) -> None:
    assert [matches(glob, name) for name in yes] == [True] * len(yes)
    assert [matches(glob, name) for name in no] == [False] * len(no)


@pytest.mark.parametrize(
    ("glob", "yes", "no"),
    [
        ("[a&&b].png", ["a.png", "&.png", "b.png"], ["x.png", "&&.png"]),
        ("[a||b].png", ["|.png", "b.png"], ["x.png"]),
        ("[a~~b].png", ["~.png", "a.png"], ["x.png"]),
        ("[a-c--].png", ["b.png", "-.png"], ["x.png"]),
        ("[[]draft[]].png", ["[draft].png"], ["d.png", "draft.png"]),
        ("[!^]x", ["ax"], ["^x"]),
        ("[^]x", ["^x"], ["ax"]),  # '^' is not negation in a glob ('!' is)
    ],
)
def test_regex_set_syntax_in_a_class_is_literal_and_warns_nothing(glob: str, yes: list[str], no: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # re's FutureWarning about future set operations
        compile_glob.cache_clear()
        assert [matches(glob, name) for name in yes] == [True] * len(yes)
        assert [matches(glob, name) for name in no] == [False] * len(no)


def test_a_negated_class_never_matches_a_folder_separator() -> None:
    assert matches("d/a[!x]b.png", "d/ayb.png")
    assert not matches("d/a[!x]b.png", "d/a/b.png"), "'/' is not a character of a name"
    assert not matches("d/[!x]/b.png", "d///b.png")


def test_names_with_a_newline_match_like_any_other() -> None:
    assert matches("*.png", "a\nb.png")
    assert matches("shots/**", "shots/a\nb.png")
    assert matches("shots/**", "shots/x\ny/z.png")
    assert matches("**/[!x]?.png", "deep/\n\n.png")


# -- the same names match as a plain reading of the grammar says -------------------------------


def reference(glob: str, path: str) -> bool:
    """The grammar read literally: fnmatch (lowercased) per folder name, '**' any number of whole folders."""
    if "/" not in glob:
        return fnmatchcase(PurePosixPath(path).name.lower(), glob.lower())
    globs, names = glob.split("/"), path.split("/")

    def rest(i: int, j: int) -> bool:
        if i == len(globs):
            return j == len(names)
        if globs[i] == "**":
            if i == len(globs) - 1:
                return j < len(names)
            return any(rest(i + 1, k) for k in range(j, len(names)))
        return j < len(names) and fnmatchcase(names[j].lower(), globs[i].lower()) and rest(i + 1, j + 1)

    return rest(0, 0)


def random_glob(rng: random.Random) -> str:
    pieces = ["a", "b", "A", ".p", "_", "*", "*", "?", "[ab]", "[!a]", "[a-c]", "[]a]", "[!]]", "[-b]", "[b-]"]
    segments = [
        "**" if rng.random() < 0.25 else "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
        for _ in range(rng.randint(1, 4))
    ]
    # '**' inside a name is refused: two stars drawn in a row are one.
    return "/".join(segment if segment == "**" else re.sub(r"\*+", "*", segment) for segment in segments)


def random_path(rng: random.Random) -> str:
    return "/".join("".join(rng.choice("aabB._]-") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 5)))


def test_matching_agrees_with_a_plain_reading_of_the_grammar() -> None:
    rng = random.Random(20240611)
    results = []
    for _ in range(400):
        glob = random_glob(rng)
        for _ in range(25):
            path = random_path(rng)
            expected = reference(glob, path)
            assert matches(glob, path) is expected, (glob, path)
            results.append(expected)
    assert 0.05 < sum(results) / len(results) < 0.95, "the corpus tests both outcomes"


# -- matching cannot blow up -------------------------------------------------------------------

HOSTILE = [
    "*a*a*a*a*a*a*b.png",  # the reviewer's: 8.5 s on a 64-character name before
    "*_*_*_*_*.png",
    "*a" * 40 + "*b.png",
    "**/x/**/x/**/x/**/x/**/y",
    "**/*a*a*a/**/*a*a*b/q",
    "*a*/*a*/*a*a*b",
    "[!b]*[!b]*[!b]*[!b]*b",
]


def backtracking_repeats(items: Any, *, atomic: bool = False, nested: bool = False) -> list[bool]:
    """For each unbounded repeat that may give back what it matched: whether it sits outside atomic groups.

    Fails at once on such a repeat inside another one (the textbook catastrophic case).
    """
    found: list[bool] = []
    for op, arg in items:
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            unbounded = arg[1] == sre.MAXREPEAT
            if unbounded:
                assert not nested, "an unbounded repeat inside another one"
                found.append(not atomic)
            found += backtracking_repeats(arg[2], atomic=atomic, nested=nested or unbounded)
        elif op == sre.POSSESSIVE_REPEAT:  # gives nothing back
            found += backtracking_repeats(arg[2], atomic=atomic, nested=nested)
        elif op == sre.ATOMIC_GROUP:
            found += backtracking_repeats(arg, atomic=True, nested=nested)
        elif op == sre.SUBPATTERN:
            found += backtracking_repeats(arg[3], atomic=atomic, nested=nested)
        elif op == sre.BRANCH:
            for branch in arg[1]:
                found += backtracking_repeats(branch, atomic=atomic, nested=nested)
    return found


@pytest.mark.parametrize("glob", HOSTILE)
def test_the_regex_backtracks_at_most_once_per_folder(glob: str) -> None:
    """What bounds the work: no repeat nested in a repeat, and outside atomic groups (tried once,
    never re-entered) at most one backtracking repeat per folder of the glob. A plain translation
    has one per '*' (7 for the first glob), and its work grows like len(name) ** stars."""
    pattern = compile_glob(glob)
    repeats = backtracking_repeats(sre_parse.parse(pattern.pattern, pattern.flags))
    assert sum(repeats) <= len(glob.split("/")), pattern.pattern


def test_the_translation_is_fnmatchs() -> None:
    assert compile_glob("*a*a*b.png").pattern == r"(?>[^/]*?a)(?>[^/]*?a)[^/]*b\.png"
    assert compile_glob("**/x/**/y.png").pattern == r"(?>(?:[^/]++/)*?x/)(?:[^/]++/)*y\.png"
    assert compile_glob("a/**/**/b").pattern == compile_glob("a/**/b").pattern == r"a/(?:[^/]++/)*b"


# Not a timing assertion: nothing is measured. Expected to take milliseconds; before the fix the first
# glob alone needed hours on this name, so the deadline (a pytest-timeout failure, not a clock read in
# the test) only catches a return of exponential matching, however slow or busy the machine.
@pytest.mark.timeout(120)
def test_hostile_globs_and_names_are_selected_at_all() -> None:
    hostile = tuple(Rule(name=f"hostile-{index}", match=(glob,)) for index, glob in enumerate(HOSTILE))
    rules = RuleSet(rules=(Rule(name=DEFAULT_RULE), *hostile))
    names = ["a" * 250 + ".png", "_" * 250 + ".jpg", "/".join(["x"] * 120) + "/z", "/".join(["a" * 40] * 6)]
    assert [rules.select(name).name for name in names] == [DEFAULT_RULE] * len(names)
    assert rules.select("a" * 250 + "b.png").name == "hostile-0"


def test_a_compile_error_is_a_value_error_naming_the_glob(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every part of the regex is escaped, so re.error is not expected; if it ever comes, it is still
    a ValueError (which pydantic turns into a RuleError naming file and field), never re.error."""

    def broken(source: str, flags: int = 0) -> re.Pattern[str]:
        raise re.error("simulated", source)

    compile_glob.cache_clear()
    with (
        monkeypatch.context() as patch,
        pytest.raises(ValueError, match=r"glob '\*\.png' does not compile: simulated"),
    ):
        patch.setattr(re, "compile", broken)
        compile_glob("*.png")
