"""Data: LMM-R1's row format, synthetic datasets for the tiny preset, prompt encoding, batching.

A row is one JSON object per line (or a row of a parquet file or of a `datasets.save_to_disk`
directory) with `message` (a chat list, or a JSON string of one, as LMM-R1 stores it) and `answer`;
images are `{"type": "image", "image": "file:///abs.png" | "rel/path.png"}` with relative paths
resolved against the folder holding the data file (or directory). Every bad row is an error naming file and line,
or, with data.on_error=skip, a skip that is counted by reason and reported. Nothing is dropped silently.
"""

import functools
import hashlib
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

import sokoban

# LMM-R1's system prompt for its math data (examples/data/test_message.jsonl).
LMM_R1_SYSTEM_PROMPT = (
    "Solve the question. The user asks a question, and you solves it. You first thinks about the reasoning "
    "process in the mind and then provides the user with the answer. The answer is in latex format and wrapped "
    "in $...$. The final answer must be wrapped using the \\boxed{} command. The reasoning process and answer are "
    "enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> Since $1+1=2$, so "
    "the answer is $2$. </think><answer> The answer is $\\boxed{2}$ </answer>, which means assistant's output "
    "should start with <think> and end with </answer>.\n"
)


class BadRow(ValueError):
    """A row that cannot be used. `reason` is a fixed phrase (skips are counted by it); the message
    adds where the row is (file:line) and the row's particulars."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass
class Sample:
    """One validated prompt row."""

    messages: List[Dict[str, Any]]  # chat messages; image items hold an absolute path or a PIL image
    answer: str  # gold answer
    meta: Dict[str, Any] = field(default_factory=dict)  # other fields of the row (question, datasource, level, ...)
    where: str = ""  # "file:line" (or "synthetic:index") for error messages

    def reward_row(self) -> Dict[str, Any]:
        """What reward functions receive: the gold answer and every other field of the row."""
        return {"answer": self.answer, **self.meta}


@dataclass
class Prompt:
    """A sample encoded for the model."""

    input_ids: List[int]  # chat-templated prompt, each <|image_pad|> expanded to its image's token count
    pixel_values: Optional[torch.Tensor]  # (n_patches, 3 * temporal_patch * patch * patch), all images of the prompt
    image_grid_thw: Optional[torch.Tensor]  # (n_images, 3)
    text: str  # the chat-templated prompt before expansion, for logs
    sample: Sample
    positions: Optional[torch.Tensor] = None  # (3, P) rotary positions, filled once by model.prompt_positions


# ---------------------------------------------------------------------------------------------
# Reading LMM-R1 rows
# ---------------------------------------------------------------------------------------------


def image_items(messages) -> List[Dict[str, Any]]:
    return [c for m in messages if isinstance(m.get("content"), list) for c in m["content"] if c.get("type") == "image"]


def parse_row(obj: Any, base_dir: str, where: str, image_roots: Sequence[str] = ()) -> Sample:
    """Validate one decoded JSON row; image paths become absolute (`find_image`). Raises BadRow."""
    if not isinstance(obj, dict):
        raise BadRow(where, "row is not a JSON object", type(obj).__name__)
    if "message" not in obj:
        raise BadRow(where, "no 'message' field")
    messages = obj["message"]
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise BadRow(where, "'message' is a string but not valid JSON", str(e)) from None
    if not isinstance(messages, list) or not messages:
        raise BadRow(where, "'message' must be a non-empty list of chat messages")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(where, "each message needs 'role' and 'content'")
        if isinstance(m["content"], list):
            for c in m["content"]:
                if not isinstance(c, dict) or c.get("type") not in ("text", "image"):
                    raise BadRow(where, "content items must be {'type': 'text'|'image', ...}", f"got {c!r:.80}")
        elif not isinstance(m["content"], str):
            raise BadRow(where, "message content must be a string or a list")
    answer = obj.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise BadRow(where, "missing or empty 'answer'")
    for item in image_items(messages):
        ref = item.get("image")
        if not isinstance(ref, str) or not ref:
            raise BadRow(where, "image item without a path")
        path = ref[len("file://") :] if ref.startswith("file://") else ref
        item["image"] = find_image(path if os.path.isabs(path) else os.path.join(base_dir, path), image_roots, where)
    meta = {k: v for k, v in obj.items() if k not in ("message", "answer")}
    return Sample(messages=messages, answer=str(answer), meta=meta, where=where)


def find_image(path: str, roots: Sequence[str], where: str) -> str:
    """`path` if it exists, else the first file under one of `roots` (data.image_root) that ends in
    the most of its trailing components: LMM-R1's rows name images by the authors' cluster paths
    (`/apdcephfs.../mathv60k/mathv60k_img/train/x.png`) or relative to its repository
    (`data/mathv_geo/mathv_geo_img/x.png`), so `<root>/mathv60k_img/train/x.png` is found with
    root = where the archive was extracted. Raises BadRow naming every path tried."""
    if os.path.isfile(path):
        return path
    tried = [path]
    name = os.path.basename(path)
    for folder in candidate_dirs(os.path.dirname(os.path.normpath(path)), tuple(roots)):
        tried.append(os.path.join(folder, name))
        if os.path.isfile(tried[-1]):
            return tried[-1]
    hint = f"data.image_root is {list(roots) or 'not set'}: set it to where the images were extracted"
    raise BadRow(where, "image not found", f"tried {', '.join(tried)}; {hint}")


@functools.lru_cache(maxsize=4096)
def candidate_dirs(folder: str, roots: Tuple[str, ...]) -> List[str]:
    """Existing directories `<root>/<trailing components of folder>`, longest suffix first (rows of
    one file share a few folders: each is looked up once)."""
    parts = [p for p in folder.split(os.sep) if p]
    found = []
    for root in roots:
        for k in range(len(parts) + 1):  # k = 0: the whole folder under root; k = len: root itself
            candidate = os.path.join(os.path.abspath(os.path.expanduser(root)), *parts[k:])
            if os.path.isdir(candidate):
                found.append(candidate)
    return found


def read_rows(path: str) -> Iterator[Tuple[str, Any]]:
    """(where, decoded object or BadRow) for each row of a .jsonl or .json (a list) file, a .parquet
    file, or a directory written by `datasets.save_to_disk`."""
    if os.path.isdir(path) or path.endswith(".parquet"):
        for i, obj in enumerate(table_rows(path)):
            yield f"{path}[{i}]", obj
        return
    if path.endswith(".json"):
        with open(path) as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise BadRow(path, "a .json data file must hold a list of rows")
        for i, obj in enumerate(rows):
            yield f"{path}[{i}]", obj
        return
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", BadRow(f"{path}:{lineno}", "invalid JSON", e.msg)


def table_rows(path: str) -> Iterator[Dict[str, Any]]:
    """Rows of a parquet file (read a record batch at a time) or of a `save_to_disk` directory (a
    Dataset, or a DatasetDict's "train" split), as plain dicts. Imported here: pyarrow and datasets
    cost seconds to import and jsonl runs never need them."""
    if not os.path.isdir(path):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise BadRow(path, "a data directory must be written by datasets' save_to_disk", str(e)) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise BadRow(path, "a saved DatasetDict without a 'train' split", f"splits {sorted(ds)}: name <dir>/<split>")
        ds = ds["train"]
    yield from ds


# ---------------------------------------------------------------------------------------------
# Synthetic data for the tiny preset (verifiable, deterministic from the seed)
# ---------------------------------------------------------------------------------------------


def user_message(text: str, image=None) -> Dict[str, Any]:
    """A user turn: the image first (if any), then the text."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def arithmetic_sample(rng: random.Random) -> Tuple[Dict[str, Any], str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op, value = rng.choice([("+", a + b), ("-", a - b), ("\\times", a * b)])
    return user_message(f"What is ${a} {op} {b}$?"), str(value)


def shapes_sample(rng: random.Random, size: int) -> Tuple[Dict[str, Any], str]:
    """Circles and squares on a white canvas; the question asks how many of one kind there are."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    counts = {"circles": rng.randint(0, 4), "squares": rng.randint(0, 4)}
    r = max(size // 16, 3)
    for kind, n in counts.items():
        for _ in range(n):
            x, y = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
            color = rng.choice(["red", "blue", "green", "black"])
            (draw.ellipse if kind == "circles" else draw.rectangle)([x - r, y - r, x + r, y + r], outline=color, width=2)
    kind = rng.choice(sorted(counts))
    return user_message(f"How many {kind} are in the image?", img), str(counts[kind])


def geometry_sample(rng: random.Random, size: int) -> Tuple[Dict[str, Any], str]:
    """A rectangle drawn on a grid of unit squares; the question asks for its area or perimeter."""
    cells = 8
    step = size // cells
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for k in range(cells + 1):
        draw.line([(k * step, 0), (k * step, size)], fill="lightgray")
        draw.line([(0, k * step), (size, k * step)], fill="lightgray")
    w, h = rng.randint(1, cells - 1), rng.randint(1, cells - 1)
    x0, y0 = rng.randint(0, cells - w), rng.randint(0, cells - h)
    draw.rectangle([x0 * step, y0 * step, (x0 + w) * step, (y0 + h) * step], outline="blue", width=2)
    if rng.random() < 0.5:
        return user_message("Each grid square has side 1. What is the area of the blue rectangle?", img), str(w * h)
    return user_message("Each grid square has side 1. What is the perimeter of the blue rectangle?", img), str(2 * (w + h))


def sokoban_sample(rng: random.Random) -> Tuple[List[Dict[str, Any]], str, Dict[str, Any]]:
    """A small generated level (6x6, one box) in LMM-R1's Sokoban prompt; the answer is its optimal moves."""
    level = sokoban.generate_level(6, 6, 1, seed=rng.randrange(2**31), min_moves=3)
    fields = sokoban.level_fields(level)
    return sokoban.level_messages(sokoban.render(level)), sokoban.moves_text(fields["solution"]), fields


def synthetic_samples(kind: str, n: int, seed: int, image_size: int, system_prompt: str) -> List[Sample]:
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}-{kind}-{i}")  # one stream per (seed, kind, index)
        if kind == "sokoban":  # its own system prompt and a `level` field for the reward
            messages, answer, fields = sokoban_sample(rng)
            out.append(Sample(messages, answer, meta={"datasource": "synthetic_sokoban", **fields}, where=f"synthetic:{i}"))
            continue
        if kind == "arithmetic":
            user, answer = arithmetic_sample(rng)
        elif kind == "shapes":
            user, answer = shapes_sample(rng, image_size)
        elif kind == "geometry":
            user, answer = geometry_sample(rng, image_size)
        else:
            raise ValueError(f"unknown synthetic dataset {kind!r}")
        messages = [{"role": "system", "content": system_prompt}, user]
        out.append(Sample(messages=messages, answer=answer, meta={"datasource": f"synthetic_{kind}"}, where=f"synthetic:{i}"))
    return out


