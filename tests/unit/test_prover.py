"""The pure parts of proof search: tactic checks, Coq's XML replies, theorem files, rollout
bookkeeping, pass@k of proof results, and the proof-step task."""

import json

import pytest

from jobs.prover import default_k_grid, pass_at_k_summary, pooled_rows, split_passes
from jobs.prover_extract import is_test_file
from passn import coq_protocol as xml
from passn.proof_steps import ProofStepTask
from passn.prover import (Goal, Outcome, ProofState, Theorem, TheoremSearch, check_tactic, load_theorems,
                          normalise_tactic, proof_prompt, render_state, sampling_plan, split_statement_name)
from passn.tasks import DataError

# ----------------------------------------------------------------------------------------------
# tactics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tactic", [
    "intros n.", "induction n as [|n IH].", "simpl; rewrite IHn; reflexivity.", "2: simpl.", "all: auto.",
    "apply Nat.add_comm.", "rewrite <- (Nat.add_0_r n) at 1.", 'idtac "a. b".', "exact (fun x => x).",
    "destruct (H x) as [y Hy].", "intros * ->; constructor.", "now destruct n.", "x.(field) .",
    "intros (* a. comment *) n.",
])
def test_plain_tactics_are_accepted(tactic):
    assert check_tactic(tactic) is None


@pytest.mark.parametrize("tactic, reason", [
    ("", "empty"), ("intros", "ends with '.'"), ("intros n. simpl.", "more than one sentence"),
    ("intros n.\nsimpl.", "more than one sentence"), ("- simpl.", "bullets"), ("+ auto.", "bullets"),
    ("** auto.", "bullets"), ("{", "braces"), ("}", "braces"), ("2: {", "braces"), ("Qed.", "vernacular"),
    ("Admitted.", "vernacular"), ("Require Import Arith.", "vernacular"), ("#[local] Hint Resolve x.", "vernacular"),
    ("admit.", "leaves a goal"), ("try admit.", "leaves a goal"), ("all: give_up.", "leaves a goal"),
    ("(* only *)", "only a comment"), ("intros (* open", "unterminated comment"), ('idtac "x.', "unterminated string"),
    ("intros\x00.", "control"), ("a" * 3000 + ".", "longer"),
])
def test_other_text_is_refused_with_a_reason(tactic, reason):
    assert reason in check_tactic(tactic)


def test_normalise_tactic_drops_comments_and_collapses_space_outside_strings():
    assert normalise_tactic("intros  (* c (* nested *) *)\n   n.") == "intros n."
    assert normalise_tactic('idtac "a   b".') == 'idtac "a   b".'


def test_statement_names():
    assert split_statement_name("Lemma add_0_r : forall n, n + 0 = n.") == "add_0_r"
    assert split_statement_name("#[global] Instance foo : Bar.") == "foo"
    assert split_statement_name("Local Theorem t' : True.") == "t'"
    assert split_statement_name("Goal True.") is None


def test_state_text_and_prompt():
    goals = (Goal(("n : nat", "IHn : n + 0 = n"), "S n + 0 = S n"), Goal((), "0 + 0 = 0"))
    assert render_state(goals) == "n : nat\nIHn : n + 0 = n\n|- S n + 0 = S n\n\n|- 0 + 0 = 0"
    assert render_state(()) == "no goals"
    assert proof_prompt("|- True") == "|- True\nTactic: "


# ----------------------------------------------------------------------------------------------
# Coq's XML replies (recorded from coqidetop.opt 8.16)
# ----------------------------------------------------------------------------------------------

GOALS_REPLY = (
    b'<feedback object="state" route="0"><state_id val="4"/><feedback_content val="processed"/></feedback>'
    b'<value val="good"><option val="some"><goals><list><goal><string>7</string><list/><richpp><_><pp>0'
    b'<constr.notation>&nbsp;+</constr.notation>&nbsp;0<constr.notation>&nbsp;=</constr.notation>&nbsp;0</pp></_>'
    b'</richpp><option val="none"/></goal><goal><string>10</string><list><richpp><_><pp>n&nbsp;:&nbsp;'
    b'<constr.variable>nat</constr.variable></pp></_></richpp></list><richpp><_><pp><constr.variable>S'
    b'</constr.variable>&nbsp;n&nbsp;=&nbsp;S&nbsp;n</pp></_></richpp><option val="none"/></goal></list>'
    b'<list/><list/><list/></goals></option></value>')


def _goal_xml(text):
    return f"<goal><string>1</string><list/><richpp><_><pp>{text}</pp></_></richpp><option val=\"none\"/></goal>"


