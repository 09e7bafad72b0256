"""The answer-checking worker process behind :class:`passn.verify.AnswerChecker`.

Reads JSON lines ``[prediction, reference, mode]`` from stdin and writes ``[correct, reason]`` lines.
It caps its own address space first; the parent kills it when a check overruns its time bound.
"""

from __future__ import annotations

import functools
import json
import logging
import resource
import sys


_PARSE_CACHE = True


@functools.lru_cache(maxsize=1 << 16)
def _parse(answer: str) -> tuple:
    """math-verify's parse of one answer, cached: a reference is compared with many predictions."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Timeouts off: math-verify's alarm-based ones are replaced by the parent's kill.
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return tuple(parse(f"${answer}$", extraction_config=config, parsing_timeout=None))


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
    ok = verify(list(gold), list(pred), timeout_seconds=None)
    return bool(ok), "symbolic" if ok else "not_equivalent"


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
