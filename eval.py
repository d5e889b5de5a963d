"""Evaluation: generate with the rollout engines, score with the training verifiers, write tables.

    python eval.py model.path=CKPT eval.benchmarks=[mathvista,mathverse,mathvision,olympiadbench,mmstar,math500,gpqa,sokoban]
    python eval.py eval.benchmarks=[math500] eval.predictions=preds/     # rescore <bench>.jsonl files

Benchmarks are read from local files in their public release formats, `eval.data_dir/<name>/...`
(nothing is downloaded; `scripts/get_benchmarks.md` says where each comes from):
    mathvista      testmini.json (pid -> question, image, choices, answer, question_type, answer_type,
                   precision): MathVista's own answer normalisation by answer type, by question type
    mathverse      testmini.json (five problem versions per problem): letters for multi-choice, math
                   equivalence for free-form, by problem version
    mathvision     test.jsonl (question, options, image, answer, level, subject): letters or math
    olympiadbench  OE_en.json (open-ended English: final_answer, error tolerance, image_1..): math,
                   within `error` for numbers
    mmstar         mmstar.jsonl (question with options, image, answer letter, category): letters
    math500        test.jsonl (problem, answer, subject, level, unique_id): math equivalence
    gpqa           gpqa_diamond.csv: options shuffled with a fixed seed per question, letters recorded
    sokoban        our held-out jsonl (sokoban.py build --split test): success by size/boxes/length
    football       MageBench's Football on gfootball, its shaped score by region and kind (accuracy =
                   score / 100). eval.football.setting=online (default): MageBench's own setting, played
                   live, nothing to download (football.py: the subset x eval.football.repeats episodes,
                   a turn per answer, every live episode's turn in one generate). global (ours, not
                   MageBench's): one plan per scenario, rows from football.py build
Prompts use the training system prompt. Scoring is rule-based (the `choice` and `math` verifiers,
bounded by the same worker pool; MathVista's and OlympiadBench's own rules where they publish them,
see `verdicts`); with eval.judge.url an LLM behind any OpenAI-compatible endpoint
first extracts each final answer, and the rules grade that. Every result says which was used. Outputs in the run dir: <bench>/predictions.jsonl
(per item: prediction and verdict), <bench>/results.json (overall and by sub-category), results.md
and results.png across benchmarks.
"""

import csv
import json
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import hydra
import torch
from omegaconf import DictConfig

import config  # noqa: F401  (registers the schema with Hydra's ConfigStore)
import football
import sokoban
from config import ConfigError, reject_unknown_keys
from dist import gathered_in_order, main_rank, rank0_value, rank_and_world
from data import LMM_R1_SYSTEM_PROMPT, BadRow, Sample, parse_row, read_rows, user_message
from rewards import (
    choice_letter,
    choice_reward,
    final_answer,
    format_reward,
    last_answer_span,
    normalise,
    reward_pool,
    score,
    unwrap_text,
)

LETTERS = "ABCDEFGHIJ"


@dataclass
class Item:
    """One benchmark question: the chat to send, the row the verifier sees, and its categories."""

    id: str
    messages: list
    row: dict  # {"answer": gold, "choices": [...], "level": ...}: what the reward functions receive
    groups: Dict[str, str] = field(default_factory=dict)  # sub-category name -> value, for the tables


def user_turn(text: str, image: Optional[str] = None) -> list:
    return [{"role": "system", "content": LMM_R1_SYSTEM_PROMPT}, user_message(text, image)]


def options_text(choices: List[str]) -> str:
    return "\n".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(choices))


# ---------------------------------------------------------------------------------------------
# Readers of the public release formats
# ---------------------------------------------------------------------------------------------


def read_math500(path: str, seed: int) -> List[Item]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        Item(
            r["unique_id"], user_turn(r["problem"]), {"answer": r["answer"]}, {"subject": r["subject"], "level": str(r["level"])}
        )
        for r in rows
    ]


