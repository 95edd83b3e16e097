#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU session: fetches into .whl/ (git-ignored) the wheels that the
# lent GPU machine's image lacks or holds in other versions (bitsandbytes, datasets; transformers, peft,
# tokenizers at the versions in constraints.txt; liger-kernel, issue 17's GPU comparison), for Python 3.12 on
# x86-64. The image's own huggingface_hub stays: 2.x imports httpx2, which that image lacks.
# bitsandbytes' wheel carries a library for every CUDA/ROCm release (43 MB); only the CUDA 13 ones and the
# CPU one are kept, so that everything that travels to the GPU machine stays under its 64 MiB limit.
# Then, on the GPU machine:  bash launch_scripts/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
pins=()
for name in bitsandbytes transformers peft datasets dill multiprocess tokenizers; do
    pins+=("$(grep -i "^${name}==" launch_scripts/constraints.txt)")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}" liger-kernel==0.8.5
python3 - <<'EOF'
import glob, os, re, zipfile

path = glob.glob(".whl/bitsandbytes-*.whl")[0]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm|xpu)\w*\.so$")
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            rows = [r for r in data.split(b"\n") if r and not drop.search(r.split(b",")[0].decode())]
            data = b"\n".join(rows) + b"\n"
        dst.writestr(item, data)
os.replace(slim, path)
EOF
du -ch .whl/* | tail -1
