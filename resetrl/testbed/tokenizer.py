"""A tiny tokenizer for the chain testbed, built with the `tokenizers` library and saved as a Hugging Face folder
(PreTrainedTokenizerFast) that transformers and vLLM both load.

Character-level BPE with every digit its own token: numbers are spelled digit by digit (what a tiny model can learn
arithmetic on), while the fixed English of the prompts (SRPO's localisation request) is merged into word pieces,
so a localisation example is ~3x shorter than in characters. Its alphabet is the printable ASCII characters plus
every character of the training corpus, and each token is whole characters: text in that alphabet decodes back
exactly, and vLLM's incremental detokenizer and transformers' decode always agree (a byte-level vocabulary lets a
model emit half a UTF-8 character, which the two render differently). A character outside the alphabet encodes
as <unk>. `</step>` is one token, so step boundaries fall between tokens. No chat template: the testbed preset
sets data.use_chat_template=false.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Pre-tokens, which BPE merges never cross: one digit; a word or a punctuation run, with the space before it;
# other whitespace runs.
_PIECES = r"\d| ?[^\W\d_]+| ?[^\w\s]+|\s+"


def build_tokenizer(corpus: Iterable[str], vocab_size: int, out: Path | None = None):
    """Train the BPE on `corpus` (the texts the model will see) up to `vocab_size` tokens (fewer when the corpus
    runs out of merges), specials included; return it as a transformers PreTrainedTokenizerFast, saved to `out`
    when given."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from resetrl.testbed.chain_task import STEP_DELIMITER

    alphabet = sorted(set(string.printable) - set("\x0b\x0c"))
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"tokenizer vocab_size {vocab_size} is below the {len(alphabet)} printable characters + "
                         f"{len(SPECIAL_TOKENS) + 1} special tokens it needs; raise it (the testbed default is 1024)")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # tokens are literal text: concatenate them
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Not special: it is part of the response text and must survive decode(skip_special_tokens=True).
    tokenizer.add_tokens([AddedToken(STEP_DELIMITER, normalized=False, special=False)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      unk_token=UNK, clean_up_tokenization_spaces=False, model_max_length=1024)
    if out is not None:
        wrapped.save_pretrained(out)
    return wrapped
