"""Format and choice rewards, the bounded worker pool, adversarial inputs, fuzzing, and the weighted score.

The math grading policy, case by case, is in test_math_policy.py.
"""

import ast
import math
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from config import ConfigError, DataConfig
from data import BadRow, load_dataset
from rewards import (
    RewardPool,
    choice_reward,
    extract_answer,
    format_reward,
    gold_problems,
    math_reward,
    resolve,
    reward_pool,
    score,
)
from test_data import write_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Killing and reading back a worker; the bound under test is timeout_s + this. Generous for a loaded
# 2-core CI machine, and still far below what an unbounded call costs (math-verify alone waits 5 s).
MARGIN_S = 1.5


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("<think>1+1=2</think><answer>$\\boxed{2}$</answer>", True),
        ("  <think>\nmulti\nline\n</think><answer> 2 </answer>\n", True),  # surrounding whitespace is stripped
        ("<think></think><answer></answer>", True),  # empty parts pass: the math reward judges the content
        ("<think>a</think> <answer>2</answer>", False),  # nothing may sit between </think> and <answer>
        ("<think>a</think>\n<answer>2</answer>", False),  # not even a newline
        ("<think>a</think><answer>2</answer> trailing", False),
        ("preamble <think>a</think><answer>2</answer>", False),
        ("<think>a</think><answer>2</answer><answer>3</answer>", False),
        ("<think>a <think> b</think><answer>2</answer>", False),
        ("<think>a</think><answer>2 <answer> 3</answer>", False),
        ("<answer>2</answer><think>a</think>", False),
        ("<think>a</think>", False),
        ("<answer>2</answer>", False),
        ("<THINK>a</THINK><ANSWER>2</ANSWER>", False),  # tags are case-sensitive
        ("", False),
    ],
)
def test_format_reward_is_lmm_r1_strict(completion, ok):
    assert format_reward(completion) == float(ok)


def test_extract_answer_prefers_answer_span_then_last_boxed():
    assert extract_answer("<think>\\boxed{1}</think><answer>The answer is $3$</answer>") == "The answer is $3$"
    assert extract_answer("so \\boxed{1} or rather \\boxed{\\frac{1}{2}}") == "$\\frac{1}{2}$"
    assert extract_answer("no answer here") is None


def test_math_reward_without_answer_tags_uses_the_last_box():
    assert math_reward("so the result is \\boxed{12}", "12") == 1.0
    assert math_reward("first \\boxed{11}, then \\boxed{12}", "12") == 1.0  # outside <answer>: the last box
    assert math_reward("no final answer", "12") == 0.0
    assert math_reward("<answer>$\\boxed{60", "60") == 0.0  # unclosed tag and box


@pytest.mark.parametrize(
    "span, answer, choices, verdict",
    [
        ("(B)", "B", None, 1),
        ("B.", "B", None, 1),
        ("$\\boxed{B}$", "B", None, 1),
        ("$\\boxed{\\text{B}}$", "B", None, 1),
        ("The answer is B", "B", None, 1),
        ("answer: (B)", "B", None, 1),
        ("B: 12", "B", None, 1),
        ("B) 12", "B", None, 1),
        ("$\\boxed{a}$", "A", None, 0),  # lower-case letters are variables, never choices
        ("the answer is a", "A", None, 0),
        ("A triangle", "A", None, 0),  # an article, not a choice
        ("(A) or (B)", "B", None, 0),  # a hedge
        ("$\\boxed{C}$", "B", None, 0),
        ("12", "B", ["10", "12", "14"], 1),  # choice text selects its letter
        ("$\\boxed{12}$", "B", ["10", "12", "14"], 1),
        ("B", "12", ["10", "12", "14"], 1),  # MathVista stores the gold as the choice text
        ("C", "12", ["10", "12", "14"], 0),
        ("D", "D", ["10", "12", "14"], 0),  # out of range of the choices
        ("13", "B", ["10", "12", "14"], 0),
    ],
)
def test_choice_reward(span, answer, choices, verdict):
    assert choice_reward(f"<think>t</think><answer>{span}</answer>", answer, choices) == float(verdict)


def test_choice_reward_without_tags_needs_an_explicit_statement():
    assert choice_reward("Looking at (A) and (C)... The answer is C.", "C") == 1.0
    assert choice_reward("Options A. 3 B. 5 C. 7", "B") == 0.0


def test_choice_text_gold_through_the_math_reward_uses_the_choices():
    completion = "<think>t</think><answer>$\\boxed{B}$</answer>"
    assert math_reward(completion, "B", choices=["1", "2"]) == 1.0
    assert math_reward(completion, "C", choices=["1", "2"]) == 0.0


