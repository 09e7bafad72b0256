"""`passn data`: task data passn generates itself.

    passn data arithmetic --out data/arith --train 2000 --test 200 --seed 0 --max-steps 3

writes OUT/train.jsonl and OUT/test.jsonl: multi-step arithmetic word problems in the MATH format
(passn.arithmetic), which `task.kind: math` reads (`task.train_path`, `task.test_path`; template
`cot` trains on the worked solutions, `direct` on the answers alone).
"""

from __future__ import annotations

import argparse
import json


def write_splits(out: str, splits: dict[str, list[dict]]) -> list[str]:
    """Each split's rows as OUT/<split>.jsonl (local or s3://); the paths written."""
    import fsspec

    paths = []
    for split, rows in splits.items():
        path = f"{out.rstrip('/')}/{split}.jsonl"
        with fsspec.open(path, "wt", encoding="utf-8", auto_mkdir=True) as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


def _arithmetic(args: argparse.Namespace) -> int:
    from passn.arithmetic import arithmetic_splits

    try:
        train, test = arithmetic_splits(args.train, args.test, args.seed, args.max_steps)
    except ValueError as e:
        print(f"passn data arithmetic: {e}")
        return 2
    for path, rows in zip(write_splits(args.out, {"train": train, "test": test}), (train, test)):
        print(f"wrote {len(rows)} problems to {path}")
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("data", help="generate task data (arithmetic word problems in the MATH format)",
                         description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", required=True)
    a = sub.add_parser("arithmetic", help="multi-step arithmetic word problems with worked solutions")
    a.add_argument("--out", required=True, help="a folder (local or s3://) for train.jsonl and test.jsonl")
    a.add_argument("--train", type=int, default=2000, help="train problems")
    a.add_argument("--test", type=int, default=200, help="held-out test problems (no text shared with train)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--max-steps", type=int, default=3, help="operations per problem: 1 to this many")
    a.set_defaults(run=_arithmetic)
