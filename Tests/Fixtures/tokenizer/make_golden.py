#!/usr/bin/env python3
"""Golden encodings of a hard corpus with the Hugging Face `tokenizers` library.

    pip install tokenizers && python3 Tests/Fixtures/tokenizer/make_golden.py

Reads Tests/Fixtures/qwen-tokenizer/tokenizer.json and writes golden.json beside this script:
[{"text", "ids", "decoded"}], where decoded = decode(ids) with special tokens kept.
"""
import json
import os
import random

from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "qwen-tokenizer", "tokenizer.json")


def corpus():
    texts = [
        "", " ", "  ", "\t", "\n", "\r\n", "\n\n\n", " \n ", "a", "Hello, world!",
        "Hello world", " Hello world ", "  leading and trailing  ", "\tTabbed\tline\t",
        "Multiple   spaces    between     words", "Line one\nLine two\r\nLine three\rLine four",
        "Trailing newline\n", "\n\nLeading newlines", "   \n   indented\n\tblock\n",
        # contractions in mixed case
        "I'm sure you'll see they've done what we'd said, it's John's.",
        "I'M SURE YOU'LL SEE THEY'VE DONE WHAT WE'D SAID, IT'S JOHN'S.",
        "iT'S wE'Re yOu'Ll tHeY'vE sHe'D i'M dOn'T", "'s 't 're 've 'm 'll 'd 'x '", "don't won't can't shan't y'all",
        "the ſ in 'ſ long s", "rock'n'roll o'clock 'quoted' \"double\"",
        # digits
        "1234567890", "3.14159", "1,000,000", "2025-07-01T12:34:56Z", "v1.2.3-beta+001", "x1y22z333",
        "٠١٢٣٤٥٦٧٨٩ Arabic-Indic digits", "१२३ Devanagari digits", "Ⅻ roman numeral ⅻ", "½ ¾ ² ³ ①②③",
        # scripts and languages
        "Привет, мир! Как дела?", "Γειά σου Κόσμε", "שלום עולם", "مرحبا بالعالم", "नमस्ते दुनिया",
        "你好，世界！这是一个测试。", "こんにちは世界、カタカナとひらがな。", "안녕하세요 세계", "ภาษาไทยไม่มีช่องว่าง",
        "Tiếng Việt có dấu: Đường phố", "Ελληνικά και English mixed 中文 too",
        "ᚠᚢᚦᚨᚱᚲ runes", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉", "ﬁ ﬂ ligatures",
        # emoji
        "😀😃😄", "👍🏽 thumbs up with skin tone", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "🇺🇸🇫🇷🇯🇵 flags",
        "❤️ heart with VS16", "keycap 1️⃣ #️⃣", "🧑🏿‍🚀 astronaut", "emoji🙂inside😉words",
        # combining marks and NFC
        "e\u0301 vs \u00e9", "A\u030a ring vs \u00c5", "\u1e9b\u0323", "o\u0308\u0304 stacked", "Zalgo: Z\u0351\u0364\u036ba\u0350l\u0352g\u0357o",
        "\u212b angstrom sign", "\u2126 ohm sign", "\uff21\uff22\uff23 fullwidth", "Hangul jamo \u1100\u1161\u11a8",
        "n\u0303 ñ \u0303 lone combining", "\u0645\u064e\u0631\u0652\u062d\u064e\u0628\u064b\u0627",
        # punctuation runs and symbols
        "!!!???...", "Wait... what?!", "--- *** ___ ===", "\"quotes\" 'single' `back`", "(parens) [brackets] {braces} <angles>",
        "a+b=c; x*y/z; 100% & more", "@user #hashtag $100 ^caret ~tilde |pipe \\backslash",
        "…—–‘’“”«»", "¡Hola! ¿Qué tal?", "price: €10, £20, ¥30, ₹40",
        # code
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "<div class=\"x\">Hello</div>", "SELECT * FROM t WHERE a = 'b' AND c <> 1;",
        "let json = {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}", "    indented = True\n        more = False",
        "x=1;y=2\n\n\n\nz=3", "#!/usr/bin/env bash\nset -euo pipefail\n", "https://example.com/path?q=1&r=2#frag",
        # special tokens inside text
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more text",
        "<|im_start|><|im_end|>", "not special: <|im_start |> <im_start> <|unknown|>", "<|endoftext|><|endoftext|>",
        "nested <|im_start|>system\nYou are a helpful assistant.<|im_end|>", "<think>\nreasoning\n</think>\n\nanswer",
        # whitespace oddities
        "\u00a0non-breaking\u00a0space", "em\u2003space and thin\u2009space", "zero\u200bwidth\u200bspace", "\u3000ideographic space",
        "\u2028line separator\u2029paragraph", "\x0bvertical tab\x0cform feed", "\u0085next line", "mixed \t \n \r\n \t end",
        "word\u00adsoft\u00adhyphen", "a\u200db zero width joiner", "\ufeffBOM at start",
    ]
    rng = random.Random(7)
    pool = [t for t in texts if t]
    for _ in range(20):
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(2, 5))))
    # Random code points from many blocks.
    for _ in range(10):
        texts.append("".join(chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0xa0, 0x2fff), rng.randint(0x3000, 0x9fff),
                                             rng.randint(0x1f300, 0x1faff)])) for _ in range(40)))
    return texts


def main():
    tok = Tokenizer.from_file(TOKENIZER)
    cases = []
    for text in corpus():
        ids = tok.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    with open(os.path.join(HERE, "golden.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizers_version": __import__("tokenizers").__version__, "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
