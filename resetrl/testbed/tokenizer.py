"""A tiny tokenizer for the chain testbed, built with the `tokenizers` library and saved as a Hugging Face folder
(PreTrainedTokenizerFast) that transformers and vLLM both load.

Byte-level BPE with every digit its own token: numbers are spelled digit by digit (what a tiny model can learn
arithmetic on), while the fixed English of the prompts (SRPO's localisation request) is merged into a few hundred
word pieces, so a localisation example is ~4x shorter than with characters alone. Byte-level: any text encodes
(a prompt the corpus never showed included) and decodes back exactly. `</step>` is one token, so step boundaries
fall between tokens. No chat template: the testbed preset sets data.use_chat_template=false.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


def build_tokenizer(corpus: Iterable[str], vocab_size: int, out: Path | None = None):
    """Train the BPE on `corpus` (the texts the model will see) up to `vocab_size` tokens, 256 bytes and the
    specials included; return it as a transformers PreTrainedTokenizerFast, saved to `out` when given."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from resetrl.testbed.chain_task import STEP_DELIMITER

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"tokenizer vocab_size {vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS) + 1} "
                         "special tokens a byte-level tokenizer needs; raise it (the testbed default is 512)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),  # one token per digit, never merged
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=byte_alphabet, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Not special: it is part of the response text and must survive decode(skip_special_tokens=True).
    tokenizer.add_tokens([AddedToken(STEP_DELIMITER, normalized=False, special=False)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      clean_up_tokenization_spaces=False, model_max_length=1024)
    if out is not None:
        wrapped.save_pretrained(out)
    return wrapped
