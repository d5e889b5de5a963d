"""LMM-R1's row format, bad rows, synthetic data, prompt encoding, batching."""

import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from config import DataConfig
from conftest import VERMULTI_PREFIX
from data import (
    LMM_R1_SYSTEM_PROMPT,
    BadRow,
    encode_prompt,
    load_dataset,
    prompt_batches,
    prompt_length,
    synthetic_samples,
    synthetic_solution,
)


def dcfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), kw)


def write_rows(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def lmm_r1_row(image_ref, question="Which number is missing?", answer="$\\boxed{60}$"):
    """A row exactly as LMM-R1 ships them: `message` is a JSON string, system prompt inside."""
    message = [
        {"role": "system", "content": LMM_R1_SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "text", "text": question}, {"type": "image", "image": image_ref}]},
    ]
    return {"question": question, "answer": answer, "message": json.dumps(message)}


@pytest.fixture()
def image_dir(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (112, 84), "white").save(tmp_path / "images" / "1.png")
    return tmp_path


def test_reads_lmm_r1_rows_with_string_and_list_messages(image_dir, tokenizer, image_processor):
    abs_path = str(image_dir / "images" / "1.png")
    rows = [
        lmm_r1_row("images/1.png"),  # relative to the data file
        lmm_r1_row("file://" + abs_path),
        {"message": [{"role": "user", "content": "What is 2+2?"}], "answer": "4", "datasource": "text"},
    ]
    path = write_rows(image_dir / "train.jsonl", rows)
    samples, skipped = load_dataset(dcfg(train_files=[path]), 0, tokenizer, image_processor)
    assert len(samples) == 3 and not skipped
    assert samples[0].messages[1]["content"][1]["image"] == abs_path
    assert samples[1].messages[1]["content"][1]["image"] == abs_path
    assert samples[0].meta["question"] == "Which number is missing?" and samples[0].answer == "$\\boxed{60}$"
    assert samples[2].meta == {"datasource": "text"}
    # a row without a system message gets LMM-R1's math system prompt only when asked to
    assert samples[2].messages[0]["role"] == "user"
    samples, _ = load_dataset(dcfg(train_files=[path], system_prompt="Be brief."), 0, tokenizer, image_processor)
    assert samples[2].messages[0] == {"role": "system", "content": "Be brief."}
    assert samples[0].messages[0]["content"] == LMM_R1_SYSTEM_PROMPT


def test_encoded_prompt_expands_image_tokens_to_the_merged_grid(image_dir, tokenizer, image_processor):
    path = write_rows(image_dir / "train.jsonl", [lmm_r1_row("images/1.png")])
    (sample,), _ = load_dataset(dcfg(train_files=[path]), 0, tokenizer, image_processor)
    prompt = encode_prompt(sample, tokenizer, image_processor)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = prompt.image_grid_thw[0].tolist()  # 84x112 -> (1, 6, 8) patches -> 12 tokens after 2x2 merge
    assert grid == [1, 6, 8]
    assert prompt.input_ids.count(pad) == 12
    assert prompt.pixel_values.shape[0] == 48
    assert prompt_length(sample, tokenizer, image_processor) == len(prompt.input_ids)  # the load-time length is exact
    assert tokenizer.decode(prompt.input_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "row, reason",
    [
        ("{not json", "invalid JSON"),
        ({"answer": "1"}, "no 'message'"),
        ({"message": '[{"role": ', "answer": "1"}, "not valid JSON"),
        ({"message": [{"role": "user", "content": "q"}]}, "missing or empty 'answer'"),
        ({"message": [{"role": "user", "content": "q"}], "answer": " "}, "missing or empty 'answer'"),
        ({"message": [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]}], "answer": "1"}, "image not found"),
        ({"message": [{"role": "user", "content": [{"type": "audio"}]}], "answer": "1"}, "content items"),
        ({"message": [], "answer": "1"}, "non-empty list"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, tokenizer, image_processor, row, reason):
    good = {"message": [{"role": "user", "content": "q"}], "answer": "1"}
    path = write_rows(tmp_path / "d.jsonl", [good, row])
    with pytest.raises(BadRow) as e:
        load_dataset(dcfg(train_files=[path]), 0, tokenizer, image_processor)
    assert f"{path}:2" in str(e.value) and reason in str(e.value) and "data.on_error=skip" in str(e.value)


def test_skip_counts_bad_rows_by_reason(tmp_path, tokenizer, image_processor):
    good = {"message": [{"role": "user", "content": "q"}], "answer": "1"}
    long = {"message": [{"role": "user", "content": "many words " * 400}], "answer": "1"}
    path = write_rows(tmp_path / "d.jsonl", [good, "{oops", {"message": []}, long, good])
    samples, skipped = load_dataset(dcfg(train_files=[path], on_error="skip", max_prompt_len=256), 0, tokenizer, image_processor)
    assert len(samples) == 2
    assert sum(skipped.values()) == 3 and len(skipped) == 3
    assert any("max_prompt_len" in k for k in skipped)