def test_code_injection_scores_zero_without_side_effects(tmp_path):
    target = tmp_path / "pwned"
    attempts = [
        f"\\boxed{{__import__('os').system('touch {target}')}}",
        f"\\boxed{{eval(\"__import__('os').system('touch {target}')\")}}",
        f'\\boxed{{exec(\'open("{target}", "w")\')}}',
        f"\\boxed{{(lambda: __import__('os').system('touch {target}'))()}}",
        f"__import__('os').system('touch {target}')",
        f"\\boxed{{\\text{{${{__import__('os').system('touch {target}')}}}}}}",
    ]
    for attempt in attempts:
        assert math_reward(f"<think>x</think><answer>{attempt}</answer>", "0") == 0.0
    assert not target.exists()


def test_rewards_never_eval_or_sympify_model_text():
    """Model text reaches sympy only through math-verify's parsers: rewards.py calls none of these."""
    tree = ast.parse(open(os.path.join(ROOT, "rewards.py")).read())
    called = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "re.compile" in called  # the walk sees calls
    assert not {c.split(".")[-1] for c in called if c != "re.compile"} & {"eval", "exec", "sympify", "parse_expr", "S", "compile"}


ADVERSARIAL = {
    "power tower": "\\boxed{9^{9^{9}}}",
    "huge power": "\\boxed{10^{10^{10}}}",
    "factorial of a googol": "\\boxed{(10^{100})!}",
    "deep braces": "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
    "deep fractions": "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}",
    "1 MB of text": "x" * (1 << 20),
    "1 MB of math": "\\boxed{" + "1+" * (1 << 19) + "1}",
    "1 MB of boxes": "\\boxed{1}" * 100_000,
    "1 MB of unclosed boxes": "\\boxed{" * 150_000,
    "1 MB of hedged letters": "\\boxed{A} (B) answer: C " * 40_000,
    "unbalanced": "\\boxed{\\frac{1}{2}}}}}\\left( \\right] \\begin{pmatrix} 1 & \\end{bmatrix} $$$ \\sqrt[",
    "NUL bytes": "\\boxed{6\x000}\x00\x00",
    "odd unicode": "\\boxed{６０\u200b\u202e٦٠\U0001f600\ufeff}",
    "lone surrogate": "\\boxed{60\ud800}",
    "control chars": "\\boxed{\x1b[31m60\x1b[0m\r\x08}",
}


@pytest.fixture(scope="module")
def warm_pool():
    """The process's shared pool, started (and its zygote warmed up) before anything is timed."""
    assert math_reward("<answer>1</answer>", "1") == 1.0
    return reward_pool()


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_answers_finish_in_time_and_score_zero(name, warm_pool):
    """Each case runs right after the previous one killed a worker (the case that once took 2.5 s)."""
    completion = f"<think>x</think><answer>{ADVERSARIAL[name]}</answer>"
    waited = warm_pool.spawn_wait_s
    start = time.monotonic()
    (outcome,) = warm_pool.run([[("score", ("math", completion, {"answer": "7"}))]], 1.0)[0]
    elapsed = time.monotonic() - start
    assert outcome.value == 0.0 and outcome.error is None  # no adversarial answer contains a 7
    assert warm_pool.spawn_wait_s == waited  # the unit went to a warm worker: it waited for no start-up
    assert outcome.seconds < 1.0 + MARGIN_S  # its own clock: killed at its deadline, not later
    assert elapsed - outcome.seconds < 0.5, (elapsed, outcome)  # the pool's own overhead: hand-over and kill


def test_the_call_after_a_kill_waits_for_no_worker_start():
    pool = RewardPool(1)
    try:
        hang = ("score", ("toy_rewards:hang", "x", {"answer": "1"}))
        right = ("score", ("math", "<answer>1</answer>", {"answer": "1"}))
        assert pool.run([[right]], 60.0)[0][0].value == 1.0  # start-up, not timed
        waited = pool.spawn_wait_s
        (killed,) = pool.run([[hang]], 0.5)[0]
        assert killed.timeout and killed.replaced and 0.5 <= killed.seconds < 0.5 + MARGIN_S
        start = time.monotonic()
        (after,) = pool.run([[right]], 0.5)[0]
        # a fresh interpreter needs seconds to import math-verify and sympy; the spare is already warm
        assert after.value == 1.0 and not after.replaced and time.monotonic() - start < 0.5
        assert pool.spawn_wait_s == waited and pool.restarts == 1
    finally:
        pool.close()


