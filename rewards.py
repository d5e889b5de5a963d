"""Rule-based rewards: pure verdict functions, and the pool of worker processes that bounds the time each
one may take (its plumbing lives in reward_workers.py; this module gives it the rules to run).

A stage names the rewards it uses and their weights (`reward.weights: {format: 0.5, math: 1.0}`); a
name is a key of REWARDS or `module:function` for a researcher's own verifier, called as
fn(completion, sample) -> float with the whole sample ({"answer": ..., **domain fields}).

Every verification runs in a worker process (reward_workers.RewardPool): a call that passes
`reward.timeout_s` has its worker killed and replaced and scores 0; a call that raises scores 0; both
are counted (`reward/n_timeouts`, `reward/n_errors`) and never reach the training loop. A reward that
raises `Malformed` (no usable answer, e.g. a Sokoban answer that is not a move list) scores 0 and is
counted as `reward/n_malformed` instead. Model text is never given to eval/exec/sympify: it reaches
sympy only through math-verify's own LaTeX and expression parsers.

Grading policy of `math` (each rule has its cases, with reasons, in tests/test_math_policy.py)
- Final answer: the last <answer>…</answer> span, else the last \\boxed{} in the completion. Inside
  it, the boxed content if any; several boxes with different contents are a hedge: wrong.
- Hedges are wrong: `\\pm`/`\\mp`, or the word "or", in an answer whose gold has none. One exception:
  a single `\\pm` against a gold of exactly two values names both (`y=\\pm a` = `a, -a` = `\\{-a, a\\}`);
  against a single value it stays a hedge (`\\pm 2` != `2`).
- Gold first: math-verify's verify(gold, pred) is asymmetric. So a prediction in interval notation
  matches an inequality gold (`1<x<2` vs `(1,2)`), but an inequality does not match an interval gold.
- An equation whose left side is a name (a letter or command with subscripts and primes: `x`, `a_n`,
  `I_{\\max}`, `k_{\\mathrm{B}}`, `v'`) labels its value: `I_{\\max}=X` accepts `X`, and `I_\\max=Y`
  when Y = X. A different name is a different answer, case included (`V=10` != `v=10`), however
  latex2sympy reads the two (it lower-cases `V`, reads `E_{k}` and `E_{p}` both as e, and `I_{max}`
  and `I_{min}` both as the imaginary unit).
- Percent: a number written with a percent sign is that number and its hundredth, `60\\%` = `60` =
  `0.6` (so `10\\%` = `0.1`). Degrees, `\\$` and units are annotations of the number, stripped from
  both sides before comparing: `30^\\circ` = `30`, `5\\text{ cm}` = `5 cm` = `5`. The question fixes
  the unit, so no conversion: `30^\\circ` != `\\frac{\\pi}{6}`, `5 m` = `5 cm` (the number is graded).
- A name's subscript is a label: its `\\mathrm{}`/`\\text{}` wrappers and command backslashes go, so
  `k_{\\mathrm{B}}` = `k_B` (latex2sympy read `k_{\\text{b}}`, and the unit rule stripped `\\mathrm{B}`
  from an answer with a number) and `R_{\\odot}`, `I_{\\max}`, `n_{\\gamma}` parse (latex2sympy cannot
  read those commands in a subscript). An operator's subscript keeps its meaning
  (`\\int_{-\\pi}^{\\pi}`, `\\log_{\\pi}`, `\\lim_{x\\to 0}`).
- A power too large to evaluate (`10^{10^{10^{10}}}`: an exponent beyond floating point) is equal
  only as written; evaluating it would never finish (OlympiadBench's judge refuses it too).
- Thousands separators `1,000`, `1{,}000`, `1\\,000` are the number 1000 when they make up the whole
  answer; `1,5` stays a pair, never the decimal 1.5.
- `(1,2)` is one object whether read as an ordered pair or an open interval; it differs from `[1,2]`
  and from the set `\\{1,2\\}` (math-verify calls the last two equal: we do not).
- A column or row vector equals the tuple of its entries (`\\begin{pmatrix}1\\\\2\\end{pmatrix}` = `(1,2)`).
- Numbers: exact answers must be exactly equal (math-verify rounds differences below 1e-15 to zero, so
  it calls `\\frac{1}{2^{99}}` and `\\frac{1}{2^{98}}` equal: we do not). A decimal on either side must
  agree to 6 significant figures (`\frac{1}{3}` = `0.333333` != `0.33`); an integer gold only accepts
  an integral decimal (`3.0`, not `2.9999999`).
- A gold that is a single capital letter is a choice letter: graded by `choice_reward` (so `b` does
  not match `B`), with the sample's `choices` if any. A gold that is a word (`\\text{Evelyn}`, `odd`)
  is compared as text, case-insensitively (math-verify reads `Evelyn` as the product E*v*e*l*y*n).

Where OlympiadBench's official judge (eval/auto_scoring_judge.py) would give the other verdict, on
purpose: it drops any left side of an equation (`x^2+y^2=1` would accept `1`: a constant rewarded for
a curve) and scales every number by 100 both ways, sign or not (gold 5 would accept 500 and 0.05):
both reward wrong answers, so we drop only a name and rescale only a written percent. It reads
several boxes as one comma list; we keep them a hedge (a box per candidate is the common hedge). It
compares numbers to an absolute 1e-8 (so 10^{-20} = 10^{-21}, and 1/3 != 0.333333) and accepts
expressions that differ by a constant under 1e-3; we keep the exact and 6-significant-figure rules.
"""

