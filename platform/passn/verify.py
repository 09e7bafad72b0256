"""Answer extraction and checking: the verifier behind every pass@N number.

- :func:`extract_answer`: whichever comes last of the last ``\\boxed{...}`` (nested braces; else
  ``\\fbox{...}``) and a closing "final answer is X" / "Final Answer: X" sentence, else a one-line
  direct answer; ``None`` when there is no answer.
- :func:`answers_match`: ``mode="symbolic"`` (the default) accepts what exact mode accepts plus
  exact rational equality of numbers (mixed numbers, thousands separators, a unit or percent sign
  on one side) plus math-verify's symbolic equivalence; ``mode="exact"`` is the paper's Minerva
  normalisation and string equality, guarded so that an accept never rests on what the
  normalisation threw away (the left side of an equation, a list's separators, two different units).
- :class:`AnswerChecker`: runs math-verify in killable, memory-capped worker processes with a
  per-check time bound and a cache. math-verify's own timeout uses ``signal.alarm`` (main thread
  only) and cannot stop C-level work such as ``9^9^9^9``; a killed process can.

A check that times out, runs out of memory or cannot be parsed is *incorrect* with a reason; it
never raises into the caller and never hangs. No pre-check accepts unless the two sides are provably
equal, and none rejects unless they are provably different (exact numbers, units, letters, words or
times of day that differ, a number against a multiple of it); everything else is math-verify's.
The policies where public graders disagree are in docs/VERIFY.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import unicodedata
from fractions import Fraction
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

Mode = Literal["symbolic", "exact"]

# ---------------------------------------------------------------------------------------------
# Unicode and extraction
# ---------------------------------------------------------------------------------------------

# Zero-width and bidirectional-control characters: invisible, but they make equal answers differ.
_INVISIBLE = dict.fromkeys(
    [0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD, 0x200E, 0x200F,
     *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2012": "-", "\ufe63": "-", "\uff0d": "-"})
# NFKC turns "m²" into "m2" and "x₁" into "x1": a power and an index become a different number.
_SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻", "0123456789+-"))
_SUBSCRIPTS = dict(zip("₀₁₂₃₄₅₆₇₈₉₊₋", "0123456789+-"))
_SCRIPT_RUN = re.compile(f"[{''.join(_SUPERSCRIPTS)}]+|[{''.join(_SUBSCRIPTS)}]+")


def _script_to_latex(match: re.Match[str]) -> str:
    run = match.group(0)
    table, mark = (_SUPERSCRIPTS, "^") if run[0] in _SUPERSCRIPTS else (_SUBSCRIPTS, "_")
    body = "".join(table[ch] for ch in run)
    return f"{mark}{body}" if len(body) == 1 else f"{mark}{{{body}}}"


def normalise_unicode(text: str) -> str:
    """Super/subscripts to ``^``/``_``, then NFKC, minus-like dashes to '-', invisibles removed, ends stripped."""
    text = _SCRIPT_RUN.sub(_script_to_latex, text)
    return unicodedata.normalize("NFKC", text).translate(_MINUS_SIGNS).translate(_INVISIBLE).strip()


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each ``{`` -> index of its ``}``, escaped braces skipped: one pass, however deep."""
    match, stack = {}, []
    for i, ch in enumerate(text):
        if ch in "{}" and i and text[i - 1] == "\\":
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            match[stack.pop()] = i
    return match


@dataclasses.dataclass(frozen=True)
class _Box:
    answer: str
    start: int
    end: int


def _boxes(text: str, command: str) -> list[_Box]:
    """Every ``command{...}`` (or ``command 5``) that closes, outermost only, in order."""
    match = _matching_braces(text) if command in text else {}
    boxes: list[_Box] = []
    for m in re.finditer(re.escape(command) + r"(?![A-Za-z])", text):
        if boxes and m.start() < boxes[-1].end:
            continue  # a box inside a box
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            if j in match:
                boxes.append(_Box(text[j + 1 : match[j]], m.start(), match[j] + 1))
        elif j > m.end() and (token := _BOX_TOKEN.match(text, j)):  # "\boxed 5": one token
            boxes.append(_Box(token.group(0), m.start(), token.end()))
    return boxes


_BOX_TOKEN = re.compile(r"[^\s$\\][^\s$]*")  # not "\boxed \boxed{...}": a command is no answer

# Boxes side by side ("\boxed{1}, \boxed{2}", "\boxed{1} \quad\text{and}\quad \boxed{2}") are one
# answer, a list; "\boxed{1} no no no no no \boxed{2}" is not (Math-Verify's tests draw the line
# there). "First \boxed{1}, then finally \boxed{2}" revises the first box, and in
# "\boxed{12} \div 4 = \boxed{3}" the boxes are parts of one calculation: the answer is the last box.
# A hedge ("\boxed{3} or \boxed{5}", "\boxed{2}, not \boxed{3}") is the list: no box alone passes.
_BOX_GAP_CHARS, _BOX_GAP_WORDS = 32, 3
_REVISION_WORDS = {"then", "finally", "but", "so", "thus", "hence", "therefore", "correcting", "corrected", "actually",
                   "instead", "wait", "answer", "is", "was", "final"}
