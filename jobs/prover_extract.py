"""`passn prover extract --out DIR`: (proof state, tactic) pairs from the proofs of Coq's library sources.

Debian's libcoq-stdlib installs the standard library's .v sources beside the compiled files
(under `coqc -where`). Every selected file is split into sentences by Coq itself (coqc -time on a
private copy) and replayed one sentence at a time through coqidetop (-topfile: the module name is
coqc's), asking for the goals after each. Inside a proof, every sentence that is a plain tactic
(passn.prover.check_tactic: no bullets, braces or vernacular) becomes a row
{theorem, file, step, state, tactic}, the state being all open goals as a proof without bullets
shows them. Train and test are split by file (a stable hash of the path: no proof of a test file
is seen in training, and a subset run splits the same way).

Writes into DIR: files/*.json (one per source file, written when it is done: a rerun skips those,
so an interrupted extraction resumes), then train.jsonl, test.jsonl, theorems-test.jsonl (the
test files' named lemmas closed by Qed, as `passn prove --theorems` reads them) and summary.json.
Files under theories/Init/ (they need -noinit) are left out.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

DEFAULT_FILES = "theories/*.v"
EXCLUDED = ("theories/Init/*",)
LEMMA_KINDS = ("Theorem", "Lemma", "Fact", "Remark", "Corollary", "Proposition", "Property", "Example")


def is_test_file(rel: str, test_fraction: float) -> bool:
    """The split of a source file: the first 8 hex digits of sha256(path) as a fraction of 2^32."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 2**32 < test_fraction


def select_files(root: Path, patterns: list[str], limit: int | None) -> list[str]:
    """Library files (relative to ``root``) matching any pattern (``*`` crosses folders), sorted."""
    every = sorted(p.relative_to(root).as_posix() for p in (root / "theories").rglob("*.v"))
    chosen = [f for f in every if any(fnmatch.fnmatch(f, p) for p in patterns)
              and not any(fnmatch.fnmatch(f, e) for e in EXCLUDED)]
    return chosen[:limit]


def extract_file(rel: str, tactic_timeout_s: float = 300.0) -> dict[str, Any]:
    """Replay one library file: its (state, tactic) rows and its lemmas."""
    from actors.prover import CoqProver, coq_sentences, resolve_source
    from passn.prover import check_tactic, normalise_tactic, render_state, split_statement_name

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    theorems: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="passn-extract-") as tmp:
        prover = CoqProver(context_timeout_s=tactic_timeout_s, workdir=tmp)
        try:
            sentences, copy = coq_sentences(resolve_source(rel), Path(tmp) / "src")
            before = None  # goals open before the current sentence
            current: dict[str, Any] | None = None  # the proof being replayed
            for i, after in prover.replay(sentences, str(copy)):
                sentence = sentences[i]
                if before is None and after is not None:  # a statement opened a proof
                    name = split_statement_name(sentence)
                    current = {"id": f"{rel}:{name or f'sentence{i}'}", "statement": sentence.strip(), "file": rel,
                               "sentence": i, "named": name is not None, "lemma": sentence.lstrip().startswith(LEMMA_KINDS),
                               "steps": 0}
                elif before is not None and current is not None:
                    tactic = normalise_tactic(sentence)
                    if after is None:  # the proof ended: Qed, Defined, Admitted, ...
                        if current.pop("named") and current.pop("lemma") and tactic == "Qed.":
                            theorems.append(current)
                        current = None
                    elif before.all and check_tactic(tactic) is None:
                        rows.append({"theorem": current["id"], "file": rel, "step": current["steps"],
                                     "state": render_state(before.all), "tactic": tactic})
                        current["steps"] += 1
                before = after
            error = None
        except Exception as exc:  # noqa: BLE001  (one broken file must not stop the extraction)
            error = f"{type(exc).__name__}: {exc}"
            sentences = []
        finally:
            prover.close()
    return {"file": rel, "pairs": rows, "theorems": theorems, "sentences": len(sentences), "error": error,
            "seconds": round(time.perf_counter() - started, 2)}


def _done_path(out: Path, rel: str) -> Path:
    return out / "files" / (rel.replace("/", "__") + ".json")


