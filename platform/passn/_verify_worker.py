"""The answer-checking worker process behind :class:`passn.verify.AnswerChecker`.

Reads JSON lines ``[prediction, reference, mode]`` from stdin and writes ``[correct, reason]`` lines.
It caps its own address space first; the parent kills it when a check overruns its time bound.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import resource
import sys


_PARSE_CACHE = True

# A word of prose: three letters or more, not a LaTeX command, not inside \text{...}.
_PROSE_WORD = re.compile(r"(?<![\\{A-Za-z])[A-Za-z]{3,}(?![A-Za-z}])")
# In a prediction written as prose, math-verify takes the last expression; a hedge, negation or
# conjunction just before it makes that a guess ("not 5", "maybe 5 maybe 6", "5 apples and 6 pears").
_HEDGE_WORDS = frozenset("not no never isn't wrong incorrect neither nor maybe perhaps either or and instead rather".split())
_ANSWER_ITEM = re.compile(r"\$\$?[^$]+\$\$?|\\\(.+?\\\)|\\\[.+?\\\]|\d[\d,]*(?:\.\d+)?", re.DOTALL)
_DOLLAR_SPAN = re.compile(r"\$\$?[^$]+\$\$?")


def _glued_to_span(answer: str) -> bool:
    """A sign or digit touching a ``$...$`` span from outside ("-$5$", "2$\\sqrt{2}$", "$5$0")."""
    for span in _DOLLAR_SPAN.finditer(answer):  # left to right: each match opens and closes a span
        before = answer[span.start() - 1] if span.start() else ""
        after = answer[span.end()] if span.end() < len(answer) else ""
        if (before and before in "0123456789+-*/^=") or after.isdigit():
            return True
    return False
_UPRIGHT_CONSTANT = re.compile(r"\\mathrm\{\s*([ei])\s*\}")
_DOUBLED_COMMAND = re.compile(r"\\\\[A-Za-z]")  # \\frac: a command whose backslash was escaped again
_SINGLE_COMMAND = re.compile(r"(?<!\\)\\[A-Za-z]")


def _as_written(answer: str) -> bool:
    """An answer that delimits its own math or is a sentence: math-verify finds the expression in it."""
    return "$" in answer or "\\(" in answer or "\\[" in answer or len(_PROSE_WORD.findall(answer)) >= 2


def _ambiguous(prediction: str) -> bool:
    """A prediction math-verify reads as written whose last expression follows a hedge, a negation
    or a conjunction (within the three words since the expression before it): no single answer in it."""
    if not _as_written(prediction):
        return False
    items = list(_ANSWER_ITEM.finditer(prediction))
    if not items:
        return False
    since = items[-2].end() if len(items) > 1 else 0  # the words between the last two expressions
    before = re.findall(r"[A-Za-z']+", prediction[max(since, items[-1].start() - 60) : items[-1].start()])[-3:]
    return any(w.lower() in _HEDGE_WORDS for w in before)


def _broken_prefix(extracted: object, answer: str) -> bool:
    """math-verify stopped inside the answer: what it read is a prefix of the answer, and what it
    left out is more than units or text (``1 - \\frac{1}{\\mathrm{e}}`` read as ``1``, ``x + 4c`` as
    ``x + 4``). Then it did not read the answer, and gives no verdict on it."""
    from passn.verify import UNIT_WORDS, singular_unit

    if not isinstance(extracted, str):
        return False
    short, full = extracted.replace(" ", ""), answer.replace(" ", "").strip("$")
    if len(short) >= len(full) or not full.startswith(short):
        return False
    if short.count("{") != short.count("}"):
        return True
    left_out = _NOT_PART_OF_A_VALUE.sub(" ", _tail(answer, short))
    return bool(re.search(r"\d", left_out)) or any(
        singular_unit(w) not in UNIT_WORDS | _PERCENT_WORDS for w in re.findall(r"[A-Za-z]+", left_out))


_PERCENT_WORDS = frozenset({"percent", "pct"})
# What math-verify may leave out of an answer by its own rules: text, units' powers, %, degrees, punctuation.
_NOT_PART_OF_A_VALUE = re.compile(r"\\(?:text|textrm|textbf|textit|textnormal|mbox|mathrm)\{[^{}]*\}|\^\{?[23]\}?|\\?%|\^\{?\\circ\}?|[.,;:!$]")


def _tail(answer: str, prefix: str) -> str:
    """What follows, in ``answer``, its first ``len(prefix)`` characters that are not spaces."""
    count = 0
    for j, ch in enumerate(answer):
        if count == len(prefix):
            return answer[j:]
        if not (ch.isspace() or (ch == "$" and count == 0)):
            count += 1
    return ""


def _parse_uncached(answer: str) -> tuple:
    """math-verify's parse of one answer (a bare answer is read as LaTeX math)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Timeouts off: math-verify's alarm-based ones are replaced by the parent's kill.
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    if _DOUBLED_COMMAND.search(answer) and not _SINGLE_COMMAND.search(answer):
        answer = answer.replace("\\\\", "\\")  # escaped twice ("\\\\frac"): every backslash doubled
    as_written = _as_written(answer)
    if _glued_to_span(answer):
        return ()  # "-$5$", "2$\sqrt{2}$": math-verify would read the span and lose what touches it
    answer = _UPRIGHT_CONSTANT.sub(r"\1", answer)  # \mathrm{e} stops math-verify's parse mid-answer
    parsed = parse(answer if as_written else f"${answer}$", extraction_config=config, parsing_timeout=None)
    if any(_broken_prefix(p, answer) for p in parsed):
        return ()  # math-verify read only a broken prefix ("1 - \frac{1}{"): no parse, not a verdict on it
    return tuple(parsed)


