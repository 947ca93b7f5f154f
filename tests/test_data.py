"""Data: each generator's documented structure, the Markov floor, tokenizers, corpora and caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from bench.data import DataConfig, DataUnavailable, load_dataset, tokenized
from bench.data import tasks as T
from bench.data import corpora
from bench.data.corpora import Corpus, Document, shakespeare_corpus
from bench.data.markov import MarkovChain
from bench.data.tokenizers import ByteTokenizer, CharTokenizer, named_encoding, train_bpe
from tests.conftest import needs_shakespeare

DATA = TypeAdapter(DataConfig)


def rng(seed: int = 0):
    return np.random.default_rng(seed)


def test_mad_defaults_are_the_papers_baseline_settings():
    expected = {  # task: (vocab, seq len, train examples)
        "in_context_recall": (16, 128, 12_800), "fuzzy_recall": (16, 128, 12_800),
        "noisy_recall": (32, 128, 12_800), "selective_copying": (16, 256, 12_800),
        "compression": (16, 32, 12_800), "memorization": (256, 32, 256),
    }
    for task, (vocab, seq, n) in expected.items():
        config = DATA.validate_python({"source": "task", "task": task})
        assert (config.vocab_size, config.seq_len, config.n_train) == (vocab, seq, n)
    noisy = DATA.validate_python({"source": "task", "task": "noisy_recall"})
    assert noisy.noise_vocab_size == 16
    assert DATA.validate_python({"source": "task", "task": "selective_copying"}).num_tokens_to_copy == 16


def test_every_mqar_answer_is_the_value_bound_to_that_key_earlier():
    inputs, answers = T.mqar(300, rng(), vocab_size=128, seq_len=64, num_kv_pairs=8, power_a=0.01)
    assert inputs.shape == answers.shape == (300, 64)
    for x, a in zip(inputs, answers):
        bound = dict(zip(x[0:16:2], x[1:16:2]))  # the key-value context
        asked = np.nonzero(a >= 0)[0]
        assert len(asked) == 8 and all(t >= 16 for t in asked)
        for t in asked:
            assert a[t] == bound[x[t]]  # the query key sits at t; its value is the answer
        assert all(k < 64 for k in bound) and all(v >= 64 for v in bound.values())


def test_mqar_checks_zoologys_constraints():
    with pytest.raises(ValueError, match="vocab_size > seq_len"):
        DATA.validate_python({"source": "task", "task": "mqar", "vocab_size": 64, "seq_len": 64})
    with pytest.raises(ValueError, match="4·num_kv_pairs ≤ seq_len"):
        DATA.validate_python({"source": "task", "task": "mqar", "seq_len": 64, "num_kv_pairs": 17})


def _value_after(seq, key):
    """The value that followed `key` the first time it appeared as a key in a (key, value) sequence."""
    for i in range(0, len(seq) - 1, 2):
        if seq[i] == key:
            return seq[i + 1]
    raise AssertionError("probe key never shown")


@pytest.mark.parametrize("task", ["in_context_recall", "noisy_recall"])
def test_recall_answer_is_the_value_seen_with_the_probe_key(task):
    config = DATA.validate_python({"source": "task", "task": task, "n_train": 4, "n_test": 200})
    dataset = load_dataset(config)
    inputs, answers = dataset.test
    for x, a in zip(inputs, answers):
        assert (a >= 0).sum() == 1 and a[-1] >= 0  # only the final value is asked
        assert x[-2] == config.vocab_size - 1  # copy prefix, then the probe key
        assert a[-1] == _value_after(x[:-2], x[-1])
    train_x, train_y = dataset.train
    assert np.array_equal(train_x[:, 1:], train_y[:, :-1])  # MAD trains on every next token


def test_train_on_belongs_to_the_recall_tasks_only():
    assert DATA.validate_python({"source": "task", "task": "fuzzy_recall", "train_on": "answers"}).train_on == "answers"
    with pytest.raises(ValidationError, match="train_on"):
        DATA.validate_python({"source": "task", "task": "mqar", "train_on": "all"})  # MQAR trains on answers only


def test_noisy_recall_noise_comes_from_its_own_tokens():
    x, _ = load_dataset(DATA.validate_python({"source": "task", "task": "noisy_recall", "n_train": 200, "n_test": 2})).train
    noise = (x >= 15) & (x < 31)  # 32 tokens: 15 regular, 16 noise, 1 prefix
    assert 0.1 < noise.mean() < 0.3  # frac_noise 0.2 of the pairs


def test_fuzzy_recall_answer_is_the_whole_multi_token_value():
    seqs, answer_len = T.fuzzy_recall(100, rng(), vocab_size=16, seq_len=128, k_motif_size=3, v_motif_size=3, train=False)
    for seq, m in zip(seqs, answer_len):
        prefix = int(np.nonzero(seq == 15)[0][-1])
        key, value = tuple(seq[prefix + 1 : prefix + 4]), tuple(seq[-m:])
        assert len(key) == 3 and 1 <= m <= 3
        earlier = [tuple(seq[i + 3 : i + 3 + m]) for i in range(prefix - 3) if tuple(seq[i : i + 3]) == key]
        assert value in earlier
    inputs, answers = T._recall_targets(seqs, answer_len, all_tokens=False)
    assert np.array_equal((answers >= 0).sum(1), answer_len)


def test_selective_copying_targets_are_exactly_the_non_noise_tokens_in_order():
    inputs, answers = T.selective_copying(200, rng(), vocab_size=16, seq_len=256, num_tokens_to_copy=16)
    for x, a in zip(inputs, answers):
        copy_at = int(np.nonzero(x == 15)[0][0])
        scattered = x[:copy_at]
        assert np.array_equal(a[a >= 0], scattered[scattered != 14])
        assert (a[: copy_at + 1] < 0).all() and len(x) == 256


def test_compression_memorization_and_induction_structure():
    x, a = T.compression(50, rng(), vocab_size=16, seq_len=32)
    assert np.array_equal(a[:, 15:30], x[:, :15]) and (x[:, 15] == 15).all()
    x, a = T.memorization(50, rng(1), vocab_size=256, seq_len=32, kv_map_seed=12345)
    x2, a2 = T.memorization(50, rng(2), vocab_size=256, seq_len=32, kv_map_seed=12345)
    table = {}
    for xs, ys in ((x, a), (x2, a2)):  # one key → value table across every sequence
        for k, v in zip(xs[:, 0::2].ravel(), ys[:, 1::2].ravel()):
            assert table.setdefault(k, v) == v
    assert (x[:, 1::2] == 255).all()
    x, a = T.induction(50, rng(), vocab_size=64, seq_len=64)
    for xs, ys in zip(x, a):
        for t in np.nonzero(ys >= 0)[0]:
            first = int(np.nonzero(xs == xs[t])[0][0])
            assert first < t and ys[t] == xs[first + 1]


def test_tasks_are_deterministic_given_their_seed():
    a = load_dataset(DATA.validate_python({"source": "task", "task": "in_context_recall", "n_train": 50, "n_test": 5}))
    b = DATA.validate_python({"source": "task", "task": "in_context_recall", "n_train": 50, "n_test": 5}).load()
    c = DATA.validate_python({"source": "task", "task": "in_context_recall", "n_train": 50, "n_test": 5, "seed": 7}).load()
    assert np.array_equal(a.train[0], b.train[0]) and not np.array_equal(a.train[0], c.train[0])
    x1, _ = a.train_batch(3, seed=0, batch_size=4, seq_len=128)
    x2, _ = b.train_batch(3, seed=0, batch_size=4, seq_len=128)
    assert (x1 == x2).all()


def test_markov_true_model_loss_equals_the_entropy_rate():
    chain = MarkovChain.random(vocab_size=32, concentration=0.3, seed=3)
    tokens = chain.sample(64, 4096, rng(4))
    assert chain.nll(tokens) == pytest.approx(chain.entropy_rate(), rel=0.01)
    assert np.allclose(chain.stationary @ chain.transition, chain.stationary)


def test_markov_dataset_reports_its_floor_and_keeps_windows_inside_chains():
    dataset = load_dataset(DATA.validate_python({"source": "markov", "vocab_size": 16, "n_train_tokens": 20_000,
                                                 "n_val_tokens": 4096, "doc_len": 512}))
    assert dataset.loss_floor == pytest.approx(dataset.fingerprint["entropy_rate"])
    offsets = dataset._offsets(dataset.train_tokens, 64, 1000, rng())
    assert ((offsets % 512) + 65 <= 512).all()


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300))
def test_bpe_round_trips_arbitrary_text(text):
    bpe = train_bpe(Corpus.of("poems", "the quick brown fox jumps over the lazy dog\n" * 50 + "ünïcödé ✓ 😀\n"), 300)
    assert bpe.decode(bpe.encode(text)) == text
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text


def test_bpe_is_cached_by_corpus_and_vocabulary_size(_isolated_cache):
    corpus = Corpus.of("c", "abc abd abe " * 100)
    first = train_bpe(corpus, 270)
    files = sorted((_isolated_cache / "tokenizers").glob("bpe-*"))
    assert train_bpe(corpus, 270).encoding.name == first.encoding.name
    assert sorted((_isolated_cache / "tokenizers").glob("bpe-*")) == files
    train_bpe(corpus, 280)
    assert len(sorted((_isolated_cache / "tokenizers").glob("bpe-*"))) == len(files) + 1


def test_token_bytes_count_utf8_bytes():
    char = CharTokenizer.fit("aé✓")
    assert dict(zip(char.chars, char.token_bytes())) == {"a": 1, "é": 2, "✓": 3}
    bpe = train_bpe(Corpus.of("c", "héllo wörld " * 200), 280)
    ids = bpe.encode("héllo wörld")
    assert bpe.token_bytes()[ids].sum() == len("héllo wörld".encode())


def test_named_tiktoken_encoding_offline_says_what_to_do(monkeypatch):
    import tiktoken

    import socket

    timeouts = []

    def offline(name):
        timeouts.append(socket.getdefaulttimeout())  # tiktoken's download has no timeout of its own
        raise ConnectionError("name resolution failed")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataUnavailable, match="tiktoken encoding 'gpt2' needs its vocabulary files.*tokenizer: bpe"):
        named_encoding("gpt2")
    assert timeouts == [15.0] and socket.getdefaulttimeout() is None  # a dead network fails, then the default returns


def test_stdlib_corpus_is_a_hashed_sample_of_whole_files_tokenized_once(monkeypatch):
    config = DATA.validate_python({"source": "stdlib", "max_bytes": 200_000})
    identity = config.identity()
    assert len(identity["corpus_sha256"]) == 64 and 190_000 < identity["corpus_bytes"] <= 200_000
    names = [d.name for d in config.corpus().documents]
    assert names == sorted(names) and len(names) > 5
    assert names[-1] > "o"  # not the alphabetical start of the library: a sample across it
    first = load_dataset(config)
    assert first.kind == "text" and first.vocab_size == len(set(config.corpus().text))
    import bench.data as data

    monkeypatch.setattr(data, "make_tokenizer", lambda *a: pytest.fail("tokenized twice"))
    again = config.load()
    assert np.array_equal(again.val_tokens, first.val_tokens)
    assert np.array_equal(again.val_batches(12, 32, 4)[2][0], first.val_batches(12, 32, 4)[2][0])


def test_the_stdlib_corpus_leaves_out_every_test_folder():
    from bench.data.corpora import is_test_path

    names = [d.name for d in corpora.stdlib_corpus(None).documents]
    assert len(names) > 500 and not any(is_test_path(Path(n)) for n in names)
    for folder in ("ctypes/test/test_bytes.py", "tkinter/test/x.py", "unittest/test/testmock/x.py",
                   "idlelib/idle_test/x.py", "lib2to3/tests/data/x.py", "test/test_json/x.py", "distutils/tests/x.py"):
        assert is_test_path(Path(folder)), folder
    assert not is_test_path(Path("unittest/case.py")) and not is_test_path(Path("test_like_name.py"))


def test_many_documents_are_split_by_document_and_one_is_cut_by_characters():
    documents = tuple(Document(f"doc{i:03d}.py", f"# file {i}\n" + "x = 1\n" * (i % 17 + 1)) for i in range(200))
    corpus = Corpus("c", documents)
    split = corpus.split(0.1)
    held = set(split.val_documents)
    assert split.how == "documents" and 0 < len(held) < 200
    assert split.val == "\n".join(d.text for d in documents if d.name in held)
    assert split.train == "\n".join(d.text for d in documents if d.name not in held)
    total = sum(len(d.text) for d in documents)
    largest = max(len(d.text) for d in documents)
    assert 0.1 * total <= sum(len(d.text) for d in documents if d.name in held) < 0.1 * total + largest  # the fraction kept
    assert sorted(held) != [d.name for d in documents][-len(held):]  # not the last files: a seeded hash
    assert corpus.split(0.1).sha256 == split.sha256 and corpus.split(0.1, seed=1).val_documents != split.val_documents
    assert corpus.split(0.1, seed=1).sha256 != split.sha256
    one = Corpus.of("one", "abcdefghij" * 10)
    cut = one.split(0.1)
    assert (cut.how, cut.train, cut.val, cut.val_documents) == ("characters", "abcdefghij" * 9, "abcdefghij", ())


def test_the_split_is_part_of_the_data_identity(tmp_path):
    for i in range(30):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i} " * (20 + i))
    a = DATA.validate_python({"source": "file", "path": str(tmp_path), "tokenizer": "byte"})
    b = DATA.validate_python({"source": "file", "path": str(tmp_path), "tokenizer": "byte", "split_seed": 3})
    assert a.identity()["corpus_sha256"] == b.identity()["corpus_sha256"]
    assert a.identity()["split_sha256"] != b.identity()["split_sha256"]
    assert load_dataset(a).fingerprint["split_sha256"] == a.identity()["split_sha256"]


def test_bpe_learns_its_merges_from_the_training_documents_only(tmp_path, monkeypatch):
    import bench.data as data

    for i in range(40):
        (tmp_path / f"f{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * (10 + i))
    config = DATA.validate_python({"source": "file", "path": str(tmp_path), "tokenizer": "bpe", "vocab_size": 300})
    split = config.train_val_split()
    fitted_on = []
    real = data.make_tokenizer
    monkeypatch.setattr(data, "make_tokenizer", lambda kind, corpus, size: fitted_on.append(corpus.text) or real(kind, corpus, size))
    dataset = config.load()
    assert fitted_on == [split.train] and split.val_documents
    assert not any(f"document {name[1:3].lstrip('0') or '0'}:" in fitted_on[0] for name in split.val_documents)
    assert len(dataset.val_tokens) > 0 and config.fitted_tokenizer().decode(dataset.val_tokens[:40].tolist()) == split.val[:len(
        config.fitted_tokenizer().decode(dataset.val_tokens[:40].tolist()))]


@pytest.mark.parametrize("kind", ["task", "stream", "documents"])
def test_an_epoch_sees_every_example_once_before_any_repeats(kind):
    if kind == "task":
        dataset = load_dataset(DATA.validate_python({"source": "task", "task": "induction", "n_train": 100, "n_test": 4}))
        seq_len, per_epoch = 64, 100
        key = lambda x, y: x.numpy().tobytes()  # noqa: E731 - a row
    else:
        markov = {"source": "markov", "vocab_size": 16, "n_train_tokens": 3000, "n_val_tokens": 512,
                  "doc_len": 1000 if kind == "documents" else 3000}
        dataset = load_dataset(DATA.validate_python(markov))
        seq_len = 32
        per_epoch = 3 * ((1000 - 32) // 32) if kind == "documents" else (3000 - 32) // 32
        key = None
    assert dataset.examples_per_epoch(seq_len) == per_epoch
    batch = 7
    steps = dataset.single_pass_steps(batch, seq_len)
    assert steps == per_epoch // batch
    batches = [dataset.train_batch(step, 5, batch, seq_len) for step in range(steps + 1)]
    first = torch.cat([x for x, _ in batches[:steps]])
    if key:
        seen = {key(x, None) for x in first}
        assert len(seen) == len(first)  # no row twice within the epoch
    else:
        assert (first[:, 1:] == torch.cat([y for _, y in batches[:steps]])[:, :-1]).all()
        # windows every seq_len tokens on one shifted grid: no target token is predicted twice
        flat = dataset.train_tokens
        span = 1000 if kind == "documents" else 3000
        starts = []
        for x in first:
            hits = [o for o in range(len(flat) - seq_len) if np.array_equal(flat[o:o + seq_len], x.numpy())]
            starts.append(hits[0])
        starts = np.array(starts)
        assert len(set(starts % span % seq_len)) == 1 and len(set(starts)) == len(starts)
        assert ((starts % span) + seq_len + 1 <= span).all()  # windows stay inside their chain
    again = dataset.train_batch(3, 5, batch, seq_len)
    assert torch.equal(again[0], batches[3][0])  # a pure function of (seed, step)
    assert not torch.equal(dataset.train_batch(3, 6, batch, seq_len)[0], batches[3][0])  # another seed, another order
    straddling = dataset.train_batch(steps, 5, batch, seq_len)[0]
    assert len(straddling) == batch  # the next epoch's examples complete the batch


def test_a_single_pass_over_heterogeneous_files_validates_like_it_trains(tmp_path):
    """Files of two kinds (skewed random letters and number tables) whose names sort the tables last:
    held-out documents are the training distribution; a cut at 90% of the text would be all tables."""
    from bench.config import resolve_run
    from bench.train import train

    generator = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlu cmfwyp"))
    weights = np.linspace(2.0, 0.2, len(letters))
    for i in range(240):
        if i < 216:
            text = "".join(generator.choice(letters, 400, p=weights / weights.sum()))
            (tmp_path / f"a{i:03d}.txt").write_text(text)
        else:
            (tmp_path / f"z{i:03d}.txt").write_text("".join(f"{n:05d}\n" for n in range(i, i + 66)))
    data = {"source": "file", "path": str(tmp_path), "tokenizer": "byte"}
    train_cfg = {"steps": 60, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "warmup_steps": 10, "eval_every": 60,
                 "eval_batches": 8, "dtype": "float32", "checkpoint_every": None}
    gaps = {}
    for name, split_seed in (("documents", 0), ("cut", None)):
        if split_seed is None:  # the same text as one document: the old cut at 90%
            (tmp_path.parent / "one.txt").write_text(Corpus.of("x", DATA.validate_python(data).corpus().text).text)
            config = {"source": "file", "path": str(tmp_path.parent / "one.txt"), "tokenizer": "byte"}
        else:
            config = data
        run = resolve_run({"n_layer": 1, "n_head": 2, "n_embd": 32}, config, train_cfg)
        dataset = load_dataset(run.data)
        assert run.train.steps <= dataset.single_pass_steps(16, 64)  # one pass: every batch unseen
        losses = []
        result = train(run, on_step=lambda r: losses.append(r["train_loss"]))
        gaps[name] = result["val_loss"] - float(np.mean(losses[-12:]))
    assert abs(gaps["documents"]) < 0.15, gaps
    assert abs(gaps["cut"]) > 1.0, gaps  # the cut validates on tables the model never trained on


@needs_shakespeare()
def test_shakespeare_char_matches_nanogpts_preparation():
    dataset = load_dataset(DATA.validate_python({"source": "shakespeare", "tokenizer": "char"}))
    assert dataset.vocab_size == 65
    assert (len(dataset.train_tokens), len(dataset.val_tokens)) == (1_003_854, 111_540)
    assert shakespeare_corpus().n_bytes == 1_115_394


def test_shakespeare_offline_without_a_copy_says_where_to_put_one(monkeypatch, tmp_path):
    import urllib.request

    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataUnavailable, match=f"offline, put a copy at {tmp_path}.*input.txt \\(sha256 86c4e6aa"):
        shakespeare_corpus()


def test_a_wrong_copy_of_shakespeare_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path))
    (tmp_path / "data" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "data" / "tinyshakespeare" / "input.txt").write_text("not shakespeare")
    with pytest.raises(DataUnavailable, match="does not match sha256"):
        shakespeare_corpus()


def test_local_files_and_nanogpt_bin_files(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n" * 300)
    (tmp_path / "b.txt").write_text("second file\n" * 300)
    config = DATA.validate_python({"source": "file", "path": str(tmp_path), "tokenizer": "byte"})
    dataset = load_dataset(config)
    assert dataset.vocab_size == 256 and len(dataset.train_tokens) + len(dataset.val_tokens) == 11 * 300 + 12 * 300
    bins = tmp_path / "bins"
    bins.mkdir()
    np.arange(5000, dtype=np.uint16).tofile(bins / "train.bin")
    np.arange(1000, dtype=np.uint16).tofile(bins / "val.bin")
    tokens = load_dataset(DATA.validate_python({"source": "bin", "path": str(bins), "vocab_size": 5000}))
    x, y = tokens.val_batches(2, 16, 2)[0]
    assert (y[:, :-1] == x[:, 1:]).all() and (y - x == 1).all()
    with_bytes = load_dataset(DATA.validate_python({"source": "bin", "path": str(bins), "vocab_size": 256, "tokenizer": "byte"}))
    assert with_bytes.token_bytes is not None  # bits per byte for byte-level files
    with pytest.raises(ValidationError, match="tokenizer 'bpe' is trained on a text corpus that .bin files do not carry"):
        DATA.validate_python({"source": "bin", "path": str(bins), "vocab_size": 5000, "tokenizer": "bpe"})
    with pytest.raises(DataUnavailable, match="not found"):
        load_dataset(DATA.validate_python({"source": "file", "path": str(tmp_path / "missing")}))


def test_unknown_tokenizer_lists_the_choices():
    with pytest.raises(ValueError, match="unknown tokenizer 'gtp2': use char, byte, bpe or one of .*gpt2"):
        tokenized(Corpus.of("c", "abc"), "gtp2", None, 0.1)


def test_hugging_face_source_without_the_package_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    config = DATA.validate_python({"source": "hf", "name": "roneneldan/TinyStories"})
    with pytest.raises(DataUnavailable, match="pip install 'archbench\\[hf\\]'"):
        config.load()