import atexit
import functools
import importlib
import logging
import math
import os
import re
import threading
import traceback
from collections import Counter
from decimal import Decimal
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import sokoban
from config import ConfigError
from reward_workers import RewardPool

# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------

# LMM-R1's strict format (openrlhf/models/remote_rm/math_verifier.py). After stripping surrounding
# whitespace the completion is exactly <think>X</think><answer>Y</answer>: X holds no </think>, Y no
# </answer>, nothing (not even a space) sits between </think> and <answer> or follows </answer>,
# and <think> and <answer> each appear once. X and Y may be empty and span lines.
FORMAT_PATTERN = re.compile(r"^<think>(?:(?!</think>).)*</think><answer>(?:(?!</answer>).)*</answer>\Z", re.DOTALL)
ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(completion: str) -> float:
    """1.0 iff `completion` is in LMM-R1's strict <think>…</think><answer>…</answer> format (linear time)."""
    text = completion.strip()
    ok = FORMAT_PATTERN.match(text) is not None and text.count("<think>") == 1 and text.count("<answer>") == 1
    return float(ok)


# ---------------------------------------------------------------------------------------------
# Extracting the final answer
# ---------------------------------------------------------------------------------------------


BRACE_TOKEN = re.compile(r"\\boxed\{|\{|\}")


def boxed_contents(text: str) -> List[str]:
    """The contents of the outermost \\boxed{...} in `text`, balanced braces, in order; unclosed ones
    dropped. One pass over the braces, so a megabyte of `\\boxed{` costs linear time."""
    out, stack, open_boxes = [], [], 0  # stack: (content start, is a box recorded at this level)
    for m in BRACE_TOKEN.finditer(text):
        if m.group() != "}":
            recorded = m.group() != "{" and open_boxes == 0  # nested boxes lie inside their parent's content
            open_boxes += m.group() != "{"
            stack.append((m.end(), m.group() != "{", recorded))
        elif stack:
            start, is_box, recorded = stack.pop()
            open_boxes -= is_box
            if recorded:
                out.append((start, text[start : m.start()]))
    return [content for _, content in sorted(out)]


def last_boxed(text: str) -> Optional[str]:
    """The content of the last outermost \\boxed{...} in `text`, or None."""
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


def last_answer_span(completion: str) -> Optional[str]:
    """The text inside the last <answer>…</answer>, or None."""
    spans = ANSWER_SPAN.findall(completion)
    return spans[-1] if spans else None


def extract_answer(completion: str) -> Optional[str]:
    """The final answer text: the last <answer> span, else the last \\boxed{} (wrapped in $ for parsing)."""
    span = last_answer_span(completion)
    if span is not None:
        return span
    boxed = last_boxed(completion)
    return None if boxed is None else f"${boxed}$"


def final_answer(completion: str) -> Optional[str]:
    """The one answer a completion commits to, or None (none given, or several different boxes)."""
    text = extract_answer(completion)
    if text is None:
        return None
    boxes = boxed_contents(text)
    if len(set(boxes)) > 1 and len({normalise(b) for b in set(boxes)}) > 1:  # one box needs no normalising
        return None  # `\boxed{1}, \boxed{2}`: a hedge
    answer = boxes[-1] if boxes else text
    return answer if answer.strip() else None


# ---------------------------------------------------------------------------------------------
# Normalising answer strings (both gold and prediction, before any parsing)
# ---------------------------------------------------------------------------------------------

UNIT_WORDS = (
    "square units|sq units|units|unit|square feet|square inches|square meters|square centimeters|"
    "cm|mm|km|meters|meter|metres|centimeters|inches|inch|feet|foot|ft|yards|yd|miles|mph|"
    "degrees|degree|dollars|dollar|cents|cent|hours|hour|hrs|minutes|minute|mins|min|seconds|second|sec|"
    "days|day|weeks|years|kg|mg|grams|gram|pounds|lbs|lb|ml|liters|litres|gallons|people|students|ways"
)
# `\text{ cm}` / `\mathrm{kg}` / `\mbox{units}` (words only) and trailing unit words after a number.
TEXT_UNIT = re.compile(r"\\(?:text|mathrm|mbox|textrm|rm)\s*\{\s*(?:[A-Za-z]+\.?\s*)+\}(\^\{?[23]\}?)?")
TRAILING_UNIT = re.compile(rf"(?<=[\d}}])\s*(?:{UNIT_WORDS})\b\.?(\^\{{?[23]\}}?)?\s*$")
THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
DELIMITED = re.compile(r"\$+([^$]*)\$+|\\\((.*)\\\)|\\\[(.*)\\\]", re.DOTALL)  # one whole $…$, \(…\) or \[…\]
PROSE = re.compile(r"(?:^|(?<=\s))[A-Za-z]{3,}\b")  # a free-standing word (not \command{arg}): a sentence
PERCENT = re.compile(r"\\%|%|\\percent\b")
TEXT_WRAPPER = re.compile(r"\\(?:text|mathrm|mbox|textrm|rm)\s*\{([^{}]*)\}")
# A name's subscript (`k_{\mathrm{B}}`, `T_\text{s}`, `I_{\max}`, `n_\gamma`), spelled out as a label below;
# not an operator's (`\lim_{x\to 0}`, `\int_{-\pi}`, `\log_{\alpha}` keep their meaning)
OPERATOR = r"(?:lim|limsup|liminf|sum|prod|coprod|int|iint|iiint|oint|log|ln|lg|max|min|sup|inf|arg\w*|big\w+)(?![A-Za-z])"
SUBSCRIPT = re.compile(
    rf"((?<![\\A-Za-z])[A-Za-z]+|\\(?!{OPERATOR})[A-Za-z]+|\}})_\s*"
    r"(?:\{((?:[^{}]|\{[^{}]*\})*)\}|(\\(?:text|mathrm|mbox|textrm|rm)\s*\{[^{}]*\}|\\[A-Za-z]+))"
)


