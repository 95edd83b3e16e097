"""Corpus, split, tokenizer cache, packing, stateless batch order, local dataset files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench import data
from workbench.config import DataConfig, RecipeError

SMALL = dict(max_documents=40, vocab_size=320, seq_len=32, val_fraction=0.1)


def test_stdlib_corpus_is_real_source_without_tests():
    root = data.stdlib_root()
    rel = [str(p.relative_to(root)) for p in data.stdlib_files()]
    assert len(rel) > 300
    assert "json/decoder.py" in rel and "collections/__init__.py" in rel
    assert not any(part in ("test", "tests", "idle_test") for r in rel for part in r.split("/")[:-1])
    assert not any(r.split("/")[-1].startswith("test_") for r in rel)
    assert not any(r.startswith(("encodings/", "site-packages/")) for r in rel)


def test_split_is_deterministic_disjoint_and_stable():
    corpus = data.load_corpus(DataConfig(**SMALL))
    again = data.load_corpus(DataConfig(**SMALL))
    assert corpus.val_ids == again.val_ids and corpus.fingerprint == again.fingerprint
    assert corpus.val_ids and corpus.train_ids
    assert not set(corpus.val_ids) & set(corpus.train_ids)
    # membership depends on the document alone: a bigger corpus keeps the same held-out files
    bigger = data.load_corpus(DataConfig(**{**SMALL, "max_documents": 80}))
    assert set(corpus.val_ids) <= set(bigger.val_ids)
    assert corpus.fingerprint != bigger.fingerprint


class _FakeTok:
    eos_token_id, bos_token_id = 0, None

    def __len__(self):
        return 10


def test_pack_joins_with_eos_and_drops_the_tail():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]  # stream: 1 2 3 0 4 5 0 6 7 8 9 0 (12 tokens)
    blocks = data.pack(docs, _FakeTok(), seq_len=5)
    np.testing.assert_array_equal(blocks, [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8]])
    assert blocks.dtype == np.uint16


def test_pack_adds_a_distinct_bos():
    tok = _FakeTok()
    tok.bos_token_id = 9
    blocks = data.pack([[1, 2], [3]], tok, seq_len=3)
    np.testing.assert_array_equal(blocks, [[9, 1, 2], [0, 9, 3]])


def test_bpe_is_trained_once_cached_and_round_trips(monkeypatch):
    cfg = DataConfig(**SMALL)
    corpus = data.load_corpus(cfg)
    tok = data.load_tokenizer(cfg, corpus)
    assert len(tok) == cfg.vocab_size
    assert tok.eos_token == data.EOS_TOKEN
    code = "def quick_sort(xs):\n    return sorted(xs)  # ünïcode ok\n"
    assert tok.decode(tok(code, add_special_tokens=False)["input_ids"]) == code

    def boom(*a, **k):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(data, "_train_bpe", boom)
    again = data.load_tokenizer(cfg, corpus)
    assert data.tokenizer_fingerprint(again) == data.tokenizer_fingerprint(tok)


def test_packed_blocks_are_cached_and_keyed_by_seq_len():
    cfg = DataConfig(**SMALL)
    corpus = data.load_corpus(cfg)
    tok = data.load_tokenizer(cfg, corpus)
    a = data.load_packed(cfg, tok, corpus)
    b = data.load_packed(cfg, tok, corpus)
    assert a.key == b.key and a.train.shape[1] == 32
    np.testing.assert_array_equal(a.train, b.train)
    c = data.load_packed(DataConfig(**{**SMALL, "seq_len": 16}), tok, corpus)
    assert c.key != a.key and c.seq_len == 16
    n = min(a.train.size, c.train.size)  # same token stream, cut into other lengths
    np.testing.assert_array_equal(a.train.ravel()[:n], c.train.ravel()[:n])
    # the validation blocks decode to text from the held-out files only
    text = tok.decode(a.val[0].tolist())
    assert text and any(text[:20] in t for t in corpus.val_texts)


def test_too_short_validation_split_is_explained():
    cfg = DataConfig(**{**SMALL, "seq_len": 100_000})
    corpus = data.load_corpus(cfg)
    tok = data.load_tokenizer(cfg, corpus)
    with pytest.raises(RecipeError, match="fewer than seq_len"):
        data.load_packed(cfg, tok, corpus)


def test_stream_indices_are_stateless_permutations():
    n, seed = 10, 3
    whole = data.stream_indices(n, seed, 0, 35)
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    assert not np.array_equal(whole[:10], whole[10:20])  # a new order each epoch
    pieces = np.concatenate([data.stream_indices(n, seed, s, 7) for s in range(0, 35, 7)])
    np.testing.assert_array_equal(whole, pieces)
    assert not np.array_equal(whole, data.stream_indices(n, seed + 1, 0, 35))


def test_make_batch_labels_equal_inputs():
    blocks = np.arange(12, dtype=np.uint16).reshape(3, 4)
    b = data.make_batch(blocks, np.array([2, 0]))
    assert b["input_ids"].tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]
    assert b["labels"].tolist() == b["input_ids"].tolist()
    assert b["input_ids"].dtype.is_floating_point is False


def _docs():
    return [f"def f{i}(x):\n    return x + {i}\n" * 5 for i in range(30)]


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet"])
def test_local_files_through_datasets(tmp_path, kind):
    docs = _docs()
    if kind == "jsonl":
        (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
        cfg = DataConfig(dataset=str(tmp_path / "*.jsonl"), text_field="body", seq_len=16, vocab_size=300)
    elif kind == "txt":
        for i, d in enumerate(docs):
            (tmp_path / f"doc{i:02d}.txt").write_text(d)
        cfg = DataConfig(dataset=str(tmp_path), seq_len=16, vocab_size=300)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
        cfg = DataConfig(dataset=str(tmp_path / "d.parquet"), seq_len=16, vocab_size=300)
    corpus = data.load_corpus(cfg)
    assert sorted(corpus.train_texts + corpus.val_texts) == sorted(docs)  # whole documents, not lines
    tok = data.load_tokenizer(cfg, corpus)
    packed = data.load_packed(cfg, tok, corpus)
    assert packed.train.shape[1] == 16 and len(packed.val) >= 1


def test_missing_text_field_lists_the_columns(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x"}) + "\n" + json.dumps({"content": "y"}) + "\n")
    with pytest.raises(RecipeError, match=r"'text' not in columns \['content'\]"):
        data.load_corpus(DataConfig(dataset=str(tmp_path / "d.jsonl")))


def test_missing_local_files(tmp_path):
    with pytest.raises(RecipeError, match="no .jsonl/.json/.txt/.parquet files"):
        data.load_corpus(DataConfig(dataset=str(tmp_path / "absent.jsonl")))


def test_long_documents_are_tokenised_in_bounded_pieces_with_the_same_tokens(monkeypatch):
    """A huge single line goes to the tokenizer in pieces (at most _BATCH_CHARS characters a call), cut
    where the byte-level pre-tokenizer splits anyway: the ids equal those of the whole text at once."""
    cfg = DataConfig(**SMALL)
    corpus = data.load_corpus(cfg)
    tok = data.load_tokenizer(cfg, corpus)
    monkeypatch.setattr(data, "_PIECE_CHARS", 500)
    monkeypatch.setattr(data, "_BATCH_CHARS", 2000)
    rng = np.random.default_rng(0)
    words = ["def", "x", "  ", "return", "(", ")", "ünï", "\t", "\n", "\n\n", "    ", "é", "12", "#", " "]
    long_line = "".join(rng.choice(words, 8000).tolist()).replace("\n", " ")  # one line, no newline
    code = "\n".join(corpus.train_texts[:3]) * 2
    texts = ["short one", long_line, code, "", "x" * 3000]  # and a stretch with no space at all
    seen = []
    real = tok.__class__.__call__

    def spy(self, batch, **kw):
        seen.append(sum(len(t) for t in batch))
        return real(self, batch, **kw)

    monkeypatch.setattr(tok.__class__, "__call__", spy)
    got = list(data._encode(tok, texts))
    monkeypatch.setattr(tok.__class__, "__call__", real)
    assert max(seen) <= 2000 and len(seen) > 10
    assert len(got) == len(texts)
    for text, ids in zip(texts[:4], got):
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(got[4]) == texts[4]  # cut inside a word: same text, tokens may differ at the cut
    for text in texts:
        assert "".join(data.pieces(text, 500)) == text and all(len(p) <= 500 for p in data.pieces(text, 500))


def test_no_training_block_holds_text_of_a_validation_document():
    """Decoded, the training blocks contain no passage that only a held-out document has (and the
    validation blocks none that only a training document has)."""
    cfg = DataConfig(**SMALL)
    corpus = data.load_corpus(cfg)
    tok = data.load_tokenizer(cfg, corpus)
    packed = data.load_packed(cfg, tok, corpus)
    train_text, val_text = (tok.decode(b.ravel().tolist()) for b in (packed.train, packed.val))

    def unique_passages(docs, others):
        found = []
        for doc in docs:
            for start in range(0, max(1, len(doc) - 80), 997):
                passage = doc[start : start + 80]
                if len(passage) == 80 and passage.strip() and not any(passage in o for o in others):
                    found.append(passage)
                    break
        return found

    held_out = unique_passages(corpus.val_texts, corpus.train_texts)
    assert len(held_out) >= len(corpus.val_texts) // 2
    assert not [p for p in held_out if p in train_text]
    assert sum(p in val_text for p in held_out) >= len(held_out) // 2  # they are in the validation blocks
    trained = unique_passages(corpus.train_texts, corpus.val_texts)
    assert not [p for p in trained if p in val_text]


# ----------------------------------------------------------------------------------------- chat / instructions

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat_tokenizer():
    from transformers import PreTrainedTokenizerFast

    cfg = DataConfig(**SMALL)
    tok = data.load_tokenizer(cfg, data.load_corpus(cfg))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str()),
                                  eos_token=data.EOS_TOKEN, pad_token=data.EOS_TOKEN)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHATS = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."},
                       {"role": "user", "content": "and more?"}, {"role": "assistant", "content": "more " * (i % 4)}]}
         for i in range(30)]


def test_chat_rows_train_on_the_assistant_tokens_only_and_pack_whole(tmp_path):
    tok = _chat_tokenizer()
    cfg = DataConfig(dataset=str(_write_jsonl(tmp_path / "chat.jsonl", CHATS)), seq_len=96, val_fraction=0.1)
    corpus = data.load_corpus(cfg)
    assert corpus.format == "chat" and len(corpus.train_rows) + len(corpus.val_rows) == 30
    packed = data.load_packed(cfg, tok, corpus)
    b = packed.train
    assert b.targets is not None and b.positions is not None and b.shape[1] == 96
    for row in range(len(b)):
        ids, tg, pos = b.ids[row].tolist(), b.targets[row], b.positions[row]
        starts = [t for t in range(96) if pos[t] == 0]
        text = tok.decode(ids)
        # every conversation starts at position 0 and is whole (the block holds complete conversations)
        assert text.count("<|im_start|>user") == text.count("<|im_start|>assistant") == 2 * text.count("answer")
        assert all(ids[s] == tok.convert_tokens_to_ids("<|im_start|>") or ids[s] == tok.eos_token_id for s in starts)
        targets = tok.decode([i for i, t in zip(ids, tg) if t])
        assert "question" not in targets and "user" not in targets and "<|im_start|>" not in targets
        assert targets.count("answer") == text.count("answer") and targets.count("<|im_end|>") == text.count("answer") * 2
    # the labels the trainer uses: next-token targets only where the next token is an assistant token
    from workbench.losses import shift_labels

    batch = data.make_batch(b, np.arange(2))
    labels = data.mask_labels(shift_labels(batch["input_ids"]), batch)  # labels[t] predicts token t + 1
    want = torch.full_like(labels, -100)
    want[:, :-1] = torch.where(batch["target_mask"][:, 1:], batch["input_ids"][:, 1:], -100)
    assert torch.equal(labels, want) and batch["position_ids"].shape == (2, 96)


def test_prompt_completion_rows_without_a_chat_template(tmp_path):
    cfg = DataConfig(**SMALL)
    tok = data.load_tokenizer(cfg, data.load_corpus(cfg))  # a trained BPE: no chat template
    rows = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x + {i}\n"} for i in range(20)]
    cfg = DataConfig(dataset=str(_write_jsonl(tmp_path / "pc.jsonl", rows)), seq_len=64, val_fraction=0.1)
    packed = data.load_packed(cfg, tok, data.load_corpus(cfg))
    b = packed.train
    row = b.ids[0].tolist()
    got = tok.decode([i for i, t in zip(row, b.targets[0]) if t])
    assert got.count("return x + ") == tok.decode(row).count("return x + ") and "def f" not in got
    assert got.count(data.EOS_TOKEN) == got.count("return")  # each completion ends with EOS, a target too


def bos_chat_tokenizer():
    """A chat tokenizer whose plain encoding adds BOS and whose template writes BOS too (as Llama 3's)."""
    from tokenizers.processors import TemplateProcessing

    tok = _chat_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}" + CHATML
    tok.padding_side = "left"
    assert tok("x").input_ids[0] == tok.bos_token_id  # the tokenizer adds BOS by default
    return tok


