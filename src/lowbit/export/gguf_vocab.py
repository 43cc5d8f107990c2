"""The tokenizer of a GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Two kinds, read from a transformers (fast) tokenizer's ``tokenizer.json`` backend:

* GPT-2-style byte-level BPE (Llama 3, SmolLM, Qwen2, Phi-4): ``tokenizer.ggml.model =
  "gpt2"``, tokens, token types, merges, and the pre-tokenizer name llama.cpp knows it by
  (found, as the converter finds it, from the hash of the token ids of a check text);
* SentencePiece (Llama 2, Mistral 7B, Gemma, Phi-3): ``tokenizer.ggml.model = "llama"``,
  pre-tokenizer ``"default"``, tokens as SentencePiece spells them (``▁`` for a space,
  ``<0xNN>`` byte pieces), scores and types; ``[PADn]`` (UNUSED, score -10000) fills ids up
  to the model's vocabulary size. A BPE ``tokenizer.json`` (byte fallback) has no scores:
  each piece gets minus the rank of the merge that makes it (SentencePiece's BPE scores are
  that order, and llama.cpp's tokenizer merges the highest score first), pieces no merge
  makes get 0; a Unigram one has its scores. Types: ``<0xNN>`` BYTE, the unknown token
  UNKNOWN, added special tokens CONTROL, other added tokens USER_DEFINED (``▁`` written as a
  space, score -1000), the rest NORMAL. ``tokenizer.ggml.add_space_prefix`` says whether
  the tokenizer prepends ``▁`` (Llama 2: yes; Gemma: no).

Both: special token ids (bos, eos, unk, pad, sep, cls, mask), add-BOS/EOS flags, chat
template. A tokenizer of another kind is a ConfigError (pass ``tokenizer=None`` for a
vocabulary-less file).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from hashlib import sha256

from lowbit.errors import ConfigError

# sha256 of str(tokenizer.encode(CHKTXT)) -> llama.cpp pre-tokenizer (convert_hf_to_gguf.py)
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
SPECIAL_IDS = ("bos", "eos", "unk", "pad", "sep", "cls", "mask")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def load_tokenizer(tok):
    """``tok`` itself, or the tokenizer saved in folder ``tok`` (local files only)."""
    if isinstance(tok, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tok, local_files_only=True)
    return tok


def _find(node, kind: str):
    """The first pre-tokenizer/normalizer of type ``kind`` in ``node`` (a Sequence or one)."""
    if not isinstance(node, dict):
        return None
    if node.get("type") == kind:
        return node
    for p in (node.get("pretokenizers") or node.get("normalizers") or []):
        hit = _find(p, kind)
        if hit is not None:
            return hit
    return None


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def tokenizer_kind(tj: dict | None) -> str:
    """``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece) for a ``tokenizer.json``;
    ConfigError for any other kind."""
    model = (tj or {}).get("model", {})
    if model.get("type") == "BPE" and _find(tj.get("pre_tokenizer"), "ByteLevel") is not None:
        return "gpt2"
    kind = model.get("type")
    if (kind == "BPE" and model.get("byte_fallback")) or kind == "Unigram":
        return "llama"
    raise ConfigError("GGUF export writes GPT-2-style byte-level BPE tokenizers (Llama 3, "
                      "SmolLM, Qwen2) and SentencePiece ones (BPE with byte fallback or "
                      "Unigram: Llama 2, Mistral 7B, Gemma, Phi-3); this tokenizer "
                      f"({model.get('type')!r} model) is neither. Pass tokenizer=None to "
                      "write the weights with no vocabulary")


def write_vocab(w, tokenizer, n_vocab: int, tokenizer_pre: str | None) -> None:
    """Write ``tokenizer`` (a transformers fast tokenizer, or a folder holding one) into
    GGUFWriter ``w`` for a model with ``n_vocab`` token embeddings; ``None`` writes
    ``tokenizer.ggml.model = "none"``."""
    if tokenizer is None:
        w.add_tokenizer_model("none")
        return
    tok = load_tokenizer(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    tj = json.loads(backend.to_str()) if backend is not None else None
    kind = tokenizer_kind(tj)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ConfigError(f"GGUF export: the tokenizer has token id {max(vocab.values())}, "
                          f"beyond the model's vocab_size {n_vocab}")
    if kind == "gpt2":
        _write_bpe(w, tok, tj, vocab, n_vocab, tokenizer_pre)
    else:
        if tokenizer_pre not in (None, "default"):
            raise ConfigError(f"tokenizer_pre {tokenizer_pre!r}: a SentencePiece vocabulary "
                              "has llama.cpp's pre-tokenizer 'default' only")
        _write_spm(w, tok, tj, n_vocab)
    _write_specials(w, tok, n_vocab)


def _write_bpe(w, tok, tj, vocab, n_vocab, tokenizer_pre) -> None:
    import gguf

    rev = {i: t for t, i in vocab.items()}
    added = dict(getattr(tok, "added_tokens_decoder", {}) or {})
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = rev[i]
        if i in added:
            if getattr(added[i], "special", False) or _looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    if tokenizer_pre is None:
        chk = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
        tokenizer_pre = PRE_TOKENIZERS.get(chk)
        if tokenizer_pre is None:
            warnings.warn(f"GGUF export: unknown BPE pre-tokenizer (hash {chk[:12]}...); "
                          "writing 'default' (pass tokenizer_pre=... to choose llama.cpp's)",
                          stacklevel=5)
            tokenizer_pre = "default"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bl = _find(tj.get("pre_tokenizer"), "ByteLevel")
    if bl is not None and bl.get("add_prefix_space") is not None:
        w.add_add_space_prefix(bool(bl["add_prefix_space"]))


def spm_pieces(tok, tj: dict, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """``(tokens, scores, types)`` of a SentencePiece-style tokenizer (see the module
    documentation), ``n_vocab`` long."""
    import gguf

    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(T.UNUSED)] * n_vocab
    model = tj["model"]
    if model["type"] == "Unigram":
        base = [(p, float(s), i) for i, (p, s) in enumerate(model["vocab"])]
        unk = model.get("unk_id")
    else:
        made = {}
        for r, m in enumerate(model.get("merges", [])):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            made.setdefault(a + b, -float(r))
        base = [(p, made.get(p, 0.0), i) for p, i in model["vocab"].items()]
        unk = model["vocab"].get(model.get("unk_token")) if model.get("unk_token") else None
    if isinstance(getattr(tok, "unk_token_id", None), int):
        unk = tok.unk_token_id
    for piece, score, i in base:
        if i >= n_vocab:
            raise ConfigError(f"GGUF export: the tokenizer has token id {i}, beyond the "
                              f"model's vocab_size {n_vocab}")
        tokens[i], scores[i] = piece, score
        types[i] = int(T.BYTE if _BYTE_PIECE.fullmatch(piece) else
                       T.UNKNOWN if i == unk else T.NORMAL)
    for i, at in sorted((getattr(tok, "added_tokens_decoder", {}) or {}).items()):
        text = str(at.content)
        if i == unk:
            continue
        if getattr(at, "special", False) or _looks_special(text):
            types[i] = int(T.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[i] = int(T.USER_DEFINED)
        tokens[i], scores[i] = text, -1000.0
    return tokens, scores, types


def _space_prefix(tj: dict) -> bool:
    ms = _find(tj.get("pre_tokenizer"), "Metaspace")
    if ms is not None:
        scheme = ms.get("prepend_scheme", "always" if ms.get("add_prefix_space") else "never")
        if scheme in ("first", "always"):
            return True
    pre = _find(tj.get("normalizer"), "Prepend")
    return pre is not None and pre.get("prepend") == "\u2581"


def _write_spm(w, tok, tj, n_vocab) -> None:
    tokens, scores, types = spm_pieces(tok, tj, n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(_space_prefix(tj))


def _write_specials(w, tok, n_vocab) -> None:
    for what in SPECIAL_IDS:
        tid = getattr(tok, f"{what}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            getattr(w, f"add_{what}_token_id")(tid)
    for what, add in (("bos", w.add_add_bos_token), ("eos", w.add_add_eos_token)):
        flag = getattr(tok, f"add_{what}_token", None)
        if not isinstance(flag, bool):
            tid = getattr(tok, f"{what}_token_id", None)
            ids = tok("a")["input_ids"]
            flag = tid is not None and bool(ids) and \
                (ids[0] == tid if what == "bos" else ids[-1] == tid)
        add(flag)
    tmpl = getattr(tok, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        w.add_chat_template(tmpl)


__all__ = ["CHKTXT", "PRE_TOKENIZERS", "load_tokenizer", "spm_pieces", "tokenizer_kind",
           "write_vocab"]