_RULE = re.compile(r"([-+=*~_])\1{2,}")  # "++++++", "-----": a separator, not a calculation
_LABEL = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?\s*=\s*$")  # "... and y_2 = \boxed{..}": the next box's name
_CALCULATION = re.compile(r"[=+*/^<>-]|\\(?:div|times|cdot|pm|mp|le|ge|leq|geq|neq|approx)(?![A-Za-z])")


def _final_boxes(boxes: list[_Box], text: str) -> str:
    """The last box, joined with the boxes just before it that stand beside it."""
    group = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        gap = text[box.end : group[0].start]
        words = [w.lower() for w in re.findall(r"(?<![\\A-Za-z])[A-Za-z]{2,}", gap)]  # not LaTeX commands (\quad)
        if (len(gap) > _BOX_GAP_CHARS or "\n\n" in gap or len(words) > _BOX_GAP_WORDS
                or set(words) & _REVISION_WORDS or _CALCULATION.search(_RULE.sub("", _LABEL.sub("", gap)))):
            break
        group.insert(0, box)
    return ", ".join(b.answer.strip() for b in group)


# "The final answer is X", "Final Answer: X", "**Final Answer:** X", "My final answer is: X" (the
# answer on the same line or the next), and PRM800K's "# Answer" heading, answer on the lines below.
_FINAL_ANSWER_START = re.compile(r"final answer(?:\*\*)?\s*(?:is\b\s*:?|:)(?:\*\*)?[ \t]*(?:\n[ \t]*)?|^#+[ \t]*Answer[ \t]*\n\s*",
                                 re.IGNORECASE | re.MULTILINE)
_HOPE = re.compile(r"I hope it is correct", re.IGNORECASE)
_FULL_STOP = re.compile(r"\.(?=\s|$)")  # not the point of 3.14
_LONE_MATH_SPAN = re.compile(r"\$\$?([^$]*)\$\$?")


def _final_answer_sentence(text: str) -> tuple[str, int] | None:
    """The answer of the last "final answer is X" sentence and where the sentence starts.

    The answer ends at Minerva's "I hope it is correct", at the sentence's full stop (outside math:
    ``$3.5$`` keeps its point) or at the end of the line; a lone ``$...$`` around it is dropped,
    and an answer of several math spans ("$3$ or $5$") is kept whole, for the checker to see them all.
    """
    starts = list(_FINAL_ANSWER_START.finditer(text))
    if not starts:
        return None
    last = starts[-1]
    rest = text[last.end():]
    if rest.startswith("$$"):  # displayed math may span lines
        close = rest.find("$$", 2)
        answer = rest[: close + 2] if close > 0 else rest
    else:
        answer = rest.split("\n", 1)[0]
        outside = re.sub(r"\$[^$]*\$", lambda m: "_" * len(m.group(0)), answer)  # full stops inside math don't end it
        cuts = [m.start() for m in (_HOPE.search(outside), _FULL_STOP.search(outside)) if m is not None]
        answer = answer[: min(cuts)] if cuts else answer
    answer = answer.strip().strip("*").strip().rstrip(".").strip()
    if (lone := _LONE_MATH_SPAN.fullmatch(answer)) is not None:
        answer = lone.group(1).strip()
    return (answer, last.start()) if answer else None


# A completion that ends with displayed math and has no box or final-answer sentence answers with it.
_CLOSING_DISPLAY = re.compile(r"(?:\\\[((?:(?!\\\[).){1,2000}?)\\\]|\$\$((?:(?!\$\$).){1,2000}?)\$\$)[\s.]*$", re.DOTALL)


def extract_answer(completion: str | None) -> str | None:
    """The final answer in a completion, or ``None`` when it has none.

    The last ``\\boxed{...}`` (nested braces kept; else the last ``\\fbox{...}``) or the last
    "The final answer is X" / "Final Answer: X" sentence (Minerva's format and its variants),
    whichever comes later: a box inside the sentence is its answer, and a closing sentence after
    an intermediate box wins. Boxes side by side at the end (``\\boxed{1}, \\boxed{2}``, at most
    three words apart) are one answer, the list ``1, 2``: two boxed guesses are not two chances.
    With neither, a completion that ends with displayed math (``\\[ 9 \\]``, ``$$ 9 $$``) answers with it. Else the completion itself when it is a single non-empty line (a
    direct answer). A box that never closes, and nothing else, means the answer was cut off.
    Unicode is normalised first.
    """
    if completion is None:
        return None
    text = normalise_unicode(completion)
    boxes = _boxes(text, "\\boxed") or _boxes(text, "\\fbox")
    sentence = _final_answer_sentence(text)
    if sentence is not None and (not boxes or sentence[1] >= boxes[-1].end):
        if "\\boxed" in sentence[0] or "\\fbox" in sentence[0]:
            return None  # "The final answer is \\boxed{..." cut off inside the box
        return sentence[0]
    if boxes:
        return _final_boxes(boxes, text) or None
    if "\\boxed" in text or "\\fbox" in text:
        return None  # a box that never closes: the answer was cut off
    if (display := _CLOSING_DISPLAY.search(text)) is not None:
        return (display.group(1) or display.group(2)).strip() or None
    if text and "\n" not in text:  # a direct answer; a lone $...$ around it is dropped
        lone = _LONE_MATH_SPAN.fullmatch(text)
        return (lone.group(1).strip() if lone else text) or None
    return None


