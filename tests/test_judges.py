"""eval.py's scoring against the benchmarks' own published judges, pair by pair.

OLYMPIADBENCH is the official scorer's own judgement on (gold, answer) pairs, some with a numeric
tolerance: eval/scoring_examples.json of github.com/OpenBMB/OlympiadBench (commit 61bf12a, the
file's last change; tolerances written as the dataset's `error` field writes them). MATHVISTA holds
answers as our rules extract them, with the verdict MathVista's evaluation/calculate_score.py
(github.com/lupantech/MathVista, commit e999481: normalize_extracted_answer, then safe_equal against
the gold) gives that extraction. Every pair must agree; where we differ on purpose the README says so.
"""

import json

import pytest

import eval as evaluation
from rewards import math_reward, reward_pool

TIMEOUT_S = 10.0  # generous: a verdict that timed out would score 0, not the judge's verdict

# (gold as released, answer, tolerance or None, the judge's verdict)
OLYMPIADBENCH = [
    ("x=1", "x=1", None, True),
    ("x=1", "1", None, True),
    ("x=1", "x=2", None, False),
    ("a_{n} =2 n    +1", "2n+    1", None, True),
    ("a_{n} =2 n    +1", "a_n=2n+1", None, True),
    ("$I_{\\max }=\\frac{q_{0}}{\\sqrt{2 L C}}$", "\\frac{ q_{0} }{ \\sqrt{2 C L}  }", None, True),
    ("\\Phi (x,y)=\\frac{x+1}{2y}", "\\Phi (x,    y)=\\frac{x}{2y} + \\frac{1}{2y}", None, True),
    ("(-\\infty,1]\\cup[10,+\\infty)", "c \\in \\left(-\\infty, 1\\right]\\cup[10,+\\infty)", None, True),
    ("$\\boxed{[-4/2, 0.5]}$", "[-2, \\frac{1}{2}]", None, True),
    (
        "(\\frac{\\sqrt{2}v^2_0}{g}-\\frac{v^2_0}{5\\pi g},\\frac{\\sqrt{2}v^2_0}{g}+\\frac{v^2_0}{4g},-\\frac{v^2_0}{5\\pi g})",
        "(\\frac{v^2_0 \\sqrt{2}}{g}-\\frac{v^2_0}{5g\\pi },\\frac{\\sqrt{2}v^2_0}{g}+\\frac{v^2_0}{4g},-\\frac{v^2_0}{5g \\pi})",
        None,
        True,
    ),
    ("(2,1),(3,1)", "(3,1),(2,1)", None, True),
    ("x^2+y^2=1", "\\boxed{x^{2}+y^{2}=1}", None, True),
    ("x^2+y^2=1", "\\boxed{x^{2}=1-y^2}", None, True),
    ("x^2+y^2=1", "\\boxed{1-x^{2}-y^{2}=0}", None, True),
    ("x^2+y^2=1", "\\boxed{x^{2}-y^{2}=1}", None, False),
    ("x^2+y^2=1", "\\boxed{x^{2}+y^{2}=2}", None, False),
    ("0.64N", "\\boxed{0.64N}", None, True),
    ("0.64N", "\\boxed{\\frac{16}{25}N}", None, True),
    ("0.64N", "0.6400 N", None, True),
    ("0.64N", "0.64", None, False),
    ("0.6", "\\boxed{\\frac{3}{5}}", None, True),
    ("0.6", "60%", None, True),
    ("\\cos \\theta_1", "\\cos \\theta _1", None, True),
    (
        "\\boxed{n_{\\gamma}(\\nu)=A \\frac{R_{\\odot}^{2}}{d_{\\odot}^{2}} \\frac{2 \\pi}{c^{2}} \\nu^{2} e^{\\frac{-h \\nu}{ k_{\\mathrm{B}} T_{\\mathrm{s}}}}}",
        "\\boxed{n_{\\gamma}(\\nu) = \\frac{2 \\pi A R_{\\odot}^2}{d_{\\odot}^2} \\left( \\frac{\\nu^2}{c^2} \\right) e^{ \\frac{-h \\nu}{k_B T_s}}}",
        None,
        True,
    ),
    ("\\frac{(n-1)!}{k!} \\frac{n}{(n-k)!}", "\\frac{n!}{k!(n-k)!}", None, True),
    ("7.8\\times 10^2", "780", None, True),
    ("\\Delta p\\approx -\\frac{\\hbar \\omega_{L}}{c}", "-\\frac{\\omega_{L} \\hbar}{c}", None, True),
    (
        "a = +\\frac{1}{2} \\hbar \\omega_{L}^{\\prime} \\frac{v}{c}",
        "\\frac{1}{2} \\hbar \\omega_{L}^{\\prime} \\frac{v}{c}",
        None,
        True,
    ),
    ("\\cos ^{10}(\\frac{\\pi}{10})", "0.6054", "1e-4", True),
    ("\\sqrt[3]{\\frac{5}{12}}", "(\\frac{5}{12})^{\\frac{1}{3}}", None, True),
    ("\\sqrt[3]{\\frac{5}{12}}, -\\sqrt[3]{\\frac{5}{12}}", "y = \\pm \\sqrt[3]{\\frac{5}{12}}", None, True),
    ("7 \\times 10^{35}", "7.1 \\cdot 10^{35}", "1e34", True),
    ("7 \\times 10^{35}", "7.1 \\cdot 10^{35}", "1e33", False),
    ("7 \\times 10^{35}, 0.002", "0.001, 7.1 \\cdot 10^{35}", "1e34,1e-3", True),
    ("0.003, 5.233", "0.002, 5.234", "1e-3", True),
    ("10^{10^{10^{10}}}", "10^{10}", None, False),
]


