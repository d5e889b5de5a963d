#!/usr/bin/env bash
# Issue 18's GPU check, one script sized for 8 minutes of device time (an H200 with torch 2.11 when
# last seen). Prepared, not yet run: no GPU was lent to the session that wrote it.
#   1. torch's varlen kernel: its signature there (it moved between 2.10 and 2.13) and the gpu tests
#      (varlen_attn = per-sequence SDPA in bf16, outputs and gradients; packed = one at a time);
#   2. the attention kernels alone (bench/attention.py: torch varlen, split views, slices, padded);
#   3. one packed policy update of random-init Qwen2.5-VL-3B (published config, vision tower of 32
#      layers at 1280, frozen), bf16, 64 sequences of 512-4096 tokens: tokens/s, MFU against the
#      bf16 peak measured there, peak memory, for padded vs packed with per-sequence SDPA vs packed
#      with torch's varlen kernel (bench/packing.py). Target: MFU >= 40% for packed.
# Packages the device image lacks (or has at other versions) travel as wheels in .whl/ (see the
# device README): hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# transformers==5.19.0 math-verify==0.9.0 latex2sympy2_extended gymnasium==1.4.0 farama-notifications
# deepspeed==0.19.8 wandb==0.31.0 (train.py's imports, which bench/packing.py pulls in).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import inspect, torch; from torch.nn.attention.varlen import varlen_attn; print('torch', torch.__version__, 'varlen_attn', inspect.signature(varlen_attn))"
timeout 60 python3 -m pytest -x -q -rs -m gpu tests/test_packing.py
timeout 60 python3 bench/attention.py --device cuda --repeats 5
timeout 300 python3 bench/packing.py --model 3b --device cuda --dtype bfloat16 --min-len 512 --max-len 4096 \
    --samples 64 --micro 4 --repeats 2
# issue 31: each prompt once per group vs once per sample, the 3B cut to 2+2 layers, G = 8 (bench/prefix.py)
timeout 150 python3 bench/prefix.py --device cuda --dtype bfloat16 --groups 8 --prompts 2