# ---------------------------------------------------------------------------------------------
# The paper's exact mode: Minerva's normalisation (Lewkowycz et al. 2022, Appendix D.1)
# ---------------------------------------------------------------------------------------------

_SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]
_REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
    "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}",
    "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ",
    r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
]
# The removed expressions that name a unit: two answers with different ones are different.
_UNIT_WORDS = [e for e in _REMOVED_EXPRESSIONS if e.isalpha()] + ["\\text{m}"]


TRIG_FUNCTION = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)\b")
# ",\!" between digit groups of 2 or 3 (40,\!000; Indian 56,\!01,\!78) is LaTeX's thousands markup.
_DIGIT_GROUP = re.compile(r"(?<=\d),\\!(?=\d{2,3}(?!\d))")
_ONE_MATH_SPAN = re.compile(r"\s*\$([^$]*)\$[\s.]*")


def _minerva_body(answer: str, guarded: bool = False) -> str:
    """Minerva's normalisation of one side of an equation, before its comma rule.

    ``guarded`` keeps what tells answers apart and Minerva throws away: an article ``a`` is dropped
    only at the start before a number (``a 5`` is 5; ``4 a c`` and ``a b`` keep their ``a``); ``\\overline``, ``\\ldots`` and, inside a
    trigonometric function, ``^\\circ`` stay; ``,\\!`` between digit groups goes, and otherwise
    ``{,}`` and ``,\\!`` become commas for the thousands rule (``3{,}5`` may be a decimal comma); and only a lone ``$...$`` span is unwrapped (``-$5$`` is not ``5``).
    """
    if guarded:
        answer = _DIGIT_GROUP.sub("", re.sub(r"^\s*an? (?=[\d$\\])", "", answer)).replace("{,}", ",").replace(",\\!", ",")
        kept = {"\\ldots", "\\dots", "{,}", ",\\!"} | ({r"^\circ", r"^{\circ}"} if TRIG_FUNCTION.search(answer) else set())
        if answer.count("$") >= 2:
            span = _ONE_MATH_SPAN.fullmatch(answer)
            answer = span.group(1) if span else answer.replace("$", "")
    substitutions = _SUBSTITUTIONS[2:] if guarded else _SUBSTITUTIONS
    for before, after in substitutions:
        answer = answer.replace(before, after)
    for expr in _REMOVED_EXPRESSIONS:
        if not guarded or expr not in kept:
            answer = answer.replace(expr, "")
    if answer.count("$") >= 2:  # without two '$' this pattern backtracks quadratically
        answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    if not guarded:
        answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    return answer.replace("$", "")


def minerva_normalise(answer: str) -> str:
    """Minerva's ``normalize_final_answer`` as published: the normalisation behind the paper's exact match.

    It keeps only what follows the last ``=`` and strips every comma from a string of digits and
    commas; :func:`exact_match` uses it guarded.
    """
    answer = _minerva_body(answer.split("=")[-1])
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


# What may stand left of '=' when the answer is the value on the right: x, y_1, f(x), \theta, AB.
_NAME = re.compile(r"\s*(?:[A-Za-z]|\\(?:alpha|beta|gamma|delta|theta|lambda|mu|phi|varphi|omega|sigma|rho|tau|psi)"
                   r"|[A-Z]{2,3})(?:_\{?\w+\}?)?'*(?:\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])*\s*\))?\s*")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+")
_GLUED_UNIT = re.compile(r"\d(?:" + "|".join(w for w in _UNIT_WORDS if w.isalpha()) + r")(?![A-Za-z])")


@dataclasses.dataclass(frozen=True)
class _ExactKey:
    key: str
    units: frozenset[str]  # the unit words the normalisation removed
    variable: str | None  # the plain variable named left of "=" (x in "x = 3"); None for f(x) or none