WORKED = {  # the reasoning of each synthetic task's worked solution, short enough for debug=tiny's budget
    "shapes": "I count the {kind}.",
    "area": "I count the squares inside.",
    "perimeter": "I add up the four sides.",
    "sokoban": "I push the box.",
}


def synthetic_solution(sample: Sample, formatted: bool = True) -> str:
    """A synthetic sample's worked solution: in LMM-R1's format, `<think>…</think><answer>$…$</answer>`
    (Sokoban: the move list), which the real verifiers score 1; or, `formatted=False`, the same answer
    as a base model often writes it, outside the format (`The answer is $\\boxed{…}$.`: right, format 0).
    What the tiny model's warm start imitates."""
    question = sample.messages[-1]["content"][-1]["text"]
    kind = sample.meta["datasource"].removeprefix("synthetic_")
    if kind == "sokoban":
        answer, plain = sample.answer, sample.answer
        think = WORKED["sokoban"]
    else:
        answer, plain = f"${sample.answer}$", "$\\boxed{" + sample.answer + "}$"
        if kind == "arithmetic":  # the expression copied next to the answer
            think = question.removeprefix("What is ").removesuffix("?")
        elif kind == "shapes":
            think = WORKED["shapes"].format(kind=question.split()[2])
        else:
            think = WORKED["area" if "area" in question else "perimeter"]
    if not formatted:
        return f"The answer is {plain}."
    return f"<think> {think} </think><answer> {answer} </answer>"


