"""Coq behind ``passn.prover.ProverEnv``, and a ProverPool of Ray actors running many theorems at once.

:class:`CoqProver` drives Debian's Coq 8.16 through ``coqidetop.opt -main-channel stdfds -q``
(Coq's XML IDE protocol, ``passn.coq_protocol``): goals with hypotheses, exact errors, and
``Edit_at`` back to any earlier state, about a millisecond a tactic.

- Each tactic is checked first (``passn.prover.check_tactic``: one sentence, no bullets, braces,
  vernacular or admits) and sent as ``Timeout T tactic``; a watchdog kills the process when no
  reply comes within T plus a grace period (a hang Coq's timeout cannot interrupt, e.g. in
  ``Qed``), and a dead process (killed, out of memory) is restarted on the next call: the
  theorem's context and the tactic path of the node asked for are replayed.
- The process runs in its own session with an address-space limit (``ulimit -v``), in its own
  working folder (``lia`` and ``nia`` write cache files into the current folder).
- A tactic that leaves no goal is followed by ``Qed.``: "proved" means the kernel and the guard
  checker accepted the proof (a bogus ``fix`` proof passes every tactic and fails there);
  ``reject_axioms`` also refuses proofs whose ``Print Assumptions`` lists axioms. ``Qed`` is then
  undone, so the tree stays open for the other rollouts.
- Outcomes are cached per (node, tactic): N rollouts that sample the same tactic in the same
  state cost one prover call.
- A theorem from a library file (``Theorem.file``) runs after the file's first ``sentence``
  sentences, replayed with ``-topfile`` on a private copy (module names as ``coqc``'s; a local
  compiled file cannot shadow a library module). Consecutive theorems of one file reuse the
  replayed prefix.

Sentence boundaries of a file come from Coq itself (:func:`coq_sentences`, ``coqc -time``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from passn import coq_protocol as xml
from passn.prover import Outcome, ProofState, ProverEnv, ProverError, Theorem, check_tactic, normalise_tactic

COQIDETOP = "coqidetop.opt"
INSTALL_HINT = "install Coq 8.16 (Debian: apt-get install -y coq; `make coq` does it)"


@functools.cache
def library_root() -> Path:
    """Where Coq's library lives (``coqc -where``: the standard library sources are under theories/)."""
    if shutil.which("coqc") is None:
        raise ProverError(f"coqc not found: {INSTALL_HINT}")
    return Path(subprocess.run(["coqc", "-where"], capture_output=True, text=True, check=True).stdout.strip())


def resolve_source(file: str) -> Path:
    """A theorem's ``file``: absolute, or relative to the Coq library root (``theories/Arith/PeanoNat.v``)."""
    path = Path(file)
    return path if path.is_absolute() else library_root() / path


_CHARS = re.compile(rb"^Chars (\d+) - (\d+) ", re.MULTILINE)


