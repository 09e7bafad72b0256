"""`passn bench graders`: passn's answer checking against labelled cases from public graders.

    passn bench graders [--cases FILE] [--mode symbolic|exact] [--out FILE]

The cases (``tests/data/grader_cases.jsonl``) come from the graders' own test suites and documented
examples (Math-Verify, Hendrycks MATH, PRM800K, lm-evaluation-harness, NeMo-Skills, MARIO, Qwen2.5-Math),
each with its source repository and path. Two kinds of line:

- equivalence: ``prediction``, ``reference``, ``label`` (the grader's verdict); ``extract`` names
  the sides that are whole completions (passn extracts their answer first, as it would in training);
- extraction: ``completion`` and the ``answer`` the grader extracts.

Where passn deliberately differs, the line says so: ``passn: {verdict|answer, why}``. The command
prints the agreement with the graders' labels per source, the false accepts (passn says correct, the
label says wrong) and every disagreement with its reason. docs/VERIFY.md states the policies.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_CASES = Path(__file__).resolve().parent.parent / "tests" / "data" / "grader_cases.jsonl"


def load_cases(path: str | Path = DEFAULT_CASES) -> list[dict[str, Any]]:
    """The labelled cases, one JSON object a line; a malformed line names the file and line."""
    cases = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                case = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not ("label" in case or "completion" in case) or "source" not in case:
                raise ValueError(f"{path}:{number}: needs 'source' and either 'label' or 'completion'")
            case["line"] = number
            cases.append(case)
    return cases


@dataclasses.dataclass
class Outcome:
    case: dict[str, Any]
    got: Any  # a verdict (bool) for an equivalence case, an answer for an extraction case
    reason: str = ""

    @property
    def label(self) -> Any:
        return self.case["label"] if "label" in self.case else self.case["answer"]

    @property
    def expected(self) -> Any:
        """What passn should return: the label, or passn's stated policy where it differs."""
        policy = self.case.get("passn", {})
        return policy.get("verdict", policy.get("answer", self.label)) if policy else self.label

    @property
    def agrees(self) -> bool:
        return self.got == self.label

    @property
    def false_accept(self) -> bool:
        return "label" in self.case and self.got is True and self.label is False


def grade(cases: list[dict[str, Any]], mode: str = "symbolic", workers: int = 2,
          timeout_s: float = 3.0) -> list[Outcome]:
    """Run every case through passn's own extraction and checking."""
    from passn.verify import AnswerChecker, extract_answer

    def side(case: dict[str, Any], name: str) -> str | None:
        text = case[name]
        if name not in case.get("extract", ()):
            return text
        answer = extract_answer(text)
        return answer if answer is not None or name == "prediction" else text

    pairs = [c for c in cases if "label" in c]
    with AnswerChecker(mode=mode, workers=workers, timeout_s=timeout_s) as checker:
        verdicts = checker.check_many([(side(c, "prediction"), side(c, "reference")) for c in pairs])
    outcomes = {id(c): Outcome(c, v.correct, v.reason) for c, v in zip(pairs, verdicts)}
    for c in cases:
        if "completion" in c:
            outcomes[id(c)] = Outcome(c, extract_answer(c["completion"]))
    return [outcomes[id(c)] for c in cases]


def agreement_table(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Per source repository (and "all"): cases, agreement with the labels, false accepts and rejects."""
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        if "label" not in o.case:
            continue
        for key in (o.case["source"].split(":")[0], "all"):
            row = rows[key]
            row["cases"] += 1
            row["agree"] += o.agrees
            row["false_accepts"] += o.false_accept
            row["false_rejects"] += (not o.agrees) and not o.false_accept
    return {k: {**v, "agreement": v["agree"] / v["cases"]} for k, v in rows.items()}


def _command(args: argparse.Namespace) -> int:
    cases = load_cases(args.cases)
    print(f"{len(cases)} cases from {args.cases}, mode {args.mode} ...", flush=True)
    outcomes = grade(cases, args.mode)
    table = agreement_table(outcomes)
    print(f"{'source':44s} {'cases':>5s} {'agree':>7s} {'false acc.':>10s} {'false rej.':>10s}")
    for source, row in sorted(table.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        print(f"{source:44s} {row['cases']:5d} {row['agreement']:7.1%} {row['false_accepts']:10d} {row['false_rejects']:10d}")
    extraction = [o for o in outcomes if "completion" in o.case]
    print(f"extraction: {sum(o.agrees for o in extraction)}/{len(extraction)} as the grader extracts")
    unexpected = [o for o in outcomes if o.got != o.expected]
    print("disagreements with the labels (each with passn's stated reason):")
    for o in outcomes:
        if not o.agrees:
            shown = o.case.get("prediction", o.case.get("completion"))
            why = o.case.get("passn", {}).get("why", "NO STATED REASON")
            print(f"  line {o.case['line']}: {shown!r:.70} vs {o.label!r:.40}: passn {o.got!r:.30} -- {why}")
    for o in unexpected:
        print(f"  UNEXPECTED line {o.case['line']}: passn gives {o.got!r} ({o.reason}), the file expects {o.expected!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"mode": args.mode, "cases": len(cases), "table": table,
                       "unexpected": [o.case["line"] for o in unexpected]}, f, indent=2)
        print(f"wrote {args.out}")
    return 1 if unexpected else 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("graders", help="answer checking against public graders' labelled cases",
                         description="Agreement of passn's extraction and answer checking with the labels of "
                                     "public graders' test suites, per source, with every disagreement and "
                                     "its stated reason. Exit 1 when a case differs from what the file expects.")
    p.add_argument("--cases", default=str(DEFAULT_CASES), help="labelled cases, JSON lines (default: %(default)s)")
    p.add_argument("--mode", choices=("symbolic", "exact"), default="symbolic")
    p.add_argument("--out", help="also write the table as JSON here")
    p.set_defaults(run=_command)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="passn bench")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["graders", *sys.argv[1:]])
    sys.exit(args.run(args))
