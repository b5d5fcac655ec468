"""The world's text tokenizer: CLIP's BPE scheme with merges learned on the world's own captions.

CLIP's tokenizer maps every byte to a symbol (256 symbols, and 256 more for word ends), then applies merges by
rank; its 49,408-entry vocabulary would make the token-embedding tables the largest part of the tiny models.
Here the same scheme gets merges learned (with Hugging Face ``tokenizers``' BPE trainer) on the captions of the
world, so every world word is one token while any other text still tokenizes (down to bytes). The files are
written in both formats the studio uses: ``vocab.json`` + ``merges.txt`` for ``transformers.CLIPTokenizer``
(the pipelines) and a ``bpe.txt.gz`` for ``open_clip``'s ``SimpleTokenizer`` (the tiny CLIP judge); both build
the same ids: bytes, bytes + ``</w>``, merges, ``<|startoftext|>``, ``<|endoftext|>``.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

from .concepts import ATTRIBUTES, HELD_OUT, Scene

EXTRA_WORDS = "a an the of in with and photo image picture".split()


def corpus() -> list[str]:
    captions = [Scene(*values).caption() for values in itertools.product(*ATTRIBUTES.values())]
    return captions + [c.concept_text for c in HELD_OUT] + [" ".join(EXTRA_WORDS)]


def learn_merges() -> list[tuple[str, str]]:
    from open_clip.tokenizer import bytes_to_unicode
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    # CLIP splits words from punctuation; whitespace + punctuation splitting matches it on the world's text
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    trainer = trainers.BpeTrainer(vocab_size=4000, initial_alphabet=list(bytes_to_unicode().values()),
                                  end_of_word_suffix="</w>", min_frequency=1, show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(tokenizer.to_str())["model"]["merges"]]


def vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    from open_clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def write(folder: Path, merges: list[tuple[str, str]] | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``bpe.txt.gz`` to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = merges or learn_merges()
    (folder / "vocab.json").write_text(json.dumps(vocabulary(merges)), encoding="utf-8")
    lines = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(lines, encoding="utf-8")
    with gzip.open(folder / "bpe.txt.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    return folder


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token=pad_token)


def vocab_size(folder: Path) -> int:
    return len(json.loads((Path(folder) / "vocab.json").read_text(encoding="utf-8")))
