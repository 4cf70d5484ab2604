"""The training corpus: the King James Version of the Bible from Debian's bible-kjv-text package.

    apt-get install bible-kjv      # the `bible` program and its text (bible-kjv-text)

English prose, public domain (the translation dates from 1611; the package's copyright file
says so), 31,102 verses in 1,189 chapters, 4.4 MB, 820,736 words. Every machine of ours gets the
same bytes from Debian's registry, so the fixture can be remade anywhere.

One chapter is one document: its verses, one per line, without the verse numbers. Every 25th
chapter (47 of them, about 4% of the text) is held out from training and from the tokenizer.
"""
import re
import shutil
import subprocess

SYSTEM = "You are a helpful assistant."
HELD_OUT_EVERY = 25


def verses():
    """(book, chapter, verse, text) for every verse, in order."""
    if shutil.which("bible") is None:
        raise SystemExit("the corpus needs Debian's bible-kjv package: apt-get install -y bible-kjv")
    out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    pattern = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")
    result = []
    for line in out.splitlines():
        m = pattern.match(line)
        if m:
            result.append((m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    if len(result) != 31102:
        raise SystemExit(f"expected 31102 verses from `bible`, got {len(result)}")
    return result


def chapters():
    """[(name, [verse texts])] in order."""
    out = []
    for book, chapter, _, text in verses():
        name = f"{book}{chapter}"
        if not out or out[-1][0] != name:
            out.append((name, []))
        out[-1][1].append(text)
    return out


def split():
    """(training chapters, held-out chapters)."""
    all_chapters = chapters()
    train = [c for i, c in enumerate(all_chapters) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [c for i, c in enumerate(all_chapters) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held


def document(chapter):
    return "\n".join(chapter[1]) + "\n"


def conversation(user, assistant, system=SYSTEM):
    """ChatML, as `strun chat` and the chat template write it."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{assistant}<|im_end|>\n")


def conversations(chapter_list):
    """The chat fine-tune: the user says a verse, the assistant answers with the next one or two."""
    out = []
    for _, texts in chapter_list:
        for i in range(len(texts) - 1):
            answer = texts[i + 1] if i % 2 == 0 or i + 2 >= len(texts) else texts[i + 1] + " " + texts[i + 2]
            out.append(conversation(texts[i], answer))
    return out