def prompt_key(sample: Sample) -> str:
    """What the model is shown, as one string: every message's text, the gold answer, the Sokoban
    level and a hash of each image's pixels. Two samples with the same key are the same prompt."""
    texts = [
        m["content"] if isinstance(m["content"], str) else [c.get("text", "") for c in m["content"]] for m in sample.messages
    ]
    images = [hashlib.sha1(load_image(item["image"]).tobytes()).hexdigest() for item in image_items(sample.messages)]
    return json.dumps([texts, sample.answer, sample.meta.get("level"), images])


def synthetic_question_texts() -> List[str]:
    """Every question template of the synthetic sets (what the tiny tokenizer is trained on)."""
    texts = []
    for i in range(50):
        rng = random.Random(i)
        for sample in (arithmetic_sample(rng), shapes_sample(rng, 56), geometry_sample(rng, 56)):
            user, answer = sample
            texts += [c["text"] for c in user["content"] if c["type"] == "text"] + [answer]
    return texts + [sokoban.SYSTEM_PROMPT, sokoban.USER_PROMPT, "Left, Right, Up, Down, Down, Left"]


# ---------------------------------------------------------------------------------------------
# Encoding prompts
# ---------------------------------------------------------------------------------------------


def with_system_prompt(messages, system_prompt: Optional[str]):
    if system_prompt is None or messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def chat_text(messages, tokenizer) -> str:
    """The chat-templated prompt (one <|image_pad|> per image), ending with the assistant header."""
    # The template only needs to know an item is an image; keep image objects out of it.
    view = [
        {**m, "content": [{"type": c["type"], "text": c.get("text", "")} for c in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    return tokenizer.apply_chat_template(view, tokenize=False, add_generation_prompt=True)


def load_image(ref) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    with Image.open(ref) as img:
        return img.convert("RGB")


def image_token_count(size: Tuple[int, int], image_processor) -> int:
    """Tokens one image of (width, height) becomes after Qwen's resize and 2x2 patch merge."""
    w, h = size
    p, m = image_processor.patch_size, image_processor.merge_size
    rh, rw = smart_resize(
        h, w, factor=p * m, min_pixels=image_processor.size["shortest_edge"], max_pixels=image_processor.size["longest_edge"]
    )
    return (rh // p) * (rw // p) // (m * m)


def image_size_of(ref) -> Tuple[int, int]:
    if isinstance(ref, Image.Image):
        return ref.size
    with Image.open(ref) as img:  # reads the header only
        return img.size


def prompt_length(sample: Sample, tokenizer, image_processor) -> int:
    """Prompt tokens after image-token expansion, computed without decoding any pixels."""
    n_text = len(tokenizer(chat_text(sample.messages, tokenizer), add_special_tokens=False).input_ids)
    images = image_items(sample.messages)
    if images and image_processor is None:
        raise BadRow(sample.where, "row has images but the model is text-only")
    return n_text + sum(image_token_count(image_size_of(it["image"]), image_processor) - 1 for it in images)


def encode_prompt(sample: Sample, tokenizer, image_processor) -> Prompt:
    text = chat_text(sample.messages, tokenizer)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    images = [load_image(it["image"]) for it in image_items(sample.messages)]
    if not images:
        return Prompt(input_ids=ids, pixel_values=None, image_grid_thw=None, text=text, sample=sample)
    out = image_processor(images=images, return_tensors="pt")
    grid = out["image_grid_thw"]  # (n_images, 3)
    counts = (grid.prod(-1) // image_processor.merge_size**2).tolist()
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expanded, k = [], 0
    for t in ids:
        if t == pad_id:
            expanded += [pad_id] * counts[k]
            k += 1
        else:
            expanded.append(t)
    if k != len(images):
        raise BadRow(sample.where, "image count differs from image placeholders in the templated prompt", f"{len(images)} vs {k}")
    return Prompt(input_ids=expanded, pixel_values=out["pixel_values"], image_grid_thw=grid, text=text, sample=sample)


# ---------------------------------------------------------------------------------------------
# The dataset of a run
# ---------------------------------------------------------------------------------------------


def system_prompt_of(dcfg) -> str:
    """The system prompt a synthetic row gets: data.system_prompt, or LMM-R1's math prompt."""
    return dcfg.system_prompt if dcfg.system_prompt is not None else LMM_R1_SYSTEM_PROMPT


def load_dataset(dcfg, seed: int, tokenizer, image_processor, gold_check=None) -> Tuple[List[Sample], Counter]:
    """Validated samples for the `data` config, and the count of skipped rows by reason.

    Every row is checked here, before training: parseable, has an answer, images readable, prompt
    (after image-token expansion) within data.max_prompt_len, and -- with `gold_check(samples) ->
    [problem or None]` -- a gold answer the stage's rewards can use. Multimodal prompts are never truncated.
    """
    system_prompt = system_prompt_of(dcfg)
    skipped: Counter = Counter()
    if dcfg.source == "synthetic":
        synthetic = synthetic_samples(str(dcfg.synthetic), dcfg.num_synthetic, seed, dcfg.image_size, system_prompt)
        candidates = [(s.where, s, "") for s in synthetic]
    else:
        candidates = []
        for path in dcfg.train_files:
            if not os.path.exists(path):
                raise FileNotFoundError(f"data.train_files: {path} does not exist")
            base_dir = os.path.dirname(os.path.abspath(path))
            candidates += [(where, obj, base_dir) for where, obj in read_rows(path)]
    samples = []
    for where, obj, base_dir in candidates:
        if 0 <= dcfg.max_samples <= len(samples):
            break
        try:
            samples.append(checked_sample(obj, base_dir, where, dcfg, tokenizer, image_processor))
        except BadRow as err:
            if dcfg.on_error != "skip":
                raise BadRow(str(err), "set data.on_error=skip to skip and count bad rows instead") from None
            skipped[err.reason] += 1
    if gold_check is not None:
        samples = [s for s, problem in zip(samples, gold_check(samples)) if not bad_gold(s, problem, dcfg.on_error, skipped)]
    if not samples:
        raise BadRow("data", "no usable rows", f"skipped: {dict(skipped)}")
    return samples, skipped


def bad_gold(sample: Sample, problem: Optional[str], on_error: str, skipped: Counter) -> bool:
    """True (and counted) when the gold is unusable under on_error=skip; raises BadRow otherwise."""
    if problem is None:
        return False
    if on_error != "skip":
        raise BadRow(
            sample.where, "unusable gold answer", f"{sample.answer!r}: {problem}; set data.on_error=skip to skip such rows"
        )
    skipped["unusable gold answer"] += 1
    return True


def image_roots(dcfg) -> List[str]:
    """data.image_root as a list: null, one directory, or a list of them."""
    roots = dcfg.image_root
    return [] if roots is None else [roots] if isinstance(roots, str) else [str(r) for r in roots]


def checked_sample(obj, base_dir: str, where: str, dcfg, tokenizer, image_processor) -> Sample:
    """A usable Sample from a decoded row (or a synthetic Sample), or BadRow saying why not."""
    if isinstance(obj, BadRow):
        raise obj
    sample = obj if isinstance(obj, Sample) else parse_row(obj, base_dir, where, image_roots(dcfg))
    sample.messages = with_system_prompt(sample.messages, dcfg.system_prompt)
    try:
        n = prompt_length(sample, tokenizer, image_processor)
    except OSError as e:  # an image file that exists but cannot be decoded
        raise BadRow(where, "unreadable image", str(e)) from None
    if n > dcfg.max_prompt_len:
        raise BadRow(where, "prompt longer than data.max_prompt_len after image expansion", f"{n} > {dcfg.max_prompt_len}")
    return sample


def prompt_batches(n: int, prompts_per_step: int, seed: int, shuffle: bool) -> Iterator[List[int]]:
    """Row indices for each step: epochs of a permutation seeded by (seed, epoch); the tail of an
    epoch that does not fill a step is carried into the next epoch rather than dropped."""
    epoch, pending = 0, []
    while True:
        order = list(range(n))
        if shuffle:
            random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
        pending += order
        epoch += 1
        while len(pending) >= prompts_per_step:
            batch, pending = pending[:prompts_per_step], pending[prompts_per_step:]
            yield batch


def steps_per_epoch(n: int, prompts_per_step: int) -> int:
    return max(1, math.ceil(n / prompts_per_step))
