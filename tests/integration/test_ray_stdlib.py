"""With the repository as a Ray working_dir, `import platform` is still the stdlib (no __init__.py in platform/)."""

import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def test_platform_is_the_stdlib_module_inside_a_ray_worker():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"working_dir": str(ROOT), "excludes": [".venv", ".git", "runs", "*.pyc"]})
    try:

        @ray.remote
        def probe():
            import os
            import platform
            import sys

            import torch  # torch imports platform: it breaks first when the stdlib is shadowed

            from passn import coverage

            return {"platform_file": platform.__file__, "system": platform.system(), "cwd": os.getcwd(),
                    "path0": sys.path[:3], "torch": torch.__version__, "pass": float(coverage.pass_at_k(4, 1, 2))}

        info = ray.get(probe.remote(), timeout=300)
    finally:
        ray.shutdown()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(info["platform_file"]).resolve().parent == stdlib, info
    assert info["system"] == "Linux"
    assert info["pass"] == 0.5
    # the worker really ran inside the uploaded repository copy
    assert (Path(info["cwd"]) / "platform" / "passn").is_dir(), info
