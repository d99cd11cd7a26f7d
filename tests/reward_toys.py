"""A tiny random BERT and a toy preference language, for the reward-model tests (unit and GPU).

Kept apart from the test modules so that a test can use them without importing what those modules import
(the feedback store, MLflow).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from pipelines.reward.train import Args

TOPICS = ["cats", "dogs", "rain", "code", "tea", "maps", "jazz", "bread", "stars", "trains", "chess", "snow"]
FILLER = ["the", "a", "is", "it", "and", "of", "to", "in", "you", "that", "this", "very", "some", "more"]
QUALITY = ["excellent", "good", "okay", "bad"]  # best first
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "human", "assistant", ":", "?", ".", ",", "!",
         "tell", "me", "about", "answer", "question", *TOPICS, *FILLER, *QUALITY]


def fast_args(folder: Path, **overrides) -> Args:
    """RM training settings under which the tiny BERT learns the toy preferences in seconds."""
    values = dict(backbone=str(folder), lr=3e-3, batch_size=8, epochs=4, max_length=64, warmup_ratio=0.1,
                  pointwise_weight=0.0, eval_fraction=0.2, seed=0)
    return Args(**(values | overrides))


def build_tiny_bert(folder: Path) -> Path:
    """A random BertModel (hidden 32, 2 layers) with a WordPiece tokenizer over VOCAB, built in under 1 s."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    # Built with `tokenizers` directly: transformers 5's BertTokenizerFast(vocab_file=...) maps every word to
    # [UNK] here.
    wordpiece = Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=128)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def answer(rng: random.Random, quality: str) -> str:
    words = rng.choices(FILLER, k=rng.randint(3, 8))
    words.insert(rng.randint(0, len(words)), quality)
    return " ".join(words) + "."


def conversation(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"tell me about {topic}?"}]
