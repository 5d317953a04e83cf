"""The output cache: program outputs on disk, keyed by program, corpus and tokenizer."""

import numpy as np

from attnprog.synth.features import Sentence
from attnprog.synth.runtime.cache import OutputCache, corpus_hash, default_cache_dir


def corpus(*texts: str) -> list[Sentence]:
    return [Sentence.from_text(t) for t in texts]


def test_corpus_hash_is_stable_for_the_same_texts_and_ids():
    assert corpus_hash(corpus("a b", "c")) == corpus_hash(corpus("a b", "c"))


def test_corpus_hash_changes_with_texts_order_or_token_ids():
    base = corpus_hash(corpus("a b", "c"))
    assert corpus_hash(corpus("a b", "d")) != base
    assert corpus_hash(corpus("c", "a b")) != base
    retokenised = corpus("a b", "c")
    retokenised[0].ids[0] += 1
    assert corpus_hash(retokenised) != base


def test_a_stored_entry_comes_back_unchanged(tmp_path):
    cache = OutputCache(tmp_path)
    values = np.linspace(0, 1, 10, dtype=np.float32)
    failed = np.array([False, True])
    cache.put("p1", "c1", "tok", values, failed, "raised ValueError on text 1")
    hit = cache.get("p1", "c1", "tok", n_cells=10, n_texts=2)
    np.testing.assert_array_equal(hit.values, values)
    np.testing.assert_array_equal(hit.failed, failed)
    assert hit.reason == "raised ValueError on text 1"


def test_each_key_part_separates_entries(tmp_path):
    cache = OutputCache(tmp_path)
    cache.put("p1", "c1", "tok", np.zeros(3, np.float32), np.zeros(1, bool))
    assert cache.get("p2", "c1", "tok", 3, 1) is None
    assert cache.get("p1", "c2", "tok", 3, 1) is None
    assert cache.get("p1", "c1", "other/tokenizer", 3, 1) is None


def test_an_entry_of_the_wrong_size_or_a_damaged_file_is_a_miss(tmp_path):
    cache = OutputCache(tmp_path)
    cache.put("p1", "c1", "tok", np.zeros(3, np.float32), np.zeros(1, bool))
    assert cache.get("p1", "c1", "tok", 4, 1) is None
    cache.path("p1", "c1", "tok").write_bytes(b"not a safetensors file")
    assert cache.get("p1", "c1", "tok", 3, 1) is None


def test_the_cache_directory_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNPROG_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env" / "outputs"
    assert OutputCache().root == tmp_path / "env" / "outputs"
    assert OutputCache(tmp_path / "arg").root == tmp_path / "arg"


def test_without_the_environment_variable_the_user_cache_dir_is_used(monkeypatch):
    monkeypatch.delenv("ATTNPROG_CACHE_DIR", raising=False)
    assert default_cache_dir().parts[-2:] == ("attnprog", "outputs")


def test_an_entry_moved_to_another_key_or_edited_in_place_reads_as_a_miss(tmp_path):
    cache = OutputCache(tmp_path)
    values, failed = np.arange(6, dtype=np.float32), np.zeros(2, bool)
    cache.put("aaaa", "corpus", "tok", values, failed)
    cache.put("bbbb", "corpus", "tok", values + 1, failed)
    a, b = cache.path("aaaa", "corpus", "tok"), cache.path("bbbb", "corpus", "tok")
    a.replace(b)  # a swap: a valid file under the wrong key
    assert cache.get("bbbb", "corpus", "tok", 6, 2) is None
    cache.put("aaaa", "corpus", "tok", values, failed)
    data = bytearray(a.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last value edited in place
    a.write_bytes(bytes(data))
    assert cache.get("aaaa", "corpus", "tok", 6, 2) is None
