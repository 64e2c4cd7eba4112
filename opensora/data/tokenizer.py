"""A small T5-style tokenizer for the moving-shapes world.

The published T5 tokenizer (32k SentencePiece pieces) cannot ship with the book, and the tiny
text encoder does not need it: a word-level vocabulary trained on the captions, with T5's special
ids (pad=0, eos=1, unk=2) and an appended `</s>`, behaves the same way through
`transformers.AutoTokenizer`. Whole words keep every caption within the tiny preset's 16 tokens
(a unigram model trained on 150 short captions degenerates to single characters); words outside
the world map to `<unk>`.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import WordLevelTrainer

from opensora.data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, caption_for
from opensora.runtime import configure

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def world_captions() -> list[str]:
    """Every caption the synthetic world can produce, held-out combinations included, so the
    vocabulary covers all words a prompt may use."""
    return [caption_for(*combo)
            for combo in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)]


def train_caption_tokenizer(folder: str | Path, vocab_size: int = 64,
                            model_max_length: int = 16) -> Path:
    """Train the word-level tokenizer and save it in the Hugging Face folder layout."""
    from transformers import PreTrainedTokenizerFast  # after configure(): see runtime.configure

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(world_captions(), trainer=trainer)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the moving-shapes caption tokenizer.")
    parser.add_argument("--out", default="data_samples/tokenizer")
    args = parser.parse_args(argv)
    configure()
    print(f"wrote tokenizer to {train_caption_tokenizer(args.out)}")


if __name__ == "__main__":
    main()
