"""The `passn` command. Each subcommand lives in its own module under jobs/ and is imported only
when it runs, so `passn --help` stays fast (no Ray, vLLM or DeepSpeed at start-up)."""

from __future__ import annotations

import argparse
import sys


def _config_command(args: argparse.Namespace) -> int:
    from passn.config import ConfigError, config_hash, load_config, to_yaml

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    print(f"# config hash {config_hash(cfg)[:16]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="passn",
        description="Fine-tune language models for pass@N (DCO, DCOstep, DCOa) on Ray.",
        epilog="See README.md for each command's use; `passn COMMAND --help` for its flags.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="validate a configuration and print it resolved",
                            description="Load CONFIG (YAML; omit for the defaults), apply --set overrides, "
                                        "validate, and print the resolved configuration with its hash.")
    config.add_argument("config", nargs="?", help="YAML file, local or s3://")
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. objective.budget=64 (repeatable)")
    config.set_defaults(run=_config_command)

    train = sub.add_parser("train", help="fine-tune with CE, DCO or DCOstep (Ray Train + DeepSpeed)",
                           description="Train CONFIG into --run-dir on a Ray cluster (local by default). A run "
                                       "directory with checkpoints is resumed from the newest valid one.")
    from jobs import train as train_job  # light: Ray and DeepSpeed load only when a run starts

    train_job.add_arguments(train)
    train.set_defaults(run=train_job.main_with_args)

    from jobs import bench, data, demo, evaluate, frontier, model, prover, serve, submit, sweep

    evaluate.add_parser(sub)
    prover.add_parser(sub)
    sweep.add_parser(sub)
    frontier.add_parser(sub)
    serve.add_parser(sub)
    submit.add_parser(sub)
    demo.add_parser(sub)
    bench.add_parser(sub)
    model.add_parser(sub)
    data.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jobs.cluster import multicast_off
    from jobs.submit import split_rest

    multicast_off()  # before anything here or below starts NCCL (MULTICAST_OFF says why)
    argv, rest = split_rest(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if rest:
        args.rest = rest
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