def answered(answer: str) -> str:
    return f"<think>...</think><answer>{answer}</answer>"


def disagreements(table, verdicts) -> list:
    return [(gold, answer, want) for (gold, answer, *_, want), got in zip(table, verdicts) if got != want]


def test_olympiadbench_examples_are_all_there():
    assert len(OLYMPIADBENCH) == 36 and sum(tolerance is not None for _, _, tolerance, _ in OLYMPIADBENCH) == 5


def test_eval_agrees_with_olympiadbench_judge_on_its_examples(tmp_path):
    """Through eval.py's OlympiadBench path: the release format read by read_olympiadbench, the
    `math` verdict or, for an item with an `error`, the tolerance rule."""
    rows = [
        {"id": k, "question": "?", "final_answer": [gold], "error": tolerance, "answer_type": "Expression", "subject": "Math"}
        for k, (gold, _, tolerance, _) in enumerate(OLYMPIADBENCH)
    ]
    (tmp_path / "OE_en.json").write_text(json.dumps(rows))
    items = evaluation.read_olympiadbench(str(tmp_path / "OE_en.json"), seed=0)
    predictions = [answered(answer) for _, answer, _, _ in OLYMPIADBENCH]
    verdicts = evaluation.verdicts("olympiadbench", items, predictions, reward_pool(), TIMEOUT_S)
    assert disagreements(OLYMPIADBENCH, verdicts) == []


def test_training_math_reward_agrees_with_olympiadbench_judge_without_tolerance():
    """The training policy itself (golds as released, `$` and all): the judge's verdict on every
    pair that has no numeric tolerance."""
    table = [case for case in OLYMPIADBENCH if case[2] is None]
    verdicts = [math_reward(answered(answer), gold, timeout_s=TIMEOUT_S) == 1.0 for gold, answer, _, _ in table]
    assert disagreements(table, verdicts) == []


