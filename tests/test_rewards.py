"""Format and math rewards, the registry and the weighted score."""

import pytest

from config import ConfigError
from rewards import extract_answer, format_reward, math_reward, resolve, score


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("<think>1+1=2</think><answer>$\\boxed{2}$</answer>", True),
        ("  <think>\nmulti\nline\n</think><answer> 2 </answer>\n", True),  # surrounding whitespace is stripped
        ("<think>a</think> <answer>2</answer>", False),  # nothing may sit between </think> and <answer>
        ("<think>a</think><answer>2</answer> trailing", False),
        ("preamble <think>a</think><answer>2</answer>", False),
        ("<think>a</think><answer>2</answer><answer>3</answer>", False),
        ("<think>a <think> b</think><answer>2</answer>", False),
        ("<think>a</think>", False),
        ("<answer>2</answer>", False),
        ("", False),
    ],
)
def test_format_reward_is_lmm_r1_strict(completion, ok):
    assert format_reward(completion) == float(ok)


def test_extract_answer_prefers_answer_span_then_last_boxed():
    assert extract_answer("<think>\\boxed{1}</think><answer>The answer is $3$</answer>") == "The answer is $3$"
    assert extract_answer("so \\boxed{1} or rather \\boxed{\\frac{1}{2}}") == "$\\frac{1}{2}$"
    assert extract_answer("no answer here") is None


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("<think>..</think><answer>$\\boxed{60}$</answer>", "$\\boxed{60}$", 1.0),
        ("<think>..</think><answer>60</answer>", "60", 1.0),
        ("<think>..</think><answer>The answer is $\\frac{1}{2}$</answer>", "0.5", 1.0),
        ("<think>..</think><answer>$\\boxed{x^2+2x+1}$</answer>", "(x+1)^2", 1.0),
        ("<think>..</think><answer>$\\boxed{61}$</answer>", "60", 0.0),
        ("the result is \\boxed{12}", "12", 1.0),
        ("no final answer", "12", 0.0),
        ("<think>..</think><answer></answer>", "12", 0.0),
    ],
)
def test_math_reward(completion, answer, expected):
    assert math_reward(completion, answer) == expected


def broken_verifier(completion, sample):
    raise RuntimeError("verifier bug")


def length_reward(completion, sample):
    return len(completion) / 10


def test_score_weights_parts_and_counts_failures(capsys):
    completions = ["<think>a</think><answer>4</answer>", "4", "<think>b</think><answer>5</answer>"]
    samples = [{"answer": "4"}] * 3
    total, parts, errors = score(completions, samples, {"format": 0.5, "math": 1.0}, timeout_s=2.0)
    assert parts == {"format": [1.0, 0.0, 1.0], "math": [1.0, 0.0, 0.0]}
    assert total == [1.5, 0.0, 0.5] and errors == {}
    total, parts, errors = score(
        completions, samples, {"test_rewards:broken_verifier": 1.0, "test_rewards:length_reward": 2.0}, 2.0
    )
    assert errors == {"test_rewards:broken_verifier": 3}
    assert parts["test_rewards:broken_verifier"] == [0.0, 0.0, 0.0]
    assert total == pytest.approx([2 * len(c) / 10 for c in completions])
    assert "verifier bug" in capsys.readouterr().out  # shown once, not silently swallowed


def test_unknown_rewards_are_config_errors():
    with pytest.raises(ConfigError, match="unknown reward 'sokoban'"):
        resolve("sokoban")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve("no_such_module:fn")
