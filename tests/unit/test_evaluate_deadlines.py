"""`passn evaluate` on an endpoint that stops answering: it stops at the request deadline, with a
message naming the flag, and keeps every problem already written (fault injection: a stand-in
server that answers the first batch of requests, then holds every later one open)."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
FIRST_BATCH = 64 * 2  # evaluate's batch of 64 problems, each one sampled request and one greedy


class _AnswersThenHangs(BaseHTTPRequestHandler):
    answered = 0
    hung_at: float | None = None
    lock = threading.Lock()
    release = threading.Event()

    def _json(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json({"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "t"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).answered += 1
            hang = self.answered > FIRST_BATCH
        if hang:
            type(self).hung_at = type(self).hung_at or time.monotonic()
            self.release.wait(120)  # a hung engine behind the server
            return
        self._json({"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "text": "7", "finish_reason": "stop",
             "logprobs": {"tokens": ["7"], "token_logprobs": [-0.5], "top_logprobs": None, "text_offset": [0]}}]})

    def log_message(self, *args):
        pass


def test_an_endpoint_that_stops_answering_ends_evaluate_at_the_deadline_with_results_kept(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AnswersThenHangs)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "eval"
    try:
        run = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--endpoint",
                              f"http://127.0.0.1:{server.server_port}/v1", "--model", "m", "--config", TINY,
                              "--samples", "1", "--limit", "100", "--sample-timeout", "3", "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PASSN_SERVE_TOKEN": "t"})
        took = time.monotonic() - _AnswersThenHangs.hung_at
    finally:
        _AnswersThenHangs.release.set()
        server.shutdown()
    assert run.returncode == 2, run.stderr[-3000:]
    assert "did not answer within 3s (--sample-timeout to change)" in run.stderr
    assert f"http://127.0.0.1:{server.server_port}/v1: a completions request" in run.stderr
    rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and all(r["samples"] == 1 for r in rows)  # the first batch, kept
    assert took < 3 + 15, f"evaluate ended {took:.0f} s after the server stopped answering, for a 3 s deadline"