def read_gpqa(path: str, seed: int) -> List[Item]:
    """GPQA's correct answer is always first in the file: options are shuffled per question with
    Random((seed, Record ID)), so the letters are fixed and recorded in each item's row."""
    items = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            options = [r["Correct Answer"]] + [r[f"Incorrect Answer {k}"] for k in (1, 2, 3)]
            options = [o.strip() for o in options]
            order = list(range(4))
            random.Random(f"{seed}:{r['Record ID']}").shuffle(order)
            choices = [options[k] for k in order]
            gold = LETTERS[order.index(0)]
            question = f"{r['Question'].strip()}\n{options_text(choices)}\nAnswer with the letter of the correct option."
            groups = {"domain": r.get("High-level domain", "")}
            items.append(Item(r["Record ID"], user_turn(question), {"answer": gold, "choices": choices}, groups))
    return items


def read_mathvista(path: str, seed: int) -> List[Item]:
    """testmini.json: {pid: item} (or a list). Multiple-choice golds are choice texts; the verifier
    maps letters and texts through `choices`. Image paths are relative to the file's directory."""
    with open(path) as f:
        data = json.load(f)
    rows = list(data.values()) if isinstance(data, dict) else data
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for r in rows:
        question = r.get("query") or r["question"]
        if r.get("choices") and not r.get("query"):
            question += "\n" + options_text(r["choices"])
        row = {"answer": str(r["answer"]), "answer_type": r["answer_type"], "precision": r.get("precision")}
        if r.get("choices"):
            row["choices"] = list(r["choices"])
        groups = {"question_type": r["question_type"], "answer_type": r["answer_type"]}
        if isinstance(r.get("metadata"), dict) and "task" in r["metadata"]:
            groups["task"] = r["metadata"]["task"]
        items.append(Item(str(r["pid"]), user_turn(question, os.path.join(base, r["image"])), row, groups))
    return items


def read_mathverse(path: str, seed: int) -> List[Item]:
    """MathVerse testmini.json: a list of items, five problem versions of each problem (Text
    Dominant ... Vision Only); multi-choice golds are letters with the options in the question."""
    with open(path) as f:
        rows = json.load(f)
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for r in rows:
        question = r.get("query_cot") or r.get("question_for_eval") or r["question"]
        image = os.path.join(base, "images", r["image"]) if r.get("image") else None
        groups = {"problem_version": r["problem_version"], "question_type": r["question_type"]}
        if isinstance(r.get("metadata"), dict) and "subject" in r["metadata"]:
            groups["subject"] = r["metadata"]["subject"]
        items.append(Item(str(r["sample_index"]), user_turn(question, image), {"answer": str(r["answer"])}, groups))
    return items


def read_mathvision(path: str, seed: int) -> List[Item]:
    """MATH-Vision test.jsonl (id, question, options, image, answer, level, subject): with options
    the gold is a letter among them, otherwise a math answer."""
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path) as f:
        for r in map(json.loads, filter(str.strip, f)):
            question = r["question"] + ("\n" + options_text(r["options"]) if r.get("options") else "")
            row = {"answer": str(r["answer"])} | ({"choices": list(r["options"])} if r.get("options") else {})
            groups = {"subject": r.get("subject", ""), "level": str(r.get("level", ""))}
            items.append(Item(str(r["id"]), user_turn(question, os.path.join(base, r["image"])), row, groups))
    return items