def test_a_batch_with_many_hangs_costs_its_timeouts_and_scores_the_rest():
    pool = RewardPool(2)
    try:
        assert pool.run([[("score", ("format", "x", {"answer": "1"}))]], 60.0)  # start-up, not timed
        completions = [f"<think>t</think><answer>{k}</answer>" for k in range(24)]
        samples = [{"answer": str(k)} for k in range(24)]  # 24 prompt groups of one
        completions[3] = completions[10] = completions[11] = completions[17] = "HANG"
        waited, start = pool.spawn_wait_s, time.monotonic()
        weights = {"toy_rewards:hang_if_asked": 0.0, "math": 1.0}
        _, parts, counts = score(pool, completions, samples, weights, timeout_s=0.5)
        elapsed = time.monotonic() - start
        assert counts["timeouts"] == 4 and counts["worker_restarts"] == 4 and pool.restarts == 4
        assert parts["math"] == [0.0 if k in (3, 10, 11, 17) else 1.0 for k in range(24)]
        assert elapsed < math.ceil(4 / 2) * 0.5 + MARGIN_S  # two hangs at a time, no start-up between
        assert pool.spawn_wait_s - waited < 0.5  # two kills at once: the second waits for a fork (ms), not an import
    finally:
        pool.close()


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_in_process_rewards_are_fast_on_adversarial_answers(name):
    """format and choice run in the caller's process (regex only): they must stay fast on anything."""
    completion = f"<think>x</think><answer>{ADVERSARIAL[name]}</answer>"
    start = time.monotonic()
    assert choice_reward(completion, "D") == 0.0 and format_reward(completion) in (0.0, 1.0)
    assert time.monotonic() - start < 2.0  # linear passes over 1 MB; a quadratic scan would take minutes


def live_workers(pool) -> set:
    """Pids of the processes the pool's zygote has forked and that still run."""
    pid = pool.zygote.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return set(map(int, f.read().split()))


def test_pool_kills_and_replaces_hung_and_crashed_workers_and_keeps_going():
    pool = RewardPool(2)
    try:
        pool.run([[("score", ("format", "x", {"answer": "1"}))]], 60.0)  # start-up
        pids = {w.pid for w in pool.workers if w.ready}
        samples = [{"answer": "4"}] * 3 + [{"answer": "5"}] * 3
        completions = ["<think>a</think><answer>4</answer>"] * 3 + ["<think>a</think><answer>5</answer>"] * 3
        start = time.monotonic()
        total, parts, counts = score(pool, completions, samples, {"toy_rewards:hang": 1.0, "math": 1.0}, timeout_s=0.5)
        # both groups time out on their first completion, then are re-sent to warm workers: each
        # completion costs one timeout (two in flight at a time), the math parts are still scored
        assert counts["timeouts"] == 6 and counts["errors"] == 0 and counts["worker_restarts"] == 6
        assert parts["math"] == [1.0] * 6 and total == [1.0] * 6
        assert time.monotonic() - start < 3 * 0.5 + MARGIN_S  # three rounds of two timeouts, no start-ups
        assert len(pool.workers) == pool.capacity == 3 and pool.restarts == 6
        killed = pids - {w.pid for w in pool.workers}
        deadline = time.monotonic() + 10  # SIGKILL is sent; a loaded machine may take a moment to reap
        while (killed & live_workers(pool) or len(live_workers(pool)) > 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert killed and not killed & live_workers(pool) and len(live_workers(pool)) <= 3  # killed: gone
        _, parts, counts = score(pool, completions[:2], samples[:2], {"toy_rewards:crash": 1.0, "format": 1.0}, 1.0)
        assert counts["errors"] == 2 and counts["worker_restarts"] == 2 and parts["format"] == [1.0, 1.0]
        _, parts, counts = score(pool, completions[:2], samples[:2], {"toy_rewards:not_a_number": 1.0}, 1.0)
        assert counts["errors"] == 2 and parts["toy_rewards:not_a_number"] == [0.0, 0.0]  # NaN is an error, not a reward
        assert counts["worker_restarts"] == 0 and len(pool.workers) == 3
    finally:
        pool.close()
    assert not pool.workers


def test_a_pool_whose_workers_cannot_start_says_so(monkeypatch):
    monkeypatch.setattr("sys.executable", "/bin/false")  # each worker exits at start-up
    pool = RewardPool(1)
    try:
        with pytest.raises(RuntimeError, match="3 reward workers in a row failed to start"):
            pool.run([[("score", ("format", "x", {"answer": "1"}))]], 1.0)
    finally:
        pool.close()


def test_calls_from_threads_are_bounded_and_correct():
    cases = [("<answer>$\\boxed{12}$</answer>", "12", 1.0), ("<answer>$\\boxed{13}$</answer>", "12", 0.0)]
    cases += [("<answer>$\\boxed{9^{9^{9}}}$</answer>", "12", 0.0)]

    def call(k):
        completion, gold, verdict = cases[k % len(cases)]
        start = time.monotonic()
        return math_reward(completion, gold, timeout_s=1.0) == verdict, time.monotonic() - start

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(call, range(12)))
    assert all(ok for ok, _ in results)
    # calls share one pool: a call may wait for others, never longer than the batch ahead of it
    assert max(t for _, t in results) < 12 * (1.0 + MARGIN_S)
    assert threading.current_thread() is threading.main_thread()


