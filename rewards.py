"""Rule-based rewards: pure functions (completion, sample) -> float, and their weighted sum.

A stage names the rewards it uses and their weights (`reward.weights: {format: 0.5, math: 1.0}`);
a name is a key of REWARDS or `module:function` for a researcher's own verifier with the same
signature. A reward that raises scores 0 for that completion and is counted, never crashing the run.
"""

import importlib
import math
import re
import traceback
from typing import Callable, Dict, List, Optional, Tuple

from config import ConfigError
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# LMM-R1's strict format (openrlhf/models/remote_rm/math_verifier.py): after stripping surrounding
# whitespace, the completion is exactly <think>...</think><answer>...</answer>, nothing between
# </think> and <answer>, nothing after </answer>, and each opening tag appears once.
FORMAT_PATTERN = re.compile(r"^<think>(?:(?!</think>).)*</think><answer>(?:(?!</answer>).)*</answer>\Z", re.DOTALL)
ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(completion: str) -> float:
    """1.0 iff `completion` is in LMM-R1's strict <think>…</think><answer>…</answer> format."""
    text = completion.strip()
    ok = FORMAT_PATTERN.match(text) is not None and text.count("<think>") == 1 and text.count("<answer>") == 1
    return float(ok)


def last_boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} in `text` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(completion: str) -> Optional[str]:
    """The final answer: the last <answer> span, else the last \\boxed{} (wrapped in $ for parsing)."""
    spans = ANSWER_SPAN.findall(completion)
    if spans:
        return spans[-1]
    boxed = last_boxed(completion)
    return None if boxed is None else f"${boxed}$"


def as_latex(answer: str) -> str:
    """Gold answers are LaTeX with or without $ (LMM-R1 stores `$\\boxed{60}$` and `60` alike)."""
    return answer if "$" in answer or "\\boxed" in answer else f"${answer}$"


def math_reward(completion: str, answer: str, timeout_s: float = 2.0) -> float:
    """1.0 iff the completion's final answer is mathematically equivalent to the gold `answer`.

    math-verify compares with the gold first (verify(gold, pred) is asymmetric). Its timeouts are
    SIGALRM-based, so they bound the time only on the main thread.
    """
    pred_text = extract_answer(completion)
    if pred_text is None:
        return 0.0
    seconds = max(1, math.ceil(timeout_s))
    gold = parse(as_latex(answer), parsing_timeout=seconds)
    pred = parse(
        pred_text,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=seconds,
    )
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=seconds))


def _format(completion: str, sample: dict, timeout_s: float) -> float:
    return format_reward(completion)


def _math(completion: str, sample: dict, timeout_s: float) -> float:
    return math_reward(completion, sample["answer"], timeout_s)


# name -> fn(completion, sample, timeout_s). `sample` holds the row's answer and its other fields.
REWARDS: Dict[str, Callable[[str, dict, float], float]] = {
    "format": _format,
    "math": _math,
}


def resolve(name: str) -> Callable:
    """A reward function by name: a key of REWARDS, or `module:function` taking (completion, sample)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, fn_name = name.split(":", 1)
        try:
            fn = getattr(importlib.import_module(module), fn_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward.weights: cannot import {name!r} ({e})") from None
        return lambda completion, sample, timeout_s: fn(completion, sample)
    raise ConfigError(f"reward.weights: unknown reward {name!r}; known: {sorted(REWARDS)} or module:function")


def score(
    completions: List[str], samples: List[dict], weights: Dict[str, float], timeout_s: float
) -> Tuple[List[float], Dict[str, List[float]], Dict[str, int]]:
    """Weighted total per completion, each part's raw value per completion, and errors per part.

    `samples[i]` is the row completion i answers: {"answer": ..., **other fields}.
    """
    parts: Dict[str, List[float]] = {}
    errors: Dict[str, int] = {}
    for name in weights:
        fn = resolve(name)
        values = []
        for completion, sample in zip(completions, samples):
            try:
                values.append(float(fn(completion, sample, timeout_s)))
            except Exception:  # a verifier failure must not end a multi-day run: score 0, count, show once
                if not errors.get(name):
                    print(f"[reward] {name} failed (scored 0, counted in reward/{name}_errors):\n{traceback.format_exc()}")
                errors[name] = errors.get(name, 0) + 1
                values.append(0.0)
        parts[name] = values
    total = [sum(weights[n] * parts[n][i] for n in weights) for i in range(len(completions))]
    return total, parts, errors