def _exact_key(answer: str) -> _ExactKey:
    """Minerva's normalisation with its unsafe steps guarded (see :func:`_minerva_body`).

    - ``lhs = value`` keeps the value only when ``lhs`` names a quantity (``x``, ``f(x)``); any
      other equation is kept whole, each side normalised: ``a + 3z = 0`` is not the number 0.
    - Commas are dropped only from a thousands-separated number (``32,349``), not from a list
      (``32, 349``, ``1,2,3``) nor a decimal comma (``3{,}5``).
    - A unit word glued to a number (``10cm``) is not removed: in LaTeX it is a product.
    """
    sides = answer.split("=")
    named = len(sides) > 1 and all(_NAME.fullmatch(side.strip().strip("$")) for side in sides[:-1])
    parts = sides[-1:] if len(sides) == 1 or named else sides
    variable = sides[0].strip().strip("$").strip() if named and "(" not in sides[0] else None
    keys, units = [], set()
    for part in parts:
        spaced = part.replace("{,}", ",").replace(",\\!", ",").strip().strip("$").strip()
        units |= {w for w in _UNIT_WORDS if w in part.replace(" ", "")}
        key = part.replace(" ", "") if _GLUED_UNIT.search(part) else _minerva_body(part, guarded=True)
        if key.replace(",", "").lstrip("-").isdigit() and _THOUSANDS.fullmatch(spaced):
            key = key.replace(",", "")
        keys.append(key)
    return _ExactKey("=".join(keys), frozenset(units), variable)


def exact_match(prediction: str, reference: str) -> bool:
    """The paper's exact mode: string equality after Minerva's normalisation, guarded.

    Equal only when the normalised strings are equal and the normalisation threw nothing away that
    tells them apart: an equation's left side (see :func:`_exact_key`), list separators, two
    different units (``5 km`` is not ``5 cm``; ``5 cm`` is ``5``), or two different variables
    (``y = 3`` is not ``x = 3``; ``y = 2x+3`` is ``f(x) = 2x+3``).
    """
    a, b = _exact_key(prediction), _exact_key(reference)
    if a.variable and b.variable and a.variable.replace(" ", "") != b.variable.replace(" ", ""):
        return False
    return a.key == b.key and (a.units == b.units or not a.units or not b.units)


# ---------------------------------------------------------------------------------------------
# Numbers compared as exact rationals: most MATH answers, no sympy
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Number:
    value: Fraction
    decimal: bool  # written with a decimal point: rounding may be meant
    unit: str  # "" when none: "cm^2", "week", "degree", "dollar"
    percent: bool


# Units a number may carry: Minerva's removed words and the units of MATH-style answers. A word
# after a number is its unit only if it is one of these (singular or plural).
UNIT_WORDS = frozenset("""
    square cubic sq unit ways way integer digit multiple point edge student meal dollar cent mph
    inch in foot feet ft yard yd mile mi meter metre m centimeter centimetre cm millimeter millimetre mm
    kilometer kilometre km gram g kilogram kg milligram mg pound lb lbs ounce oz ton liter litre l
    milliliter ml gallon gal second sec s minute min hour hr hrs day week month year degree
    person people child children ticket book page box coin marble apple candy candies cookie
""".split())
# Words that change the number they follow: "2 million" is not 2, nor "5 squared" 5.
MULTIPLIER_WORDS = frozenset("""
    hundred thousand million billion trillion dozen half halves third fourth quarter fifth sixth
    seventh eighth ninth tenth squared cubed times
""".split())
# Short units count after a space or inside \text{} only: glued to a number ("10cm") they are a
# product of variables in LaTeX (MARIO's tests).
_GLUED_UNIT_MIN_LETTERS = 3

_LATEX_SPACE = re.compile(r"\\[ ,;:!>]|~|\\quad|\\qquad")
_TEXT_COMMAND = re.compile(r"\\(?:text|textrm|textnormal|textbf|mbox|mathrm|mathit|mathcal)\s*\{([^{}]*)\}")
# One unit token at the very end: \text{ cm}, a word, either with ^2 or ^3. Possessive and
# anchored: linear in the answer's length whatever it holds.
_UNIT_TOKEN = re.compile(r"(?:\\(?:text|textrm|textnormal|mbox|mathrm)\s*+\{([^{}]*+)\}|(?<![A-Za-z\\])([A-Za-z]++))"
                         r"((?:\s*+\^\s*+\{?\s*+[23]\s*+\}?)?)\s*+$")
DEGREE_SIGN = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_TRAILING_DEGREES = re.compile(rf"\s*(?:{DEGREE_SIGN.pattern})\s*$")
_UNSIGNED = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+"
_DECIMAL = re.compile(rf"({_UNSIGNED})")
_FRACTION = re.compile(r"\\[dt]?frac\{\s*(-?)\s*(\d+)\s*\}\{\s*(\d+)\s*\}|\\[dt]?frac(\d)(\d)|(\d+)\s*/\s*(\d+)")
_MIXED = re.compile(r"(\d+)\s+(\d+)\s*/\s*(\d+)|(\d+)\s*\\[dt]?frac\{(\d+)\}\{(\d+)\}|(\d+)\s*\\[dt]?frac(\d)(\d)")


