#!/usr/bin/env bash
# The device check (issues 18, 30, 31): what only a GPU can show, in one run of about 9 minutes on one
# H200 (torch 2.11 and transformers 5.17 there; vllm, flash-attn and deepspeed not). First run there on
# 2026-12-04 (bench/RESULTS.md, "The device check"): every step it reached passed, the last one cut by
# a 450 s budget and passing when run alone; steps 1-7 took about 250 s, each 3B packing update at
# one repeat about 140 s, so the default budget (570 s) holds them all. Give the device tool's run
# timeout_s=600.
#   bench/gpu.sh             on the device: run it from the repository root, OUT set by the device tool
#   bench/gpu.sh --dry-run   the same steps on the CPU at small sizes (.ci/run runs it, so it cannot rot)
# Packages the device lacks travel as wheels in .whl/, made here by bench/gpu_wheels.sh.
# No `set -e`: each step runs under its own timeout and prints "ok <step>" or "FAIL <step> (rc N)",
# then the next one starts; a step is skipped, said so, once the whole budget (GPU_SH_BUDGET seconds,
# default 570: the device tool's 600 less the last step's 10 s kill and some) would not leave it 30 s.
# Everything goes to $OUT/log too. The exit status is the number of failed or skipped steps.
cd "$(dirname "$0")/.." || exit 1
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
TEE=$!
END=$((SECONDS + ${GPU_SH_BUDGET:-570}))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY=python3
FAILED=()
step() {  # step NAME SECONDS COMMAND...: run it under its own timeout, say how it went, go on
    local name=$1 limit=$2 left=$((END - SECONDS)) rc
    shift 2
    if ((left < limit && left < 30)); then echo "SKIP $name (the budget is spent)"; FAILED+=("$name"); return; fi
    ((limit > left)) && limit=$left
    echo "=== $name ($(date +%T), limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [ $rc -eq 0 ]; then echo "ok $name"; else echo "FAIL $name (rc $rc)"; FAILED+=("$name"); fi
}
if [ -d .whl ] && [ $DRY = 0 ]; then  # the device's packages plus ours (bench/gpu_wheels.sh); not for a dry run here
    step wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
if [ $DRY = 1 ]; then  # CPU stand-ins: the same commands, small
    DEV=cpu SCALE=(--model small --samples 8 --min-len 32 --max-len 256 --micro 4 --repeats 1)
    PREFIX=(--model small --groups 4 --repeats 1)
else
    DEV=cuda SCALE=(--model 3b --samples 64 --min-len 512 --max-len 4096 --micro 4 --repeats 1)
    PREFIX=(--model 3b --groups 4,8,16 --prompts 2 --repeats 3)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
TINY=(debug=tiny_random trainer.device=$DEV model.dtype=bfloat16 log.wandb=disabled log.progress=false trainer.logp_chunk_size=16)

# 1. torch's varlen kernel: its signature here (it moved between 2.10 and 2.13), flash-attn if present
step varlen 60 $PY -c "
import inspect, torch, model
print('torch', torch.__version__, 'cuda', torch.cuda.is_available())
print('varlen_attn', model.varlen_attn and inspect.signature(model.varlen_attn), 'flash_attn', model.flash_attn_varlen_func is not None)"
# 2. the trainer's CPU collectives under a default group without a CPU backend, as vLLM's in-process
#    worker makes it on a GPU (nccl); the CPU stand-in is a cuda:gloo group
step collectives 60 $PY -c "
import torch, dist
backend = 'nccl' if torch.cuda.is_available() else 'cuda:gloo'
torch.distributed.init_process_group(backend, init_method=f'tcp://127.0.0.1:{dist.free_port()}', rank=0, world_size=1)
dist.barrier()
print(backend, dist.all_max(3), dist.all_sum(torch.ones(2)).tolist(), dist.any_rank(True), dist.gather(1))"
# 3. the tests marked gpu (they skip, saying why, on a CPU)
step gpu-tests 180 $PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_packing.py tests/test_rollout.py
# 4. each prompt once per group vs once per sample (issue 31), the 3B cut to 2+2 layers (bench/prefix.py),
#    early, so that the budget reaches it
step prefix 200 $PY bench/prefix.py --device $DEV --dtype bfloat16 "${PREFIX[@]}"
# 5. two steps of train.py on the device (HF engine; fp32 master weights, bf16 autocast: the tiny
#    preset's own float32 is refused with packed attention on a GPU; 16-token log-prob chunks), a
#    checkpoint each step; then a resume to step 3 from it; then eval.py on the result
step train 300 $PY train.py "${TINY[@]}" trainer.max_steps=2 trainer.save_every=1 hydra.run.dir="$OUT/train"
step resume 300 $PY train.py "${TINY[@]}" trainer.max_steps=3 trainer.save_every=1 hydra.run.dir="$OUT/train"
step resumed-at-step-3 10 $PY -c "
import json; steps = [json.loads(l)['step'] for l in open('$OUT/train/metrics.jsonl')]
print(steps); assert steps == [1, 2, 3], steps"
step eval 300 $PY eval.py "${TINY[@]}" model.path="$OUT/train/checkpoints/final" "eval.benchmarks=[sokoban]" \
    eval.max_items=16 eval.max_new_tokens=48 eval.data_dir="$OUT/eval_data" hydra.run.dir="$OUT/eval"
# 6. ZeRO 1, 2 and 3 on the one device beside the plain path, where DeepSpeed imports (its wheel carried
#    in .whl/): a step each, at once, with an entropy bonus for a gradient; entropy and gradient norm
#    agree (bench/zero_stages.py)
if $PY -c "import deepspeed" 2>/dev/null; then
    step zero-stages 300 $PY bench/zero_stages.py "$OUT/zero" "${TINY[@]}"
else
    echo "SKIP zero-stages (deepspeed does not import here: bench/gpu_wheels.sh carries it)"
    FAILED+=(zero-stages)
fi
# 7. the attention kernels alone: torch varlen, split views, slices, padded (bench/attention.py)
step attention 120 $PY bench/attention.py --device $DEV --repeats 3
# 8. one packed policy update of random-init Qwen2.5-VL-3B (on CPU a small model): padded vs packed,
#    tokens/s, MFU against the bf16 peak measured here, peak memory; bf16 weights, then fp32 master
#    weights under bf16 autocast (what training runs: q and k leave the rotary embedding in fp32)
step packing-bf16 300 $PY bench/packing.py --device $DEV --dtype bfloat16 "${SCALE[@]}"
step packing-fp32-master 300 $PY bench/packing.py --device $DEV --dtype float32 "${SCALE[@]}"

echo "=== done: ${#FAILED[@]} failed or skipped${FAILED:+: ${FAILED[*]}}; log in $OUT/log"
exec >&- 2>&-
wait $TEE  # the log's last lines written before the status goes out
exit ${#FAILED[@]}
