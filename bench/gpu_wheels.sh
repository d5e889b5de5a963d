#!/usr/bin/env bash
# The wheels bench/gpu.sh needs on the device machine (Python 3.12, x86-64; torch 2.11, tokenizers,
# safetensors, numpy, pillow, matplotlib, sympy and pytest are there), made here into .whl/ (git-ignored
# through .git/info/exclude), which the device call carries. Run from anywhere: bash bench/gpu_wheels.sh
# It builds with the project's venv (.venv, the README's set-up) where there is one: DeepSpeed's build
# needs torch beside it and a setuptools with bdist_wheel (>= 70.1), which a bare system python3 may lack.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
# our pins (requirements.txt) that the device lacks or has at another version, and what they need that it
# lacks (DeepSpeed's hjson and pydantic; the device's KINDS.md package list)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
    transformers==5.19.0 hydra-core==1.3.8 omegaconf==2.3.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
    gymnasium==1.4.0 farama-notifications==0.0.6 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5
# no wheels on the registry: built here (pure Python, so any platform's build serves); DeepSpeed
# without its ops (DS_BUILD_OPS=0: ZeRO-3 with our AdamW compiles none)
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
du -sh .whl
