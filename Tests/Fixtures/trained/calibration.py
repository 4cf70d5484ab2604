"""calibration-sample.txt: calibration text for `strun imatrix`, from the training chapters.

Whole chapters spread over the Bible (every 50th chapter from the 13th), none of them held out,
so that an importance matrix collected on this file is judged on held-out-sample.txt without
having seen it. About 8,000 tokens through the fixture's tokenizer.

    apt-get install -y bible-kjv && pip install tokenizers
    python3 calibration.py
"""
import os

from tokenizers import Tokenizer

from corpus import HELD_OUT_EVERY, chapters, document

HERE = os.path.dirname(os.path.abspath(__file__))
BUDGET = 8000


def main():
    tok = Tokenizer.from_file(os.path.join(HERE, "trained-21b-like", "tokenizer.json"))
    text, tokens = "", 0
    for i, chapter in enumerate(chapters()):
        if i % 50 != 12:
            continue
        assert i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1  # a training chapter
        doc = document(chapter)
        n = len(tok.encode(doc).ids)
        if tokens + n > BUDGET:
            break
        text, tokens = text + doc, tokens + n
    with open(os.path.join(HERE, "calibration-sample.txt"), "w") as f:
        f.write(text)
    print(f"calibration-sample.txt: {tokens} tokens, {len(text)} bytes")


if __name__ == "__main__":
    main()