def read_olympiadbench(path: str, seed: int) -> List[Item]:
    """OlympiadBench open-ended English (a JSON list: id, question, final_answer [..], unit,
    answer_type, error (a numeric tolerance or null), subject, image_1...): math equivalence, within
    `error` for numbers."""
    with open(path) as f:
        rows = json.load(f)
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for r in rows:
        images = [os.path.join(base, r[k]) for k in ("image_1", "image_2", "image_3", "image_4", "image_5") if r.get(k)]
        content = [{"type": "image", "image": p} for p in images] + [
            {"type": "text", "text": (r.get("context") or "") + r["question"]}
        ]
        messages = [{"role": "system", "content": LMM_R1_SYSTEM_PROMPT}, {"role": "user", "content": content}]
        gold = r["final_answer"][0] if isinstance(r["final_answer"], list) else r["final_answer"]
        row = {"answer": gold.strip().strip("$"), "error": r.get("error")}
        groups = {
            "subject": r.get("subject", ""),
            "answer_type": r.get("answer_type", ""),
            "modality": "image" if images else "text",
        }
        items.append(Item(str(r["id"]), messages, row, groups))
    return items


def read_mmstar(path: str, seed: int) -> List[Item]:
    """MMStar as jsonl (index, question with its options, image path, answer letter, category,
    l2_category): letter extraction."""
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path) as f:
        for r in map(json.loads, filter(str.strip, f)):
            groups = {"category": r["category"], "l2_category": r.get("l2_category", "")}
            items.append(
                Item(str(r["index"]), user_turn(r["question"], os.path.join(base, r["image"])), {"answer": r["answer"]}, groups)
            )
    return items


def read_sokoban(path: str, seed: int) -> List[Item]:
    """Our Sokoban rows, read as training reads them (data.read_rows / parse_row): relative image
    paths resolved, the row's level and optimal length kept for the verifier."""
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for where, obj in read_rows(path):
        if isinstance(obj, BadRow):
            raise obj
        sample = parse_row(obj, base, where)
        items.append(Item(str(sample.meta.get("question", where)), sample.messages, sample.reward_row()))
    return items


# ---------------------------------------------------------------------------------------------
# Scoring (rule-based: the training verifiers, and the benchmarks' own rules where published)
# ---------------------------------------------------------------------------------------------


def mathvista_correct(prediction: str, row: dict) -> bool:
    """MathVista's own scoring (evaluation/calculate_score.py: normalize_extracted_answer, then ==
    against the gold string) applied to the answer our rules extract (`final_answer`; delimiters,
    units and separators removed by `normalise`). By the item's type:
      multiple choice  the letter's choice (`choice_letter`), else the choice nearest in edit distance
      integer          str(int(float(x))): `4.0` and `4.7` both read 4
      float            str(round(float(x), precision))
      list             the text, spacing aside
    No final answer is wrong (the scorer's --ignore_empty_extractions; without it, an empty
    extraction gets the nearest choice, the shortest one)."""
    answer = final_answer(prediction)
    if answer is None:
        return False
    if row.get("choices"):
        return nearest_choice(answer, row["choices"]) == row["answer"]
    if row["answer_type"] not in ("integer", "float"):
        return normalise(answer) == normalise(row["answer"])
    try:
        value = float(normalise(answer))
        read = str(int(value)) if row["answer_type"] == "integer" else str(round(value, int(row["precision"])))
    except (ValueError, OverflowError):  # not a plain number (`\frac{3}{2}`, `nan`, `inf`): no reading
        return False
    return read == row["answer"]


def nearest_choice(answer: str, choices: List[str]) -> str:
    """The choice an answer selects for MathVista: its letter (`B`, `(B)`, `\\boxed{B}`, the text of a
    choice), else the first choice with the fewest edits from it, as MathVista's scorer picks."""
    letter = choice_letter(answer, choices)
    if letter is not None:
        return choices[ord(letter) - ord("A")]
    text = unwrap_text(answer)
    return min(choices, key=lambda choice: edit_distance(text, choice))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), as MathVista's scorer measures."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


# OlympiadBench's numeric tolerances; a reward of the pool (it parses model text), not of training
TOLERANCE = "rewards:tolerance_score"


