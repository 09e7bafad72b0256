"""Answer extraction and checking: the verifier behind every pass@N number.

- :func:`extract_answer`: the last ``\\boxed{...}`` (nested braces), else ``\\fbox{...}``, else
  the Minerva "final answer is X" sentence, else a one-line direct answer; ``None`` when there
  is no answer.
- :func:`answers_match`: ``mode="symbolic"`` (the default) accepts what the paper's exact mode
  accepts plus math-verify's symbolic equivalence; ``mode="exact"`` is the paper's Minerva
  normalisation and string equality.
- :class:`AnswerChecker`: runs math-verify in killable, memory-capped worker processes with a
  per-check time bound and a cache. math-verify's own timeout uses ``signal.alarm`` (main thread
  only) and cannot stop C-level work such as ``9^9^9^9``; a killed process can.

A check that times out, runs out of memory or cannot be parsed is *incorrect* with a reason; it
never raises into the caller and never hangs.
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


def normalise_unicode(text: str) -> str:
    """NFKC, every minus-like dash to ASCII '-', invisible characters removed, ends stripped."""
    return unicodedata.normalize("NFKC", text).translate(_MINUS_SIGNS).translate(_INVISIBLE).strip()


def _braced_argument(text: str, start: int) -> str | None:
    """The content of the ``{...}`` group opening at ``text[start]``, nested braces included."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":  # an escaped brace does not open or close a group
            continue
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _last_command_argument(text: str, command: str) -> str | None:
    idx = text.rfind(command)
    while idx >= 0:
        rest = idx + len(command)
        j = rest
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            arg = _braced_argument(text, j)
            if arg is not None:
                return arg
        elif j > rest and j < len(text):  # "\boxed 5": the argument is one token
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                return m.group(0)
        idx = text.rfind(command, 0, idx)
    return None


_FINAL_ANSWER = re.compile(r"final answer is\s*(.+?)(?:\.\s*I hope it is correct\.?|\s*$)", re.IGNORECASE | re.DOTALL)


def extract_answer(completion: str | None) -> str | None:
    """The final answer in a completion, or ``None`` when it has none.

    Order: the last ``\\boxed{...}`` (nested braces kept), else the last ``\\fbox{...}``, else
    "The final answer is X. I hope it is correct." (Minerva's format), else the completion itself
    when it is a single non-empty line (a direct answer). Unicode is normalised first.
    """
    if completion is None:
        return None
    text = normalise_unicode(completion)
    for command in ("\\boxed", "\\fbox"):
        arg = _last_command_argument(text, command)
        if arg is not None:
            arg = arg.strip()
            return arg or None
    if "\\boxed" in text or "\\fbox" in text:
        return None  # a box that never closes: the answer was cut off
    sentences = list(_FINAL_ANSWER.finditer(text))
    if sentences:
        answer = sentences[-1].group(1).strip().rstrip(".").strip()
        return answer.strip("$").strip() or None
    if text and "\n" not in text:
        return text.strip("$").strip() or None
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


def minerva_normalise(answer: str) -> str:
    """Minerva's ``normalize_final_answer``: the normalisation behind the paper's exact match."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED_EXPRESSIONS:
        answer = answer.replace(expr, "")
    if answer.count("$") >= 2:  # guarded: without two '$' this pattern backtracks quadratically
        answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def exact_match(prediction: str, reference: str) -> bool:
    """The paper's exact mode: string equality after Minerva's normalisation."""
    return minerva_normalise(prediction) == minerva_normalise(reference)


# ---------------------------------------------------------------------------------------------
# Bounded, cached checking
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a prediction matches the reference, and why.

    ``reason`` is one of: exact, symbolic, not_equivalent, empty, parse_error, timeout, memory,
    worker_died, too_long.
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


_PLAIN_NUMBER = re.compile(r"(-?)(\d+(?:\.\d+)?)")
_PLAIN_FRACTION = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}|(-?)(\d+)/(\d+)")


def _plain_number(text: str) -> tuple[Fraction, bool] | None:
    """(value, has_decimal_point) for an integer, decimal or simple fraction; None otherwise."""
    text = text.strip().strip("$").strip()
    if len(text) > 1000:
        return None  # past int()'s 4300-digit limit and far past any real answer: math-verify decides
    if m := _PLAIN_NUMBER.fullmatch(text):
        value = Fraction(m.group(2))
        return (-value if m.group(1) else value), "." in text
    if m := _PLAIN_FRACTION.fullmatch(text):
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5), m.group(6))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return (-value if sign else value), False
    return None


def _compare_plain_numbers(prediction: str, reference: str) -> Verdict | None:
    """Exact rational comparison when both sides are plain numbers: most MATH answers, no sympy.

    Decimals that differ are left to math-verify, whose rounding rules may still accept them.
    """
    a, b = _plain_number(prediction), _plain_number(reference)
    if a is None or b is None:
        return None
    if a[0] == b[0]:
        return Verdict(True, "symbolic")
    if a[1] or b[1]:
        return None
    return Verdict(False, "not_equivalent")


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
        numeric = _compare_plain_numbers(pred, ref)
        if numeric is not None:
            self.stats.numeric_hits += 1
            return self._remember(key, numeric), key
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