_parse_cached = functools.lru_cache(maxsize=1 << 16)(_parse_uncached)


def _parse(answer: str) -> tuple:
    """:func:`_parse_uncached`, cached unless the worker was started without its cache: a
    reference is compared with many predictions."""
    return _parse_cached(answer) if _PARSE_CACHE else _parse_uncached(answer)


def _equivalent(prediction: str, reference: str, mode: str) -> tuple[bool, str]:
    from passn.verify import exact_match

    if exact_match(prediction, reference):
        return True, "exact"
    if mode == "exact":
        return False, "not_equivalent"
    if _ambiguous(prediction):
        return False, "ambiguous"
    from math_verify import verify

    gold, pred = _parse(reference), _parse(prediction)
    if not gold or not pred:
        return False, "parse_error"
    if any(_degrees_in_trig(s) for s in (reference, prediction)):  # math-verify drops degree signs
        ok = _equal_in_radians(reference, prediction)
    else:
        ok = (verify(list(gold), list(pred), timeout_seconds=None)
              or _approximately_equal(reference, gold[0], prediction, pred[0])
              or _equal_with_imaginary_unit(gold[0], pred[0]))
    return bool(ok), "symbolic" if ok else "not_equivalent"


# A decimal written to d places, with at least 4 significant digits, is a real number written
# approximately when it is within one unit of its last place (rounded or truncated: 3.1416 and
# 125.663 for 40 pi); math-verify alone rounds both sides to 6 places.
_DECIMAL_LITERAL = re.compile(r"\s*\$?\s*-?(\d+)\.(\d+)\s*(?:\\times\s*10\s*\^\s*\{?\s*(-?\d+)\s*\}?)?\s*\$?\s*")
MIN_SIGNIFICANT_DIGITS = 4


def _last_place(text: str) -> float | None:
    """One unit in the last written place of a plain decimal (``125.663`` -> 0.001), if it has
    at least :data:`MIN_SIGNIFICANT_DIGITS` significant digits; else None."""
    m = _DECIMAL_LITERAL.fullmatch(text)
    if m is None or len((m.group(1) + m.group(2)).lstrip("0")) < MIN_SIGNIFICANT_DIGITS:
        return None
    return 10.0 ** (int(m.group(3) or 0) - len(m.group(2)))


