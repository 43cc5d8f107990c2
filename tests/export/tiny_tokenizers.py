"""Tiny SentencePiece-style tokenizers built offline (no hub): Llama-2's and Gemma's shapes.

A BPE is trained with the ``tokenizers`` library on a few sentences (pieces never cross a
``▁``), then laid out as the real vocabularies are (special tokens first, the 256 byte
pieces ``<0x00>``..``<0xFF>`` for byte fallback, then the learned pieces) and handed to
transformers' own ``LlamaTokenizer`` / ``GemmaTokenizer`` classes, which bring the real
normalizer, pre-tokenizer and decoder (Llama: Metaspace with a prefix ``▁``; Gemma: spaces
replaced by ``▁``, no prefix). (Named ``tiny_tokenizers`` so that it cannot shadow the
``tokenizers`` package on pytest's path.)
"""

import json

TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
    "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park "
    "is let at last? The year 1811 was a good one; 3 + 4 = 7.",
    "    indented code:\tdef f(x): return x * 2  # and two  spaces",
]
SAMPLE = ("Mr. Bennet heard it is a truth that the  neighbourhood knows; 42 wives! "
          "Zebra-like éclair 🦙 \t tab")


def _pieces(n_pieces: int, prepend: bool):
    """A trained BPE's learned pieces (id order) and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prepend else "never", split=True)
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=n_pieces,
                                                     show_progress=False))
    model = json.loads(tk.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    return pieces, [tuple(m) if not isinstance(m, str) else tuple(m.split(" "))
                    for m in model["merges"]]


def _layout(specials: list[str], pieces: list[str]) -> dict:
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    return vocab


LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' "
                   "+ m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
                   "{% endif %}{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + "
                  "'\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def llama2_tokenizer(n_pieces: int = 120):
    """A Llama-2-shaped tokenizer: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, bytes 3..258, pieces;
    adds BOS, prefixes a ``▁``. ``len(tok)`` is 259 + the learned pieces."""
    from transformers import LlamaTokenizer

    pieces, merges = _pieces(n_pieces, prepend=True)
    tok = LlamaTokenizer(vocab=_layout(["<unk>", "<s>", "</s>"], pieces), merges=merges,
                         add_bos_token=True, add_eos_token=False)
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


PHI3_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
                 "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|assistant|>\n' }}{% endif %}")


def phi3_tokenizer(n_pieces: int = 120):
    """A Phi-3-shaped tokenizer: Llama-2's vocabulary in the legacy layout (the prefix ``▁``
    and the spaces come from a normalizer, no pre-tokenizer), then ``<|endoftext|>``,
    ``<|assistant|>``, ``<|end|>``, ``<|user|>`` as added special tokens; adds no BOS."""
    from tokenizers import normalizers

    tok = llama2_tokenizer(n_pieces)
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    tok.add_special_tokens({"additional_special_tokens": [
        "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]},
        replace_extra_special_tokens=False)
    tok.add_bos_token = False
    tok.chat_template = PHI3_TEMPLATE
    return tok


def gemma_tokenizer(n_pieces: int = 120):
    """A Gemma-shaped tokenizer: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3,
    ``<mask>`` 4, ``<start_of_turn>`` 5, ``<end_of_turn>`` 6, bytes, pieces; adds BOS, no
    prefix ``▁``; the turn markers are special tokens."""
    from transformers import GemmaTokenizer

    pieces, merges = _pieces(n_pieces, prepend=False)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>",
                "<end_of_turn>"]
    tok = GemmaTokenizer(vocab=_layout(specials, pieces), merges=merges, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": specials[5:]},
                           replace_extra_special_tokens=False)
    tok.chat_template = GEMMA_TEMPLATE
    return tok