def _rational(text: str) -> tuple[Fraction, bool] | None:
    """(value, written as a decimal) of an unsigned-or-signed integer, decimal, fraction or mixed number."""
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-").strip()
    if m := _DECIMAL.fullmatch(text):
        return sign * Fraction(m.group(1).replace(",", "")), "." in text
    if m := _FRACTION.fullmatch(text):
        if m.group(2) is not None:
            num, den, inner = int(m.group(2)), int(m.group(3)), -1 if m.group(1) else 1
        elif m.group(4) is not None:
            num, den, inner = int(m.group(4)), int(m.group(5)), 1
        else:
            num, den, inner = int(m.group(6)), int(m.group(7)), 1
        return (sign * inner * Fraction(num, den), False) if den else None
    if m := _MIXED.fullmatch(text):  # 7 3/4, 7\frac{3}{4}: a whole part and a proper fraction
        whole, num, den = (int(g) for g in next(m.groups()[i : i + 3] for i in (0, 3, 6) if m.group(i + 1)))
        return (sign * (whole + Fraction(num, den)), False) if 0 < num < den else None
    return None


def singular_unit(word: str) -> str:
    """``weeks`` -> ``week``, ``inches`` -> ``inch``: the unit's name for comparing two units."""
    word = word.lower()
    if word in UNIT_WORDS or word in MULTIPLIER_WORDS:
        return word
    for ending in ("es", "s"):
        if word.endswith(ending) and (word[: -len(ending)] in UNIT_WORDS or word[: -len(ending)] in MULTIPLIER_WORDS):
            return word[: -len(ending)]
    return word


class _NotANumber(Exception):
    """The text after the number changes its value (a multiplier): ``args[0]`` is the text before it."""


def _split_unit(text: str) -> tuple[str, str]:
    """(the number's text, its unit) with up to three unit tokens taken off the end; unit "" if none.

    Raises :class:`_NotANumber` for a multiplier word ("2 million"); an unknown word leaves the
    text whole (``("5 apples and", "")``), for the caller to see that it is no number.
    """
    words: list[str] = []
    for _ in range(3):
        m = _UNIT_TOKEN.search(text)
        if m is None or m.start() == 0:
            break
        inside_text = m.group(1) is not None
        tokens = (m.group(1) if inside_text else m.group(2)).split()
        names = [singular_unit(t) for t in tokens]
        if any(n in MULTIPLIER_WORDS for n in names):
            raise _NotANumber(text[: m.start()])
        glued = not inside_text and text[m.start() - 1].isdigit()
        if not names or any(n not in UNIT_WORDS for n in names) or (glued and len(tokens[0]) < _GLUED_UNIT_MIN_LETTERS):
            break
        words.insert(0, " ".join(names) + m.group(3).replace(" ", "").replace("{", "").replace("}", ""))
        text = text[: m.start()]
    return text, " ".join(words)


def _parse_number(text: str) -> _Number | None:
    """A number, optionally with a percent sign or a unit written after it (or \\$ before it)."""
    if len(text) > 1000:
        return None  # past int()'s 4300-digit limit and far past any real answer: math-verify decides
    text = _LATEX_SPACE.sub(" ", text).strip().strip("$").strip().rstrip(".").strip()
    if (m := _TEXT_COMMAND.fullmatch(text)) is not None:
        text = m.group(1).strip()  # \text{5 cm}
    unit, percent = "", False
    if text.startswith("\\$"):
        text, unit = text[2:].strip(), "dollar"
    if text.endswith("%"):
        text, percent = text[:-1].rstrip("\\").strip(), True
    elif (m := _TRAILING_DEGREES.search(text)) is not None:
        text, unit = text[: m.start()], "degree"
    else:
        text, written_unit = _split_unit(text)
        unit = written_unit or unit
    parsed = _rational(text.strip())
    return None if parsed is None else _Number(parsed[0], parsed[1], unit, percent)


@dataclasses.dataclass(frozen=True)
class _Multiplied:
    bare: Fraction | None  # the number before the multiplier word: "2 million" -> 2


def _number_or_multiplied(text: str) -> _Number | _Multiplied | None:
    try:
        return _parse_number(text)
    except _NotANumber as before:
        head = _rational(_LATEX_SPACE.sub(" ", before.args[0]).strip().strip("$").strip())
        return _Multiplied(None if head is None else head[0])


# A number with letters glued to it that name no unit is a product: 10m is 10 times m, 3abc 3 a b c.
_NUMBER_TIMES_LETTERS = re.compile(r"-?\d+(?:\.\d+)?[A-Za-z]+")


