"""passn.storage: the S3 retry defaults every process gets on ``import passn``."""

import fsspec.config
import pytest

import passn  # noqa: F401  (configures the retries)
from passn.storage import S3_RETRIES, configure_s3_retries


def test_import_passn_gives_s3_paths_standard_retries():
    # the integration chaos test test_storage_faults.py shows them riding out five 503s in a row
    assert fsspec.config.conf["s3"]["config_kwargs"]["retries"] == {"mode": "standard", "max_attempts": 10}
    import s3fs

    fs = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)
    assert fs.config_kwargs["retries"] == S3_RETRIES


@pytest.mark.parametrize("env", [{"AWS_RETRY_MODE": "adaptive"}, {"AWS_MAX_ATTEMPTS": "3"}])
def test_an_environment_that_chooses_its_retries_keeps_them(env, monkeypatch):
    monkeypatch.setattr(fsspec.config, "conf", {})
    configure_s3_retries(env)
    assert fsspec.config.conf == {}
    configure_s3_retries({})
    assert fsspec.config.conf["s3"]["config_kwargs"]["retries"] == S3_RETRIES