def test_prompts_are_encoded_as_training_encodes_what_they_start(tmp_path):
    """A rendered row's prompt gets no added special tokens (the template wrote BOS: one BOS, and the ids
    are the start of the row's training encoding); a text prompt starts with BOS as pack starts a document."""
    tok = bos_chat_tokenizer()
    bos = tok.bos_token_id
    row = [{"role": "user", "content": "question 3?"}, {"role": "assistant", "content": "answer 3."}]
    prompt, _ = data.row_prompt(tok, row, "chat")
    trained, targets = next(data._encode_examples(tok, [row], "chat"))
    enc = data.encode_prompts(tok, [prompt, prompt + "more"], rendered=True)
    ids = enc.input_ids[0][enc.attention_mask[0].bool()].tolist()
    assert ids == trained[: targets.index(True)] and ids.count(bos) == 1
    assert enc.attention_mask[1].all() and not enc.attention_mask[0].all()  # left padding of the shorter one
    text = "def quick_sort(xs):\n"
    enc = data.encode_prompts(tok, [text], rendered=False)
    doc = tok(text, add_special_tokens=False).input_ids
    block = data.pack([doc], tok, len(doc) + 2)  # the document whole: BOS, its ids, EOS
    assert enc.input_ids[0].tolist() == block[0][:-1].tolist()
    assert enc.input_ids[0].tolist()[:2].count(bos) == 1