def normalise(answer: str) -> str:
    """A canonical string for an answer: delimiters, spacing, annotations and separators removed.

    Only rewrites that cannot change the value (see the module docstring for the policy).
    """
    s = answer.strip()
    whole = DELIMITED.fullmatch(s)
    if whole:
        s = next(g for g in whole.groups() if g is not None).strip()
    boxes = boxed_contents(s)
    if len(boxes) == 1 and s.startswith("\\boxed{") and s.endswith("}") and len(boxes[0]) == len(s) - 8:
        s = boxes[0]
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = SUBSCRIPT.sub(subscript_label, s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"(\d)(?:\\[,;: !]|\{,\}|~)(?=\d{3}\b)", r"\1", s)  # 1\,000 and 1{,}000 -> 1000
    s = re.sub(r"\\!|\\,|\\;|\\:|~|\\ ", " ", s)
    s = PERCENT.sub("", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree\b", "", s)
    s = s.replace("\\$", "")
    if re.search(r"\d", s):
        s = TEXT_UNIT.sub("", s)
        s = TRAILING_UNIT.sub("", s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = re.sub(r"\s*([^\w\s\\])\s*", r"\1", s)  # `( 3, 4 )` -> `(3,4)`; keeps `\cdot x` and `a b`
    if THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def subscript_label(m: re.Match) -> str:
    """A name's subscript is part of the name: its text wrappers and command backslashes go (`k_{\\mathrm{B}}`
    -> `k_{B}`, `R_{\\odot}` -> `R_{odot}`). TEXT_UNIT would strip `\\mathrm{B}` as a unit, and
    latex2sympy cannot parse `\\max`, `\\gamma` or `\\odot` in a subscript."""
    label = TEXT_WRAPPER.sub(r"\1", m[2] if m[2] is not None else m[3])
    return m[0] if "{" in label else m[1] + "_{" + re.sub(r"\\(?=[A-Za-z])", "", label) + "}"


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")  # golds that need no parse to be known good
CHOICE_GOLD = re.compile(r"\(?([A-Z])\)?\.?")
TEXT_GOLD = re.compile(r"[A-Za-z][A-Za-z '\-]*[A-Za-z]")
HEDGE = re.compile(r"\\pm|\\mp|±|∓|\bor\b|\\lor\b")
PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![A-Za-z])|±|∓")
# a name (`x`, `a_{n}`, `I_{\max}`, `\omega_0`, `v'`) = a right side holding no other relation (normalised text)
NAME = r"(?:\\[A-Za-z]+|[A-Za-z])(?:_(?:\{[^{}]*\}|[A-Za-z0-9])|'|\^\{?\\prime\}?)*"
NAMED_EQUATION = re.compile(rf"({NAME})=([^=<>]+)")


def unwrap_text(answer: str) -> str:
    """`\\text{(C)}` -> `(C)`: the normalised answer with text wrappers removed, spaces collapsed."""
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}", r"\1", normalise(answer))
    return re.sub(r"\s+", " ", s).strip()


def as_text(answer: str) -> str:
    """`\\text{Evelyn}` -> `evelyn`: the words of an answer, lower-cased."""
    return unwrap_text(answer).lower()


@functools.lru_cache(maxsize=4096)
def gold_kind(answer: str) -> str:
    """'choice' (a capital letter), 'text' (a word of 3+ letters) or 'math'."""
    if CHOICE_GOLD.fullmatch(unwrap_text(answer)):
        return "choice"
    text = as_text(answer)
    return "text" if len(text) >= 3 and TEXT_GOLD.fullmatch(text) else "math"


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