def _real_value(expr) -> float | None:
    import sympy

    if not isinstance(expr, sympy.Expr) or expr.free_symbols:
        return None
    value = complex(sympy.N(expr, 30))
    return None if value.imag else value.real


def _approximately_equal(reference: str, gold, prediction: str, pred) -> bool:
    """A real number (or a list of them) against the same written with decimals, each decimal
    within one unit of its last written place (see :data:`_DECIMAL_LITERAL`); no variables."""
    import sympy

    for text, other in ((prediction, gold), (reference, pred)):
        written = _written_values(text)
        if written is None or not any(unit for _, unit in written):
            continue
        others = list(other.args) if isinstance(other, sympy.FiniteSet) else [other]
        values = [_real_value(e) for e in others]
        if len(values) != len(written) or None in values:
            continue
        if all(abs(a - b) < (unit or 1e-12 * max(1.0, abs(b)))
               for (a, unit), b in zip(sorted(written), sorted(values))):  # type: ignore[type-var]
            return True
    return False


def _written_values(text: str) -> list[tuple[float, float]] | None:
    """(value, one unit in its last place; 0 when exact) for each element of a bare list or
    single answer (``1/3, 1.732, 3.1416``); None when an element is no number."""
    out = []
    for element in _top_level_items(text.strip().strip("$").strip()):
        unit = _last_place(element)
        parsed = _parse(element)
        value = _real_value(parsed[0]) if parsed else None
        if value is None:
            return None
        out.append((value, unit or 0.0))
    return out


def _top_level_items(text: str) -> list[str]:
    """``a, b, c`` split at the commas outside brackets; a bracketed or single answer is one item."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [item.strip() for item in [*items, text[start:]] if item.strip()]


def _degrees_in_trig(answer: str) -> bool:
    from passn.verify import DEGREE_SIGN, TRIG_FUNCTION

    return bool(DEGREE_SIGN.search(answer) and TRIG_FUNCTION.search(answer))


def _equal_in_radians(reference: str, prediction: str) -> bool:
    """Both sides with each degree sign read as pi/180 (``\\cos(x)`` is ``\\sin(90^\\circ - x)``,
    ``\\sin 30`` is not ``\\sin 30^\\circ``): math-verify alone drops degree signs."""
    from math_verify import verify

    from passn.verify import DEGREE_SIGN

    gold, pred = (_parse(DEGREE_SIGN.sub(r"\\cdot\\frac{\\pi}{180}", s)) for s in (reference, prediction))
    return bool(gold and pred and verify(list(gold), list(pred), timeout_seconds=None))


def _equal_with_imaginary_unit(gold, pred) -> bool:
    """``i(2-i)`` is ``1+2i``: math-verify reads ``i`` as a real variable. When ``i`` is the only
    symbol on both sides, the answers are complex numbers and ``i`` is the imaginary unit."""
    import sympy

    if not all(isinstance(e, sympy.Expr) for e in (gold, pred)):
        return False
    symbols = [e.free_symbols for e in (gold, pred)]
    if not all(len(s) == 1 and next(iter(s)).name == "i" for s in symbols):
        return False
    as_unit = {s: sympy.I for s in symbols[0] | symbols[1]}
    return sympy.simplify(gold.subs(as_unit) - pred.subs(as_unit)) == 0


def main() -> None:

    global _PARSE_CACHE
    memory_bytes, _PARSE_CACHE = int(sys.argv[1]), sys.argv[2] == "cache"
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    sys.setrecursionlimit(10_000)
    logging.disable(logging.CRITICAL)
    import math_verify  # noqa: F401  (import before "ready": the parent times checks, not start-up)

    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        prediction, reference, mode = json.loads(line)
        try:
            result = _equivalent(prediction, reference, mode)
        except MemoryError:
            result = (False, "memory")
        except RecursionError:
            result = (False, "parse_error")
        except Exception:  # noqa: BLE001  (any failure inside math-verify means "not verified")
            result = (False, "parse_error")
        out.write(json.dumps(result).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
