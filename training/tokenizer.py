"""A CLIP byte-level BPE tokenizer written from scratch for the shapes world.

Real CLIP vocabularies cannot be downloaded here, so the project writes `vocab.json` and `merges.txt` itself, in the
exact format `transformers.CLIPTokenizer` reads. Every byte is in the vocabulary (any text tokenizes), and merges are
added until every word of the world is a single token, which keeps a tiny text encoder's job easy.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = list(bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        encoded = "".join(bytes_to_unicode()[b] for b in word.encode("utf-8"))
        while len(pieces := _bpe(encoded, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(p) for p in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def write_clip_tokenizer(out: Path, words: list[str], model_max_length: int) -> Path:
    """Write a folder that `CLIPTokenizer.from_pretrained(out)` loads without network."""
    vocab, merges = build_vocab(words)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0, sort_keys=False) + "\n")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2) + "\n")
    return out