def coq_sentences(source: Path, workdir: Path, timeout_s: float = 600.0) -> tuple[list[str], Path]:
    """The sentences of a ``.v`` file as Coq splits them, and the private copy they were read from.

    ``coqc -time`` compiles a copy of the file in ``workdir`` (its own folder) and prints the byte
    range of every sentence (``Chars 676 - 700 [Require~Import~PeanoNat.] 0.06 secs``). Bullets
    and braces are sentences of their own.
    """
    copy = workdir / source.name
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, copy)
    try:
        done = subprocess.run(["coqc", "-q", "-time", copy.name], cwd=workdir, capture_output=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ProverError(f"{source}: coqc -time ran past {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise ProverError(f"{source}: coqc failed: {done.stderr.decode(errors='replace')[-800:]}")
    data = copy.read_bytes()
    return [data[int(a):int(b)].decode("utf-8") for a, b in _CHARS.findall(done.stdout)], copy


class _Hung(Exception):
    pass


class _Died(Exception):
    pass


@dataclasses.dataclass
class _Node:
    parent: int | None
    tactic: str | None
    goals: tuple
    sid: int | None  # Coq's state id, valid while the node is on the document's current chain


class CoqProver(ProverEnv):
    """One ``coqidetop.opt`` process: one theorem's search tree at a time (see the module docstring).

    ``timeout_s`` bounds each tactic (Coq's ``Timeout``, then the watchdog at ``timeout_s +
    grace_s``), ``qed_timeout_s`` the kernel check, ``context_timeout_s`` each context sentence.
    """

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 4096, reject_axioms: bool = False,
                 qed_timeout_s: float = 30.0, context_timeout_s: float = 300.0, grace_s: float = 2.0,
                 workdir: str | None = None) -> None:
        if shutil.which(COQIDETOP) is None:
            raise ProverError(f"{COQIDETOP} not found: {INSTALL_HINT}")
        if timeout_s < 1 or timeout_s != int(timeout_s):
            raise ValueError(f"timeout_s ({timeout_s}) must be a whole number of seconds >= 1 (Coq's Timeout)")
        self.timeout_s, self.memory_mb, self.reject_axioms = int(timeout_s), memory_mb, reject_axioms
        self.qed_timeout_s, self.context_timeout_s, self.grace_s = qed_timeout_s, context_timeout_s, grace_s
        self._own_workdir = workdir is None  # removed on close
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="passn-coq-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stderr = tempfile.TemporaryFile(dir=self.workdir)
        self._proc: subprocess.Popen | None = None
        self._topfile: str | None = None
        self._buffer = b""
        self._init_sid = self._tip = 0
        self._context: list[tuple[str, int]] = []  # loaded context sentences and the state after each
        self._chain: list[int] = []  # the nodes on the document's chain, root to tip
        self._sources: dict[str, tuple[list[str], Path]] = {}
        self._theorem: Theorem | None = None
        self._nodes: dict[int, _Node] = {}
        self._cache: dict[tuple[int, str], Outcome] = {}
        self.restarts = 0
        self.tactics = 0

    # -- the process ---------------------------------------------------------------------------

    def _spawn(self, topfile: str | None) -> None:
        self._kill()
        cmd = [COQIDETOP, "-main-channel", "stdfds", "-q", *(["-topfile", topfile] if topfile else [])]
        self._stderr.seek(0)
        self._stderr.truncate()
        self._proc = subprocess.Popen(["/bin/sh", "-c", f"ulimit -v {self.memory_mb * 1024} && exec {shlex.join(cmd)}"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      start_new_session=True, cwd=self.workdir)  # lia/nia write caches here
        self._topfile, self._buffer, self._context, self._chain = topfile, b"", [], []
        self._init_sid = self._tip = xml.init_state(self._call(xml.init_call(), self.context_timeout_s))

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()  # type: ignore[union-attr]
            self._proc = None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _why_dead(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        self._stderr.seek(0)
        tail = self._stderr.read()[-300:].decode(errors="replace").replace("Skipping rcfile loading.", "").strip()
        return f"exit status {code}" + (f": {tail}" if tail else "")

    def _call(self, request: str, timeout_s: float) -> xml.Reply:
        """Send one call and read its reply; _Hung past ``timeout_s`` (the process is killed),
        _Died when the process is gone."""
        if not self._alive():
            raise _Died("the prover process is not running")
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(request.encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _Died(self._why_dead()) from None
        fd, data = self._proc.stdout.fileno(), self._buffer
        deadline = time.monotonic() + timeout_s
        while (end := data.find(b"</value>")) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                raise _Hung(f"no answer within {timeout_s:.0f} s")
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise _Died(self._why_dead())
                data += chunk
        end += len(b"</value>")
        self._buffer = data[end:]
        return xml.parse_reply(data[:end])

    def _add(self, sentence: str, timeout_s: float) -> tuple[int | None, xml.Reply]:
        """Add ``sentence`` at the tip and run it: (new state id, None) or (None, the failure)."""
        reply = self._call(xml.add_call(sentence, self._tip), timeout_s)
        if not reply.ok:  # a parse error: nothing was added
            return None, reply
        parent, self._tip = self._tip, xml.added_state(reply)
        run = self._call(xml.goal_call(), timeout_s)
        if not run.ok:
            self._edit_at(parent)
            return None, run
        return self._tip, run

    def _edit_at(self, sid: int) -> None:
        if sid != self._tip:
            reply = self._call(xml.edit_at_call(sid), self.context_timeout_s)
            if not reply.ok:
                raise _Died(f"Edit_at {sid} failed: {reply.error}")
            self._tip = sid

    # -- theorems ------------------------------------------------------------------------------

    def _context_of(self, theorem: Theorem) -> tuple[list[str], str | None]:
        if theorem.file is None:
            return list(theorem.prelude), None
        if theorem.file not in self._sources:
            folder = self.workdir / f"src{len(self._sources)}"
            self._sources[theorem.file] = coq_sentences(resolve_source(theorem.file), folder)
        sentences, copy = self._sources[theorem.file]
        if theorem.sentence is None or theorem.sentence >= len(sentences):
            raise ProverError(f"{theorem.id}: {theorem.file} has {len(sentences)} sentences, no number {theorem.sentence}")
        return sentences[: theorem.sentence], str(copy)

    def _open(self, theorem: Theorem) -> ProofState:
        """Load the context (reusing the loaded prefix), add the statement: the root state."""
        context, topfile = self._context_of(theorem)
        if not self._alive() or topfile != self._topfile:
            self._spawn(topfile)
        keep = 0
        while keep < min(len(context), len(self._context)) and self._context[keep][0] == context[keep]:
            keep += 1
        self._edit_at(self._context[keep - 1][1] if keep else self._init_sid)
        del self._context[keep:]
        for i, sentence in enumerate(context[keep:], start=keep):
            sid, failure = self._add(sentence, self.context_timeout_s)
            if sid is None:
                raise ProverError(f"{theorem.id}: context sentence {i} ({sentence[:80]!r}) failed: {failure.error}")
            self._context.append((sentence, sid))
        sid, reply = self._add(theorem.statement, self.context_timeout_s)
        goals = xml.parse_goals(reply) if sid is not None else None
        if goals is None:
            why = reply.error if sid is None else "it does not open a proof"
            raise ProverError(f"{theorem.id}: the statement {theorem.statement[:80]!r} failed: {why}")
        self._nodes[0] = _Node(None, None, goals.all, sid)
        self._chain = [0]
        return ProofState(0, goals.all)

    def start(self, theorem: Theorem) -> ProofState:
        self._theorem, self._nodes, self._cache = theorem, {}, {}
        try:
            return self._open(theorem)
        except (_Hung, _Died) as exc:
            self._kill()
            raise ProverError(f"{theorem.id}: the prover failed while loading the theorem ({exc})") from None

    def _goto(self, node: int) -> None:
        """Make ``node`` the tip. Coq's document is one chain: ``Edit_at`` discards every state
        after its target (editing at one of those later fails with ``Stm.Vcs_aux.Expired``), so
        go back to the deepest node the chain shares with ``node``'s path and replay the rest
        (after a restart, the whole path)."""
        if not self._alive() or not self._chain:
            self.restarts += 1
            assert self._theorem is not None
            self._kill()
            self._open(self._theorem)
        path = [node]
        while (parent := self._nodes[path[-1]].parent) is not None:
            path.append(parent)
        path.reverse()
        keep = 0
        while keep < min(len(path), len(self._chain)) and path[keep] == self._chain[keep]:
            keep += 1
        self._edit_at(self._nodes[path[keep - 1]].sid)  # type: ignore[arg-type]
        del self._chain[keep:]
        for n in path[keep:]:
            sid, failure = self._add(self._wrap(self._nodes[n].tactic), self.timeout_s + self.grace_s)  # type: ignore[arg-type]
            if sid is None:
                raise _Died(f"replaying the tactic path failed: {failure.error}")
            self._nodes[n].sid = sid
            self._chain.append(n)

    def _wrap(self, tactic: str) -> str:
        return f"Timeout {self.timeout_s} {tactic}"

    def apply(self, node: int, tactic: str) -> Outcome:
        if self._theorem is None:
            raise ProverError("start a theorem before applying tactics")
        if node not in self._nodes:
            raise ValueError(f"node {node} is not in the current search tree ({len(self._nodes)} nodes)")
        started = time.perf_counter()
        reason = check_tactic(tactic)
        if reason is not None:
            return Outcome("error", message=f"rejected: {reason}")
        key = (node, normalise_tactic(tactic))
        if key in self._cache:
            return self._cache[key]
        self.tactics += 1
        for _ in range(2):  # a process that died (killed from outside, or by this tactic) gets one retry
            try:
                outcome = self._apply(node, key[1])
                break
            except _Hung as exc:
                outcome = Outcome("error", message=f"time limit: {exc}; the prover was restarted")
                break
            except _Died as exc:
                self._kill()
                outcome = Outcome("error", message=f"the prover process died twice on this tactic ({exc})")
        outcome = dataclasses.replace(outcome, time_s=time.perf_counter() - started)
        self._cache[key] = outcome
        return outcome

    def _apply(self, node: int, tactic: str) -> Outcome:
        self._goto(node)
        sid, reply = self._add(self._wrap(tactic), self.timeout_s + self.grace_s)
        if sid is None:
            timed_out = reply.error == "Timeout!"
            return Outcome("error", message=f"time limit: the tactic ran past {self.timeout_s} s" if timed_out else reply.error)
        goals = xml.parse_goals(reply)
        if goals is None:  # cannot happen with check_tactic's rules; kept as a clear error
            self._edit_at(self._nodes[node].sid)  # type: ignore[arg-type]
            return Outcome("error", message="the tactic left proof mode")
        child = len(self._nodes)
        self._nodes[child] = _Node(node, tactic, goals.all, sid)
        self._chain.append(child)
        state = ProofState(child, goals.all)
        if not goals.closed:
            return Outcome("state", state)
        qed, failure = self._add("Qed.", self.qed_timeout_s)
        if qed is None:
            return Outcome("error", state, f"Qed failed: {failure.error}")
        axioms = self._axioms(qed) if self.reject_axioms else ""
        self._edit_at(sid)  # undo Qed: the tree stays open for the other rollouts
        if axioms:
            return Outcome("error", state, f"the proof uses axioms: {axioms}")
        return Outcome("proved", state)

    def _axioms(self, qed_sid: int) -> str:
        """The axioms ``Print Assumptions`` lists for the just-saved theorem ('' when none)."""
        from passn.prover import split_statement_name

        assert self._theorem is not None
        name = split_statement_name(self._theorem.statement)
        if name is None:
            return "cannot tell the theorem's name from its statement to print its assumptions"
        reply = self._call(xml.query_call(f"Print Assumptions {name}.", qed_sid), self.qed_timeout_s)
        text = "\n".join(t for _, t in reply.messages)
        if not reply.ok:
            return f"Print Assumptions failed: {reply.error}"
        return " ".join(text.split("Axioms:", 1)[1].split()) if "Axioms:" in text else ""

    def replay(self, sentences: Sequence[str], topfile: str | None = None) -> Iterator[tuple[int, xml.Goals | None]]:
        """Run ``sentences`` (a whole file, as :func:`coq_sentences` splits it) in a fresh document,
        yielding after each its index and the goals then open (None outside a proof). Raises
        :class:`ProverError` naming the sentence that failed."""
        self._theorem, self._nodes, self._cache = None, {}, {}
        self._spawn(topfile)
        for i, sentence in enumerate(sentences):
            try:
                sid, reply = self._add(sentence, self.context_timeout_s)
            except (_Hung, _Died) as exc:
                self._kill()
                raise ProverError(f"sentence {i} ({sentence[:80]!r}): {exc}") from None
            if sid is None:
                raise ProverError(f"sentence {i} ({sentence[:80]!r}) failed: {reply.error}")
            self._context.append((sentence, sid))
            yield i, xml.parse_goals(reply)

    def close(self) -> None:
        self._kill()
        self._stderr.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        return {"tactics": self.tactics, "restarts": self.restarts, "pid": self._proc.pid if self._proc else None}


# ---------------------------------------------------------------------------------------------
# Ray: a pool of prover actors, one theorem each at a time
# ---------------------------------------------------------------------------------------------


class ProverActor:
    """One CoqProver in a Ray actor. Thin: a theorem in, its root state out; (node, tactic) steps
    in, outcomes out."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.prover = CoqProver(**options)

    def start(self, theorem: Theorem) -> ProofState | str:
        """The root state, or the reason the theorem cannot be started."""
        try:
            return self.prover.start(theorem)
        except ProverError as exc:
            return str(exc)

    def apply_many(self, steps: list[tuple[int, str]]) -> list[Outcome]:
        return [self.prover.apply(node, tactic) for node, tactic in steps]

    def stats(self) -> dict[str, Any]:
        return self.prover.stats()


class ProverPool:
    """``num_actors`` Ray actors, each holding a :class:`CoqProver` (``options`` are its
    arguments). A dead actor is restarted by Ray with a fresh prover."""

    def __init__(self, num_actors: int = 2, cpus_per_actor: float = 0.5, **options: Any) -> None:
        import ray

        remote = ray.remote(max_restarts=-1, max_task_retries=0)(ProverActor)
        self.actors = [remote.options(num_cpus=cpus_per_actor).remote(options) for _ in range(num_actors)]
        ray.get([a.stats.remote() for a in self.actors])  # every prover is up (coqidetop found)

    def stats(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.stats.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