def test_goals_reply_with_non_breaking_spaces():
    goals = xml.parse_goals(xml.parse_reply(GOALS_REPLY))
    assert goals.focused == (Goal((), "0 + 0 = 0"), Goal(("n : nat",), "S n = S n"))
    assert not goals.closed and goals.all == goals.focused


def test_unfocused_goals_come_back_in_proof_order():
    # focus on goal 3 of 5 (`3: {`): Coq lists the goals before it nearest first
    before = "".join(_goal_xml(f"g{i}") for i in (2, 1))
    after = "".join(_goal_xml(f"g{i}") for i in (4, 5))
    reply = (f'<value val="good"><option val="some"><goals><list>{_goal_xml("g3")}</list><list><pair><list>{before}'
             f'</list><list>{after}</list></pair></list><list/><list/></goals></option></value>').encode()
    goals = xml.parse_goals(xml.parse_reply(reply))
    assert [g.conclusion for g in goals.all] == ["g1", "g2", "g3", "g4", "g5"]


def test_failure_reply_names_the_last_good_state_and_the_error():
    reply = xml.parse_reply(
        b'<feedback object="state" route="0"><state_id val="9"/><feedback_content val="message"><message>'
        b'<message_level val="error"/><option val="none"/><richpp><_><pp>Timeout!</pp></_></richpp></message>'
        b'</feedback_content></feedback><value val="fail" loc_s="0" loc_e="49"><state_id val="2"/><richpp><_><pp>'
        b'Timeout!</pp></_></richpp></value>')
    assert not reply.ok and reply.good_state == 2 and reply.error == "Timeout!"
    assert reply.messages == (("error", "Timeout!"),)
    assert xml.parse_goals(xml.parse_reply(b'<value val="good"><option val="none"/></value>')) is None


def test_add_call_escapes_the_sentence():
    call = xml.add_call('idtac "<&>".', 3)
    assert '<string>idtac "&lt;&amp;&gt;".</string>' in call
    assert '<state_id val="3"/>' in call


# ----------------------------------------------------------------------------------------------
# theorem files
# ----------------------------------------------------------------------------------------------


def test_theorem_files_load_and_name_bad_rows(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text(json.dumps({"id": "a", "statement": "Lemma a : True.", "prelude": ["Require Import Arith."]}) + "\n"
                    + json.dumps({"id": "b", "statement": "Lemma b : True.", "file": "theories/X.v", "sentence": 3}) + "\n")
    assert load_theorems(str(good)) == [Theorem("a", "Lemma a : True.", ("Require Import Arith.",)),
                                        Theorem("b", "Lemma b : True.", (), "theories/X.v", 3)]
    cases = {'{"id": "a"}': 'field "statement"', '{"id": "a", "statement": "x", "file": "f.v"}': '"file" and "sentence"',
             "[1]": "expected an object", "{not json": "invalid JSON",
             '{"id": "a", "statement": "x", "prelude": "Require."}': '"prelude" must be a list'}
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"id": "ok", "statement": "Lemma ok : True."}\n' + text + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
            load_theorems(str(bad))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "statement": "s."}\n{"id": "a", "statement": "s."}\n')
    with pytest.raises(ValueError, match="dup.jsonl:2: theorem id 'a' already used on line 1"):
        load_theorems(str(dup))


# ----------------------------------------------------------------------------------------------
# rollouts and results
# ----------------------------------------------------------------------------------------------

ROOT = ProofState(0, (Goal((), "A"),))


def test_rollouts_end_on_proof_error_and_step_cap():
    search = TheoremSearch(Theorem("t", "Lemma t : A."), ROOT, passes=3, max_steps=2)
    assert search.requests() == [(0, "|- A"), (1, "|- A"), (2, "|- A")]
    mid = ProofState(1, (Goal(("h : B",), "A"),))
    search.record(0, "t1.", Outcome("proved", ProofState(2, ())))
    search.record(1, "t2.", Outcome("error", message="no"))
    search.record(2, "t3.", Outcome("state", mid))
    assert search.requests() == [(2, "h : B\n|- A")] and search.node_of(2) == 1
    search.record(2, "t4.", Outcome("state", mid))  # second step: the cap
    assert search.finished
    row = search.result()
    assert (row["attempts"], row["successes"], row["proof"]) == (3, 1, ["t1."])
    assert row["ends"] == {"proved": 1, "error": 1, "max_steps": 1} and row["tactics_applied"] == 4