def merge(out: Path, files: list[str], test_fraction: float) -> dict[str, Any]:
    """train.jsonl, test.jsonl and theorems-test.jsonl from the per-file results; the summary."""
    counts = {"train": 0, "test": 0}
    proofs = {"train": set(), "test": set()}
    failed, theorems = [], 0
    with (out / "train.jsonl").open("w") as train, (out / "test.jsonl").open("w") as test, \
            (out / "theorems-test.jsonl").open("w") as held_out:
        for rel in files:
            result = json.loads(_done_path(out, rel).read_text())
            if result["error"]:
                failed.append({"file": rel, "error": result["error"][:500]})
            split = "test" if is_test_file(rel, test_fraction) else "train"
            sink = test if split == "test" else train
            for row in result["pairs"]:
                sink.write(json.dumps(row) + "\n")
                proofs[split].add(row["theorem"])
            counts[split] += len(result["pairs"])
            if split == "test":
                for t in result["theorems"]:
                    held_out.write(json.dumps({k: t[k] for k in ("id", "statement", "file", "sentence", "steps")}) + "\n")
                    theorems += 1
    summary = {"files": len(files), "failed_files": failed, "pairs": counts,
               "proofs": {k: len(v) for k, v in proofs.items()}, "held_out_theorems": theorems,
               "test_fraction": test_fraction,
               "test_files": sum(is_test_file(f, test_fraction) for f in files)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_extract(out: str, patterns: list[str], limit_files: int | None = None, workers: int | None = None,
                test_fraction: float = 0.1) -> dict[str, Any]:
    from tqdm import tqdm

    from actors.prover import library_root

    root = Path(out)
    (root / "files").mkdir(parents=True, exist_ok=True)
    files = select_files(library_root(), patterns, limit_files)
    if not files:
        raise ValueError(f"no library files match {patterns} under {library_root()}")
    todo = [f for f in files if not _done_path(root, f).exists()]
    if len(todo) < len(files):
        print(f"resuming: {len(files) - len(todo)} of {len(files)} files already extracted in {out}", flush=True)
    workers = workers or os.cpu_count() or 1
    pairs = 0
    bar = tqdm(total=len(files), initial=len(files) - len(todo), desc="files", unit="file", file=sys.stdout)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(extract_file, rel): rel for rel in todo}
        for future in as_completed(futures):
            result = future.result()
            done = _done_path(root, futures[future])
            partial = done.with_suffix(".partial")
            partial.write_text(json.dumps(result))
            partial.rename(done)  # the per-file done marker: written whole or not at all
            pairs += len(result["pairs"])
            bar.update(1)
            bar.set_postfix(pairs=pairs, failed=None if not result["error"] else futures[future])
    bar.close()
    return merge(root, files, test_fraction)


def _extract_command(args: argparse.Namespace) -> int:
    from passn.prover import ProverError

    try:
        summary = run_extract(args.out, args.files or [DEFAULT_FILES], args.limit_files, args.workers,
                              args.test_fraction)
    except (ValueError, ProverError, OSError) as exc:
        print(f"passn prover extract: {exc}", file=sys.stderr)
        return 2
    print(f"{summary['files']} files ({len(summary['failed_files'])} failed): {summary['pairs']['train']} train and "
          f"{summary['pairs']['test']} test pairs from {summary['proofs']['train']} + {summary['proofs']['test']} "
          f"proofs; {summary['held_out_theorems']} held-out theorems; in {args.out}")
    for f in summary["failed_files"]:
        print(f"  failed: {f['file']}: {f['error'][:200]}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    doc = __doc__.split("\n\n")
    prover = sub.add_parser("prover", help="proof-assistant data: `passn prover extract`")
    kinds = prover.add_subparsers(dest="prover_command", required=True, metavar="COMMAND")
    p = kinds.add_parser("extract", help="(state, tactic) pairs from the Coq standard library's proofs",
                         description=doc[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="\n\n".join(doc[1:]))
    p.add_argument("--out", required=True, help="output folder (local); a rerun resumes")
    p.add_argument("--files", action="append", metavar="GLOB",
                   help=f"library files to replay, relative to `coqc -where` (repeatable; default {DEFAULT_FILES!r}, "
                        "where * also crosses folders)")
    p.add_argument("--limit-files", type=int, help="only the first N matching files (sorted by path)")
    p.add_argument("--workers", type=int, help="parallel Coq processes (default: CPUs)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of files held out (default 0.1)")
    p.set_defaults(run=_extract_command)
