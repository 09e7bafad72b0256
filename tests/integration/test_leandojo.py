"""LeanDojoProver against real Lean 4 (clusters only: skipped where LeanDojo or Lean is missing).

The repository and theorem default to LeanDojo's own example (network access needed on first use to
trace it); set PASSN_LEAN_REPO, PASSN_LEAN_COMMIT, PASSN_LEAN_FILE, PASSN_LEAN_THEOREM and
PASSN_LEAN_LINE for another, PASSN_LEAN_REPO_DIR to a checkout for the kernel check.
"""

import os
import shutil

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.lean,
              pytest.mark.skipif(shutil.which("lake") is None, reason="Lean 4 (lake, via elan) is not installed")]
lean_dojo = pytest.importorskip("lean_dojo", reason="lean-dojo is not installed (pip install lean-dojo)")

from actors.leandojo import LeanDojoProver  # noqa: E402
from passn.prover import Theorem  # noqa: E402

REPO = os.environ.get("PASSN_LEAN_REPO", "https://github.com/yangky11/lean4-example")
COMMIT = os.environ.get("PASSN_LEAN_COMMIT", "fd14c4c8b29cc74a082e5ae6f64c2fb25b28e15e")
THEOREM = Theorem(os.environ.get("PASSN_LEAN_THEOREM", "hello_world"),
                  "theorem hello_world (a b c : Nat) : a + b + c = a + c + b",
                  file=os.environ.get("PASSN_LEAN_FILE", "Lean4Example.lean"),
                  sentence=int(os.environ.get("PASSN_LEAN_LINE", "0")))


def test_leandojo_proves_branches_and_rejects():
    prover = LeanDojoProver(REPO, COMMIT, repo_dir=os.environ.get("PASSN_LEAN_REPO_DIR"),
                            kernel_check="PASSN_LEAN_REPO_DIR" in os.environ)
    with prover:
        root = prover.start(THEOREM)
        assert root.goals and "⊢" not in root.text
        assert prover.apply(root.node, "sorry").kind == "error"
        assert prover.apply(root.node, "exact foo_bar_baz").kind == "error"
        done = prover.apply(root.node, "rw [Nat.add_assoc, Nat.add_comm b, ← Nat.add_assoc]")
        assert done.kind == "proved", done.message
        assert prover.apply(root.node, "omega").kind == "proved"  # another branch from the root
