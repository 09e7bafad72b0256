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
_PROSE_WORD = re.compile(r"(?<![\\\\{A-Za-z])[A-Za-z]{3,}(?![A-Za-z}])")


_UPRIGHT_CONSTANT = re.compile(r"\\mathrm\{\s*([ei])\s*\}")


def _broken_prefix(extracted: object, answer: str) -> bool:
    """math-verify stopped inside the answer and kept an unclosed group: what it parsed is not the answer."""
    if not isinstance(extracted, str) or extracted.count("{") == extracted.count("}"):
        return False
    short, full = extracted.replace(" ", ""), answer.replace(" ", "")
    return len(short) < len(full) and full.startswith(short)


@functools.lru_cache(maxsize=1 << 16)
def _parse(answer: str) -> tuple:
    """math-verify's parse of one answer, cached: a reference is compared with many predictions."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Timeouts off: math-verify's alarm-based ones are replaced by the parent's kill.
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    # An answer that delimits its own math ("$x \\geq 5$ is the solution") or is a sentence ("Jane
    # started 3 hours ago") is parsed as written, for math-verify to find the expression in it.
    as_written = "$" in answer or "\\(" in answer or "\\[" in answer or len(_PROSE_WORD.findall(answer)) >= 2
    answer = _UPRIGHT_CONSTANT.sub(r"\1", answer)  # \mathrm{e} stops math-verify's parse mid-answer
    parsed = parse(answer if as_written else f"${answer}$", extraction_config=config, parsing_timeout=None)
    if any(_broken_prefix(p, answer) for p in parsed):
        return ()  # math-verify read only a broken prefix ("1 - \frac{1}{"): no parse, not a verdict on it
    return tuple(parsed)


def _equivalent(prediction: str, reference: str, mode: str) -> tuple[bool, str]:
    from passn.verify import exact_match

    if exact_match(prediction, reference):
        return True, "exact"
    if mode == "exact":
        return False, "not_equivalent"
    from math_verify import verify

    parse = _parse if _PARSE_CACHE else _parse.__wrapped__
    gold, pred = parse(reference), parse(prediction)
    if not gold or not pred:
        return False, "parse_error"
    ok = (verify(list(gold), list(pred), timeout_seconds=None) or _approximately_equal(gold[0], pred[0])
          or _equal_with_imaginary_unit(gold[0], pred[0]) or _equal_in_radians(reference, prediction))
    return bool(ok), "symbolic" if ok else "not_equivalent"


# A decimal within this relative distance of a real number is that number written approximately
# (Qwen2.5-Math's grader and NeMo-Skills' earlier one); math-verify alone rounds to 6 places.
RELATIVE_TOLERANCE = 1e-4


def _real_value(expr) -> float | None:
    import sympy

    if not isinstance(expr, sympy.Expr) or expr.free_symbols:
        return None
    value = complex(sympy.N(expr, 30))
    return None if value.imag else value.real


def _approximately_equal(gold, pred) -> bool:
    """Real numbers (or equal-sized sets of them), one side written with a decimal point, within 1e-4 relative."""
    import sympy

    if isinstance(gold, sympy.FiniteSet) and isinstance(pred, sympy.FiniteSet):
        golds, preds = list(gold.args), list(pred.args)
    else:
        golds, preds = [gold], [pred]
    if len(golds) != len(preds) or not any(isinstance(e, sympy.Basic) and e.atoms(sympy.Float) for e in golds + preds):
        return False  # exact values only: math-verify's verdict stands
    a, b = [_real_value(e) for e in golds], [_real_value(e) for e in preds]
    if None in a or None in b:
        return False
    return all(abs(x - y) <= RELATIVE_TOLERANCE * abs(x) for x, y in zip(sorted(a), sorted(b)))


_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
_TRIG = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)\b")


def _equal_in_radians(reference: str, prediction: str) -> bool:
    """``\\cos(x)`` is ``\\sin(90^\\circ - x)``: math-verify drops the degree sign; inside a trig function it is pi/180."""
    if not any(_DEGREE.search(s) and _TRIG.search(s) for s in (reference, prediction)):
        return False
    from math_verify import verify

    gold, pred = (_parse(_DEGREE.sub(r"\\cdot\\frac{\\pi}{180}", s)) for s in (reference, prediction))
    return bool(gold and pred and verify(list(gold), list(pred), timeout_seconds=None))


def _equal_with_imaginary_unit(gold, pred) -> bool:
    """``i(2-i)`` is ``1+2i``: math-verify reads ``i`` as a variable; read as the imaginary unit, both sides equal."""
    import sympy

    if not all(isinstance(e, sympy.Expr) for e in (gold, pred)):
        return False
    units = {s for e in (gold, pred) for s in e.free_symbols if s.name == "i"}  # math-verify's i is real
    if not units or not all(units & e.free_symbols for e in (gold, pred)):
        return False
    as_unit = {s: sympy.I for s in units}
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