def bounded_call(results):
    assert math_reward("<answer>1</answer>", "1") == 1.0  # starts this process's pool (not timed)
    start = time.monotonic()
    value = math_reward("<answer>$\\boxed{9^{9^{9}}}$</answer>", "7", timeout_s=1.0)
    results.put((value, time.monotonic() - start))


def test_calls_from_a_daemon_child_process_are_bounded():
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=bounded_call, args=(results,), daemon=True)
    child.start()
    value, seconds = results.get(timeout=120)
    child.join(30)
    assert value == 0.0 and seconds < 1.0 + MARGIN_S and child.exitcode == 0


TOKENS = (
    r"""\frac{ }{ } { \sqrt{ ^ _ \boxed{ \left( \right) \pi x y 1 2 9 0.5 + - \cdot = < , \% ^\circ \text{cm} \pm $
\infty ( ) [ ] \{ \} \begin{pmatrix} \\ & \end{pmatrix} or A (B) ! \log \sin e i é""".split()
    + [" ", "\x00", "\n"]
)
LATEXISH = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pred=LATEXISH, gold=st.sampled_from(["60", "\\frac{1}{2}", "(1,2)", "x^2+1", "B", "10\\%", "\\text{odd}"]))
def test_fuzzed_latex_never_raises_or_overruns(pred, gold, warm_pool):
    start = time.monotonic()
    value = math_reward(f"<think>t</think><answer>{pred}</answer>", gold, timeout_s=1.0)
    assert value in (0.0, 1.0)
    assert time.monotonic() - start < 1.0 + MARGIN_S


def test_score_weights_parts_and_counts_failures(capsys):
    pool = reward_pool()
    completions = ["<think>a</think><answer>4</answer>", "4", "<think>b</think><answer>5</answer>"]
    samples = [{"answer": "4", "level": "#@$.#"}] * 3
    total, parts, counts = score(pool, completions, samples, {"format": 0.5, "math": 1.0}, timeout_s=2.0)
    assert parts == {"format": [1.0, 0.0, 1.0], "math": [1.0, 0.0, 0.0]}
    assert total == [1.5, 0.0, 0.5] and counts["errors"] == counts["timeouts"] == 0
    weights = {"toy_rewards:broken": 1.0, "toy_rewards:length": 2.0, "toy_rewards:level_seen": 1.0}
    total, parts, counts = score(pool, completions, samples, weights, 2.0)
    assert counts["errors"] == 3 and counts["toy_rewards:broken_errors"] == 3
    assert parts["toy_rewards:broken"] == [0.0, 0.0, 0.0]
    assert parts["toy_rewards:level_seen"] == [0.0, 0.0, 0.0]
    assert total == pytest.approx([2 * len(c) / 10 for c in completions])
    assert capsys.readouterr().out.count("RuntimeError: verifier bug") == 1  # shown once, not silently swallowed


def test_unknown_rewards_are_config_errors():
    with pytest.raises(ConfigError, match="unknown reward 'sokoban_v2'"):
        resolve("sokoban_v2")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve("no_such_module:fn")


def test_unusable_golds_are_named():
    samples = [{"answer": "60"}, {"answer": "\\frac{"}, {"answer": "E", "choices": ["1", "2"]}, {"answer": "\\text{odd}"}]
    problems = gold_problems(reward_pool(), samples, ["format", "math"], 2.0)
    assert problems[0] is None and problems[3] is None
    assert "cannot parse" in problems[1] and "out of range" in problems[2]
    assert gold_problems(reward_pool(), samples, ["format"], 2.0) == [None] * 4  # format needs no gold


def test_unusable_gold_is_a_load_time_error_or_a_counted_skip(tmp_path, tokenizer, image_processor):
    rows = [{"message": [{"role": "user", "content": "q"}], "answer": a} for a in ["1", "\\frac{", "2"]]
    path = write_rows(tmp_path / "d.jsonl", rows)

    def check(samples):
        return gold_problems(reward_pool(), [s.reward_row() for s in samples], ["math"], 2.0)

    dcfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"train_files": [path]})
    with pytest.raises(BadRow, match="d.jsonl:2: unusable gold answer"):
        load_dataset(dcfg, 0, tokenizer, image_processor, check)
    dcfg.on_error = "skip"
    samples, skipped = load_dataset(dcfg, 0, tokenizer, image_processor, check)
    assert [s.answer for s in samples] == ["1", "2"] and skipped == {"unusable gold answer": 1}
