"""The bundled caption tokenizer loads like any Hugging Face T5 tokenizer."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from opensora.data.tokenizer import train_caption_tokenizer, world_captions
from opensora.presets import DATA_SAMPLES


def test_bundled_tokenizer_has_t5_special_ids() -> None:
    tok = AutoTokenizer.from_pretrained(DATA_SAMPLES / "tokenizer", local_files_only=True)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    enc = tok(["a red circle moving left on a black background"], padding="max_length",
              max_length=16, truncation=True)
    ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
    assert ids[9] == 1 and ids[10:] == [0] * 6 and sum(mask) == 10
    assert 2 not in ids  # every word of the world is in the vocabulary
    assert tok(["a purple circle"])["input_ids"][0][1] == 2  # unknown words map to <unk>


def test_every_world_caption_fits_and_roundtrips() -> None:
    tok = AutoTokenizer.from_pretrained(DATA_SAMPLES / "tokenizer", local_files_only=True)
    for caption in world_captions():
        ids = tok(caption)["input_ids"]
        assert len(ids) <= 16
        assert tok.decode(ids, skip_special_tokens=True) == caption


def test_training_reproduces_the_bundled_vocabulary(tmp_path: Path) -> None:
    folder = train_caption_tokenizer(tmp_path / "tok")
    ours = AutoTokenizer.from_pretrained(folder, local_files_only=True).get_vocab()
    bundled = AutoTokenizer.from_pretrained(DATA_SAMPLES / "tokenizer",
                                            local_files_only=True).get_vocab()
    assert ours == bundled