def test_unreadable_image_is_a_bad_row(tmp_path, tokenizer, image_processor):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    row = {"message": [{"role": "user", "content": [{"type": "image", "image": "broken.png"}]}], "answer": "1"}
    path = write_rows(tmp_path / "d.jsonl", [row])
    with pytest.raises(BadRow, match="d.jsonl:1"):
        load_dataset(dcfg(train_files=[path]), 0, tokenizer, image_processor)
    with pytest.raises(BadRow, match="no usable rows"):
        load_dataset(dcfg(train_files=[path], on_error="skip"), 0, tokenizer, image_processor)


def test_missing_data_file_says_so(tokenizer, image_processor):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_dataset(dcfg(train_files=["nowhere.jsonl"]), 0, tokenizer, image_processor)


@pytest.mark.parametrize("kind", ["arithmetic", "shapes", "geometry"])
def test_synthetic_sets_are_deterministic_and_verifiable(kind, tokenizer, image_processor):
    a = synthetic_samples(kind, 8, seed=5, image_size=112, system_prompt="S")
    b = synthetic_samples(kind, 8, seed=5, image_size=112, system_prompt="S")
    c = synthetic_samples(kind, 8, seed=6, image_size=112, system_prompt="S")
    assert [s.answer for s in a] == [s.answer for s in b]
    assert [s.messages[1]["content"][-1]["text"] for s in a] == [s.messages[1]["content"][-1]["text"] for s in b]
    assert [s.answer for s in a] != [s.answer for s in c] or kind != "arithmetic"
    for s in a:
        int(s.answer)  # every answer is an integer a verifier can check
        p = encode_prompt(s, tokenizer, image_processor)
        assert (p.image_grid_thw is None) == (kind == "arithmetic")
    if kind != "arithmetic":
        imgs = [s.messages[1]["content"][0]["image"] for s in a]
        assert list(imgs[0].getdata()) == list(b[0].messages[1]["content"][0]["image"].getdata())


def test_shapes_answer_counts_what_is_drawn():
    s = synthetic_samples("geometry", 1, seed=0, image_size=112, system_prompt="S")[0]
    img = s.messages[1]["content"][0]["image"]
    blue = [(x, y) for x in range(112) for y in range(112) if img.getpixel((x, y)) == (0, 0, 255)]
    xs, ys = {x for x, _ in blue}, {y for _, y in blue}
    w, h = round((max(xs) - min(xs)) / 14), round((max(ys) - min(ys)) / 14)
    question = s.messages[1]["content"][1]["text"]
    assert int(s.answer) == (w * h if "area" in question else 2 * (w + h))


