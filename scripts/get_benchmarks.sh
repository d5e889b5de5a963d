#!/usr/bin/env bash
# Fetch the benchmarks that download as files (needs internet and `pip install huggingface_hub`).
# MathVerse, OlympiadBench and MMStar need a conversion step: see scripts/get_benchmarks.md.
set -euo pipefail
root="${1:-data/eval}"
huggingface-cli download HuggingFaceH4/MATH-500 test.jsonl --repo-type dataset --local-dir "$root/math500"
huggingface-cli download Idavidrein/gpqa gpqa_diamond.csv --repo-type dataset --local-dir "$root/gpqa"  # gated: accept its terms first
mkdir -p "$root/mathvista" && curl -L -o "$root/mathvista/testmini.json" \
  https://raw.githubusercontent.com/lupantech/MathVista/main/data/testmini.json
huggingface-cli download AI4Math/MathVista images.zip --repo-type dataset --local-dir "$root/mathvista" \
  && (cd "$root/mathvista" && unzip -q -o images.zip)
git clone --depth 1 https://github.com/mathllm/MATH-V "$root/mathvision.git" \
  && mkdir -p "$root/mathvision" && cp "$root/mathvision.git/data/test.jsonl" "$root/mathvision/" \
  && cp -r "$root/mathvision.git/images" "$root/mathvision/"
echo "done: $root (MathVerse, OlympiadBench, MMStar: see scripts/get_benchmarks.md)"
