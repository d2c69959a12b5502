"""Kimi-K2 / Moonlight tokenizers: `tiktoken.model` + `tokenizer_config.json` (no tokenizer.json), read with tiktoken.

The directory is made in-test the way Moonshot ships it: ranks trained here by plain BPE over Kimi's split pattern
(`base64(token) rank` lines), 256 special ids after the base vocabulary, named ones in `added_tokens_decoder`, and
Moonlight's chat template in tokenizer_config.json. The oracle is an independent pure-Python BPE (the `regex`
module's split in V1 mode, which reads the pattern's class intersections `[...&&[^\\p{Han}]]`, then repeated
lowest-rank merges) on the same ranks; a tiny kimi_k2 model then chats through it.
"""

from __future__ import annotations

import base64
import json
from collections import Counter

import pytest
import regex

from dsv3.io.tiktoken_tokenizer import KIMI_PATTERN, MAX_RUN_CHARS, TiktokenError
from dsv3.io.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS = """Hello world, hello there! It's a small world after all. The quick brown fox jumps over the lazy dog.
Kimi is a model made by Moonshot AI. Moonshot trained Kimi K2 on many tokens; the model answers questions.
你好世界。月之暗面训练了一个模型。这是一个测试。中文文本和英文文本混合在一起。模型模型模型。
def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n
Numbers 1234567890 and 3.14159; naïve café résumé ÉCOLE. I'll we've they're don't\n\n\n   spaced   out\t\ttabs
""" * 3
NAMED = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 10: "<|im_system|>",
         17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]"}
MOONLIGHT_TEMPLATE = (
    "{%- for message in messages -%}{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>{%- endif -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>{%- endif -%}{%- if message['role'] == 'user' -%}<|im_user|>{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}<|im_assistant|>{%- endif -%}"
    "{{ message['role'] }}<|im_middle|>{{message['content']}}<|im_end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")


def train_ranks(text: str, merges: int) -> dict[bytes, int]:
    """Byte-level BPE over Kimi's pre-tokens: 256 byte tokens, then the most frequent adjacent pair, `merges` times."""
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(KIMI_PATTERN, text, flags=regex.V1))
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        new = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return ranks


