"""passn.storage: the S3 retry defaults every process gets on ``import passn``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec.config
import pytest

import passn  # noqa: F401  (configures the retries)
from passn.storage import S3_RETRIES, configure_s3_retries


def total_attempts(retries: dict) -> tuple[str, int]:
    """The retry mode and the attempts in all: botocore rewrites the dict it is given in place
    (``max_attempts`` N becomes ``total_max_attempts`` N + 1) once a client is built from it."""
    total = retries["total_max_attempts"] if "total_max_attempts" in retries else retries["max_attempts"] + 1
    return retries["mode"], total


def test_import_passn_gives_s3_paths_standard_retries():
    # the integration chaos test test_storage_faults.py shows them riding out five 503s in a row
    assert total_attempts(fsspec.config.conf["s3"]["config_kwargs"]["retries"]) == ("standard", 11)
    import s3fs

    fs = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)
    assert total_attempts(fs.config_kwargs["retries"]) == total_attempts(S3_RETRIES) == ("standard", 11)
    # in a process where no S3 client was built yet, the defaults are exactly passn's
    code = "import json, fsspec.config, passn; print(json.dumps(fsspec.config.conf['s3']['config_kwargs']['retries']))"
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert json.loads(out) == S3_RETRIES


@pytest.mark.parametrize("env", [{"AWS_RETRY_MODE": "adaptive"}, {"AWS_MAX_ATTEMPTS": "3"}])
def test_an_environment_that_chooses_its_retries_keeps_them(env, monkeypatch):
    monkeypatch.setattr(fsspec.config, "conf", {})
    configure_s3_retries(env)
    assert fsspec.config.conf == {}
    configure_s3_retries({})
    assert fsspec.config.conf["s3"]["config_kwargs"]["retries"] == S3_RETRIES


def test_a_remote_file_copy_has_a_deadline_that_grows_with_its_size():
    from passn.storage import TIMEOUT_ENV, transfer_timeout_s

    assert transfer_timeout_s(0, {}) == 300 and transfer_timeout_s(10 * 2**20, {}) == 310
    assert transfer_timeout_s(2**20, {TIMEOUT_ENV: "20"}) == 21
    for bad in ("soon", "0", "-5", "nan"):
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            transfer_timeout_s(0, {TIMEOUT_ENV: bad})


def test_a_bad_storage_deadline_is_refused_before_training(monkeypatch, tmp_path):
    from jobs.train import check_before_training
    from passn.config import ConfigError, load_config
    from passn.storage import TIMEOUT_ENV

    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    cfg = load_config(str(Path(__file__).parents[2] / "configs" / "tiny.yaml"), [])
    with pytest.raises(ConfigError, match=f"{TIMEOUT_ENV}='soon': not a number of seconds"):
        check_before_training(cfg, str(tmp_path / "run"))
