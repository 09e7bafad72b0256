"""Import hygiene: the pure library never imports Ray, vLLM or DeepSpeed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

BLOCKER = """
import importlib.abc, pkgutil, sys
BLOCKED = ("ray", "vllm", "deepspeed")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"passn imported {name}, which the pure library must not")
        return None

sys.meta_path.insert(0, Block())
import passn
names = [m.name for m in pkgutil.walk_packages(passn.__path__, "passn.")]
for name in names:
    __import__(name)
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
print(len(names), "modules")
"""


def test_every_passn_module_imports_without_ray_vllm_deepspeed():
    out = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "platform"), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[0]) >= 6


def test_the_blocker_itself_works():
    # The same blocker must reject a module that does import Ray, or the test above proves nothing.
    code = BLOCKER.replace("import passn\n", "import passn\nimport ray\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "platform"), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode != 0 and "must not" in out.stderr


def test_platform_is_a_source_root_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", "import platform, sys; print(platform.__file__); platform.system()"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and str(ROOT) not in out.stdout