def bpe_oracle(text: str, ranks: dict[bytes, int], specials: dict[str, int]) -> list[int]:
    """tiktoken's algorithm written out: specials split first, Kimi's regex, then lowest-rank pair merges."""
    out = []
    parts = regex.split("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")", text)
    for part in parts:
        if part in specials:
            out.append(specials[part])
            continue
        for word in regex.findall(KIMI_PATTERN, part, flags=regex.V1):
            toks = [bytes([b]) for b in word.encode()]
            while len(toks) > 1:
                best = min(range(len(toks) - 1), key=lambda i: ranks.get(toks[i] + toks[i + 1], float("inf")))
                if toks[best] + toks[best + 1] not in ranks:
                    break
                toks[best:best + 2] = [toks[best] + toks[best + 1]]
            out.extend(ranks[t] for t in toks)
    return out


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kimi")
    ranks = train_ranks(CORPUS, 300)
    (d / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    base = len(ranks)
    config = {"added_tokens_decoder": {str(base + i): {"content": c, "special": True, "lstrip": False, "rstrip": False,
                                                         "normalized": False, "single_word": False} for i, c in NAMED.items()},
              "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
              "chat_template": MOONLIGHT_TEMPLATE, "tokenizer_class": "TikTokenTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [base + 1, base + 2]}))
    return d, ranks


TEXTS = ["Hello world, it's Kimi!", "你好世界，模型。Mixed 中文 and English", "def f(x):\n    return x  # ok\n\n\n",
         "12345678 3.14 ÉCOLE naïve", "   leading spaces\t\ttabs  ", "<|im_user|>user<|im_middle|>hi<|im_end|>", ""]


def test_encoding_matches_an_independent_bpe(kimi_dir):
    d, ranks = kimi_dir
    tok = Tokenizer.from_dir(d)
    base = len(ranks)
    specials = {c: base + i for i, c in NAMED.items()}
    for text in TEXTS + [CORPUS]:
        assert tok.encode(text) == bpe_oracle(text, ranks, specials), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.vocab_size == base + 256
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (base, base + 1, base + 255)
    assert tok.stop_token_ids == [base + 1, base + 2]
    assert tok.token_to_id("<|reserved_token_%d|>" % (base + 5)) == base + 5
    assert tok.decode(tok.encode("<|im_end|>hi")) == "hi"  # specials skipped when decoding by default
    assert tok.id_to_token(ranks["Hello".encode()]) == "Hello" and tok.id_to_token(ranks[" world".encode()]) == "Ġworld"


def test_long_runs_are_cut_as_kimi_cuts_them(kimi_dir):
    d, ranks = kimi_dir
    tok = Tokenizer.from_dir(d)
    text = "a" * (MAX_RUN_CHARS + 10) + " b"
    specials = {c: len(ranks) + i for i, c in NAMED.items()}
    ids = tok.encode(text)
    assert ids == bpe_oracle("a" * MAX_RUN_CHARS, ranks, specials) + bpe_oracle("a" * 10 + " b", ranks, specials)


def test_chat_template_and_streaming(kimi_dir):
    d, _ = kimi_dir
    tok = Tokenizer.from_dir(d)
    msgs = [{"role": "user", "content": "你好 Kimi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user<|im_middle|>"
                    "你好 Kimi<|im_end|><|im_assistant|>assistant<|im_middle|>")
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids[0] == tok.token_to_id("<|im_system|>")
    detok = IncrementalDetokenizer(tok)
    target = tok.encode("模型 answers 你好!")
    assert "".join(detok.push(i) for i in target) + detok.flush() == "模型 answers 你好!"


def test_without_a_template_the_bundled_kimi_one_is_used(kimi_dir, tmp_path):
    d, _ = kimi_dir
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    text = Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_malformed_files_are_one_line_errors(kimi_dir, tmp_path):
    d, _ = kimi_dir
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tiktoken.model").write_text("not base64!! 0\n")
    with pytest.raises(TiktokenError, match="line 1 is not"):
        Tokenizer.from_dir(tmp_path)


def test_a_kimi_k2_model_chats_through_it(kimi_dir, tmp_path):
    """A tiny kimi_k2 model whose vocabulary is the tiktoken one: generate and chat run end to end."""
    import torch

    from dsv3 import LLM, SamplingParams
    from dsv3.config import ModelConfig
    from dsv3.io.checkpoint import save_model
    from dsv3.models.deepseek_v3 import DeepseekV3ForCausalLM
    from tiny_model import TINY

    d, ranks = kimi_dir
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    base = len(ranks)
    cfg = ModelConfig.from_dict({**TINY, "model_type": "kimi_k2", "vocab_size": base + 256, "bos_token_id": base,
                                 "eos_token_id": base + 1, "num_nextn_predict_layers": 0})
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights(std=0.2)
    save_model(model, tmp_path)
    llm = LLM(tmp_path)
    out = llm.chat([{"role": "user", "content": "你好"}], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6
    assert out[0].prompt_token_ids[-1] == base + 17  # <|im_middle|> closes the generation prompt


def test_structured_output_grammar_builds_over_the_tiktoken_vocabulary(kimi_dir):
    """The server's xgrammar backend reads the raw byte tokens (specials as empty, never text) and constrains to JSON."""
    from dsv3.serve.structured import GrammarBackend

    d, ranks = kimi_dir
    tok = Tokenizer.from_dir(d)
    g = GrammarBackend(tok, tok.vocab_size, tok.stop_token_ids)  # (its compiler pool is started by the server only)
    assert g.info.vocab_size == tok.vocab_size
    decoded = g.info.decoded_vocab
    assert decoded[ranks[b"Hello"]] == b"Hello" and decoded[len(ranks)] == b""
    assert bool(g.control[ranks[b"\n"]]) and not bool(g.control[ranks[b"Hello"]])
