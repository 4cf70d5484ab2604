#!/usr/bin/env python3
"""A tiny Qwen2-style tokenizer (same pipeline, 500 ids) for the tiny fixture models, whose
vocabulary has 512 entries: lets the command-line tests run text in, text out.

    pip install tokenizers && python3 Tests/Fixtures/tokenizer/make_tiny.py

Writes Tests/Fixtures/tiny-tokenizer/{tokenizer.json, tokenizer_config.json}.
"""
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tiny-tokenizer")
PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TEXT = """You are a helpful assistant. The user asks a question and the assistant answers it.
SmallThinker is a family of mixture-of-experts language models designed for local devices.
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris.
def main():\n    print("hello world")\n    return 0\n
The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:
""" * 20


def main():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    os.makedirs(OUT, exist_ok=True)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "add_bos_token": False, "bos_token": None}, f, indent=1)
    print("vocab", tok.get_vocab_size(), [tok.token_to_id(s) for s in SPECIAL])


if __name__ == "__main__":
    main()