def test_the_time_budget_ends_running_rollouts():
    now = [0.0]
    search = TheoremSearch(Theorem("t", "Lemma t : A."), ROOT, passes=2, max_steps=50, time_budget_s=10,
                           clock=lambda: now[0])
    search.record(0, "t.", Outcome("state", ROOT))
    now[0] = 10.0
    assert search.requests() == [] and search.finished
    assert search.result()["ends"] == {"time_budget": 2}


def test_sampling_plan_groups_identical_states():
    assert sampling_plan(["a", "b", "a", "c", "a", "b"]) == {3: ["a"], 2: ["b"], 1: ["c"]}


def test_passes_split_and_pool_over_an_ensemble():
    assert split_passes(10, 3) == [4, 3, 3] and sum(split_passes(64, 5)) == 64
    a = [{"id": "x", "attempts": 4, "successes": 1, "proof": ["p."], "time_s": 1.0}, {"id": "y", "skipped": "bad"}]
    b = [{"id": "x", "attempts": 3, "successes": 0, "proof": None, "time_s": 2.0}, {"id": "y", "skipped": "bad"}]
    rows = pooled_rows([a, b])
    assert rows[0] == {"id": "x", "attempts": 7, "successes": 1, "proof": ["p."], "time_s": 3.0}
    assert rows[1] == {"id": "y", "skipped": "bad"}


def test_pass_at_k_summary_uses_the_unbiased_estimator():
    rows = [{"id": "x", "attempts": 4, "successes": 1}, {"id": "y", "attempts": 4, "successes": 0},
            {"id": "z", "skipped": "context failed"}]
    s = pass_at_k_summary(rows, [1, 2, 4, 8])
    # x: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5, pass@4 = 1; y: 0; mean over 2 theorems
    assert s["pass_at_k"] == pytest.approx({"1": 0.125, "2": 0.25, "4": 0.5}, abs=1e-12)
    assert s["proved"] == 1 and s["theorems"] == 2 and s["skipped"] == [{"uid": "z", "skipped": "context failed"}]
    assert default_k_grid(12) == [1, 2, 4, 8, 12]


def test_files_split_by_a_stable_hash():
    files = [f"theories/F{i}.v" for i in range(400)]
    test = [f for f in files if is_test_file(f, 0.1)]
    assert 20 < len(test) < 60 and test == [f for f in files[::-1] if is_test_file(f, 0.1)][::-1]


# ----------------------------------------------------------------------------------------------
# the proof-step task
# ----------------------------------------------------------------------------------------------


def _pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_proof_step_task_renders_state_prompts_and_drops_unreadable_rows(tmp_path):
    rows = [{"theorem": "f.v:a", "file": "f.v", "step": 0, "state": "|- True", "tactic": "trivial."},
            {"theorem": "f.v:a", "file": "f.v", "step": 1, "state": "|- " + "x" * 100, "tactic": "auto."},
            {"theorem": "f.v:b", "file": "f.v", "step": 0, "state": "|- ∀ x, x", "tactic": "auto."}]
    task = ProofStepTask(_pairs(tmp_path / "train.jsonl", rows), None, max_chars=60, alphabet="|- Truectiailvx.:\n")
    (only,) = task.problems("train")
    assert only.uid == "f.v:a#0" and task.render_prompt(only) == "|- True\nTactic: "
    assert task.reference_completion(only) == "trivial." and task.check(only, " trivial.\n").correct
    assert task.dropped["train"] == {"longer than task.max_chars": 1, "characters outside the model's alphabet": 1}
    with pytest.raises(DataError, match="no test data configured"):
        task.problems("test")


def test_proof_step_task_names_malformed_rows(tmp_path):
    path = _pairs(tmp_path / "bad.jsonl", [{"theorem": "a", "step": 0, "state": "s", "tactic": "t."},
                                           {"theorem": "a", "step": 1, "state": "s"}])
    with pytest.raises(DataError, match='bad.jsonl:2: field "tactic" is missing'):
        ProofStepTask(path, None).problems("train")


def test_leandojo_goals_and_tactic_rules():
    from types import SimpleNamespace

    from actors.leandojo import _goals, _lean_tactic_problem

    state = SimpleNamespace(pp="a b : Nat\nh : a = b\n⊢ b = a\n\n⊢ True")
    assert _goals(state) == (Goal(("a b : Nat", "h : a = b"), "b = a"), Goal((), "True"))
    assert _lean_tactic_problem("simp [h]") is None
    assert "sorry" in _lean_tactic_problem("exact sorry") and _lean_tactic_problem(" ") == "empty tactic"
