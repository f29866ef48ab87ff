"""Built-in and user datasets, tasks, and the models they meet (lowrank.data, lowrank.models)."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank.data import ByteTokenizer, ClassificationTask, LMTask, load_data, load_task, stdlib_docstrings, stdlib_text
from lowrank.errors import ConfigError, DataError


def test_stdlib_docstrings_is_split_by_file_and_balanced():
    d = stdlib_docstrings()
    assert d.num_labels == 8 and len(set(d.label_names)) == 8
    # no source file contributes to both train and eval
    assert set(d.train_groups).isdisjoint(d.eval_groups)
    assert len(d.train_groups) == len(d.train_texts) and len(d.eval_groups) == len(d.eval_texts)
    # each label appears on both sides; the label is the file's top-level package
    assert set(d.train_labels) == set(d.eval_labels) == set(range(8))
    for group, label in zip(d.train_groups[:200], d.train_labels[:200]):
        assert group.split("/")[0] == d.label_names[label]
    # deterministic: built again (from the cache or not) it is the same dataset
    stdlib_docstrings.cache_clear()
    assert stdlib_docstrings().train_texts == d.train_texts


def test_stdlib_text_split_by_file():
    c = stdlib_text()
    assert set(c.train_files).isdisjoint(c.eval_files)
    assert sum(map(len, c.train)) > 1_000_000 and c.eval


def test_sampler_is_a_seeded_permutation_per_epoch():
    data = load_data("stdlib-docstrings")
    task = load_task(data, ByteTokenizer(), seq_len=16, seed=3)
    n = task.num_train
    first_epoch = torch.cat([task.sampler.indices(i, 7) for i in range(n // 7)])
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no repeats within an epoch
    again = load_task(data, ByteTokenizer(), seq_len=16, seed=3)
    other = load_task(data, ByteTokenizer(), seq_len=16, seed=4)
    b1, b2, b3 = task.train_batch(5, 8), again.train_batch(5, 8), other.train_batch(5, 8)
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["labels"], b2["labels"])
    assert not torch.equal(b1["labels"], b3["labels"]) or not torch.equal(b1["input_ids"], b3["input_ids"])
    assert b1["input_ids"].shape[1] <= 16 and set(b1) == {"input_ids", "attention_mask", "labels"}


def test_lm_task_windows_and_eval_cap():
    task = load_task("stdlib-text", ByteTokenizer(), seq_len=32, seed=0, eval_size=5)
    assert isinstance(task, LMTask)
    b = task.train_batch(0, 4)
    assert b["input_ids"].shape == (4, 32) and torch.equal(b["input_ids"], b["labels"])
    assert task.eval_windows.shape == (5, 32)


def test_user_files(tmp_path):
    rows = [{"text": f"good thing {i}", "label": "pos"} for i in range(10)]
    rows += [{"text": f"bad thing {i}", "label": "neg"} for i in range(10)]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    d = load_data(p)
    assert d.label_names == ["neg", "pos"] and len(d.train_texts) + len(d.eval_texts) == 20
    assert set(d.eval_labels) == {0, 1}  # stratified hold-out
    csv = tmp_path / "c.csv"
    csv.write_text("sentence,y\n" + "".join(f"row {i},{i % 3}\n" for i in range(30)))
    d2 = load_data(csv, text_column="sentence", label_column="y")
    assert d2.label_names == ["0", "1", "2"]
    txt = tmp_path / "corpus"
    txt.mkdir()
    (txt / "train.txt").write_text("hello world\n" * 50)
    (txt / "test.txt").write_text("bye world\n" * 20)
    c = load_data(txt)
    assert c.train == ["hello world\n" * 50] and c.eval == ["bye world\n" * 20]
    task = load_task(d, ByteTokenizer(), seq_len=8)
    assert isinstance(task, ClassificationTask) and task.num_labels == 2


def test_data_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="neither a built-in dataset"):
        load_data("stdlib-docs")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_data(empty)
    one = tmp_path / "one.jsonl"
    one.write_text("\n".join(json.dumps({"text": f"t{i}", "label": "a"}) for i in range(5)))
    with pytest.raises(DataError, match="single class"):
        load_data(one)
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"sentence": "x", "label": 1}))
    with pytest.raises(DataError, match="no column 'text'.*sentence"):
        load_data(nocol)
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n")
    with pytest.raises(DataError, match="empty"):
        load_data(blank)
    for suffix in (".jsonl", ".csv"):
        binary = tmp_path / f"binary{suffix}"
        binary.write_bytes(bytes(range(128, 256)) * 4)
        with pytest.raises(DataError, match="not UTF-8"):
            load_data(binary)


def test_csv_with_a_long_document(tmp_path):
    f = tmp_path / "long.csv"
    long_text = "word " * 40_000  # 200k characters: above csv's default field limit (131072)
    f.write_text("text,label\n" + "\n".join(f'"{long_text if i == 0 else f"t{i}"}",{"ab"[i % 2]}' for i in range(6)))
    data = load_data(f)
    assert max(len(t) for t in data.train_texts + data.eval_texts) >= 200_000


def test_models_builtin_and_errors(tmp_path):
    from lowrank.models import load_model

    tiny = load_model("llama-tiny", objective="lm", pretrained=False)
    n = sum(p.numel() for p in tiny.model.parameters())
    assert 0.5e6 < n < 1.5e6  # "about a million parameters"
    assert "lm_head" in tiny.head_modules and "model.embed_tokens" in tiny.head_modules
    with pytest.raises(ConfigError, match="neither a built-in model"):
        load_model("llama-huge")
    with pytest.raises(ConfigError, match="not a causal language model"):
        load_model("minilm", objective="lm")


def test_minilm_is_the_real_pretrained_checkpoint():
    from lowrank.models import load_model, minilm_path
    from safetensors.torch import load_file

    m = load_model("minilm", objective="classification", num_labels=3)
    ref = load_file(str(minilm_path() / "model.safetensors"))
    emb = m.model.backbone.embeddings.word_embeddings.weight
    assert torch.equal(emb, ref["embeddings.word_embeddings.weight"])  # loaded, not freshly initialised
    ids = m.tokenizer.encode("Return the event loop.", 16)
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] of the shipped vocabulary
    out = m.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert out.logits.shape == (1, 3)


def test_a_local_model_is_read_from_safetensors_only(tmp_path):
    """A checkpoint directory with only pickled weights is refused before anything is unpickled;
    the same model saved as safetensors loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank.models import load_model

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    src = LlamaForCausalLM(cfg)
    pickled, safe = tmp_path / "pickled", tmp_path / "safe"
    cfg.save_pretrained(pickled)
    torch.save(src.state_dict(), pickled / "pytorch_model.bin")  # written here only, never read
    src.save_pretrained(safe)
    assert (pickled / "pytorch_model.bin").exists() and not list(pickled.glob("*.safetensors"))
    with pytest.raises(ConfigError, match=r"no \.safetensors weights \(only pytorch_model\.bin"):
        load_model(str(pickled), objective="lm")
    m = load_model(str(safe), objective="lm")
    assert torch.equal(m.model.model.embed_tokens.weight, src.model.embed_tokens.weight)