# Only capital letters are choice letters: `\boxed{a}` is a variable, not option A.
BOXED_LETTER = re.compile(r"^\s*(?:\\text\{)?\s*\(?([A-Z])\)?(?:[.:)]|\s|\}|$)")
# `B`, `(B)`, `B.`, `B: 12`, `B) 12`, `(B) 12` -- but not the article in `A triangle`.
WHOLE_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?=[.:)]|\s*$))")
# `The answer is B`, `answer: (C)`, `Option B.` -- words in any case, the letter a capital that ends the clause.
SAID_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*:?|:)?\s*(?i:option\s*)?\(?([A-Z])\)?(?=\s*(?:$|[.,;:)\n]))")
PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def choice_letter(text: str, choices: Optional[Sequence[str]] = None) -> Optional[str]:
    """The one choice letter `text` commits to, or None (none, several different, or out of range).

    Tried in order, the first rule that finds any letter decides: \\boxed{B} / \\boxed{(B)}; the whole
    answer is `B`, `(B)`, `B.`, `B: 12`, `B) 12`; `The answer is B` / `Option (B)`; `(B)` anywhere.
    With `choices`, an answer equal to one choice's text (normalised) selects that choice.
    """
    text = text.replace("$", "")
    boxes = set(boxed_contents(text))
    if len(boxes) > 1 and len({normalise(b) for b in boxes}) > 1:  # one box needs no normalising
        return None  # `\boxed{A} or \boxed{B}`: a hedge
    plain = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", text)
    for letters in (
        [m.group(1) for b in boxes if (m := BOXED_LETTER.match(b))],
        [m.group(1) or m.group(2)] if (m := WHOLE_LETTER.match(plain)) else [],
        SAID_LETTER.findall(plain),
        PAREN_LETTER.findall(plain),
    ):
        if letters:
            return letters[0] if len(set(letters)) == 1 and in_range(letters[0], choices) else None
    return choice_with_text(text, choices)


def choice_with_text(text: str, choices: Optional[Sequence[str]]) -> Optional[str]:
    """The letter of the one choice whose text equals `text` (normalised, case-insensitive), or None."""
    hits = [i for i, c in enumerate(choices or []) if as_text(str(c)) == as_text(text)]
    return chr(ord("A") + hits[0]) if len(hits) == 1 else None


def in_range(letter: str, choices: Optional[Sequence[str]]) -> bool:
    return choices is None or ord(letter) - ord("A") < len(choices)


def gold_letter(answer: str, choices: Optional[Sequence[str]] = None) -> Optional[str]:
    """The gold's choice letter: the answer is a letter, or (with choices) the text of one choice."""
    m = CHOICE_GOLD.fullmatch(unwrap_text(answer))
    if m:
        return m.group(1) if in_range(m.group(1), choices) else None
    return choice_with_text(answer, choices)


def choice_reward(completion: str, answer: str, choices: Optional[Sequence[str]] = None) -> float:
    """1.0 iff the completion's final answer picks the gold choice (letter, or choice text).

    Regex only, linear time: safe to call in any process without the pool's time bound."""
    text = extract_answer(completion)
    if text is None:  # no <answer> and no \boxed{}: accept only an explicit "The answer is B"
        said = SAID_LETTER.findall(completion)
        text = said[-1] if said else None
    gold = gold_letter(answer, choices)
    return float(text is not None and gold is not None and choice_letter(text, choices) == gold)


# ---------------------------------------------------------------------------------------------
# Math equivalence (runs inside worker processes: math-verify has no reliable timeout of its own)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """math-verify's parse of a normalised gold, once per gold per worker (groups share their gold)."""
    from math_verify import parse

    return tuple(parse(f"${gold}$", parsing_timeout=None))


