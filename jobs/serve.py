"""`passn serve`: trained checkpoints behind an OpenAI-compatible API (Ray Serve), in the foreground.

    export PASSN_SERVE_TOKEN=...            # or --token-file /run/secrets/passn-token
    passn serve --checkpoint ce=runs/ce/checkpoints/step_00000468 \\
                --checkpoint dco=runs/dco/checkpoints/step_00000468 --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=token)
    client.completions.create(model="ce", prompt="...", n=8, logprobs=1, max_tokens=16, seed=0)

Endpoints: ``POST /v1/completions``, ``GET /v1/models`` (both need ``Authorization: Bearer
TOKEN``) and ``GET /health`` (open and cheap: each model's last generation, or a one-token probe at
most every few seconds). Runs until SIGINT or SIGTERM, then drains: new requests are answered 503
with Retry-After while those already running finish (at most --drain-timeout seconds); then it
closes its port, deletes the application and stops the Ray cluster it started. A second signal
ends the drain at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import PurePosixPath

TOKEN_ENV = "PASSN_SERVE_TOKEN"
APP_NAME = "passn"


def model_id_for(checkpoint: str) -> str:
    """``runs/ce/checkpoints/step_00000468`` -> ``ce/step_00000468``; any other folder -> its name."""
    parts = PurePosixPath(checkpoint.rstrip("/").split("://")[-1]).parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return f"{parts[-3]}/{parts[-1]}"
    return parts[-1]


def parse_checkpoints(specs: list[str]) -> dict[str, str]:
    """``[ID=]DIR`` flags -> {model id: folder}; ids must be unique."""
    out: dict[str, str] = {}
    for spec in specs:
        model_id, sep, folder = spec.partition("=")
        if not sep or "://" in model_id or os.path.exists(spec):
            model_id, folder = model_id_for(spec), spec
        if model_id in out:
            raise ValueError(f"--checkpoint: model id {model_id!r} is given twice; name them: --checkpoint ID=DIR")
        out[model_id] = folder
    return out


def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token, $PASSN_SERVE_TOKEN or --token-file (first found)."""
    if args.token:
        return args.token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file}: the file is empty")
        return token
    return None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve checkpoints through an OpenAI-compatible API (Ray Serve)",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--checkpoint", action="append", required=True, metavar="[ID=]DIR",
                   help="a passn checkpoint or Hugging Face model folder, local or s3:// (repeatable); the model id "
                        "defaults to RUN/step_N for checkpoints and the folder name otherwise")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help=f"bearer token (visible in the process list: prefer ${TOKEN_ENV} or --token-file)")
    p.add_argument("--token-file", help="file holding the bearer token (a Kubernetes secret mount, say)")
    p.add_argument("--no-auth", action="store_true", help="serve without authentication (local experiments only)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--max-n", type=int, default=256, help="largest n per request")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens per request")
    p.add_argument("--max-ongoing", type=int, default=32, help="requests a model replica works on at once")
    p.add_argument("--max-queued", type=int, default=64, help="requests per model waiting for a replica before 503 (Serve counts a request as waiting until a replica takes it, so a burst larger than this can be turned away while the replica has room)")
    p.add_argument("--max-batch", type=int, default=16, help="requests batched into one engine call")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request is answered 504")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds that requests still running on SIGTERM/SIGINT may take to finish (default 30)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per model")
    p.add_argument("--cpus-per-replica", type=float, default=0.5)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="split each model over this many GPUs of one node (vLLM tensor parallelism, one worker "
                        "process a GPU); needs --gpus-per-replica equal to it")
    p.add_argument("--kv-cache-mb", type=int, default=256, help="vLLM KV cache per replica, MiB (at least one sequence of the model's length)")
    p.add_argument("--dtype", default=None, help="engine dtype (default: the checkpoint's own, from config.json)")
    p.set_defaults(run=main_with_args)


def main_with_args(args: argparse.Namespace) -> int:
    from passn import checkpoint as ckpt
    from passn.openai_api import Limits, token_digest

    try:
        token = read_token(args)
        if token is None and not args.no_auth:
            raise ValueError(f"no token: pass --token-file FILE, set ${TOKEN_ENV}, or --no-auth for local experiments")
        check_tensor_parallel(args.tensor_parallel, args.gpus_per_replica)
        models = resolve_models(parse_checkpoints(args.checkpoint), args.kv_cache_mb, args.dtype, args.max_batch,
                                args.tensor_parallel)
        limits = Limits(max_n=args.max_n, max_tokens=args.max_tokens)
    except (ValueError, OSError, ckpt.CheckpointError) as exc:
        print(f"passn serve: {exc}", file=sys.stderr)
        return 2
    return serve_forever(models, None if token is None else token_digest(token), limits, args)


def check_tensor_parallel(tensor_parallel: int, gpus_per_replica: float) -> None:
    """A replica split over GPUs holds exactly that many whole GPUs (vLLM puts one worker on each)."""
    if tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel {tensor_parallel}: at least 1")
    if tensor_parallel > 1 and gpus_per_replica != tensor_parallel:
        raise ValueError(f"--tensor-parallel {tensor_parallel} splits each model over {tensor_parallel} GPUs: "
                         f"set --gpus-per-replica {tensor_parallel} (it is {gpus_per_replica:g})")