def verdicts(name: str, items: List[Item], predictions: List[str], pool, timeout_s: float) -> List[bool]:
    """Right or wrong per item, by the benchmark's rule: letters for choices, MathVista's own
    normalisation, the `math` verifier (math-verify with the documented policy) for the rest, and
    OlympiadBench's tolerances where an item gives one."""
    rows = [i.row for i in items]
    if name in ("gpqa", "mmstar"):
        return [choice_reward(p, r["answer"], r.get("choices")) == 1.0 for p, r in zip(predictions, rows)]
    if name == "mathvista":
        return [mathvista_correct(p, r) for p, r in zip(predictions, rows)]
    weights = {"math": 1.0, TOLERANCE: 1.0} if name == "olympiadbench" else {"math": 1.0}
    parts = score(pool, predictions, rows, weights, timeout_s)[1]
    ok = [any(parts[w][k] == 1.0 for w in weights) for k in range(len(rows))]  # olympiadbench: either rule
    if name == "mathvision":
        return [
            choice_reward(p, r["answer"], r["choices"]) == 1.0 if r.get("choices") else o
            for p, r, o in zip(predictions, rows, ok)
        ]
    return ok  # math500, mathverse (a letter gold is graded as a choice letter by `math`), olympiadbench


BENCHMARKS: Dict[str, Tuple[str, Callable[[str, int], List[Item]]]] = {
    "mathvista": ("mathvista/testmini.json", read_mathvista),
    "mathverse": ("mathverse/testmini.json", read_mathverse),
    "mathvision": ("mathvision/test.jsonl", read_mathvision),
    "olympiadbench": ("olympiadbench/OE_en.json", read_olympiadbench),
    "mmstar": ("mmstar/mmstar.jsonl", read_mmstar),
    "math500": ("math500/test.jsonl", read_math500),
    "gpqa": ("gpqa/gpqa_diamond.csv", read_gpqa),
    "sokoban": ("sokoban/test.jsonl", read_sokoban),
    "football": ("football/test.jsonl", read_sokoban),  # our rows too, read the same way
}


JUDGE_PROMPT = (
    "Below is a question and a model's response. Reply with the response's final answer only, exactly as "
    "the response gives it (a number, expression, option letter or short text), or NONE if it gives none. "
    "Do not solve the question yourself.\n\nQuestion:\n{question}\n\nResponse:\n{response}"
)


