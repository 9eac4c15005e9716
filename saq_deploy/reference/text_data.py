"""Prompts for the text-to-image reference pipeline (`builtin:digits-text`) and the tokenizer it reads.

Every bundled digit gets prompts that name the digit (word or numeral) and, most of the time, its
stroke weight: "bold" when the image holds more ink than the median image of its class, "thin"
otherwise. The attribute is computed from the pixels (``ink``), so the same rule scores generated
images (attribute accuracy, chance = 50 %). Prompts are drawn from a small closed set of
templates, which is what lets the training script tokenize them all once.

The tokenizer is a real CLIP BPE tokenizer over a vocabulary this module builds: every letter,
digit and common punctuation mark (alone and word-final), plus merges that make each prompt word
one token. Any ASCII prompt therefore tokenizes (unknown words fall apart into letters), exactly
as an SD-1.5 tokenizer would treat them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ATTRIBUTES = ("thin", "bold")  # index 1 = more ink than the class median
# {w}: the digit's word, {n}: its numeral, {a}: the attribute. Attribute-free templates keep plain
# "seven" meaningful; the first template is the evaluation prompt (``eval_prompt``).
ATTR_TEMPLATES = ("a {a} {w}", "{a} {n}", "{a} {w}", "a {a} digit {w}", "a {a} {n}", "{w}, {a}")
PLAIN_TEMPLATES = ("{w}", "{n}", "a {w}", "digit {n}", "the number {w}")
MAX_LENGTH = 16  # tokens, start and end included (SD-1.5 uses 77; these prompts need <= 8)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'!?"


def ink(images: Tensor) -> Tensor:
    """Mean ink per image (N,): pixels in [-1, 1] mapped to [0, 1] and averaged."""
    return ((images.clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


def ink_thresholds(images: Tensor, labels: Tensor) -> list[float]:
    """Per-class median ink: above it a digit is "bold", else "thin"."""
    values = ink(images)
    return [float(values[labels == c].median()) for c in range(len(DIGIT_WORDS))]


def attribute_of(images: Tensor, digits: Tensor, thresholds: list[float]) -> Tensor:
    """Attribute index (0 thin, 1 bold) of each image against the threshold of its digit."""
    th = torch.tensor(thresholds, dtype=torch.float32)[digits.long()]
    return (ink(images) > th).long()


def fill(template: str, digit: int, attribute: int | None) -> str:
    return template.format(w=DIGIT_WORDS[digit], n=str(digit),
                           a="" if attribute is None else ATTRIBUTES[attribute])


def eval_prompt(digit: int, attribute: int) -> str:
    return fill(ATTR_TEMPLATES[0], digit, attribute)


def eval_prompts(n: int) -> tuple[list[str], Tensor, Tensor]:
    """Balanced evaluation prompts for ``n`` samples: sample i asks for digit i % 10 with attribute
    (i // 10) % 2. Returns (the 20 distinct prompts, prompt index per sample, digit, attribute)."""
    prompts = [eval_prompt(d, a) for a in range(len(ATTRIBUTES)) for d in range(len(DIGIT_WORDS))]
    i = torch.arange(n)
    digit, attr = i % 10, (i // 10) % 2
    return prompts, digit + 10 * attr, digit, attr


def all_prompts() -> list[str]:
    """Every prompt the training script can draw (attribute and plain templates x digits)."""
    out = [fill(t, d, a) for t in ATTR_TEMPLATES for d in range(10) for a in range(len(ATTRIBUTES))]
    out += [fill(t, d, None) for t in PLAIN_TEMPLATES for d in range(10)]
    return out


def prompt_choices(digit: int, attribute: int) -> tuple[list[int], list[int]]:
    """Indices into ``all_prompts()`` for a digit with this attribute: (prompts naming the
    attribute, prompts naming only the digit)."""
    index = {p: i for i, p in enumerate(all_prompts())}
    return ([index[fill(t, digit, attribute)] for t in ATTR_TEMPLATES],
            [index[fill(t, digit, None)] for t in PLAIN_TEMPLATES])


def _words() -> list[str]:
    words: list[str] = []
    for p in all_prompts():
        for w in p.replace(",", " ").split():
            if w not in words and not w.isdigit():
                words.append(w)
    return words


def vocabulary() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the CLIP BPE: characters, word-final characters, then one merge chain per
    word ("s e" -> "se", "se v" -> "sev", ... "seve n</w>" -> "seven</w>")."""
    vocab: dict[str, int] = {}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
    for c in _CHARS:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in _words():
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            merged = toks[0] + toks[1]
            rule = f"{toks[0]} {toks[1]}"
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            toks = [merged, *toks[2:]]
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return vocab, merges


def write_tokenizer(out_dir: Path):
    """Write ``vocab.json`` + ``merges.txt`` (what every transformers version reads) and the
    tokenizer's own saved files; return the loaded ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocabulary()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, indent=0, sort_keys=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=MAX_LENGTH,
                        pad_token=EOS, bos_token=BOS, eos_token=EOS, unk_token=EOS)
    tok.save_pretrained(str(out_dir))
    return tok


def tokenize(tokenizer, prompts: list[str]) -> Tensor:
    """(P, MAX_LENGTH) int64 ids, padded and truncated as diffusers' SD pipelines do."""
    enc = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return enc.input_ids.long()