def parse_pred(pred: str) -> list:
    """math-verify's parse of a normalised prediction. A bare answer (`x^2+1`, `(1,2)`) is read as one
    LaTeX formula; a sentence or text with $…$ goes through math-verify's own extraction (rightmost math)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    sentence = "$" in pred or "\\(" in pred or PROSE.search(pred) is not None
    return parse(pred if sentence else f"${pred}$", extraction_config=config, parsing_timeout=None)


def sympy_objects(parsed) -> list:
    from sympy import Basic, MatrixBase

    return [p for p in parsed if isinstance(p, (Basic, MatrixBase))]


def numbers_agree(gold, pred) -> Optional[bool]:
    """Stricter than math-verify for plain numbers: exact values must be equal, a decimal must agree to 6
    significant figures, and an integer gold accepts only an integral decimal. None: not two real numbers."""
    from sympy import Expr, Float, Integer

    if not (isinstance(gold, Expr) and isinstance(pred, Expr) and gold.is_number and pred.is_number):
        return None
    if too_large(gold) or too_large(pred):
        return gold == pred  # equal only as written
    g, p = gold.evalf(40), pred.evalf(40)
    if not (g.is_real and p.is_real and g.is_finite and p.is_finite):
        return None
    diff = abs(g - p)
    if isinstance(gold, Integer) or gold.is_integer:
        return bool(diff == 0)
    if gold.has(Float) or pred.has(Float):  # equal to 6 significant figures (1/3 = 0.333333)
        return f"{float(g):.6g}" == f"{float(p):.6g}" or bool(diff <= 1e-6 * abs(g))
    return bool(diff <= 1e-25 * max(abs(g), abs(p)))


def too_large(number) -> bool:
    """Whether a number holds a power whose exponent overflows a float (`10^{10^{10^{10}}}`): evalf
    would never finish it (OlympiadBench's judge refuses such powers too). Inner powers first."""
    from sympy import Pow, postorder_traversal

    return any(
        isinstance(n, Pow) and n.exp.is_number and math.isinf(float(abs(n.exp.evalf(15)))) for n in postorder_traversal(number)
    )


def vector_entries(obj) -> Optional[list]:
    """Entries of a one-row/one-column matrix, an ordered pair/open interval, or a tuple; else None."""
    from sympy import Interval, MatrixBase, Tuple

    if isinstance(obj, MatrixBase) and 1 in obj.shape:
        return list(obj)
    if isinstance(obj, Interval) and obj.left_open and obj.right_open:
        return [obj.start, obj.end]
    if isinstance(obj, Tuple):
        return list(obj)
    return None


def objects_equal(gold, pred) -> bool:
    """math-verify's verdict (gold first) with our policy corrections (module docstring)."""
    from math_verify import verify
    from sympy import FiniteSet, Float, Interval, MatrixBase, Tuple

    pair_like = (Interval, Tuple)
    if (isinstance(gold, FiniteSet) and isinstance(pred, pair_like)) or (
        isinstance(gold, pair_like) and isinstance(pred, FiniteSet)
    ):
        return False  # {1,2} is not (1,2)
    if isinstance(gold, MatrixBase) != isinstance(pred, MatrixBase):
        g, p = vector_entries(gold), vector_entries(pred)
        return g is not None and p is not None and len(g) == len(p) and all(objects_equal(a, b) for a, b in zip(g, p))
    own = numbers_agree(gold, pred)
    if own is not None and (gold.has(Float) or pred.has(Float)):
        return own  # our 6-significant-figure rule replaces math-verify's 6 decimal places
    return own is not False and verify(gold, pred, timeout_seconds=None)


def math_score(completion: str, answer: str, choices: Optional[Sequence[str]] = None) -> float:
    """1.0 iff the completion's final answer equals the gold `answer` under the module's policy.

    Unbounded in time: call it through a RewardPool (or `math_reward`), which enforces the timeout.
    """
    if gold_kind(answer) == "choice":
        return choice_reward(completion, answer, choices)
    pred = final_answer(completion)
    if pred is None:
        return 0.0
    # a group's completions often agree: a verdict is computed once per (gold, answer) in a worker
    return same_answer(answer, pred) if len(pred) < 4096 else same_answer.__wrapped__(answer, pred)


@functools.lru_cache(maxsize=16384)
def same_answer(answer: str, pred: str) -> float:
    """The verdict for a gold and a final-answer string (see the module docstring)."""
    if HEDGE.search(pred) and not HEDGE.search(answer):
        both = plus_minus_list(pred)
        return same_answer(answer, both) if both is not None and two_values(answer) else 0.0
    if gold_kind(answer) == "text":
        return float(as_text(pred) == as_text(answer))
    return float(any(equal_forms(g, p) for g in readings(answer) for p in readings(pred)))


def readings(answer: str) -> List[str]:
    """The normalised answer, and for a number written with a percent sign also its hundredth
    (`60\\%` -> `60`, `0.60`)."""
    s = normalise(answer)
    if PERCENT.search(answer) and NUMBER.fullmatch(s):
        return [s, format(Decimal(s).scaleb(-2), "f")]
    return [s]


def label_free(gold: str, pred: str) -> Optional[List[Tuple[str, str]]]:
    """The (gold, pred) pairs to compare (normalised text): as written, and with a name's label
    dropped: `I_{\\max}=X` vs `X` also as X vs X, vs `I_\\max=Y` only as X vs Y. None when each names
    a different thing (`x=2` vs `y=2`): wrong, however latex2sympy reads the names (it reads both
    `I_{\\max}` and `I_{\\min}` as the imaginary unit)."""
    g, p = NAMED_EQUATION.fullmatch(gold), NAMED_EQUATION.fullmatch(pred)
    if g and p:
        return [(g[2], p[2])] if name_key(g[1]) == name_key(p[1]) else None
    if g and "=" not in pred:
        return [(gold, pred), (g[2], pred)]
    if p and "=" not in gold:
        return [(gold, pred), (gold, p[2])]
    return [(gold, pred)]


def name_key(name: str) -> str:
    """`a_{n}` and `a_n`, `v^{\\prime}` and `v'`: one name."""
    return re.sub(r"\^\\prime", "'", re.sub(r"[{}]", "", name))


def equal_forms(gold: str, pred: str) -> bool:
    """Normalised gold and prediction equal as written, or as the values of a named equation."""
    for g, p in label_free(gold, pred) or []:
        if g == p:
            return True  # same string after normalising: equal without symbolic work
        if any(objects_equal(a, b) for a in sympy_objects(parse_gold(g)) for b in sympy_objects(parse_pred(p))):
            return True
    return False


def plus_minus_list(pred: str) -> Optional[str]:
    """`y=\\pm a` -> `+a,-a`: the two values one ± (of a name's value) stands for, as a list; None for
    any other hedge (`or`, two ±)."""
    s = normalise(pred)
    named = NAMED_EQUATION.fullmatch(s)
    s = named[2] if named else s
    if len(PLUS_MINUS.findall(s)) != 1 or HEDGE.search(PLUS_MINUS.sub("", s)):
        return None
    return f"{PLUS_MINUS.sub('+', s)},{PLUS_MINUS.sub('-', s)}"


def two_values(answer: str) -> bool:
    """Whether the gold is a list or set of exactly two values (`a, -a`, `\\{-a, a\\}`)."""
    from sympy import FiniteSet

    return any(isinstance(o, FiniteSet) and len(o) == 2 for o in sympy_objects(parse_gold(normalise(answer))))


def tolerance_score(completion: str, sample: dict) -> float:
    """OlympiadBench's rule for a gold with a numeric tolerance (eval.py; not a training reward):
    1.0 iff the final answer is as many numbers as the gold, matched one to one in any order, each
    within its gold number's tolerance. `sample["error"]` is one tolerance for all or one per gold
    number in order, comma-separated; an empty one is the judge's default 1e-8, and every tolerance
    gets the judge's 1% slack (a difference of exactly the tolerance passes despite float rounding).
    Hedges and percent readings as in `same_answer`. No `error`: 0.0."""
    pred = final_answer(completion)
    if pred is None or sample.get("error") in (None, "") or (HEDGE.search(pred) and not HEDGE.search(sample["answer"])):
        return 0.0
    tolerances = [1.01 * float(t) if t.strip() else 1.01e-8 for t in str(sample["error"]).split(",")]
    for gold in readings(sample["answer"]):
        golds = [real_values(parse_gold(item)) for item in top_level_items(gold)]
        for p in readings(pred):
            preds = [real_values(parse_pred(item)) for item in top_level_items(p)]
            if within(golds, preds, tolerances * len(golds) if len(tolerances) == 1 else tolerances):
                return 1.0
    return 0.0


def within(golds: List[List[float]], preds: List[List[float]], tolerances: List[float]) -> bool:
    """Each gold number (its candidate values) paired with a different prediction within its
    tolerance, gold by gold in order, as OlympiadBench's judge pairs them."""
    if not len(golds) == len(preds) == len(tolerances):
        return False
    left = list(preds)
    for values, tolerance in zip(golds, tolerances):
        hit = next((p for p in left if any(abs(g - v) <= tolerance for g in values for v in p)), None)
        if hit is None:
            return False
        left.remove(hit)
    return True


def top_level_items(answer: str) -> List[str]:
    """A normalised answer split at the commas outside brackets (`0.1,(1,2)` -> `0.1`, `(1,2)`)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(answer):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(answer[start:i])
            start = i + 1
    return items + [answer[start:]]


def real_values(parsed) -> List[float]:
    """The finite real numbers among math-verify's readings of one answer."""
    from sympy import Expr

    values = [o.evalf(30) for o in sympy_objects(parsed) if isinstance(o, Expr) and o.is_number and not too_large(o)]
    return [float(v) for v in values if v.is_real and v.is_finite]


def gold_problem(answer: str, choices: Optional[Sequence[str]] = None) -> Optional[str]:
    """Why `answer` cannot be a gold for `math`, or None when it can (checked once, at data load)."""
    kind = gold_kind(answer)
    if kind == "choice" and gold_letter(answer, choices) is None:
        return f"choice letter out of range of {len(choices or [])} choices"
    gold = normalise(answer)
    named = NAMED_EQUATION.fullmatch(gold)
    forms = [gold, named[2]] if named else [gold]  # `I_{\max}=X` is graded by X where the name won't parse
    if kind == "math" and not NUMBER.fullmatch(gold) and not any(sympy_objects(parse_gold(f)) for f in forms):
        return "math-verify cannot parse it"
    return None


def choice_gold_problem(answer: str, choices: Optional[Sequence[str]] = None) -> Optional[str]:
    return None if gold_letter(answer, choices) is not None else "not a choice letter (or the text of one choice)"


# ---------------------------------------------------------------------------------------------
# Sokoban: replay the answer's moves on the row's level
# ---------------------------------------------------------------------------------------------


class Malformed(ValueError):
    """Raised by a reward when a completion gives no usable answer: it scores 0 and is counted as
    `reward/n_malformed` (not as an error: the verifier worked, the answer did not). A researcher's
    own reward may raise it too."""


PROGRESS_SCALE = 0.5  # shaping=progress: an unsolved level earns at most half of a solved one
LEVEL_CHECK_STATES = 100_000  # the load-time check's solver budget; a bigger level is kept unproven


def sokoban_moves(completion: str) -> List[str]:
    """The gate: a completion in the strict format whose <answer> is a move list (`Left, Up, ...`
    words as the prompt asks, or LURD letters); its moves as LURD letters. Raises Malformed."""
    if not format_reward(completion):
        raise Malformed("not in the <think>…</think><answer>…</answer> format")
    moves = sokoban.parse_moves(last_answer_span(completion))
    if moves is None:
        raise Malformed("the answer is not a comma-separated list of Left, Right, Up, Down")
    return moves


def sokoban_reward(completion: str, sample: dict, shaping: str = "none") -> float:
    """The answer's moves replayed on `sample["level"]` (gym-sokoban's rules): 1.0 when they solve
    it; otherwise, by `shaping` (the registry names sokoban, sokoban_progress, sokoban_lmm_r1):
      none      0.0
      progress  PROGRESS_SCALE * the fraction of the boxes, off a goal at the start, that end on one
      lmm_r1    LMM-R1's sokoban_verifier reward instead of all of the above (see `lmm_r1_sokoban`)
    A completion that fails the gate (`sokoban_moves`) raises Malformed: 0, counted.
    """
    moves = sokoban_moves(completion)
    if shaping == "lmm_r1":
        return lmm_r1_sokoban(completion, sample["level"], moves)
    if sokoban.replay(sample["level"], moves)[1]:
        return 1.0
    if shaping == "progress":
        return PROGRESS_SCALE * sokoban.box_progress(sample["level"], moves)
    if shaping != "none":
        raise ValueError(f"sokoban_reward: unknown shaping {shaping!r} (none | progress | lmm_r1)")
    return 0.0


def lmm_r1_sokoban(completion: str, level: str, moves: List[str]) -> float:
    """LMM-R1's reward (openrlhf/models/remote_rm/sokoban_verifier.py) less its 0.5 x format term,
    which is the `format` reward here:
      best running sum of gym-sokoban's rewards over the first 50 moves (-0.1 a move, +-1 per box
        on/off a goal, +10 when solved; at least 0)   -- about 10.8 for a 12-move solution of 2 boxes
      + action-length bonus: 0.05 per move up to 20 moves (1.0), then 1.0 - 0.2 * ((n - 20) / 30)^2;
        a 1- to 5-move pattern repeated back to back more than 7 times makes it min(0, bonus - 0.2)
      + thinking bonus: 0.001 per word (longer than one character) of <think>, up to 200 words.
    The bonuses reward long answers and long thinking whether or not they solve the level: that is
    what the paper trained with. One difference: LMM-R1 gave 0 in total (format included) to an
    answer that is not a move list; here `format` still pays its 0.5 for well-formed tags.
    """
    n = len(moves)
    length_bonus = 0.05 * n if n < 20 else 1.0 - 0.2 * ((n - 20) / 30) ** 2
    if repeats_back_to_back(moves, times=7, max_k=5):
        length_bonus = min(0.0, length_bonus - 0.2)
    think = completion.split("<think>", 1)[1].split("</think>", 1)[0].strip()
    thinking_bonus = 0.001 * min(200, sum(len(word) > 1 for word in think.split(" ")))
    return sokoban.best_return(level, moves, max_actions=50) + length_bonus + thinking_bonus


def repeats_back_to_back(words: Sequence[str], times: int, max_k: int) -> bool:
    """Whether some run of 1..max_k words occurs more than `times` times in a row (`L, R, L, R, ...`)."""
    for k in range(1, max_k + 1):
        for offset in range(k):
            run = 1
            for s in range(offset + k, len(words) - k + 1, k):
                run = run + 1 if words[s : s + k] == words[s - k : s] else 1
                if run > times:
                    return True
    return False


def level_problem(sample: dict) -> Optional[str]:
    """Why a row's `level` cannot be played (missing, bad XSB, already solved, unsolvable), or None."""
    level = sample.get("level")
    if not isinstance(level, str):
        return "no 'level' field (XSB text) in the row"
    try:
        board = sokoban.parse_level(level)
        if board.solved:
            return "level is already solved"
        if sokoban.solve(level, max_states=LEVEL_CHECK_STATES) is None:
            return "level is unsolvable"
    except ValueError as e:
        return str(e)
    except RuntimeError:
        pass  # too large to prove solvable within the check's budget: kept
    return None


# ---------------------------------------------------------------------------------------------
# The registry: name -> fn(completion, sample) -> float, and the gold check each one needs
# ---------------------------------------------------------------------------------------------

REWARDS: Dict[str, Callable[[str, dict], float]] = {
    "format": lambda completion, sample: format_reward(completion),
    "math": lambda completion, sample: math_score(completion, sample["answer"], sample.get("choices")),
    "choice": lambda completion, sample: choice_reward(completion, sample["answer"], sample.get("choices")),
    "sokoban": lambda completion, sample: sokoban_reward(completion, sample),
    "sokoban_progress": lambda completion, sample: sokoban_reward(completion, sample, "progress"),
    "sokoban_lmm_r1": lambda completion, sample: sokoban_reward(completion, sample, "lmm_r1"),
}

# name -> fn(sample) -> reason the sample's gold is unusable, or None. Run on every row at data load.
GOLD_CHECKS: Dict[str, Callable[[dict], Optional[str]]] = {
    "math": lambda sample: gold_problem(sample["answer"], sample.get("choices")),
    "choice": lambda sample: choice_gold_problem(sample["answer"], sample.get("choices")),
    "sokoban": level_problem,
    "sokoban_progress": level_problem,
    "sokoban_lmm_r1": level_problem,
}


def resolve(name: str) -> Callable[[str, dict], float]:
    """A reward function by name: a key of REWARDS, or `module:function` taking (completion, sample)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module, fn_name = name.split(":", 1)
        try:
            return getattr(importlib.import_module(module), fn_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward.weights: cannot import {name!r} ({e})") from None
    raise ConfigError(f"reward.weights: unknown reward {name!r}; known: {sorted(REWARDS)} or module:function")


# ---------------------------------------------------------------------------------------------
# Bounded execution: every verification runs in reward_workers.py's pool, whose processes call this
# module's warm_up, resolve and run_unit
# ---------------------------------------------------------------------------------------------

WARM_UP = [("1+x", "x+1"), ("(1,2)", "[1,2]"), ("\\{1,2\\}", "\\{2,1\\}"), ("(x+1)^2", "x^2+2x+1"), ("x>3", "3<x"),
           ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)"), ("\\frac{1}{3}", "0.333333"), ("x=2", "2")]  # fmt: skip


def warm_up() -> None:
    """Run once in the pool's zygote before it forks: math-verify, its grammar and sympy's lazy modules
    are then imported and warm in every worker."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its warnings would str() sympy objects
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    for gold, pred in WARM_UP:
        math_score(f"<answer>$\\boxed{{{pred}}}$</answer>", gold)


def run_unit(kind: str, payload: list) -> dict:
    """One unit's result line: a reward's value, a gold check's verdict, or what went wrong."""
    try:
        if kind == "check":
            name, sample = payload
            return {"value": GOLD_CHECKS[name](sample)}
        name, completion, sample = payload
        value = float(resolve(name)(completion, sample))
        if not math.isfinite(value):  # a NaN reward would poison every advantage of the batch
            raise ValueError(f"reward {name} returned {value}")
        return {"value": value}
    except Malformed as e:
        return {"value": 0.0, "malformed": str(e)}
    except BaseException:  # includes MemoryError and RecursionError from deep LaTeX
        return {"error": traceback.format_exc(limit=-8)[-4000:]}


_POOLS: Dict[int, RewardPool] = {}
_POOLS_LOCK = threading.Lock()


def reward_pool(workers: int = 0) -> RewardPool:
    """The process's pool of `workers` verifier processes (0: one per CPU core, at most 8), started on
    first use and shared by later runs and direct calls such as `math_reward`."""
    n = workers if workers > 0 else min(8, os.cpu_count() or 1)
    with _POOLS_LOCK:
        if n not in _POOLS:
            _POOLS[n] = RewardPool(n)
            atexit.register(_POOLS[n].close)
        return _POOLS[n]


def math_reward(completion: str, answer: str, timeout_s: float = 2.0, choices: Optional[Sequence[str]] = None) -> float:
    """`math_score` bounded by `timeout_s` wall-clock from any thread: a timeout or error scores 0."""
    sample = {"answer": answer} if choices is None else {"answer": answer, "choices": list(choices)}
    (outcome,) = reward_pool().run([[("score", ("math", completion, sample))]], timeout_s)[0]
    return float(outcome.value) if outcome.error is None and not outcome.timeout else 0.0


# ---------------------------------------------------------------------------------------------
# Scoring a rollout batch
# ---------------------------------------------------------------------------------------------


def groups(samples: List[dict]) -> List[List[int]]:
    """Indices of consecutive completions that answer the same sample (a prompt group)."""
    out: List[List[int]] = []
    for i, sample in enumerate(samples):
        if out and samples[out[-1][0]] == sample:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def score(
    pool: RewardPool, completions: List[str], samples: List[dict], weights: Dict[str, float], timeout_s: float
) -> Tuple[List[float], Dict[str, List[float]], Counter]:
    """Weighted total per completion, each part's raw value per completion, and failure counts.

    `samples[i]` is the row completion i answers ({"answer": ..., **other fields}). Counts:
    `errors`/`timeouts`/`malformed` in all and `<name>_errors`/... per reward, and `worker_restarts`
    (verifications whose worker was killed or died and was replaced). The first failure of
    each kind of each reward is printed (with its traceback) once per pool, not once per step.
    """
    names = list(weights)
    index = groups(samples)
    tasks = [[("score", (name, completions[i], samples[i])) for i in group for name in names] for group in index]
    outcomes = pool.run(tasks, timeout_s)
    parts = {name: [0.0] * len(completions) for name in names}
    counts: Counter = Counter()
    for group, task_outcomes in zip(index, outcomes):
        for k, outcome in enumerate(task_outcomes):
            i, name = group[k // len(names)], names[k % len(names)]
            counts["worker_restarts"] += outcome.replaced
            if outcome.timeout or outcome.error is not None:
                kind = "timeouts" if outcome.timeout else "errors"
                if f"{name}_{kind}" not in pool.reported:
                    pool.reported.add(f"{name}_{kind}")
                    detail = outcome.error or f"no verdict within reward.timeout_s={timeout_s}"
                    print(f"[reward] {name} failed (scored 0, counted in reward/{kind}; later ones only counted):\n{detail}")
                counts[kind] += 1
                counts[f"{name}_{kind}"] += 1
            elif outcome.malformed is not None:  # scores 0: no usable answer
                counts["malformed"] += 1
                counts[f"{name}_malformed"] += 1
            else:
                parts[name][i] = float(outcome.value)
    total = [sum(weights[n] * parts[n][i] for n in names) for i in range(len(completions))]
    return total, parts, counts


def gold_problems(pool: RewardPool, samples: List[dict], names: List[str], timeout_s: float) -> List[Optional[str]]:
    """For each sample, why its gold is unusable by one of the rewards `names` (or None if fine)."""
    checks = [n for n in names if n in GOLD_CHECKS]
    if not checks:
        return [None] * len(samples)
    batch = 256  # rows per task: amortises a round trip, still spreads a large dataset over workers
    tasks = [[("check", (n, s)) for s in samples[i : i + batch] for n in checks] for i in range(0, len(samples), batch)]
    problems: List[Optional[str]] = []
    for task_outcomes in pool.run(tasks, timeout_s):
        for k in range(0, len(task_outcomes), len(checks)):
            reasons = []
            for name, outcome in zip(checks, task_outcomes[k : k + len(checks)]):
                if outcome.timeout:
                    reasons.append(f"{name}: gold answer parse timed out")
                elif outcome.error is not None:
                    reasons.append(f"{name}: gold answer check failed: {outcome.error.strip().splitlines()[-1]}")
                elif outcome.value is not None:
                    reasons.append(f"{name}: {outcome.value}")
            problems.append("; ".join(reasons) or None)
    return problems