def judge_extract(judge, question: str, response: str) -> Optional[str]:
    """The final answer an OpenAI-compatible chat endpoint reads in `response`, or None (none given,
    or the call failed: then the rules read the response as it is)."""
    import urllib.request

    prompt = JUDGE_PROMPT.format(question=question, response=response)
    body = {"model": judge.model, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
    headers = {"Content-Type": "application/json"}
    if os.environ.get(judge.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[judge.api_key_env]}"
    request = urllib.request.Request(judge.url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=judge.timeout_s) as reply:
            answer = json.load(reply)["choices"][0]["message"]["content"].strip()
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return None if not answer or answer.upper() == "NONE" else answer


def question_text(item: Item) -> str:
    user = item.messages[-1]["content"]
    return user if isinstance(user, str) else " ".join(c["text"] for c in user if c["type"] == "text")


def answer_moves(completion: str) -> Optional[List[str]]:
    """The moves in a completion's last <answer> span, strict format or not (evaluation's reading;
    the training reward also demands the format: rewards.sokoban_moves); None if there are none."""
    span = last_answer_span(completion)
    return sokoban.parse_moves(span) if span is not None else None


def sokoban_metrics(rows: List[dict], completions: List[str], out_dir: Optional[str] = None, gifs: int = 4) -> Dict[str, float]:
    """Scores of one completion per row (rows with `level`; `optimal_moves` is computed if absent).

    A level counts as solved when the moves in the completion's last <answer> span solve it (the
    format need not be strict here; `format` gives the strict-format rate). Returns `success`,
    `success/size=7x7`, `success/boxes=2`, `success/optimal=10-19`, `answered` (moves parsed),
    `format` and `efficiency` (optimal / used moves, over solved levels). With `out_dir`, the
    first `gifs` episodes are saved as `out_dir/sokoban_replays/<k>_{solved|failed}.gif`.
    """
    groups: Dict[str, List[float]] = {}
    efficiency, answered, formatted = [], 0, 0
    for k, (row, completion) in enumerate(zip(rows, completions)):
        level = row["level"]
        optimal = row.get("optimal_moves")
        optimal = optimal if optimal is not None else len(sokoban.solve(level) or "")
        moves = answer_moves(completion)
        boards = sokoban.trajectory(level, moves or [])
        solved = moves is not None and boards[-1].solved
        answered += moves is not None
        formatted += format_reward(completion) == 1.0
        if solved:
            efficiency.append(optimal / max(1, len(boards) - 1))
        board = boards[0]
        keys = ["success", f"success/size={board.width}x{board.height}", f"success/boxes={len(board.boxes)}",
                f"success/optimal={sokoban.length_bucket(optimal)}"]  # fmt: skip
        for key in keys:
            groups.setdefault(key, []).append(float(solved))
        if out_dir is not None and k < gifs:
            os.makedirs(os.path.join(out_dir, "sokoban_replays"), exist_ok=True)
            name = f"{k:02d}_{'solved' if solved else 'failed'}.gif"
            sokoban.save_replay_gif(level, moves or [], os.path.join(out_dir, "sokoban_replays", name))
    n = max(1, len(rows))
    metrics = {key: sum(v) / len(v) for key, v in sorted(groups.items())}
    metrics.update(answered=answered / n, format=formatted / n, efficiency=sum(efficiency) / max(1, len(efficiency)))
    return metrics


def evaluate(name: str, items: List[Item], predictions: List[str], out_dir: str, pool, timeout_s: float, judge=None) -> dict:
    """Scores of one benchmark: `accuracy` overall and `<group>=<value>` accuracies; writes the
    per-item predictions with verdicts and the results JSON into out_dir/<name>/. With a judge
    (eval.judge.url) an LLM first extracts each final answer, which the rules then grade."""
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    scoring, extracted, graded = "rules", [None] * len(items), predictions
    if judge is not None and judge.url and name not in ("sokoban", "football"):
        extracted = [judge_extract(judge, question_text(i), p) for i, p in zip(items, predictions)]
        graded = [p if x is None else f"<answer>$\\boxed{{{x}}}$</answer>" for x, p in zip(extracted, predictions)]
        left = sum(x is None for x in extracted)
        scoring = f"judge extraction ({judge.model}; {left} of {len(items)} left to the rules) + rules"
    if name == "football":  # a plan is played, not graded: per-scenario records go to football/scores.jsonl
        metrics, records = football.evaluate([i.row for i in items], predictions, os.path.join(out_dir, name))
        correct, results = [r["end"] == "goal" for r in records], metrics
        scoring = "Global setting (ours, not MageBench's): each plan played, MageBench's shaped score / 100"
    elif name == "sokoban":
        metrics = sokoban_metrics([i.row for i in items], predictions, os.path.join(out_dir, name))
        correct = [sokoban.replay(i.row["level"], m)[1] if (m := answer_moves(p)) else False for i, p in zip(items, predictions)]
        results = {"accuracy": metrics["success"], **{k: v for k, v in metrics.items() if k != "success"}}
    else:
        correct = verdicts(name, items, graded, pool, timeout_s)
        results = {"accuracy": sum(correct) / max(1, len(correct))}
        for key in sorted({k for i in items for k in i.groups}):
            for value in sorted({i.groups.get(key, "") for i in items}):
                hits = [c for c, i in zip(correct, items) if i.groups.get(key, "") == value]
                results[f"{key}={value}"] = sum(hits) / len(hits)
    results = {"benchmark": name, "n": len(items), "scoring": scoring, **results}
    with open(os.path.join(out_dir, name, "predictions.jsonl"), "w") as f:
        for item, prediction, x, ok in zip(items, predictions, extracted, correct):
            line = {"id": item.id, "answer": item.row["answer"], "prediction": prediction, "correct": bool(ok)}
            if "choices" in item.row:  # the options as shown (GPQA's shuffle, recorded)
                line["choices"] = item.row["choices"]
            f.write(json.dumps(line | ({"judge_extracted": x} if x is not None else {})) + "\n")
    with open(os.path.join(out_dir, name, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def read_predictions(path: str, items: List[Item]) -> List[str]:
    """Predictions {"id", "prediction"} per line for every item (a missing one is an error, not a 0)."""
    with open(path) as f:
        by_id = {str(r["id"]): r["prediction"] for r in map(json.loads, filter(str.strip, f))}
    missing = [i.id for i in items if i.id not in by_id]
    if missing:
        raise ConfigError(f"{path}: no prediction for {len(missing)} items (first: {missing[:3]})")
    return [by_id[i.id] for i in items]


def write_tables(out_dir: str, results: Dict[str, dict]) -> None:
    """results.md (overall, then every sub-category) and results.png (overall accuracy per benchmark)."""
    lines = ["| benchmark | n | accuracy | scoring |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['n']} | {100 * r['accuracy']:.1f} | {r['scoring']} |" for name, r in results.items()]
    for name, r in results.items():
        subs = [(k, v) for k, v in r.items() if "=" in k]
        if subs:
            lines += ["", f"**{name}**", "", "| group | accuracy |", "|---|---|"] + [f"| {k} | {100 * v:.1f} |" for k, v in subs]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(results) + 2, 3))
    ax.bar(list(results), [100 * r["accuracy"] for r in results.values()])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def greedy_completions(engine, tokenizer, image_processor, items: List[Item], max_new_tokens: int) -> List[str]:
    """One greedy completion per item from a rollout engine (HF or vLLM). Under several ranks (eval
    during a data-parallel run) each generates every world-th item and every rank gets them all:
    a prompt's completion does not depend on the prompts beside it, so the list is one process's."""
    from data import encode_prompt

    rank, world = rank_and_world()
    greedy = engine.with_sampling(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, logprobs=False)
    mine = items[rank::world]
    # every rank generates as many prompts (a short shard repeats an item, its completion dropped): the
    # HF engine under ZeRO-3 gathers weights in each forward, so every rank must run as many batches
    padded = mine + items[:1] * (-(-len(items) // world) - len(mine))
    samples = [Sample(messages=i.messages, answer=str(i.row["answer"]), where=i.id) for i in padded]
    prompts = [encode_prompt(s, tokenizer, image_processor) for s in samples]
    texts = greedy.generate(prompts, 1, seeds=[0] * len(prompts)).texts[: len(mine)] if prompts else []
    return gathered_in_order(texts, len(items))


def football_online(cfg, engine, out_dir: str) -> Optional[dict]:
    """MageBench's Online Football with the model: eval.football's subset (its first eval.max_items
    scenarios) x repeats episodes, each rank playing every world-th with its own workers; rank 0
    writes football/episodes.jsonl (every turn logged) and results.json and returns the results."""
    f = cfg.eval.football
    names = football.subset_names(str(f.subset))
    names = names[: cfg.eval.max_items] if cfg.eval.max_items > 0 else names
    rank, world = rank_and_world()
    episodes = football.online_episodes(names, f.repeats, cfg.eval.seed)
    mine = episodes[rank::world]
    settings = football.OnlineSettings(f.max_turns, 2 * f.max_memory, f.max_images, f.resolution, str(f.render))
    wall = football.run_online(football_policy(*engine, f, cfg.eval.seed), mine, settings, f.workers)
    records = gathered_in_order([e.record() for e in mine], len(episodes))
    if not main_rank():
        return None
    results = {"benchmark": "football", "n": len(records), "scoring": "MageBench Online (shaped score / 100)",
               **football.online_metrics(records, wall)}  # fmt: skip
    football.write_records(os.path.join(out_dir, "football", "episodes.jsonl"), records)
    with open(os.path.join(out_dir, "football", "results.json"), "w") as out:
        json.dump(results, out, indent=2)
    return results


def football_policy(engine, tokenizer, image_processor, f, seed: int):
    """play_online's policy: every live episode's chat in one generate call of the rollout engine,
    sampled as MageBench samples (eval.football: temperature, top_p, max_tokens, frequency_penalty),
    each turn from its own seed (football.turn_seed: the same alone or batched)."""
    from data import encode_prompt

    sampler = engine.with_sampling(temperature=f.temperature, top_p=f.top_p, top_k=0, max_new_tokens=f.max_tokens,
                                   frequency_penalty=f.frequency_penalty, logprobs=False)  # fmt: skip

    def policy(episodes, chats):
        samples = [Sample(messages=c, answer="", where=f"football {e.scenario.name} repeat {e.repeat} turn {len(e.turns)}")
                   for e, c in zip(episodes, chats)]  # fmt: skip
        prompts = [encode_prompt(s, tokenizer, image_processor) for s in samples]
        longest = max(len(p.input_ids) for p in prompts)
        if longest + f.max_tokens > getattr(engine, "max_model_len", float("inf")):  # vLLM would refuse the prompt
            raise ConfigError(
                f"a Football turn's chat has {longest} tokens: with eval.football.max_tokens={f.max_tokens} it exceeds "
                f"vLLM's max_model_len={engine.max_model_len} (data.max_prompt_len + rollout.max_new_tokens); raise "
                "data.max_prompt_len (ten messages of history: five answers and a 1280x720 frame, ~1,200 tokens on the 3B)"
            )
        return sampler.generate(prompts, 1, seeds=[football.turn_seed(seed, e) for e in episodes]).texts

    return policy


def load_engine(cfg, out_dir: str):
    """(engine, tokenizer, image_processor) for the model in cfg.model, with cfg.rollout's engine
    (vLLM loads the tiny preset from `out_dir`)."""
    from dist import set_cpu_threads
    from model import load_policy, resolve_model_path
    from rollout import make_engine

    set_cpu_threads(cfg.trainer.threads)
    device = torch.device("cuda" if cfg.trainer.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, tokenizer, image_processor = load_policy(cfg.model, cfg.trainer.seed, device)
    engine = make_engine(cfg, model, tokenizer, image_processor, resolve_model_path(cfg.model.path), out_dir)
    return engine, tokenizer, image_processor


# scripts/get_benchmarks.md's build of the Sokoban test split, run here when it is missing (~5 s)
SOKOBAN_TEST = dict(n=500, size=7, boxes=2, seed=1, split="test")


def benchmark_items(cfg, name: str) -> Optional[List[Item]]:
    """The benchmark's items (the first eval.max_items), or None where its file is missing and
    cannot be generated here: the Sokoban test split is built (as scripts/get_benchmarks.md does),
    the downloads are the user's to make."""
    relative, reader = BENCHMARKS[name]
    path = os.path.join(cfg.eval.data_dir, relative)
    if not os.path.isfile(path) and name == "sokoban":
        import sokoban

        train_levels = [p for p in ["data/sokoban/train.jsonl"] if os.path.isfile(p)]  # held out from, where built
        flags = " ".join(f"--{k} {v}" for k, v in SOKOBAN_TEST.items())
        print(f"[eval] sokoban: {path} not found, building it: python sokoban.py build {flags} "
              f"--out {os.path.dirname(path)} --exclude {' '.join(train_levels)}", flush=True)  # fmt: skip
        sokoban.build(**SOKOBAN_TEST, out=os.path.dirname(path), exclude=tuple(train_levels))
    if not os.path.isfile(path):
        print(f"[eval] {name}: skipped, {path} not found (how to get it: scripts/get_benchmarks.md)", flush=True)
        return None
    items = reader(path, cfg.eval.seed)
    return items[: cfg.eval.max_items] if cfg.eval.max_items > 0 else items


def items_on_every_rank(cfg, name: str) -> Optional[List[Item]]:
    """benchmark_items, on rank 0 first (it builds a missing Sokoban split), then on the other ranks,
    which wait for it; where it fails on rank 0, every rank stops (none is left waiting)."""
    failure = None
    if main_rank():
        try:
            items = benchmark_items(cfg, name)
        except Exception as e:  # re-raised below, once every rank knows
            failure = e
    if (message := rank0_value(None if failure is None else f"{type(failure).__name__}: {failure}")) is not None:
        raise failure if failure is not None else RuntimeError(f"eval {name} failed on rank 0: {message}")
    return items if main_rank() else benchmark_items(cfg, name)


def run_eval(cfg: DictConfig, out_dir: str, engine=None) -> Dict[str, dict]:
    """Every benchmark of cfg.eval.benchmarks: predictions from cfg.eval.predictions, or generated
    with `engine` (a (engine, tokenizer, image_processor) triple; default: loaded from cfg.model).
    Under several ranks every rank calls it, generates its share, and rank 0 scores, writes and
    returns the results (the others: {})."""
    unknown = [b for b in cfg.eval.benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"eval.benchmarks: unknown {unknown}; known: {sorted(BENCHMARKS)}")
    reject_unknown_keys(cfg)
    results, skipped = {}, []
    for name in cfg.eval.benchmarks:
        if name == "football" and cfg.eval.football.setting == "online":  # played live: no file, no predictions
            if cfg.eval.predictions:
                raise ConfigError("eval.predictions cannot score Football Online (the game answers each turn); "
                                  "drop football from eval.benchmarks, or use eval.football.setting=global")  # fmt: skip
            engine = engine or load_engine(cfg, out_dir)
            if (online := football_online(cfg, engine, out_dir)) is not None:
                results[name] = online
                print(f"[eval] football (Online): score {online['score']:.2f} over {online['n']} episodes "
                      f"({online['parse_errors']:.1f} parse errors an episode)")  # fmt: skip
            continue
        items = items_on_every_rank(cfg, name)
        if items is None:
            skipped.append(name)
            continue
        if cfg.eval.predictions:
            predictions = read_predictions(os.path.join(cfg.eval.predictions, f"{name}.jsonl"), items)
        else:
            engine = engine or load_engine(cfg, out_dir)
            predictions = greedy_completions(*engine, items, cfg.eval.max_new_tokens)
        if main_rank():  # (the other ranks helped generate)
            results[name] = evaluate(name, items, predictions, out_dir, reward_pool(cfg.reward.workers), cfg.reward.timeout_s,
                                     cfg.eval.judge)  # fmt: skip
            print(f"[eval] {name}: {100 * results[name]['accuracy']:.1f}% of {len(items)} ({results[name]['scoring']})")
    if len(skipped) == len(cfg.eval.benchmarks):
        raise FileNotFoundError(
            f"no benchmark of {list(cfg.eval.benchmarks)} is in {cfg.eval.data_dir}: see scripts/get_benchmarks.md"
        )
    if not main_rank():
        return {}
    if skipped:
        print(f"[eval] {len(skipped)} of {len(cfg.eval.benchmarks)} benchmarks skipped (not in {cfg.eval.data_dir}): {skipped}")
    write_tables(out_dir, results)
    return results


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from dist import console_log
    from model import quiet_progress_bars

    out_dir = HydraConfig.get().runtime.output_dir
    quiet_progress_bars()
    with console_log(os.path.join(out_dir, "eval.log")):
        print(f"[eval] {os.path.abspath(out_dir)}: results.md, results.png, per-benchmark files, eval.log", flush=True)
        try:
            run_eval(cfg, out_dir)
        except (ConfigError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