def test_prompt_batches_cover_each_epoch_once_and_reshuffle():
    it = prompt_batches(10, 4, seed=0, shuffle=True)
    first = [next(it) for _ in range(5)]  # 20 indices = two epochs
    flat = [i for b in first for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert all(len(b) == 4 for b in first)
    assert [next(prompt_batches(10, 4, 0, False)) for _ in range(1)] == [[0, 1, 2, 3]]


def test_released_files_load_as_downloaded_with_an_image_root(released_layout, tokenizer, image_processor):
    root, files = released_layout
    samples, _ = load_dataset(dcfg(train_files=files, image_root=str(root / "images")), 0, tokenizer, image_processor)
    images = [s.messages[1]["content"][1]["image"] for s in samples]
    # the longest matching tail wins: mathv60k_img/train/a.png, never mathv_geo_img/train/a.png
    assert images == [str(root / "images" / "mathv60k_img/train/a.png"), str(root / "images" / "mathv_geo_img/b.png")]
    pointed_inside = dcfg(train_files=files[:1], image_root=[str(root / "nowhere"), str(root / "images" / "mathv60k_img")])
    samples, _ = load_dataset(pointed_inside, 0, tokenizer, image_processor)  # a list; a root inside the archive
    assert samples[0].messages[1]["content"][1]["image"] == str(root / "images" / "mathv60k_img/train/a.png")


def test_an_image_still_missing_names_every_path_tried(released_layout, tokenizer, image_processor):
    root, files = released_layout
    with pytest.raises(
        BadRow, match=f"image not found.*tried {VERMULTI_PREFIX}mathv60k_img/train/a.png; data.image_root is not set: set it"
    ):
        load_dataset(dcfg(train_files=files), 0, tokenizer, image_processor)
    (root / "images" / "mathv_geo_img" / "b.png").unlink()
    with pytest.raises(BadRow, match=f"tried {root}/data/data/mathv_geo/mathv_geo_img/b.png, {root}/images/mathv_geo_img/b.png"):
        load_dataset(dcfg(train_files=files[1:], image_root=str(root / "images")), 0, tokenizer, image_processor)


def table_layout(tmp_path, rows):
    """The same rows as a jsonl file, a parquet file and `save_to_disk` directories (a Dataset, and a
    DatasetDict with train/test splits), side by side, as a user gets them from the hub's tools."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    splits = {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved_dict"))
    return write_rows(tmp_path / "train.jsonl", rows), [str(tmp_path / p) for p in ("train.parquet", "saved", "saved_dict")]


def test_parquet_and_saved_datasets_load_as_their_jsonl_does(image_dir, tokenizer, image_processor):
    rows = [lmm_r1_row("images/1.png"), lmm_r1_row("file://" + str(image_dir / "images" / "1.png"), answer="$7$")]
    rows = [{**r, "datasource": "geo"} for r in rows]
    jsonl, tables = table_layout(image_dir, rows)
    expected, _ = load_dataset(dcfg(train_files=[jsonl]), 0, tokenizer, image_processor)
    for path in tables:
        samples, skipped = load_dataset(dcfg(train_files=[path]), 0, tokenizer, image_processor)
        assert not skipped
        assert [(s.messages, s.answer, s.meta) for s in samples] == [(s.messages, s.answer, s.meta) for s in expected]
        assert samples[1].where == f"{path}[1]"
    # a DatasetDict's train split, not its test split
    assert load_dataset(dcfg(train_files=[tables[2]]), 0, tokenizer, image_processor)[0][1].answer == "$7$"


def test_parquet_with_structured_messages_loads(image_dir, tokenizer, image_processor):
    # `message` as a column of structs (not a JSON string): arrow gives each item every field, None where it had none
    content = [{"type": "image", "image": "images/1.png"}, {"type": "text", "text": "What is 2+2?"}]
    _, (parquet, *_) = table_layout(image_dir, [{"message": [{"role": "user", "content": content}], "answer": "4"}])
    (sample,), _ = load_dataset(dcfg(train_files=[parquet]), 0, tokenizer, image_processor)
    assert sample.messages[0]["content"][0] == {"type": "image", "image": str(image_dir / "images" / "1.png"), "text": None}
    prompt = encode_prompt(sample, tokenizer, image_processor)
    assert prompt.input_ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 12
    assert prompt.text.endswith("<|vision_end|>What is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_bad_table_rows_raise_or_are_counted(tmp_path, tokenizer, image_processor):
    good = {"message": json.dumps([{"role": "user", "content": "q"}]), "answer": "1"}
    rows = [good, {"message": json.dumps([{"role": "user", "content": "q"}]), "answer": None}, {"message": "[{", "answer": "1"}]
    _, tables = table_layout(tmp_path, rows)
    for path in tables:
        with pytest.raises(BadRow, match=rf"{path}\[1\]: missing or empty 'answer'.*data.on_error=skip"):
            load_dataset(dcfg(train_files=[path]), 0, tokenizer, image_processor)
        samples, skipped = load_dataset(dcfg(train_files=[path], on_error="skip"), 0, tokenizer, image_processor)
        assert len(samples) == 1 and skipped == {"missing or empty 'answer'": 1, "'message' is a string but not valid JSON": 1}


def test_a_directory_that_is_not_a_training_split_says_so(tmp_path, tokenizer, image_processor):
    import datasets

    test_only = datasets.DatasetDict({"test": datasets.Dataset.from_list([{"message": "[]", "answer": "1"}])})
    test_only.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(BadRow, match=r"without a 'train' split.*splits \['test'\]"):
        load_dataset(dcfg(train_files=[str(tmp_path / "d")]), 0, tokenizer, image_processor)
    (tmp_path / "plain").mkdir()
    with pytest.raises(BadRow, match="save_to_disk"):
        load_dataset(dcfg(train_files=[str(tmp_path / "plain")]), 0, tokenizer, image_processor)


@pytest.mark.parametrize("kind", ["arithmetic", "shapes", "geometry", "sokoban"])
def test_worked_solutions_score_as_the_warm_start_means_them(kind):
    """The warm start imitates these: in the format, right on every verifier; outside it, format 0,
    the answer still right for math (the Sokoban verifier gates on the format: no verdict)."""
    from rewards import REWARDS, Malformed

    answer_reward = REWARDS["sokoban" if kind == "sokoban" else "math"]
    for sample in synthetic_samples(kind, 8, 0, 56, LMM_R1_SYSTEM_PROMPT):
        row, formatted, plain = sample.reward_row(), synthetic_solution(sample), synthetic_solution(sample, formatted=False)
        assert (REWARDS["format"](formatted, row), answer_reward(formatted, row)) == (1.0, 1.0), formatted
        assert REWARDS["format"](plain, row) == 0.0 and sample.answer in plain, plain
        if kind == "sokoban":
            with pytest.raises(Malformed):
                answer_reward(plain, row)
        else:
            assert answer_reward(plain, row) == 1.0, plain
