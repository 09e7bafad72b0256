"""Proof search against a proof assistant (paper Section 5.3): the ``ProverEnv`` interface, tactic
checks, theorem files, the state text and prompt, and N independent rollouts per theorem.

    env = CoqProver()                            # actors.prover; LeanDojoProver on Lean clusters
    root = env.start(Theorem("t", "Theorem t : forall n : nat, n + 0 = n."))
    out = env.apply(root.node, "intros n.")      # Outcome: "state" | "error" | "proved"
    out = env.apply(root.node, "induction n.")   # branch again from the root: a search tree

A state is a node of the current theorem's search tree (0 is the root); ``apply`` may start
from any node already reached. "proved" means the proof assistant's kernel accepted the closed
proof (Coq: ``Qed`` succeeded), never only that no goals are left.

A rollout samples a tactic from its current state, applies it and repeats until the theorem is
proved, a tactic fails, or ``max_steps`` tactics were applied; N rollouts per theorem are the N
passes of pass@N (:class:`TheoremSearch`).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import fsspec

# Prompt = state text in this template; the model's completion is one tactic (then <eos>).
PROMPT_TEMPLATE = "{state}\nTactic: "
MAX_TACTIC_CHARS = 2000


def proof_prompt(state_text: str) -> str:
    return PROMPT_TEMPLATE.format(state=state_text)


# ---------------------------------------------------------------------------------------------
# States, outcomes, theorems and the interface
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Goal:
    """One goal: its hypotheses (``"n : nat"``) and its conclusion, as the prover prints them."""

    hypotheses: tuple[str, ...]
    conclusion: str


def render_state(goals: Sequence[Goal]) -> str:
    """The state text the model reads: per goal its hypotheses, one a line, then ``|- conclusion``;
    goals separated by a blank line, in the order tactics see them."""
    if not goals:
        return "no goals"
    return "\n\n".join("\n".join([*g.hypotheses, f"|- {g.conclusion}"]) for g in goals)


@dataclasses.dataclass(frozen=True)
class ProofState:
    """A node of the current theorem's search tree and its open goals."""

    node: int
    goals: tuple[Goal, ...]

    @property
    def text(self) -> str:
        return render_state(self.goals)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one tactic did: a new ``state``, an ``error`` (message), or ``proved`` (the kernel
    accepted the proof; ``state`` is the node the tactic reached)."""

    kind: Literal["state", "error", "proved"]
    state: ProofState | None = None
    message: str = ""
    time_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Theorem:
    """A theorem to prove: ``statement`` is the one sentence that opens the proof
    (``"Lemma add_0_r : forall n, n + 0 = n."``), after the context: either ``prelude`` sentences
    (``"Require Import Arith."``) or the first ``sentence`` sentences of a source ``file`` (a
    library file, relative to the prover's library root, as ``passn prover extract`` lists them)."""

    id: str
    statement: str
    prelude: tuple[str, ...] = ()
    file: str | None = None
    sentence: int | None = None


class ProverError(RuntimeError):
    """A theorem could not be started (its context or statement failed); the message says where."""


class ProverEnv(abc.ABC):
    """A proof assistant seen as a search environment over one theorem at a time."""

    @abc.abstractmethod
    def start(self, theorem: Theorem) -> ProofState:
        """Load the theorem's context, open its proof, and return the root state (node 0).
        Forgets the previous theorem's tree. Raises :class:`ProverError` naming the failure."""

    @abc.abstractmethod
    def apply(self, node: int, tactic: str) -> Outcome:
        """Run one tactic from ``node`` (any node of the current tree). Never raises for a bad,
        slow or crashing tactic: those are ``error`` outcomes (the prover restarts itself)."""

    def close(self) -> None:
        """Stop the prover process."""

    def __enter__(self) -> ProverEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Tactics: exactly one sentence, no bullets, braces, vernacular or admits
# ---------------------------------------------------------------------------------------------

_SELECTOR = re.compile(r"(\d+(\s*[-,]\s*\d+)*|all|par|!|\[\s*[\w']+\s*\])\s*:\s*")
_BULLET = re.compile(r"([-+*]+|[{}])(\s|$)")
_ESCAPES = re.compile(r"\b(admit|give_up|Admitted|Abort)\b")


def _scan(text: str) -> tuple[list[tuple[int, int]], str | None]:
    """Sentence ends and comment spans of Coq text: (list of (kind, index)), error.

    A sentence ends at a ``.`` followed by whitespace or the end of the text and not part of
    ``..``; comments ``(* *)`` nest; strings are ``"..."`` with ``""`` for a quote.
    """
    marks: list[tuple[int, int]] = []  # (0, index of a sentence-ending dot) | (1, start) / (2, end) of a comment
    depth, i, n = 0, 0, len(text)
    while i < n:
        if text.startswith("(*", i):
            if depth == 0:
                marks.append((1, i))
            depth, i = depth + 1, i + 2
        elif depth and text.startswith("*)", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                marks.append((2, i))
        elif depth:
            i += 1
        elif text[i] == '"':
            end = i + 1
            while True:
                end = text.find('"', end)
                if end < 0:
                    return marks, "unterminated string"
                if text.startswith('""', end):
                    end += 2
                    continue
                break
            i = end + 1
        elif (text[i] == "." and (i + 1 == n or text[i + 1].isspace()) and (i == 0 or text[i - 1] != ".")):
            marks.append((0, i))
            i += 1
        else:
            i += 1
    return marks, "unterminated comment" if depth else None


def normalise_tactic(text: str) -> str:
    """The tactic without comments, whitespace runs outside strings collapsed to one space."""
    marks, error = _scan(text)
    if error:
        return " ".join(text.split())
    pieces, start = [], 0
    for kind, index in marks:
        if kind == 1:
            pieces.append(text[start:index])
        elif kind == 2:
            start = index
            pieces.append(" ")
    pieces.append(text[start:])
    out, in_string = [], False
    for part in re.split(r'(")', "".join(pieces)):
        if part == '"':
            in_string = not in_string
            out.append(part)
        else:
            out.append(part if in_string else re.sub(r"\s+", " ", part))
    return "".join(out).strip()


def check_tactic(tactic: str) -> str | None:
    """Why ``tactic`` may not be sent to the prover, or None when it is one plain tactic sentence.

    Coq's ``Add`` runs only the first sentence of its text and drops the rest silently, so a
    tactic must be exactly one sentence ending in ``.``. Bullets and braces are refused (a rollout
    always sees every goal), so are vernacular commands (which start with a capital letter:
    ``Qed``, ``Abort``, ``Require`` ...) and the tactics that skip a goal (``admit``, ``give_up``).
    """
    if not tactic.strip():
        return "empty tactic"
    if len(tactic) > MAX_TACTIC_CHARS:
        return f"tactic longer than {MAX_TACTIC_CHARS} characters"
    if any(ord(c) < 32 and c not in "\n\t" for c in tactic):
        return "control characters in the tactic"
    marks, error = _scan(tactic)
    if error:
        return error
    text = normalise_tactic(tactic)
    if not text:
        return "only a comment"
    body = text
    while (m := _SELECTOR.match(body)) is not None:
        body = body[m.end():]
    if _BULLET.match(body) or body.startswith(("{", "}")):
        return "bullets and braces are not allowed: every goal stays visible without them"
    if body[:1].isupper() or body.startswith("#["):
        return f"vernacular command {body.split()[0]!r}: only tactics are allowed"
    if (m := _ESCAPES.search(text)) is not None:
        return f"{m.group(1)!r} leaves a goal unproved"
    ends = [i for kind, i in marks if kind == 0]
    if not ends or normalise_tactic(tactic[: ends[0] + 1]) != text:
        return "more than one sentence (Coq would run only the first)" if ends else "a tactic ends with '.'"
    return None


def split_statement_name(statement: str) -> str | None:
    """The name a statement declares (``Lemma foo : ...`` -> ``foo``), None for ``Goal``."""
    m = re.match(r"\s*(?:#\[[^\]]*\]\s*)?(?:(?:Local|Global|Polymorphic|Program)\s+)*"
                 r"(?:Theorem|Lemma|Fact|Remark|Corollary|Proposition|Property|Example|Definition|Fixpoint|"
                 r"Instance|Let)\s+([\w'.]+)", statement)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------------
# Theorem files (JSONL): {"id", "statement", "prelude": [...]} or {"id", "statement", "file", "sentence"}
# ---------------------------------------------------------------------------------------------


def theorem_from_row(row: Any, where: str) -> Theorem:
    """A :class:`Theorem` from a JSON row; ``ValueError`` naming ``where`` and the field."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with fields id and statement, got {type(row).__name__}")
    for field in ("id", "statement"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise ValueError(f'{where}: field "{field}" is missing or not text')
    prelude = row.get("prelude", [])
    if not isinstance(prelude, list) or not all(isinstance(s, str) for s in prelude):
        raise ValueError(f'{where}: field "prelude" must be a list of sentences (text)')
    file, sentence = row.get("file"), row.get("sentence")
    if (file is None) != (sentence is None):
        raise ValueError(f'{where}: fields "file" and "sentence" go together (the statement is sentence '
                         "number SENTENCE of FILE, counted from 0)")
    if file is not None and (not isinstance(file, str) or not isinstance(sentence, int) or sentence < 0):
        raise ValueError(f'{where}: "file" must be text and "sentence" a non-negative integer')
    if file is not None and prelude:
        raise ValueError(f'{where}: give either "prelude" or "file" and "sentence", not both')
    return Theorem(row["id"], row["statement"], tuple(prelude), file, sentence)


def load_theorems(path: str) -> list[Theorem]:
    """The theorems of a JSONL file (local or URL), in order; ids must be unique."""
    theorems, seen = [], {}
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
                theorem = theorem_from_row(row, where)
                if theorem.id in seen:
                    raise ValueError(f"{where}: theorem id {theorem.id!r} already used on line {seen[theorem.id]}")
                seen[theorem.id] = lineno
                theorems.append(theorem)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such theorem file") from None
    if not theorems:
        raise ValueError(f"{path}: no theorems")
    return theorems


def theorem_row(theorem: Theorem) -> dict[str, Any]:
    row: dict[str, Any] = {"id": theorem.id, "statement": theorem.statement}
    if theorem.file is not None:
        row.update(file=theorem.file, sentence=theorem.sentence)
    elif theorem.prelude:
        row["prelude"] = list(theorem.prelude)
    return row


# ---------------------------------------------------------------------------------------------
# Rollouts: N independent passes per theorem, advanced in lockstep
# ---------------------------------------------------------------------------------------------

RolloutEnd = Literal["running", "proved", "error", "max_steps", "time_budget"]


@dataclasses.dataclass
class Rollout:
    node: int = 0
    tactics: list[str] = dataclasses.field(default_factory=list)
    status: RolloutEnd = "running"
    message: str = ""


class TheoremSearch:
    """N independent rollouts of one theorem from its root state (paper Section 5.3).

    Each step: :meth:`requests` lists the running rollouts with their state texts (the driver
    samples one tactic per rollout at temperature 1, identical states together), :meth:`record`
    takes each applied tactic's outcome. A rollout ends when the theorem is proved, a tactic
    fails, ``max_steps`` tactics were applied, or the theorem's ``time_budget_s`` is spent.
    """

    def __init__(self, theorem: Theorem, root: ProofState, passes: int, max_steps: int,
                 time_budget_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.theorem, self.max_steps, self.clock = theorem, max_steps, clock
        self.started = clock()
        self.deadline = None if time_budget_s is None else self.started + time_budget_s
        self.rollouts = [Rollout() for _ in range(passes)]
        self.texts = {root.node: root.text}
        self.applied = 0

    def requests(self) -> list[tuple[int, str]]:
        """(rollout index, state text) for every rollout that needs a tactic now."""
        if self.deadline is not None and self.clock() >= self.deadline:
            for r in self.rollouts:
                if r.status == "running":
                    r.status, r.message = "time_budget", "the theorem's time budget ran out"
        return [(i, self.texts[r.node]) for i, r in enumerate(self.rollouts) if r.status == "running"]

    def node_of(self, rollout: int) -> int:
        return self.rollouts[rollout].node

    def fail(self, rollout: int, message: str) -> None:
        """End a rollout without applying anything (e.g. its state is too long for the model)."""
        r = self.rollouts[rollout]
        r.status, r.message = "error", message

    def record(self, rollout: int, tactic: str, outcome: Outcome) -> None:
        r = self.rollouts[rollout]
        r.tactics.append(tactic)
        self.applied += 1
        if outcome.kind == "error":
            r.status, r.message = "error", outcome.message
            return
        assert outcome.state is not None
        r.node = outcome.state.node
        self.texts.setdefault(r.node, outcome.state.text)
        if outcome.kind == "proved":
            r.status = "proved"
        elif len(r.tactics) >= self.max_steps:
            r.status, r.message = "max_steps", f"no proof within {self.max_steps} steps"

    @property
    def finished(self) -> bool:
        return all(r.status != "running" for r in self.rollouts)

    def result(self, **extra: Any) -> dict[str, Any]:
        """The theorem's results row: attempts, successes, the first (shortest) proof found, time."""
        proofs = sorted((r.tactics for r in self.rollouts if r.status == "proved"), key=len)
        return {"id": self.theorem.id, "attempts": len(self.rollouts),
                "successes": sum(r.status == "proved" for r in self.rollouts),
                "proof": proofs[0] if proofs else None, "time_s": round(self.clock() - self.started, 3),
                "tactics_applied": self.applied, "states": len(self.texts),
                "ends": dict(collections.Counter(r.status for r in self.rollouts)), **extra}


def sampling_plan(texts: Iterable[str]) -> dict[int, list[str]]:
    """Group state texts so each distinct state is sampled once with as many samples as rollouts
    need it: ``{samples per prompt: [distinct texts]}``. Sampling a repeated prompt in separate
    requests with one seed would repeat the same tactic; one request with n samples does not."""
    counts = collections.Counter(texts)
    plan: dict[int, list[str]] = collections.defaultdict(list)
    for text, count in counts.items():
        plan[count].append(text)
    return dict(plan)


def search_sequentially(env: ProverEnv, theorem: Theorem, propose: Callable[[str, int], list[str]], passes: int,
                        max_steps: int = 50, time_budget_s: float | None = None) -> dict[str, Any]:
    """N rollouts of ``theorem`` on one ``env``; ``propose(state_text, n)`` returns n tactics
    (a model's samples, or a scripted policy in tests). Returns the results row."""
    search = TheoremSearch(theorem, env.start(theorem), passes, max_steps, time_budget_s)
    while not search.finished:
        requests = search.requests()
        by_text = collections.defaultdict(list)
        for rollout, text in requests:
            by_text[text].append(rollout)
        for text, rollouts in by_text.items():
            for rollout, tactic in zip(rollouts, propose(text, len(rollouts)), strict=True):
                search.record(rollout, tactic, env.apply(search.node_of(rollout), tactic))
    return search.result()
