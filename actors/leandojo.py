"""Lean 4 behind ``passn.prover.ProverEnv``, through LeanDojo (for clusters where Lean is installed).

LeanDojo (``lean-dojo``, Python < 3.13, elan, git, a repository traced in advance: see
docs/PROVER.md) opens a ``Dojo`` per theorem (slow: it builds a REPL for the theorem's file) and
answers ``run_tac(state, tactic)`` with a ``TacticState``, a ``LeanError``, ``ProofGivenUp`` or
``ProofFinished``. This backend keeps one Dojo per theorem for all N rollouts, maps LeanDojo's
states to search-tree nodes (any node can be branched from: LeanDojo states are immutable ids),
restarts the Dojo when a tactic times out or the REPL crashes, and counts a proof as "proved" only
after the kernel accepted it: LeanDojo's ``ProofFinished`` is not kernel-checked, so the found proof
is written after the file's text up to the theorem and compiled with ``lake env lean`` in the
traced repository.

Theorem rows for Lean: ``{"id": FULL_NAME, "statement": "theorem foo (a b : Nat) : a + b = b + a",
"file": "Mathlib/Foo.lean", "sentence": LINE}`` with LINE the 0-based line where the declaration
starts; the repository (url, commit) is the backend's.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from passn.prover import Goal, Outcome, ProofState, ProverEnv, ProverError, Theorem


def _goals(state: Any) -> tuple[Goal, ...]:
    """LeanDojo's pretty-printed goals (``state.pp``: goals separated by blank lines, hypotheses
    then ``⊢ conclusion``) as passn goals."""
    goals = []
    for block in state.pp.split("\n\n"):
        hyps, _, conclusion = block.rpartition("⊢ ")
        goals.append(Goal(tuple(line for line in hyps.splitlines() if line.strip()), conclusion.strip()))
    return tuple(goals)


class LeanDojoProver(ProverEnv):
    """One LeanDojo ``Dojo`` per theorem, reused by every rollout (see the module docstring)."""

    def __init__(self, repo_url: str, commit: str, repo_dir: str | None = None, timeout_s: int = 60,
                 check_timeout_s: float = 600.0, kernel_check: bool = True) -> None:
        try:
            import lean_dojo
        except ImportError as exc:
            raise ProverError("lean_dojo is not installed: pip install lean-dojo (Python < 3.13; needs elan and "
                              "git; see docs/PROVER.md)") from exc
        self._ld = lean_dojo
        self.repo = lean_dojo.LeanGitRepo(repo_url, commit)
        self.repo_dir = Path(repo_dir) if repo_dir else None  # a checkout of the repository, for kernel checks
        self.timeout_s, self.check_timeout_s, self.kernel_check = timeout_s, check_timeout_s, kernel_check
        self._dojo: Any = None
        self._theorem: Theorem | None = None
        self._states: dict[int, Any] = {}  # node -> LeanDojo TacticState
        self._path: dict[int, list[str]] = {}  # node -> tactics from the root
        self.restarts = 0
        self.tactics = 0

    def _open(self) -> Any:
        assert self._theorem is not None
        self.close()
        lean_theorem = self._ld.Theorem(self.repo, self._theorem.file, self._theorem.id)
        self._dojo = self._ld.Dojo(lean_theorem, timeout=self.timeout_s)
        _, root = self._dojo.__enter__()
        return root

    def start(self, theorem: Theorem) -> ProofState:
        if theorem.file is None:
            raise ProverError(f"{theorem.id}: a Lean theorem needs its file (and its line as 'sentence')")
        self._theorem = theorem
        try:
            root = self._open()
        except Exception as exc:  # noqa: BLE001  (DojoInitError and the errors of building the REPL)
            raise ProverError(f"{theorem.id}: LeanDojo could not open the theorem: {exc}") from None
        self._states, self._path = {0: root}, {0: []}
        return ProofState(0, _goals(root))

    def _restart(self) -> None:
        """A new Dojo: LeanDojo's old state ids are gone; states are replayed when asked for."""
        self._states = {0: self._open()}
        self.restarts += 1

    def _state_of(self, node: int) -> Any:
        if node not in self._states:
            state = self._states[0]
            for tactic in self._path[node]:
                state = self._dojo.run_tac(state, tactic)
            self._states[node] = state
        return self._states[node]

    def apply(self, node: int, tactic: str) -> Outcome:
        if self._theorem is None:
            raise ProverError("start a theorem before applying tactics")
        started = time.perf_counter()
        reason = _lean_tactic_problem(tactic)
        if reason is not None:
            return Outcome("error", message=f"rejected: {reason}")
        self.tactics += 1
        ld = self._ld
        try:
            result = self._dojo.run_tac(self._state_of(node), tactic)
        except (ld.DojoTacticTimeoutError, ld.DojoCrashError) as exc:
            self._restart()
            return Outcome("error", message=f"{type(exc).__name__}: the Dojo was restarted",
                           time_s=time.perf_counter() - started)
        child = len(self._path)
        self._path[child] = [*self._path[node], tactic]
        elapsed = time.perf_counter() - started
        if isinstance(result, ld.TacticState):
            self._states[child] = result
            return Outcome("state", ProofState(child, _goals(result)), time_s=elapsed)
        if isinstance(result, ld.ProofFinished):
            error = self._check(self._path[child]) if self.kernel_check else None
            state = ProofState(child, ())
            if error:
                return Outcome("error", state, f"kernel check failed: {error}", time.perf_counter() - started)
            return Outcome("proved", state, time_s=time.perf_counter() - started)
        message = getattr(result, "error", None) or type(result).__name__  # LeanError, ProofGivenUp
        return Outcome("error", message=message, time_s=elapsed)

    def _check(self, tactics: list[str]) -> str | None:
        """Compile the file's text up to the theorem, then the theorem with ``tactics`` as its proof
        (``lake env lean``); None when Lean (and so its kernel) accepts it."""
        theorem = self._theorem
        assert theorem is not None and theorem.file is not None and theorem.sentence is not None
        if self.repo_dir is None:
            return "no repo_dir (a checkout of the traced repository) to compile the proof in"
        lines = (self.repo_dir / theorem.file).read_text().splitlines()[: theorem.sentence]
        proof = "\n".join(f"  {t}" for t in tactics)
        text = "\n".join(lines) + f"\n\n{theorem.statement} := by\n{proof}\n"
        with tempfile.NamedTemporaryFile("w", suffix=".lean", dir=self.repo_dir, delete=True) as f:
            f.write(text)
            f.flush()
            try:
                done = subprocess.run(["lake", "env", "lean", f.name], cwd=self.repo_dir, capture_output=True,
                                      text=True, timeout=self.check_timeout_s)
            except subprocess.TimeoutExpired:
                return f"lean ran past {self.check_timeout_s:.0f} s"
        failed = done.returncode != 0 or "declaration uses 'sorry'" in done.stdout
        return (done.stdout + done.stderr)[-1000:] if failed else None

    def close(self) -> None:
        if self._dojo is not None:
            try:
                self._dojo.__exit__(None, None, None)
            finally:
                self._dojo = None

    def stats(self) -> dict[str, Any]:
        return {"tactics": self.tactics, "restarts": self.restarts}


def _lean_tactic_problem(tactic: str) -> str | None:
    """Lean tactics are not Coq sentences: refuse only what would not prove anything."""
    if not tactic.strip():
        return "empty tactic"
    if re.search(r"\b(sorry|admit)\b", tactic):
        return "'sorry' and 'admit' leave a goal unproved"
    return None