DEGREES = {"choices": ["135°", "140°", "145°", "150°"], "answer": "145°", "answer_type": "text"}
YES_NO = {"choices": ["Yes", "No"], "answer": "No", "answer_type": "text"}
INTEGER = {"answer": "4", "answer_type": "integer"}
FLOAT2 = {"answer": "1.33", "answer_type": "float", "precision": 2}
FLOAT1 = {"answer": "0.8", "answer_type": "float", "precision": 1}
LIST = {"answer": "[2014, 2016]", "answer_type": "list"}

# (item, completion, MathVista's verdict on our extraction, why)
MATHVISTA = [
    (DEGREES, answered("$\\boxed{C}$"), True, "the letter selects its choice"),
    (DEGREES, answered("(C) 145°"), True, "a letter in parentheses"),
    (DEGREES, answered("$\\boxed{145°}$"), True, "the choice's text"),
    (DEGREES, answered("$\\boxed{145}$"), True, "the choice's text less its degree sign (the scorer: the nearest choice)"),
    (DEGREES, answered("$\\boxed{D}$"), False, "another letter"),
    (DEGREES, answered("$\\boxed{146}$"), False, "no letter: the nearest choice; 140° and 145° are 2 edits away, the first wins"),
    (YES_NO, answered("$\\boxed{no}$"), True, "case differs: nearest choice"),
    (YES_NO, answered("$\\boxed{Noo}$"), True, "a misspelt choice: nearest"),
    (YES_NO, answered("$\\boxed{E}$"), True, "a letter out of range is text: nearest is No"),
    (YES_NO, "I think it is not.", False, "no final answer (the scorer by default would pick No, the nearest to '')"),
    (INTEGER, answered("$\\boxed{4}$"), True, "the integer"),
    (INTEGER, answered("$\\boxed{4.0}$"), True, "int(float(x))"),
    (INTEGER, answered("$\\boxed{4.7}$"), True, "int(float(x)) truncates: 4.7 reads 4"),
    (INTEGER, answered("$\\boxed{-4}$"), False, "the sign"),
    (INTEGER, answered("$\\boxed{\\frac{8}{2}}$"), False, "not a plain number: float() fails"),
    (FLOAT2, answered("$\\boxed{1.334}$"), True, "rounded to the precision"),
    (FLOAT2, answered("$\\boxed{1.335}$"), True, "Python rounds the binary 1.335 down"),
    (FLOAT2, answered("$\\boxed{1.3}$"), False, "1.3 != 1.33"),
    (FLOAT2, answered("$\\boxed{\\frac{4}{3}}$"), False, "not a plain number"),
    (FLOAT1, answered("$\\boxed{0.75}$"), True, "0.75 rounds half to even: 0.8"),
    (FLOAT1, answered("$\\boxed{0.85}$"), True, "the binary 0.85 is below 0.85: 0.8"),
    (FLOAT1, answered("$\\boxed{0.7}$"), False, "a different tenth"),
    (LIST, answered("$\\boxed{[2014, 2016]}$"), True, "the list as the gold writes it"),
    (LIST, answered("$\\boxed{[2016, 2014]}$"), False, "order matters"),
    (LIST, answered("$\\boxed{2014, 2016}$"), False, "no brackets: a different string"),
]


@pytest.mark.parametrize("row, completion, verdict, why", MATHVISTA, ids=[c[3][:40] for c in MATHVISTA])
def test_eval_agrees_with_mathvista_scorer(row, completion, verdict, why, tmp_path):
    """Through eval.py's MathVista path: the release format (testmini.json) read by read_mathvista."""
    item = {"pid": "1", "question": "?", "image": "1.png", "question_type": "multi_choice" if "choices" in row else "free_form"}
    item |= {"choices": None, "precision": None} | row
    (tmp_path / "testmini.json").write_text(json.dumps({"1": item}))
    items = evaluation.read_mathvista(str(tmp_path / "testmini.json"), seed=0)
    assert evaluation.verdicts("mathvista", items, [completion], None, TIMEOUT_S) == [verdict], why