def test_bad_chat_rows_are_named_by_line(tmp_path):
    bad = CHATS[:3] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    cfg = DataConfig(dataset=str(_write_jsonl(tmp_path / "bad.jsonl", bad)))
    with pytest.raises(RecipeError, match=r"bad.jsonl:4: 'messages' must be a list of \{role, content\}"):
        data.load_corpus(cfg)
    cfg = DataConfig(dataset=str(_write_jsonl(tmp_path / "chat.jsonl", CHATS)), seq_len=64)
    base = data.load_tokenizer(DataConfig(**SMALL), data.load_corpus(DataConfig(**SMALL)))
    with pytest.raises(RecipeError, match="the tokenizer has no chat template"):
        data.load_packed(cfg, base, data.load_corpus(cfg))


def test_separate_documents_restart_positions_and_attend_only_within_a_document():
    """A block of several documents with restarting positions computes, for every document, exactly what
    the model computes for that document alone: transformers masks attention between them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class Tok:
        eos_token_id, bos_token_id = 1, 2

        def __len__(self):
            return 50

    docs = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    blocks, pos = data.pack(docs, Tok(), 8, positions=True)
    assert pos.tolist()[0] == [0, 1, 2, 3, 4, 0, 1, 2]  # [2, 5, 6, 7, 1] then [2, 8, 9, ...
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64)).eval()
    ids = torch.from_numpy(blocks.astype(np.int64))
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=torch.from_numpy(pos.astype(np.int64)), use_cache=False).logits
        for r in range(len(ids)):
            starts = [t for t in range(8) if pos[r, t] == 0] + [8]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=ids[r : r + 1, a:b]).logits[0]
                torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-4, atol=1e-5)
        crossing = model(input_ids=ids, use_cache=False).logits  # without the positions, attention crosses documents
        assert not torch.allclose(crossing[0, 5:8], packed[0, 5:8], atol=1e-4)


def test_the_embedded_function_task_holds_out_whole_files_and_trains_on_bodies():
    import ast

    cfg = DataConfig(dataset="stdlib_functions", max_documents=40, seq_len=256, val_fraction=0.1)
    corpus = data.load_corpus(cfg)
    assert corpus.format == "prompt_completion" and len(corpus.train_rows) > 100 and corpus.val_rows
    file_of = lambda i: i.split("::")[0]  # noqa: E731
    assert not {file_of(i) for i in corpus.train_ids} & {file_of(i) for i in corpus.val_ids}
    for prompt, completion in corpus.train_rows[:50]:
        assert prompt.startswith(data.FUNCTION_PROMPT)
        code = prompt[len(data.FUNCTION_PROMPT):]
        fn = ast.parse(code + completion).body[0]  # signature, docstring, body: the function again
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(fn) is not None
        assert fn.body[0].end_lineno == code.count("\n") < fn.body[1].lineno  # the prompt ends with the docstring
        assert completion.strip() and len(completion) <= data._MAX_BODY_CHARS
    tok = data.load_tokenizer(DataConfig(**SMALL), data.load_corpus(DataConfig(**SMALL)))
    packed = data.load_packed(cfg, tok, corpus)
    row = packed.train.ids[0].tolist()
    targets = tok.decode([t for t, m in zip(row, packed.train.targets[0]) if m])
    assert "Complete this Python function" not in targets and "def " in tok.decode(row)


def test_built_once_builds_a_cache_directory_once_and_nothing_on_failure(tmp_path):
    out = tmp_path / "cache" / "entry"
    with pytest.raises(ValueError):
        with data.built_once(out, "done") as tmp:
            (tmp / "part").write_text("half")
            raise ValueError("build failed")
    assert not out.exists() and [p.name for p in out.parent.iterdir() if not p.name.startswith(".entry")] == []
    with data.built_once(out, "done") as tmp:
        (tmp / "done").write_text("1")
    assert (out / "done").read_text() == "1"
    with data.built_once(out, "done") as tmp:
        assert tmp is None  # built already: nothing to do


def test_training_token_ids_of_rows_are_the_ids_training_packs(tmp_path):
    """The token counts behind a frequent-token draft come from the rows exactly as training packs them
    (every turn, the template's end-of-turn tokens), not from a prompt and reference re-joined."""
    tok = _chat_tokenizer()
    cfg = DataConfig(dataset=str(_write_jsonl(tmp_path / "chat.jsonl", CHATS)), seq_len=96, val_fraction=0.1)
    corpus = data.load_corpus(cfg)
    first = data.training_token_ids(cfg, tok)[0]
    b = data.load_packed(cfg, tok, corpus).train
    starts = [t for t in range(1, 96) if b.positions[0][t] == 0] + [96]
    assert b.ids[0][: starts[0]].tolist() == first and len(data.training_token_ids(cfg, tok)) == len(corpus.train_rows)
