from transformers import CLIPTokenizer

from training.shapes import vocabulary
from training.tokenizer import build_vocab, write_clip_tokenizer


def test_every_world_word_is_one_token_and_files_are_deterministic(tmp_path):
    write_clip_tokenizer(tmp_path / "a", vocabulary(), 16)
    write_clip_tokenizer(tmp_path / "b", vocabulary(), 16)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "a")
    for word in vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)
    ids = tok("a red circle on a blue background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 9


def test_any_text_tokenizes_without_unknowns(tmp_path):
    write_clip_tokenizer(tmp_path, vocabulary(), 16)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    text = "zebra Photo, 4k!"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids).replace(" ", "") == "zebraphoto,4k!"


def test_vocab_layout_matches_clip():
    vocab, merges = build_vocab(["red", "green"])
    assert len(vocab) == 512 + len(merges) + 2
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
