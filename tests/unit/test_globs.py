"""Ignore patterns: the linear-time matchers of ocibuild.globs agree with the regular expression that defines them
(the translation ocibuild used before, which backtracked exponentially on some patterns), and stay fast where it
did not."""

from __future__ import annotations

import os
import random
import re

import pytest

from conftest import without_hanging
from ocibuild import globs
from ocibuild.globs import compile_glob


def _defining_expression(pattern: str) -> str:
    """The translation IgnoreRules used to hand to ``re`` (kept verbatim but for two fixes, see the module
    docstring of ocibuild.globs: DOTALL, and ``\\Z`` rather than ``$``, so that a newline in a name is a character
    like any other)."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out) + r"(?:/.*)?\Z"


def test_a_class_is_what_lies_between_its_brackets() -> None:
    """The old translation pasted a class's text into one expression, so ``[]``, ``[!]`` or ``[a\\]`` went on into
    what followed (``[]a[b]`` meant one of ``]a[b``): each class is now read on its own, and those are refused, as
    ``[]`` alone always was."""
    assert re.compile(_defining_expression("[]a[b]")).match("[")
    for pattern in ("[]a[b]", "[!]a]", "[a\\]b]"):
        with pytest.raises(re.error):
            compile_glob(pattern)


HANDPICKED = ["bundles", "*.md", "README.md", "**/*.o", "tmp", "a?c", "src/**/test", "**/node_modules", "a/**", "**",
              "*", "a*b*c", "[ab]*", "[!a]*", "x[!.]y", "a**b", "**.py", "*a*a*a*b", "[a-c]?/*", "a/**/b/**/c",
              "**/**/x", "a/*/b", "*/*", "a**/b", "**a", "[", "a[b", "[]]", "a\\b", ".*", "*.", "?", "*?*", "a/**/*",
              "**/*a*/**/b*", "src/engine/.git", "!x", "/a", "a/", "a//b", "**/", "a/**/"]
PIECES = ["a", "b", "/", "*", "**", "**/", "?", "[ab]", "[!a]", "[/]", ".", "[a-b]", "\n"]
NAMES = ["a", "b", "/", ".", "ab", "\n"]


def _corpus() -> tuple[list[str], list[str]]:
    rng = random.Random(12)
    patterns = HANDPICKED + ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6))) for _ in range(500)]
    paths = ["", "a", "a/b", "bundles", "bundles/x/y", "src/bundles", "a/b/c.o", "c.o", "README.md", "x/y.md",
             "abc", "a/c", "a\nb/c", "x.y", "x/y", "src/engine/.git/HEAD", "a/b/c/d/e"]
    paths += ["".join(rng.choice(NAMES) for _ in range(rng.randint(1, 8))) for _ in range(250)]
    return patterns, paths


def test_the_matchers_agree_with_the_defining_expression_on_a_corpus() -> None:
    patterns, paths = _corpus()
    kinds = {True: 0, False: 0}
    for pattern in patterns:
        try:
            expected = re.compile(_defining_expression(pattern), re.DOTALL)
        except re.error:
            with pytest.raises(re.error):
                compile_glob(pattern)
            continue
        tokens = globs._tokens(pattern)
        # each way of matching, on every pattern it can take (compile_glob picks one)
        matchers = [compile_glob(pattern), globs._Automaton(tokens).matches,
                    _matcher(globs._plain_expression(tokens))]
        if globs._stays_in_components(tokens):
            matchers.append(_matcher(globs._atomic_expression(tokens)))
        kinds[len(matchers) == 4] += 1
        for path in paths:
            want = expected.match(path) is not None
            assert [matcher(path) for matcher in matchers] == [want] * len(matchers), (pattern, path)
    assert kinds[True] > 100 and kinds[False] > 100


def _matcher(expression: str) -> globs.Matcher:
    match = re.compile(expression, re.DOTALL).match
    return lambda path: match(path) is not None


def test_normalised_patterns_of_the_ignore_files_take_the_fast_way() -> None:
    for pattern in ("bundles", "*.md", "**/*.o", "src/**/test", "a/*/b", "*", "**", "a/**", "**/*a*/**/b*", "[ab]*"):
        assert globs._stays_in_components(globs._tokens(os.path.normpath(pattern))), pattern


@pytest.mark.parametrize("pattern, path", [
    ("*a" * 30 + "*b", "a" * 4000),  # within one component: the fast way
    ("**/" + "*a" * 30 + "*b", "x/" * 50 + "a" * 4000),
    ("**" + "a**" * 30 + "b", "a" * 3000),  # stars that cross components: the automaton
    ("x[!.]" + "*a" * 30 + "*b", "x/" + "a" * 4000),
])
def test_many_stars_against_a_long_name_do_not_backtrack(pattern: str, path: str) -> None:
    assert without_hanging(_matches, pattern, path) is False
    assert without_hanging(_matches, pattern, path + "b") is True


def _matches(pattern: str, path: str) -> bool:
    return compile_glob(pattern)(path)


def test_an_invalid_class_is_an_re_error() -> None:
    for pattern in ("[]", "[z-a]", "a/[z-a]*"):
        with pytest.raises(re.error):
            compile_glob(pattern)