def resolve_models(checkpoints: dict[str, str], kv_cache_mb: int, dtype: str | None,
                   max_batch: int, tensor_parallel: int = 1) -> dict[str, dict]:
    """{model id: folder} -> {model id: ModelServer arguments}, each checkpoint verified first."""
    from jobs.evaluate import resolve_model_dir
    from jobs.cluster import absolute_path
    from passn.models import folder_kv_cache_floor, folder_limits

    models = {}
    for model_id, folder in checkpoints.items():
        model_dir = resolve_model_dir(absolute_path(folder))  # safetensors weights only (PickledWeightsError)
        max_len, saved_dtype = folder_limits(model_dir)
        kv_cache = max(kv_cache_mb << 20, folder_kv_cache_floor(model_dir, max_len, dtype or saved_dtype))
        models[model_id] = {"model_dir": model_dir, "max_model_len": max_len, "kv_cache_bytes": kv_cache,
                            "dtype": dtype or saved_dtype, "max_batch_size": max_batch,
                            "tensor_parallel": tensor_parallel}
    return models


def app_builder(args: dict[str, str]):
    """The same application for `serve run` and KubeRay's RayService (serveConfigV2
    ``import_path: jobs.serve:app_builder``), configured by ``args``:

        checkpoints: "ce=s3://bucket/runs/ce/checkpoints/step_00000468,dco=s3://..."   (required)
        max_n, max_tokens, max_ongoing, max_queued, max_batch, request_timeout, kv_cache_mb,
        gpus_per_replica, cpus_per_replica, replicas, dtype, tensor_parallel             (optional)

    The bearer token comes from $PASSN_SERVE_TOKEN or the file named by $PASSN_SERVE_TOKEN_FILE
    in the environment (a Kubernetes secret), never from the args.
    """
    from actors.serve import build_app
    from passn.openai_api import Limits, token_digest

    if not args.get("checkpoints"):
        raise ValueError("app_builder: args.checkpoints is required (ID=DIR,ID=DIR,...)")
    token = os.environ.get(TOKEN_ENV)
    if not token and os.environ.get(f"{TOKEN_ENV}_FILE"):
        with open(os.environ[f"{TOKEN_ENV}_FILE"]) as f:
            token = f.read().strip()
    if not token:
        raise ValueError(f"app_builder: set {TOKEN_ENV} or {TOKEN_ENV}_FILE (a secret) in the environment")
    number = lambda key, default, cast=int: cast(args.get(key, default))  # noqa: E731
    tensor_parallel = number("tensor_parallel", 1)
    check_tensor_parallel(tensor_parallel, number("gpus_per_replica", 1.0, float))
    models = resolve_models(parse_checkpoints(args["checkpoints"].split(",")), number("kv_cache_mb", 4096),
                            args.get("dtype"), number("max_batch", 16), tensor_parallel)
    return build_app(models, token_digest(token), Limits(max_n=number("max_n", 256), max_tokens=number("max_tokens", 1024)),
                     request_timeout_s=number("request_timeout", 120.0, float), health_timeout_s=30.0,
                     max_ongoing=number("max_ongoing", 32), max_queued=number("max_queued", 64),
                     replicas=number("replicas", 1), cpus=number("cpus_per_replica", 4.0, float),
                     gpus=number("gpus_per_replica", 1.0, float))


def serve_forever(models: dict, digest: str | None, limits, args: argparse.Namespace) -> int:
    from ray import serve
    from ray.serve.config import HTTPOptions

    from actors.serve import build_app
    from jobs.cluster import ray_session

    address = args.address or os.environ.get("RAY_ADDRESS")
    with ray_session(address):
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options=HTTPOptions(host=args.host, port=args.port,
                                             request_timeout_s=args.request_timeout + 30))
        app = build_app(models, digest, limits, request_timeout_s=args.request_timeout, health_timeout_s=30.0,
                        max_ongoing=args.max_ongoing, max_queued=args.max_queued, replicas=args.replicas,
                        cpus=args.cpus_per_replica, gpus=args.gpus_per_replica)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        ids = ", ".join(sorted(models))
        print(f"passn serve: {ids} at http://{args.host}:{args.port}/v1 "
              f"({'bearer token required' if digest else 'NO authentication'}); Ctrl-C or SIGTERM stops", flush=True)
        while not stop.wait(1.0):
            pass
        stop.clear()
        print(f"passn serve: draining (new requests 503) for at most {args.drain_timeout:g} s", flush=True)
        running = drain(serve.get_app_handle(APP_NAME), args.drain_timeout, stop)
        print(f"passn serve: stopping ({'?' if running is None else running} requests still running)", flush=True)
        if address is None:  # the port closes first: later clients see a refused connection, not a 404
            close_proxies()
        serve.delete(APP_NAME)
        if address is None:
            serve.shutdown()
    print("passn serve: stopped", flush=True)
    return 0


def drain(gateway, timeout_s: float, stop: threading.Event) -> int | None:
    """Tell the gateway to stop admitting and wait until its running requests are done, the
    timeout passes or ``stop`` is set again; the requests still running."""
    import time

    deadline, running, idle_checks = time.monotonic() + timeout_s, None, 0
    while True:
        try:
            running = gateway.drain.remote().result(timeout_s=5)
        except Exception as exc:  # noqa: BLE001  (a gateway too busy to answer now: ask again)
            print(f"passn serve: draining: {type(exc).__name__}: {exc}", flush=True)
        # idle twice, 0.25 s apart: a request on its way from the proxy is answered (503) too
        idle_checks = idle_checks + 1 if running == 0 else 0
        if idle_checks >= 2 or time.monotonic() > deadline or stop.wait(0.25):
            return running


def close_proxies() -> None:
    """Kill this cluster's Serve HTTP proxies, closing the port."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE, SERVE_PROXY_NAME

    for node in ray.nodes():
        if node["Alive"]:
            try:
                ray.kill(ray.get_actor(f"{SERVE_PROXY_NAME}-{node['NodeID']}", namespace=SERVE_NAMESPACE),
                         no_restart=True)
            except ValueError:  # no proxy on that node
                pass
