"""CoqProver against real Coq 8.16 (coqidetop.opt): goals, Qed, time limits, restarts, branching,
malformed tactics; extraction from library files."""

import json
import os
import shutil
import signal
import time

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("coqidetop.opt") is None,
                                 reason="coqidetop.opt is missing: install Coq 8.16 (`make coq`, or apt-get install coq)")]

from actors.prover import CoqProver  # noqa: E402
from passn.prover import Theorem  # noqa: E402

ADD_0_R = Theorem("add_0_r", "Theorem add_0_r : forall n : nat, n + 0 = n.")


@pytest.fixture
def prover(tmp_path):
    with CoqProver(timeout_s=1, grace_s=1.0, workdir=str(tmp_path / "coq")) as p:
        yield p


def test_proves_n_plus_0_by_induction_reporting_each_goal(prover):
    root = prover.start(ADD_0_R)
    assert root.node == 0 and root.text == "|- forall n : nat, n + 0 = n"
    intro = prover.apply(root.node, "intros n.")
    assert intro.kind == "state" and intro.state.text == "n : nat\n|- n + 0 = n"
    split = prover.apply(intro.state.node, "induction n as [|n IH].")
    assert split.kind == "state"
    assert split.state.text == "|- 0 + 0 = 0\n\nn : nat\nIH : n + 0 = n\n|- S n + 0 = S n"
    base = prover.apply(split.state.node, "reflexivity.")
    assert base.kind == "state" and base.state.text == "n : nat\nIH : n + 0 = n\n|- S n + 0 = S n"
    simpl = prover.apply(base.state.node, "simpl.")
    assert simpl.state.text == "n : nat\nIH : n + 0 = n\n|- S (n + 0) = S n"
    rewrite = prover.apply(simpl.state.node, "rewrite IH.")
    assert rewrite.kind == "state" and rewrite.state.text == "n : nat\nIH : n + 0 = n\n|- S n = S n"
    done = prover.apply(rewrite.state.node, "reflexivity.")
    assert done.kind == "proved" and done.state.goals == ()
    # the kernel accepted it; the tree stays open: another branch from the root proves it too
    assert prover.apply(root.node, "induction n; simpl; congruence.").kind == "proved"


def test_a_bogus_recursive_proof_passes_every_tactic_and_fails_at_qed(prover):
    root = prover.start(Theorem("bogus", "Theorem bogus : forall n : nat, n = n + 0."))
    fix = prover.apply(root.node, "fix IH 1.")
    assert fix.kind == "state" and "IH : forall n : nat, n = n + 0" in fix.state.text
    closed = prover.apply(fix.state.node, "exact IH.")
    assert closed.kind == "error" and closed.message.startswith("Qed failed")
    assert "ill-formed" in closed.message


def test_a_looping_tactic_hits_the_time_limit_and_the_driver_recovers(prover):
    root = prover.start(ADD_0_R)
    started = time.monotonic()
    loop = prover.apply(root.node, "repeat (idtac; assert True by trivial).")
    assert loop.kind == "error" and "time limit" in loop.message
    assert time.monotonic() - started < 1 + 1.0 + 1.5  # Coq's Timeout 1, within the watchdog
    assert prover.apply(root.node, "intros n; induction n; simpl; congruence.").kind == "proved"


def test_a_hung_prover_is_killed_by_the_watchdog_and_restarted(prover):
    root = prover.start(ADD_0_R)
    intro = prover.apply(root.node, "intros n.")
    os.kill(prover.stats()["pid"], signal.SIGSTOP)  # fault injection: the process stops answering
    started = time.monotonic()
    hung = prover.apply(intro.state.node, "induction n.")
    assert hung.kind == "error" and "time limit" in hung.message and "restarted" in hung.message
    assert time.monotonic() - started < 1 + 1.0 + 1.5
    again = prover.apply(intro.state.node, "destruct n.")  # the path to the node is replayed
    assert again.kind == "state" and again.state.text == "|- 0 + 0 = 0\n\nn : nat\n|- S n + 0 = S n"
    assert prover.stats()["restarts"] == 1


def test_a_killed_prover_process_is_restarted_with_the_same_states(prover):
    root = prover.start(ADD_0_R)
    intro = prover.apply(root.node, "intros n.")
    split = prover.apply(intro.state.node, "induction n.")
    pid = prover.stats()["pid"]
    os.kill(pid, signal.SIGKILL)
    base = prover.apply(split.state.node, "reflexivity.")  # replays intros, induction in a new process
    assert base.kind == "state" and base.state.text == "n : nat\nIHn : n + 0 = n\n|- S n + 0 = S n"
    assert prover.stats()["pid"] != pid and prover.stats()["restarts"] == 1
    assert prover.apply(base.state.node, "simpl; rewrite IHn; reflexivity.").kind == "proved"


def test_branching_from_an_earlier_state_gives_the_goals_of_replaying(prover, tmp_path):
    path = ["intros n.", "induction n.", "simpl.", "reflexivity.", "simpl."]
    prover.start(ADD_0_R)
    nodes = [0]
    for tactic in path:  # interleave: go deep, branch back to every earlier node, continue
        out = prover.apply(nodes[-1], tactic)
        assert out.kind == "state"
        for earlier in nodes:
            prover.apply(earlier, "exact I.")  # a failing branch
            prover.apply(earlier, "intros.")
        nodes.append(out.state.node)
    branched = prover.apply(nodes[3], "idtac.").state.text  # from the 4th state, after other branches
    assert prover.stats()["restarts"] == 0  # branches are replayed in the same process
    with CoqProver(timeout_s=1, workdir=str(tmp_path / "fresh")) as fresh:
        node = fresh.start(ADD_0_R).node
        for tactic in path[:3] + ["idtac."]:
            node = fresh.apply(node, tactic).state.node
        replayed = fresh.apply(node, "idtac.").state.text
    assert branched == replayed == "|- 0 = 0\n\nn : nat\nIHn : n + 0 = n\n|- S n + 0 = S n"


@pytest.mark.parametrize("tactic", [
    "", "   ", "intros", "intros n. simpl.", "- simpl.", "{", "}", "2: {", "Qed.", "Admitted.", "admit.",
    "try admit.", "Abort.", "Require Import Arith.", "Print nat.", "(* a comment", '"unterminated', "intros (.",
    "exact (fun x => x", "no_such_tactic.", "apply foo_bar_baz.", "\x00intros.", "∀ x, x.", "x" * 5000 + ".",
    "intros n; rewrite.", "Timeout 100 idtac.", "give_up.", "exact I ..",
])
def test_malformed_tactics_are_errors_never_crashes(prover, tactic):
    root = prover.start(ADD_0_R)
    out = prover.apply(root.node, tactic)
    assert out.kind == "error" and out.message
    assert prover.apply(root.node, "intros n; induction n; simpl; congruence.").kind == "proved"


def test_reject_axioms_refuses_a_proof_that_uses_one(tmp_path):
    theorem = Theorem("via_axiom", "Lemma via_axiom : 1 = 2.", prelude=("Axiom bad : False.",))
    with CoqProver(timeout_s=1, workdir=str(tmp_path / "a")) as plain:
        assert plain.apply(plain.start(theorem).node, "destruct bad.").kind == "proved"
    with CoqProver(timeout_s=1, reject_axioms=True, workdir=str(tmp_path / "b")) as strict:
        out = strict.apply(strict.start(theorem).node, "destruct bad.")
        assert out.kind == "error" and "bad : False" in out.message
        ok = Theorem("clean", "Lemma clean : 2 = 2.", prelude=("Axiom bad : False.",))
        assert strict.apply(strict.start(ok).node, "reflexivity.").kind == "proved"


def test_a_library_theorem_starts_after_its_file_prefix(prover):
    from actors.prover import coq_sentences, resolve_source

    sentences, _ = coq_sentences(resolve_source("theories/Arith/Between.v"), prover.workdir / "probe")
    index = next(i for i, s in enumerate(sentences) if s.startswith("Lemma between_le"))
    theorem = Theorem("between_le", sentences[index], file="theories/Arith/Between.v", sentence=index)
    root = prover.start(theorem)
    assert root.text == "P, Q : nat -> Prop\n|- forall k l, between k l -> k <= l"  # the section's variables
    assert prover.apply(root.node, "induction 1; auto.").kind == "proved"
    later = next(i for i, s in enumerate(sentences) if s.startswith("Lemma between_Sk_l"))
    root = prover.start(Theorem("Sk_l", sentences[later], file="theories/Arith/Between.v", sentence=later))
    assert "between k l -> S k <= l" in root.text  # the replayed prefix was reused and extended