def compare_numbers(prediction: str, reference: str) -> Verdict | None:
    """Exact rational comparison when both sides are numbers; ``None`` hands over to math-verify.

    Accepts equal values written differently (``0.5`` and ``\\frac12``, ``7 3/4`` and
    ``\\frac{31}{4}``, ``32,349`` and ``32349``), a unit or a percent sign on one side only (``10``
    and ``10 \\text{cm}^2``, ``50\\%`` and ``50``), and the same unit on both. Units are the words of
    :data:`UNIT_WORDS`. Rejects two different units (no conversion: ``5 km`` is not ``5 cm``, nor
    ``500 cm``), different values when neither has a decimal point and both carry the same unit (or
    none), and a number against the same number with a multiplier word (``2`` and ``2 million``,
    ``5 squared``) or with letters glued to it that name no unit (``10`` and ``10m``, ``3abc``).
    Decimals may be rounded and a percent sign on one side only may mean a hundredth: math-verify's.
    """
    a, b = _number_or_multiplied(prediction), _number_or_multiplied(reference)
    if isinstance(a, _Multiplied) or isinstance(b, _Multiplied):
        multiplied, other = (a, b) if isinstance(a, _Multiplied) else (b, a)
        if isinstance(other, _Number) and multiplied.bare == other.value:
            return Verdict(False, "not_equivalent")  # "2 million" is not 2
        return None
    if (a is None) != (b is None) and _NUMBER_TIMES_LETTERS.fullmatch((prediction if a is None else reference).strip()):
        return Verdict(False, "not_equivalent")
    if a is None or b is None:
        return None
    if a.unit and b.unit and a.unit != b.unit:
        return Verdict(False, "not_equivalent")  # no unit conversion: 5 km is not 5 cm
    if a.value == b.value and (a.percent == b.percent or not (a.unit or b.unit)):
        return Verdict(True, "symbolic")
    if a.decimal or b.decimal or a.percent != b.percent or bool(a.unit) != bool(b.unit):
        return None
    return Verdict(False, "not_equivalent")


