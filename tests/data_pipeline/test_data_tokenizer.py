"""Tokenisers: standard encodings built offline from registry packages, our own BPE, stable ids."""

import hashlib
import os

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from data_pipeline import tokenizer as tokmod
from data_pipeline.__main__ import main
from data_pipeline.tokenizer import BUILTIN_BPE_PATH, load_tiktoken_file, load_tokenizer
from data_pipeline.train_tokenizer import train_bpe
from dp_helpers import make_documents

# (encoding, ids of "hello world", n_vocab, eot id, tokenizer id)
STANDARD = [
    ("gpt2", [31373, 995], 50257, 50256, "gpt2-a823f0a7bb90"),
    ("r50k_base", [31373, 995], 50257, 50256, "r50k_base-a823f0a7bb90"),
    ("cl100k_base", [15339, 1917], 100277, 100257, "cl100k_base-94aa5808e614"),
    ("o200k_base", [24912, 2375], 200019, 199999, "o200k_base-70724d399878"),
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """A fresh tiktoken cache and no way to download: everything must come from the packages."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    tokmod._load_tokenizer.cache_clear()  # our per-process cache too

    read_file = tiktoken.load.read_file

    def no_network(url):
        if "://" in url:
            raise AssertionError(f"tried to download {url}")
        return read_file(url)

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    return tmp_path / "cache"


@pytest.mark.parametrize("name,hello,n_vocab,eot,tid", STANDARD, ids=[s[0] for s in STANDARD])
def test_standard_encoding_loads_offline_with_verified_rank_files(offline, name, hello, n_vocab, eot, tid):
    tok = load_tokenizer(name)
    assert tok.encode("hello world") == hello
    assert (tok.vocab_size, tok.eot_id, tok.name, tok.id) == (n_vocab, eot, name, tid)
    assert tok.decode(tok.encode("Grüße, 世界 <|endoftext|>")) == "Grüße, 世界 <|endoftext|>"
    assert tok.encode("<|endoftext|>") != [eot]  # special-token text in documents stays text
    assert load_tokenizer(name) is tok  # cached per process
    # the cache holds exactly the files tiktoken would have downloaded, under its own names
    for url, sha in tokmod._RANK_FILES[name].items():
        cached = offline / hashlib.sha1(url.encode()).hexdigest()
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha


def test_corrupted_cache_file_is_replaced(offline):
    load_tokenizer("cl100k_base")
    (cached,) = offline.iterdir()
    cached.write_bytes(b"garbage")
    tiktoken.registry.ENCODINGS.clear()
    tokmod._load_tokenizer.cache_clear()
    assert load_tokenizer("cl100k_base").encode("hello world") == [15339, 1917]


def test_builtin_bpe_is_pinned():
    tok = load_tokenizer("pydocs4k")
    assert (tok.id, tok.vocab_size, tok.eot_id) == ("pydocs4k-5cd72dae532c", 4096, 4095)
    assert load_tokenizer(str(BUILTIN_BPE_PATH)).id == tok.id
    text = "The os module provides a portable way of using operating system functionality."
    assert tok.decode(tok.encode(text)) == text


def test_trained_bpe_matches_rustbpe_ids_and_is_deterministic(tmp_path):
    import rustbpe

    docs = make_documents(200)
    ranks, pattern = train_bpe(docs, 400)
    assert (len(ranks), sorted(ranks.values())) == (399, list(range(399)))
    tokmod.save_tiktoken_file(tmp_path / "a.tiktoken", "tiny", ranks, pattern, {"<|endoftext|>": 399})
    again, _ = train_bpe(docs, 400)
    tokmod.save_tiktoken_file(tmp_path / "b.tiktoken", "tiny", again, pattern, {"<|endoftext|>": 399})
    assert (tmp_path / "a.tiktoken").read_bytes() == (tmp_path / "b.tiktoken").read_bytes()

    tok = load_tokenizer(str(tmp_path / "a.tiktoken"))
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("tiny", 400, 399)
    reference = rustbpe.Tokenizer()
    reference.train_from_iterator(iter(docs), 399)
    for doc in docs[:20]:
        assert tok.encode(doc) == reference.encode(doc)


def test_tiktoken_file_without_sidecar_gets_default_pattern_and_eot(tmp_path):
    ranks, _ = train_bpe(make_documents(50), 300)
    path = tmp_path / "bare.tiktoken"
    path.write_bytes(tokmod.tiktoken_file_bytes(ranks))
    tok = load_tokenizer(str(path))
    assert (tok.name, tok.eot_id, tok.vocab_size) == ("bare", 299, 300)


def test_id_changes_with_ranks_and_special_tokens(tmp_path):
    ranks, pattern = train_bpe(make_documents(50), 300)
    tokmod.save_tiktoken_file(tmp_path / "x.tiktoken", "x", ranks, pattern, {"<|endoftext|>": 299})
    other = dict(ranks)
    a, b = [t for t, r in ranks.items() if r in (298, 297)]
    other[a], other[b] = other[b], other[a]
    tokmod.save_tiktoken_file(tmp_path / "y.tiktoken", "x", other, pattern, {"<|endoftext|>": 299})
    tokmod.save_tiktoken_file(tmp_path / "z.tiktoken", "x", ranks, pattern, {"<|endoftext|>": 300})
    ids = {load_tokenizer(str(tmp_path / f"{n}.tiktoken")).id for n in "xyz"}
    assert len(ids) == 3 and all(i.startswith("x-") for i in ids)


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown tokenizer 'p50k'"):
        load_tokenizer("p50k")
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        load_tokenizer("missing.tiktoken")
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe(["abc"], 100)


@pytest.mark.slow
def test_train_tokenizer_cli_reproduces_committed_bpe(tmp_path, capsys):
    out = tmp_path / "pydocs4k.tiktoken"
    assert main(["train-tokenizer", "--source", "builtin", "--vocab-size", "4096", "--name", "pydocs4k",
                 "--out", str(out)]) == 0
    assert out.read_bytes() == BUILTIN_BPE_PATH.read_bytes()
    assert out.with_suffix(".tiktoken.json").read_text() == \
        BUILTIN_BPE_PATH.with_suffix(".tiktoken.json").read_text()
    assert "pydocs4k-5cd72dae532c" in capsys.readouterr().out
    assert load_tiktoken_file(out).n_vocab == 4096
    assert os.path.getsize(out) < 100_000
