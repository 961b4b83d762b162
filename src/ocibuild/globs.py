"""The globs of ``.containerignore`` / ``exclude`` patterns, matched in time linear in the path's length.

A pattern means what this regular expression (DOTALL) means, matched at the start of a '/'-separated relative
path: ``*`` is ``[^/]*``, ``?`` is ``[^/]``, ``**/`` is ``(?:.*/)?``, any other ``**`` is ``.*``, ``[...]`` is a
character class as ``re`` reads it (``[!...]`` negates, as ``[^...]``), every other character itself; then
``(?:/.*)?\\Z``: a pattern that matches a directory matches everything below it.

That expression, given to ``re``, can take exponential time: ``*a*a*a*a*a*b`` against a long name of ``a``s made
the engine try every way of splitting it between the stars. So it is used as it stands only for a pattern with at
most one star (``*``, ``**`` or ``**/``; most patterns are such), which ``re`` tries at most once per character.
Any other pattern:

- one whose stars stay within path components (no class can match '/', a ``**`` other than ``**/`` comes
  only last, a ``**/`` only first or after '/') is matched by an expression built so that ``re`` never backtracks
  into a choice it made: each component between two stars at the leftmost place it matches, each run of
  components after a ``**/`` at the leftmost component it matches, in atomic groups ``(?>…)``. Leftmost is the
  right choice because what follows is always a star that can take up whatever the choice leaves (the classic
  argument of the greedy wildcard matcher, here once within a component and once over components).
- any other (rare: ``a**b*c``; ``x[!.]*y*``, whose class matches '/') is matched by simulating its automaton over
  the path, one set of positions per character: O(len(path) × len(pattern)).

All three are checked against that expression over a corpus of patterns and paths (tests/unit/test_globs.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

#: A compiled pattern: whether it matches a path (or one of the path's directories).
Matcher = Callable[[str], bool]


class _Token(NamedTuple):
    kind: str  # "char" (one character: a literal, '?' or a class), "star", "globstar" (.*), "globstar/" ((?:.*/)?)
    regex: str  # of a "char": the expression of that one character
    slash: bool  # of a "char": whether it can match '/'


def compile_glob(pattern: str) -> Matcher:
    """The matcher of ``pattern``; ``re.error`` for an invalid character class (``[]``, ``[z-a]``)."""
    tokens = _tokens(pattern)
    if sum(token.kind != "char" for token in tokens) <= 1:
        expression = _plain_expression(tokens)
    elif _stays_in_components(tokens):
        expression = _atomic_expression(tokens)
    else:
        return _Automaton(tokens).matches
    match = re.compile(expression, re.DOTALL).match
    return lambda path: match(path) is not None


def _tokens(pattern: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            if not tokens or tokens[-1].kind != "globstar/":  # (two in a row mean what one means)
                tokens.append(_Token("globstar/", "", True))
            i += 3
            continue
        if pattern.startswith("**", i):
            tokens.append(_Token("globstar", "", True))
            i += 2
            continue
        if c == "*":
            tokens.append(_Token("star", "", False))
        elif c == "?":
            tokens.append(_Token("char", "[^/]", False))
        elif c == "[" and (end := pattern.find("]", i + 1)) != -1:
            body = pattern[i + 1 : end]
            if body.startswith(("^", "!")):
                body = "^" + body[1:]
            regex = f"[{body}]"
            tokens.append(_Token("char", regex, re.match(regex, "/") is not None))
            i = end
        else:
            tokens.append(_Token("char", re.escape(c), c == "/"))
        i += 1
    return tokens


def _plain_expression(tokens: list[_Token]) -> str:
    """The defining expression, for a pattern with at most one star: ``re`` can try it at most once per character
    of the path. (Its ``(?:/.*)?\\Z`` is written ``(?:/|\\Z)``: the same, for a match at the start.)"""
    return "".join({"star": "[^/]*", "globstar": ".*", "globstar/": "(?:.*/)?"}.get(token.kind, token.regex)
                   for token in tokens) + r"(?:/|\Z)"


def _stays_in_components(tokens: list[_Token]) -> bool:
    if not tokens or tokens[-1].regex == "/" or tokens[-1].kind == "globstar/":
        return False  # (a pattern IgnoreRules normalised never ends so)
    for i, token in enumerate(tokens):
        if token.kind == "char" and token.slash and token.regex != "/":
            return False  # a class that matches '/'
        if token.kind == "globstar" and i != len(tokens) - 1:
            return False
        if token.kind == "globstar/" and i > 0 and tokens[i - 1].regex != "/":
            return False
    return True


def _atomic_expression(tokens: list[_Token]) -> str:
    """The expression of a pattern that stays in components (see the module docstring)."""
    out = []
    group_open = False
    component: list[_Token] = []
    for token in [*tokens, _Token("end", "", False)]:
        if token.kind == "char" and token.regex != "/" or token.kind in ("star", "globstar"):
            component.append(token)
            continue
        if component:
            out.append(_component(component))
            component = []
        if token.regex == "/":
            out.append("/")
        elif token.kind == "globstar/":
            if group_open:
                out.append(")")
            out.append("(?>(?:[^/]*+/)*?")  # whole components skipped, as few as will do
            group_open = True
    if group_open:
        out.append(")")
    return "".join(out)


def _component(tokens: list[_Token]) -> str:
    """One component: its pieces between stars, each but the last at the leftmost place it matches; the last one
    ends the component (or, before a final ``**``, is followed by anything)."""
    pieces: list[list[str]] = [[]]
    for token in tokens:
        if token.kind == "char":
            pieces[-1].append(token.regex)
        elif token.kind == "star":
            pieces.append([])
    first, *middle = ["".join(piece) for piece in pieces]
    if tokens[-1].kind == "globstar":
        return first + "".join(f"(?>[^/]*?{piece})" for piece in middle) + ".*"
    if not middle:
        return f"(?>{first}(?=/|\\Z))"
    *middle, last = middle
    return f"(?>{first}" + "".join(f"(?>[^/]*?{piece})" for piece in middle) + f"[^/]*{last}(?=/|\\Z))"


class _Automaton:
    """The pattern as a nondeterministic automaton, simulated over the path: a state is a token position (a second
    state per ``**/``: inside it, before its '/'); one pass, each character moving every live state."""

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._chars = [re.compile(t.regex, re.DOTALL).fullmatch if t.kind == "char" else None for t in tokens]

    def _close(self, states: set[tuple[int, bool]], position: int) -> None:
        """Add ``position`` and every position reachable from it without a character."""
        while (position, False) not in states:
            states.add((position, False))
            if position == len(self._tokens) or self._tokens[position].kind == "char":
                return
            if self._tokens[position].kind == "globstar/":
                states.add((position, True))
            position += 1

    def matches(self, path: str) -> bool:
        end = len(self._tokens)
        states: set[tuple[int, bool]] = set()
        self._close(states, 0)
        for c in path:
            if (end, False) in states and c == "/":
                return True  # the pattern matched a directory of the path
            following: set[tuple[int, bool]] = set()
            for position, inside in states:
                if position == end:
                    continue
                kind = self._tokens[position].kind
                if inside:  # in the .*/ of a **/
                    following.add((position, True))
                    if c == "/":
                        self._close(following, position + 1)
                elif kind == "char":
                    test = self._chars[position]
                    if test is not None and test(c):
                        self._close(following, position + 1)
                elif kind == "globstar" or kind == "star" and c != "/":
                    self._close(following, position)
            if not following:
                return False
            states = following
        return (end, False) in states