# ---------------------------------------------------------------------------------------------
# Bounded, cached checking
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a prediction matches the reference, and why.

    ``reason`` is one of: exact, symbolic, not_equivalent, ambiguous (a prediction in prose or with
    several math spans that hedges or negates, or holds several answers), empty, parse_error,
    timeout, memory, worker_died, too_long.
    """

    correct: bool
    reason: str


@dataclasses.dataclass
class CheckerStats:
    checks: int = 0
    cache_hits: int = 0
    exact_hits: int = 0
    numeric_hits: int = 0
    worker_checks: int = 0
    timeouts: int = 0
    restarts: int = 0


_TIME_OF_DAY = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(?:\\text\{\s*)?(?:([AaPp])\.?\s*[Mm]\.?)?\}?")


def _time_of_day(text: str) -> tuple[int, bool] | None:
    """(seconds since midnight, written unmistakably as a time: with seconds or AM/PM) or None.

    A 12-hour clock: 12:05 AM is 00:05, 08:34 PM is 20:34.
    """
    m = _TIME_OF_DAY.fullmatch(text.strip().strip("$").strip())
    if m is None:
        return None
    hours, minutes, seconds = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if m.group(4):
        if not 1 <= hours <= 12:
            return None
        hours = hours % 12 + (12 if m.group(4) in "Pp" else 0)
    if hours >= 24 or minutes >= 60 or seconds >= 60:
        return None
    return hours * 3600 + minutes * 60 + seconds, bool(m.group(3) or m.group(4))


def compare_times(prediction: str, reference: str) -> Verdict | None:
    """Times of day compared as seconds since midnight (``20:34``, ``20:34:00``, ``08:34 P.M.``).

    ``None`` unless both sides read as times: math-verify reads ``20:34`` as the ratio 20/34. Two
    different ``h:mm`` without seconds or AM/PM may be equal ratios (``2:30``, ``1:15``): math-verify's.
    """
    a, b = _time_of_day(prediction), _time_of_day(reference)
    if a is None or b is None:
        return None
    if a[0] == b[0]:
        return Verdict(True, "exact")
    return Verdict(False, "not_equivalent") if a[1] or b[1] else None


# ---------------------------------------------------------------------------------------------
# Text answers: a letter (a choice, a point) or words
# ---------------------------------------------------------------------------------------------

_LETTER = re.compile(r"\(?([A-Za-z])\)?('*)")
_WORDS = re.compile(r"[A-Za-z]{2,}(?: [A-Za-z]{2,})*")


def compare_text(prediction: str, reference: str) -> Verdict | None:
    """Letters and words compared as text; ``None`` when either side is not plain text.

    A single letter (a choice ``(C)``, a point ``E'``) must match exactly, case and primes
    included: ``E'`` is not ``E``. Words of three letters or more match ignoring case (``East`` is
    ``east``); shorter ones exactly (``ab`` is a product, ``AB`` a segment). Text and font commands
    around them are dropped (``\\text{(C)}`` is ``C``, ``\\mathcal{B}`` is ``B``), but not bold
    (``\\mathbf{v}`` is a vector, not ``v``).
    """
    a, b = (_TEXT_COMMAND.sub(r"\1", s).strip().strip("$").strip().rstrip(".") for s in (prediction, reference))
    if (la := _LETTER.fullmatch(a)) and (lb := _LETTER.fullmatch(b)):
        same = la.groups() == lb.groups()
    elif _WORDS.fullmatch(a) and _WORDS.fullmatch(b):
        short = min(map(len, (a + " " + b).split())) < 3
        same = a == b if short else a.lower() == b.lower()
    else:
        return None
    return Verdict(same, "exact" if same else "not_equivalent")


# Up to this length the parent normalises in-process (microseconds); longer strings are normalised
# inside the worker, under its time bound.
_PARENT_NORMALISE_CHARS = 1000


class _Worker:
    """One math-verify process: JSON lines in and out, RLIMIT_AS set by the child itself."""

    def __init__(self, memory_bytes: int, startup_timeout_s: float, parse_cache: bool) -> None:
        self.memory_bytes = memory_bytes
        self.parse_cache = parse_cache
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._ready = False
        self._spawner: threading.Thread | None = None

    def _spawn(self) -> None:
        """Start the process without waiting: after a kill, the import overlaps the caller's work."""
        source_root = str(Path(__file__).resolve().parent.parent)
        code = f"import sys; sys.path.insert(0, {source_root!r}); from passn._verify_worker import main; main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(self.memory_bytes), "cache" if self.parse_cache else "no-cache"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the caller does not kill it mid-line
        )
        self._buffer = b""
        self._ready = False

    def _spawn_in_background(self) -> None:
        """Fork the replacement off the caller's path: forking a large process takes a while."""
        self._spawner = threading.Thread(target=self._spawn, daemon=True)
        self._spawner.start()

    def _ensure_ready(self) -> None:
        if self._spawner is not None:
            self._spawner.join()
            self._spawner = None
        if self.proc is None:
            self._spawn()
        if not self._ready:
            if self._read_line(self.startup_timeout_s) != b"ready":
                self.kill()
                raise RuntimeError("the answer-checking worker did not start (is math-verify installed?)")
            self._ready = True

    def kill(self) -> None:
        if self._spawner is not None:
            self._spawner.join()
            self._spawner = None
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()  # type: ignore[union-attr]
                except OSError:
                    pass
        self.proc = None

    def _read_line(self, timeout_s: float) -> bytes | None:
        """The next line from the worker, or None on timeout or end of stream."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def check(self, items: Sequence[tuple[str, str]], mode: Mode, timeout_s: float, stats: CheckerStats,
              window: int = 32) -> list[Verdict]:
        """Check (prediction, reference) pairs in order; each gets ``timeout_s`` of worker time."""
        verdicts: list[Verdict] = []
        while len(verdicts) < len(items):
            self._ensure_ready()
            batch = items[len(verdicts) : len(verdicts) + window]
            payload = b"".join(json.dumps([p, r, mode]).encode() + b"\n" for p, r in batch)
            try:
                self.proc.stdin.write(payload)  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError):
                self.kill()
                stats.restarts += 1
                verdicts.append(Verdict(False, "worker_died"))
                continue
            for _ in batch:
                line = self._read_line(timeout_s)
                if line is None:
                    died = self.proc.poll() is not None
                    self.kill()
                    self._spawn_in_background()
                    stats.restarts += 1
                    if not died:
                        stats.timeouts += 1
                    verdicts.append(Verdict(False, "worker_died" if died else "timeout"))
                    break  # the rest of the batch is re-sent to a fresh worker
                correct, reason = json.loads(line)
                verdicts.append(Verdict(bool(correct), reason))
        return verdicts


class AnswerChecker:
    """Checks answers against references with bounded time and memory, caching every verdict.

    ``timeout_s`` bounds each math-verify check (the worker is killed and restarted when it is
    exceeded); ``memory_mb`` caps each worker's address space; ``workers`` processes check cache
    misses in parallel. The cache key is (normalised prediction, normalised reference); workers also
    cache math-verify's parse of each answer. ``cache=False`` turns both off. Thread-safe.
    """

    def __init__(self, mode: Mode = "symbolic", timeout_s: float = 2.0, memory_mb: int = 2048,
                 workers: int = 1, cache_size: int = 1_000_000, max_answer_chars: int = 4096,
                 startup_timeout_s: float = 60.0, cache: bool = True) -> None:
        if mode not in ("symbolic", "exact"):
            raise ValueError(f"mode must be 'symbolic' or 'exact', got {mode!r}")
        if timeout_s <= 0 or memory_mb < 256 or workers < 1:
            raise ValueError("need timeout_s > 0, memory_mb >= 256 and workers >= 1")
        self.mode = mode
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.cache_size = cache_size if cache else 0
        self.stats = CheckerStats()
        self._cache: dict[tuple[str, str], Verdict] = {}
        self._workers = [_Worker(memory_mb << 20, startup_timeout_s, cache) for _ in range(workers)]
        self._free = list(self._workers)
        self._lock = threading.Lock()
        self._worker_available = threading.Condition(self._lock)

    # -- public ----------------------------------------------------------------------------------

    def check(self, prediction: str | None, reference: str) -> Verdict:
        """The verdict for one prediction (an extracted answer, or None for "no answer")."""
        return self.check_many([(prediction, reference)])[0]

    def check_many(self, pairs: Iterable[tuple[str | None, str]]) -> list[Verdict]:
        """Verdicts for many (prediction, reference) pairs; misses run on all workers at once."""
        verdicts: list[Verdict | None] = []
        misses: dict[tuple[str, str], list[int]] = {}
        with self._lock:
            for i, (prediction, reference) in enumerate(pairs):
                self.stats.checks += 1
                verdict, key = self._fast_verdict(prediction, reference)
                verdicts.append(verdict)
                if verdict is None:
                    # without a cache every check runs (what the benchmark's "cache off" measures)
                    misses.setdefault(key if self.cache_size else (*key, str(i)), []).append(i)
        if misses:
            keys = list(misses)
            for key, verdict in zip(keys, self._run_on_workers([k[:2] for k in keys])):
                for i in misses[key]:
                    verdicts[i] = verdict
            with self._lock:
                for key, verdict in zip(keys, (verdicts[misses[k][0]] for k in keys)):
                    self._remember(key, verdict)  # type: ignore[arg-type]
        return verdicts  # type: ignore[return-value]

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _fast_verdict(self, prediction: str | None, reference: str) -> tuple[Verdict | None, tuple[str, str]]:
        pred = normalise_unicode(prediction) if prediction else ""
        ref = normalise_unicode(reference)
        key = (pred, ref)
        if not pred:
            return Verdict(False, "empty"), key
        cached = self._cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached, key
        if len(pred) > self.max_answer_chars:
            return self._remember(key, Verdict(False, "too_long")), key
        if pred == ref:
            self.stats.exact_hits += 1
            return self._remember(key, Verdict(True, "exact")), key
        if len(pred) > _PARENT_NORMALISE_CHARS or len(ref) > _PARENT_NORMALISE_CHARS:
            return None, key  # Minerva's regexes are quadratic: long strings go to a killable worker
        if exact_match(pred, ref):
            self.stats.exact_hits += 1
            return self._remember(key, Verdict(True, "exact")), key
        if self.mode == "exact":
            return self._remember(key, Verdict(False, "not_equivalent")), key
        numeric = compare_numbers(pred, ref)
        if numeric is not None:
            self.stats.numeric_hits += 1
            return self._remember(key, numeric), key
        for compare in (compare_text, compare_times):
            verdict = compare(pred, ref)
            if verdict is not None:
                return self._remember(key, verdict), key
        return None, key

    def _remember(self, key: tuple[str, str], verdict: Verdict) -> Verdict:
        if not self.cache_size:
            return verdict
        if len(self._cache) >= self.cache_size:
            del self._cache[next(iter(self._cache))]  # oldest first
        self._cache[key] = verdict
        return verdict

    def _run_on_workers(self, keys: list[tuple[str, str]]) -> list[Verdict]:
        shards = [keys[i :: len(self._workers)] for i in range(len(self._workers))]
        shards = [s for s in shards if s]

        def run(shard: list[tuple[str, str]]) -> list[Verdict]:
            with self._worker_available:
                while not self._free:
                    self._worker_available.wait()
                worker = self._free.pop()
            try:
                self.stats.worker_checks += len(shard)
                return worker.check(shard, self.mode, self.timeout_s, self.stats)
            finally:
                with self._worker_available:
                    self._free.append(worker)
                    self._worker_available.notify()

        if len(shards) == 1:
            results = [run(shards[0])]
        else:
            with ThreadPoolExecutor(len(shards)) as pool:
                results = list(pool.map(run, shards))
        out: list[Verdict] = [Verdict(False, "worker_died")] * len(keys)
        for s, result in enumerate(results):
            out[s :: len(self._workers)] = result
        return out


_default_checkers: dict[Mode, AnswerChecker] = {}
_default_lock = threading.Lock()


def default_checker(mode: Mode = "symbolic") -> AnswerChecker:
    """The process-wide checker for ``mode`` (created on first use, 2 s and 2 GiB per check)."""
    with _default_lock:
        if mode not in _default_checkers:
            _default_checkers[mode] = AnswerChecker(mode=mode)
        return _default_checkers[mode]


def check_answer(prediction: str | None, reference: str, mode: Mode = "symbolic") -> Verdict:
    """:func:`answers_match` with the reason: a :class:`Verdict`."""
    return default_checker(mode).check(prediction, reference)


def answers_match(prediction: str | None, reference: str, mode: Mode = "symbolic") -> bool:
    """True when ``prediction`` is a correct final answer for ``reference``.

    ``mode="symbolic"``: Minerva-normalised string equality (the paper's exact mode) or
    math-verify's symbolic equivalence. ``mode="exact"``: the paper's exact mode alone. Bounded in
    time and memory; failures are False (the reason: :func:`check_answer`).
    """
    return check_answer(prediction, reference, mode).correct