def test_extract_replays_files_into_pairs_split_by_file(tmp_path):
    from jobs.prover_extract import is_test_file, run_extract

    out = tmp_path / "data"
    summary = run_extract(str(out), ["theories/Arith/Between.v", "theories/Arith/Cantor.v"], workers=1,
                          test_fraction=0.5)
    assert summary["files"] == 2 and not summary["failed_files"]
    rows = [json.loads(line) for name in ("train.jsonl", "test.jsonl") for line in (out / name).read_text().splitlines()]
    assert sum(summary["pairs"].values()) == len(rows) > 10
    for row in rows:
        assert set(row) == {"theorem", "file", "step", "state", "tactic"}
        split = "test" if is_test_file(row["file"], 0.5) else "train"
        assert json.dumps(row) + "\n" in (out / f"{split}.jsonl").read_text()
    # a proof with bullets: the second bullet's tactic sees only its goal left, the first one's both
    sk_l = [r for r in rows if r["theorem"] == "theories/Arith/Between.v:between_Sk_l"]
    assert [r["tactic"] for r in sk_l] == ["induction 1 as [|* [|]]; auto.",
                                           "intros Hle; exfalso; apply (Nat.nle_succ_diag_l _ Hle).",
                                           "intros Hle; inversion Hle; constructor; auto."]
    assert sk_l[1]["state"].count("|-") == 2 and sk_l[2]["state"].count("|-") == 1
    # resumable: files already done are not replayed again
    (out / "train.jsonl").unlink()
    again = run_extract(str(out), ["theories/Arith/Between.v", "theories/Arith/Cantor.v"], workers=1,
                        test_fraction=0.5)
    assert again == summary and (out / "train.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# passn prove end to end: a real (tiny, quickly fitted) model sampled by vLLM, Coq in Ray actors
# ----------------------------------------------------------------------------------------------


def fitted_model(folder, tactic: str, prompts: list[str], steps: int = 150):
    """A tiny char-level Llama fitted in-process to answer ``tactic`` to every prompt."""
    import torch

    from passn.config import TinyModelSpec
    from passn.models import build_tiny_model

    model, tokenizer = build_tiny_model(TinyModelSpec(alphabet="ascii", max_position_embeddings=128), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = [tokenizer(p).input_ids + tokenizer(tactic, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
             for p in prompts]
    width = max(map(len, batch))
    ids = torch.tensor([b + [tokenizer.pad_token_id] * (width - len(b)) for b in batch])
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def test_prove_end_to_end_on_a_handful_of_theorems(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from passn.prover import proof_prompt

    root = Path(__file__).parents[2]
    theorems = [{"id": "true", "statement": "Lemma t1 : True."},
                {"id": "impl", "statement": "Lemma t2 : forall A B : Prop, A -> B -> A."},
                {"id": "hard", "statement": "Lemma t3 : forall n m : nat, n * m = m * n."},
                {"id": "broken", "statement": "Lemma t4 : no_such_thing."},
                {"id": "lib", "statement": "Lemma t5 : forall b, negb (negb b) = b.", "prelude": ["Require Import Bool."]}]
    (tmp_path / "theorems.jsonl").write_text("".join(json.dumps(t) + "\n" for t in theorems))
    fitted_model(tmp_path / "auto", "auto.", [proof_prompt(s) for s in ("|- True", "|- forall A B : Prop, A -> B -> A",
                                                                          "|- forall n m : nat, n * m = m * n")])
    out = tmp_path / "prove"

    def prove(*extra):
        return subprocess.run([sys.executable, "-m", "jobs.cli", "prove", "--checkpoint", str(tmp_path / "auto"),
                               "--theorems", str(tmp_path / "theorems.jsonl"), "--passes", "4", "--max-steps", "3",
                               "--time-budget-s", "60", "--tactic-timeout-s", "2", "--max-new-tokens", "12",
                               "--out", str(out), *extra], cwd=root, capture_output=True, text=True, timeout=600)

    first = prove("--limit", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = prove("--baseline", str(tmp_path / "auto"))  # resumes the model's 3 theorems, adds 2
    assert second.returncode == 0, second.stderr[-3000:]
    assert "model0: resuming, 3 of 5 theorems already searched" in second.stdout
    rows = {r["id"]: r for r in map(json.loads, (out / "results" / "model0.jsonl").read_text().splitlines())}
    assert set(rows) == {"true", "impl", "hard", "broken", "lib"}
    assert "no_such_thing" in rows["broken"]["skipped"]
    for name in ("true", "impl", "hard", "lib"):
        assert rows[name]["attempts"] == 4 and 0 <= rows[name]["successes"] <= 4
        assert sum(rows[name]["ends"].values()) == 4
    # `auto.` proves the first two (the kernel accepted it), not commutativity of multiplication
    assert rows["true"]["successes"] > 0 and rows["impl"]["successes"] > 0 and rows["hard"]["successes"] == 0
    assert rows["true"]["proof"] == ["auto."]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["theorems"] == 4 and summary["model"]["skipped"][0]["uid"] == "broken"
    assert summary["model"]["provenance"]["verifier"] == "Coq (coqidetop)"
    assert summary["baseline"]["theorems"] == 4 and set(summary["model"]["pass_at_k"]) == {"1", "2", "4"}
    assert summary["model"]["pass_at_k"]["4"] >= summary["model"]["pass_at_k"]["1"] > 0
    assert (out / "pass_at_k.png").stat().st_size > 0
    pooled = [json.loads(line) for line in (out / "theorems.jsonl").read_text().splitlines()]
    assert len(pooled) == 5  # passn's problem records: a rollout is a sample
    assert {r["uid"] for r in pooled} == {"true", "impl", "hard", "broken", "lib"}
    assert all(r["samples"] == 4 for r in pooled if "skipped" not in r)


def test_prove_help_and_bad_input(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    for command in (["prove", "--help"], ["prover", "extract", "--help"]):
        out = subprocess.run([sys.executable, "-m", "jobs.cli", *command], cwd=root, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "usage: passn" in out.stdout
    (tmp_path / "t.jsonl").write_text('{"id": "a"}\n')
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "prove", "--checkpoint", str(tmp_path), "--theorems",
                          str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o")], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and 't.jsonl:1: field "statement" is missing' in out.stderr
