"""`passn submit`: run `passn train|sweep|evaluate` as a Ray job on a cluster (Ray Jobs SDK).

    passn submit configs/tiny.yaml --address http://HEAD:8265 -- train --run-dir s3://bucket/runs/x
    passn submit configs/paper-math-direct-dco.yaml --no-wait -- sweep --run-dir s3://bucket/sweep \\
        --grid objective.budget=1,16,256
    passn status JOB_ID | passn logs JOB_ID [--follow] | passn stop JOB_ID

The project folder travels as the job's working_dir (without .venv, .git, runs/); the cluster
provides the packages (the container image of deploy/, or --image / --pip-lock). The command
prints the job id, follows the logs until the job ends and prints its final status; the exit code
is 0 only for SUCCEEDED. Ray token authentication: the token comes from --token-file,
$RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH, and travels only in the Authorization header. Secrets
(S3 keys) are never put in the job's runtime_env or metadata: jobs read them from the cluster's
environment or secret mounts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".git", "runs", ".whl", "*.egg-info", "__pycache__", ".pytest_cache"]
COMMANDS = ("train", "sweep", "evaluate")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def read_token(token_file: str | None) -> str | None:
    """--token-file, then $RAY_AUTH_TOKEN, then $RAY_AUTH_TOKEN_PATH (Ray's own order)."""
    path = token_file or (None if os.environ.get("RAY_AUTH_TOKEN") else os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise ValueError(f"{path}: the token file is empty")
        return token
    return os.environ.get("RAY_AUTH_TOKEN") or None


def client(address: str | None, token_file: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    token = read_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # the SDK raises bare exceptions for refused connections and tokens
        raise ConnectionError(f"{address}: {_explain(exc)}") from None


def _explain(exc: Exception) -> str:
    text = str(exc)
    if "401" in text or "Missing authentication" in text:
        return "the cluster requires a Ray token: pass --token-file FILE or set RAY_AUTH_TOKEN"
    if "403" in text or "Invalid authentication" in text:
        return "the cluster refused the Ray token (403 Forbidden): check --token-file or RAY_AUTH_TOKEN"
    return text.splitlines()[0] if text else type(exc).__name__


def entrypoint(command: str, config: str, sets: list[str], rest: list[str]) -> str:
    flags = [a for s in sets for a in ("--set", s)]
    if command == "evaluate":
        args = ["evaluate", "--config", config, *flags, *rest]
    else:
        args = [command, config, *flags, *rest]
    return "python -m jobs.cli " + " ".join(shlex.quote(a) for a in args)


def runtime_env(image: str | None, pip_lock: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "working_dir": str(ROOT), "excludes": EXCLUDES,
        # relative to the job's working directory; no secrets here (they come from the cluster)
        "env_vars": {"PYTHONPATH": "platform:.", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "VLLM_NO_USAGE_STATS": "1",
                     # passn's own ray.init adds to the job's environment (its values win)
                     "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"},
    }
    if image:
        env["image_uri"] = image
    if pip_lock:
        lock = ROOT / "requirements" / "cpu.lock"
        env["pip"] = [line.split(";")[0].strip() for line in lock.read_text().splitlines()
                      if line.strip() and not line.startswith(("#", " ", "-"))]
    return env


def submit(args: argparse.Namespace) -> int:
    from passn.config import ConfigError, load_config

    if not args.rest or args.rest[0] not in COMMANDS:
        print(f"passn submit: after --, give one of {', '.join(COMMANDS)} and its arguments", file=sys.stderr)
        return 2
    command, rest = args.rest[0], args.rest[1:]
    config = args.config
    try:
        load_config(config, args.set)  # fail here, not on the cluster
        if "://" not in config:
            path = Path(config).resolve()
            if ROOT not in path.parents:
                raise ValueError(f"{config}: the config must lie inside the project (it travels with the job's "
                                 f"working_dir) or on s3://")
            config = str(path.relative_to(ROOT))
        jobs = client(args.address, args.token_file)
        job_id = jobs.submit_job(entrypoint=entrypoint(command, config, args.set, rest),
                                 runtime_env=runtime_env(args.image, args.pip_lock),
                                 submission_id=f"passn-{command}-{uuid.uuid4().hex[:10]}",
                                 metadata={"passn_command": command, "config": config})
    except (ConfigError, ValueError, ConnectionError, OSError) as exc:
        print(f"passn submit: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the SDK's errors for refused submissions
        print(f"passn submit: {_explain(exc)}", file=sys.stderr)
        return 2
    print(f"submitted {job_id}", flush=True)
    if args.no_wait:
        print(f"follow it with: passn logs {job_id} --follow; passn status {job_id}")
        return 0
    return follow(jobs, job_id)


def follow(jobs, job_id: str) -> int:
    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (passn stop {job_id} ends it)")
        return 130
    info = jobs.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    print(f"job {job_id}: {status}" + (f" ({info.message})" if info.message and status != "SUCCEEDED" else ""))
    return 0 if status == "SUCCEEDED" else 1


def _job_command(action: str):
    def run(args: argparse.Namespace) -> int:
        try:
            jobs = client(args.address, args.token_file)
            if action == "status":
                info = jobs.get_job_info(args.job)
                print(f"{args.job}: {getattr(info.status, 'value', info.status)}"
                      + (f" ({info.message})" if info.message else ""))
            elif action == "logs":
                if args.follow:
                    return follow(jobs, args.job)
                print(jobs.get_job_logs(args.job), end="")
            else:
                stopped = jobs.stop_job(args.job)
                print(f"{args.job}: {'stop requested' if stopped else 'already finished'}")
        except (ConnectionError, OSError) as exc:
            print(f"passn {action}: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            print(f"passn {action}: {_explain(exc)}", file=sys.stderr)
            return 2
        return 0

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--token-file", help="Ray token file (default: $RAY_AUTH_TOKEN, then $RAY_AUTH_TOKEN_PATH)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run train, sweep or evaluate as a Ray job on a cluster",
                       usage="passn submit CONFIG [options] -- train|sweep|evaluate [its arguments]",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML configuration inside the project, or s3://")
    _common(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--image", help="container image for the job (runtime_env image_uri)")
    p.add_argument("--pip-lock", action="store_true",
                   help="install requirements/cpu.lock in the job's environment (CPU clusters; GPU clusters use the "
                        "image of deploy/Dockerfile)")
    # what follows "--" (the passn command and its arguments) is split off before parsing: see split_rest
    p.set_defaults(run=submit, rest=[])
    for action, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        q = sub.add_parser(action, help=f"{text} (Ray Jobs)")
        q.add_argument("job", help="the job id passn submit printed")
        _common(q)
        if action == "logs":
            q.add_argument("--follow", action="store_true", help="follow until the job ends")
        q.set_defaults(run=_job_command(action))


def split_rest(argv: list[str]) -> tuple[list[str], list[str]]:
    """``passn submit CONFIG [options] -- train ...``: (the submit arguments, the job's command)."""
    if argv and argv[0] == "submit" and "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []
