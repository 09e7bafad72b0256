"""MATH-format data and configs read from a real S3-compatible server (SeaweedFS on 127.0.0.1)."""

import json

import pytest

from passn.config import load_config
from passn.tasks import DataError, MathTask, load_math_problems

pytestmark = pytest.mark.integration


def test_math_rows_from_s3_with_rejects_written_back(s3_server, monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    fs = s3_server.filesystem()
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}, {"problem": ""}]
    fs.pipe(f"{s3_server.bucket}/data/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()
            + b'{"problem": "\xff", "answer": "1"}\n')  # line 4: not UTF-8, a reject of its own
    url = f"s3://{s3_server.bucket}/data/train.jsonl"
    with pytest.raises(DataError, match=r"train.jsonl:3: field \"problem\" is missing"):
        load_math_problems(url, rejects_path=f"s3://{s3_server.bucket}/run/rejects.jsonl")
    rejected = fs.cat(f"{s3_server.bucket}/run/rejects.jsonl").decode().splitlines()
    assert [json.loads(r)["where"] for r in rejected] == [f"{url}:3", f"{url}:4"]
    task = MathTask(url, None, max_bad_fraction=0.5, rejects_dir=f"s3://{s3_server.bucket}/run2")
    assert [p.answer for p in task.problems("train")] == ["2", "4"]
    assert fs.exists(f"{s3_server.bucket}/run2/rejects-train.jsonl")


def test_config_from_s3(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    fs = s3_server.filesystem()
    fs.pipe(f"{s3_server.bucket}/configs/run.yaml", b"objective:\n  kind: dco\n  budget: 16\n")
    cfg = load_config(f"s3://{s3_server.bucket}/configs/run.yaml", ["objective.budget=32"])
    assert (cfg.objective.kind, cfg.objective.budget) == ("dco", 32)


def test_wrong_keys_are_refused(s3_server, monkeypatch):
    import s3fs

    fs = s3_server.filesystem()
    fs.pipe(f"{s3_server.bucket}/data/secret.jsonl", b'{"problem": "1+1?", "answer": "2"}\n')
    for key, value in (s3_server.env() | {"AWS_SECRET_ACCESS_KEY": "wrong"}).items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec would otherwise reuse the good credentials
    with pytest.raises(DataError, match="access denied"):
        load_math_problems(f"s3://{s3_server.bucket}/data/secret.jsonl")
