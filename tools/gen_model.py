#!/usr/bin/env python3
"""gen_model.py - writes Llama-family test models with seeded random weights.

One set of weights, drawn once in float32, can be written as a GGUF file (in
any tensor type sieve runs) and as a Hugging Face model directory (config.json,
safetensors, tokenizer.json), so the two formats can be checked against each
other. The models exist to test loaders and kernels and to measure speed; the
text they generate is noise.

Weights
    numpy.random.default_rng(seed), float32, drawn in this order: token
    embedding [vocab, dim]; for each layer q [heads*hd, dim], k [kv*hd, dim],
    v [kv*hd, dim], o [dim, heads*hd], gate [ffn, dim], up [ffn, dim],
    down [dim, ffn], then (qwen2 only) q/k/v biases; then the output matrix
    [vocab, dim] unless --tied. All are N(0, 0.02); norm weights are 1. Shapes
    are given in the Hugging Face (PyTorch) convention [out, in]; GGUF stores
    the same row-major bytes with ne = [in, out].

Q/K row order and RoPE (what a loader must do)
    safetensors: Hugging Face order for every architecture: the rows of
        q_proj/k_proj of each head are [first halves | second halves], and
        RoPE rotates the pairs (i, i + head_dim/2) ("rotate_half", NeoX style).
    GGUF, llama and mistral: the rows of attn_q/attn_k (and nothing else) are
        permuted exactly as llama.cpp's convert_hf_to_gguf.py does
        (LlamaModel.permute: per head, reshape(2, hd/2).swapaxes), so that
        GGUF row 2i+s of a head is HF row s*hd/2 + i, and RoPE rotates adjacent
        pairs (2i, 2i+1) ("normal" RoPE, kern_rope_f32).
    GGUF, qwen2: NOT permuted (llama.cpp's converter leaves Qwen2 alone and
        runs it with NeoX RoPE): rotate (i, i + hd/2) as for safetensors.
    The q/k biases of qwen2 are likewise in HF order in both outputs.
    With these rules a GGUF and a safetensors output of the same seed compute
    the same function.

Architectures
    llama: general.architecture "llama"; HF LlamaForCausalLM.
    mistral: HF MistralForCausalLM (model_type "mistral", no sliding window).
        llama.cpp writes Mistral models with general.architecture "llama",
        and so do we unless --gguf-arch mistral asks for "mistral" keys.
    qwen2: HF Qwen2ForCausalLM with q/k/v biases (blk.N.attn_q.bias etc.).
    --rope-scaling llama3 adds Llama 3.1's rope_scaling to config.json
    (factor 8, low/high frequency factors 1 and 4, original context 8192) and
    the rope_freqs.weight tensor llama.cpp's converter derives from it.

Tensor types in the GGUF (--type)
    f32, f16, bf16, q8_0, q4_0 (quantized by gguf.quants, byte-exact with
    llama.cpp's reference quantizers), q4_k, q5_k, q6_k (the gguf package can
    only decode K-quants, so this file quantizes them itself with the one-pass
    min/max fit of sieve's C quantizer, kern_quant_row; valid blocks with
    somewhat more error than llama.cpp's iterative search). 1-D tensors (norms,
    biases, rope_freqs) always stay F32, as in llama.cpp. The token embedding
    and the output matrix take --type unless --embd-type / --output-type say
    otherwise. A matrix whose rows are not a multiple of the type's block
    (256 for K-quants, 32 otherwise) falls back to q8_0, or to f16 if its rows
    are not a multiple of 32 either; each fallback is printed.

Tokenizers
    --tokenizer stories (default for GGUF): the SentencePiece vocabulary of
        shared/models/stories260K.gguf copied verbatim (vocab must be 512).
    --tokenizer bpe: a synthetic byte-level BPE: 256 byte tokens (GPT-2 byte
        to unicode mapping), merges learned from a small built-in English text
        with the Llama 3 pre-tokenizer split (most frequent pair first, until
        every word of the text is one token), then <|begin_of_text|> and
        <|end_of_text|> (and <|reserved_N|> fillers if the text runs out of
        merges) - ids 0..vocab-1. In GGUF it is tokenizer.ggml.model "gpt2",
        pre "llama-bpe".
    The safetensors directory always gets the byte-level BPE as tokenizer.json
    (a stories GGUF and its safetensors twin then share weights and ids, not
    the text-to-id mapping: compare them on token ids).

Presets
    synth768      the baseline's model: dim 768, 12 layers, 12 heads, 12 KV
                  heads, FFN 2048, context 4096, vocab 512, seed 1234, llama
    synth768-gqa  the same with 4 KV heads
    tiny          dim 256, 2 layers, 4 heads, 2 KV heads, FFN 512, context 512,
                  vocab 512 (fast; K-quant compatible)
    Explicit options override preset values.

Examples
    tools/gen_model.py --preset synth768 --type f32 --gguf /tmp/synth768-f32.gguf
    tools/gen_model.py --preset synth768-gqa --type f16 --gguf /tmp/synth768-gqa-f16.gguf
    tools/gen_model.py --preset tiny --arch qwen2 --type q4_k --gguf /tmp/t.gguf \\
        --hf /tmp/t-hf --hf-dtype bf16 --shards 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType as QT
    from gguf import quants as gq
except ImportError:  # pragma: no cover
    sys.exit("gen_model.py needs the gguf package: pip install gguf numpy")

QK_K = 256

PRESETS = {
    "synth768": dict(dim=768, layers=12, heads=12, kv_heads=12, ffn=2048, context=4096,
                     vocab=512, seed=1234),
    "synth768-gqa": dict(dim=768, layers=12, heads=12, kv_heads=4, ffn=2048, context=4096,
                         vocab=512, seed=1234),
    "tiny": dict(dim=256, layers=2, heads=4, kv_heads=2, ffn=512, context=512, vocab=512,
                 seed=1),
}

TYPES = {
    "f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0,
    "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K,
}

FILE_TYPE = {  # llama.cpp's LlamaFileType for a file that is "mostly" this type
    QT.F32: 0, QT.F16: 1, QT.Q4_0: 2, QT.Q8_0: 7, QT.Q4_K: 14, QT.Q5_K: 16, QT.Q6_K: 18,
    QT.BF16: 32,
}

# ---------------------------------------------------------------------------
# K-quant encoders (the gguf package decodes these types but cannot encode them)
# Same algorithm as kernels/cpu/quant.c; rounding half away from zero.


def _round(x: np.ndarray) -> np.ndarray:
    return gq.np_roundf(x)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> ggml's 12-byte packing."""
    s = np.empty((sc.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return s


def _fit_k4(x: np.ndarray, nmax: int):
    """One-pass fit of Q4_K/Q5_K: per 32-element sub-block scale (max-min)/nmax and
    offset -min (min clipped to <= 0); 6-bit codes of both against the block's largest."""
    nb = x.shape[0]
    xs = x.reshape(nb, 8, 32)
    mn = np.minimum(xs.min(axis=2), np.float32(0))
    mx = xs.max(axis=2)
    scale = (mx - mn) / np.float32(nmax)
    off = -mn
    d = (scale.max(axis=1) / np.float32(63)).astype(np.float16)
    dmin = (off.max(axis=1) / np.float32(63)).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    dmf = dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.clip(_round(scale / df), 0, 63), 0).astype(np.uint8)
        m = np.where(dmf > 0, np.clip(_round(off / dmf), 0, 63), 0).astype(np.uint8)
        ds = (df * sc.astype(np.float32))[:, :, None]
        dm = (dmf * m.astype(np.float32))[:, :, None]
        q = np.where(ds > 0, np.clip(_round((xs + dm) / ds), 0, nmax), 0).astype(np.uint8)
    return d, dmin, _pack_scales_k4(sc, m), q.reshape(nb, QK_K)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _fit_k4(x, 15)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           scales, qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _fit_k4(x, 31)
    q4 = q.reshape(-1, 4, 2, 32)
    qs = ((q4[:, :, 0, :] & 15) | ((q4[:, :, 1, :] & 15) << 4)).reshape(-1, 128)
    hi = (q.reshape(-1, 8, 32) >> 4).astype(np.uint8)  # bit j of qh[l] = high bit of sub-block j
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= hi[:, j, :] << j
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           scales, qh, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Per 16-element sub-block the symmetric scale max/-32 of the largest-magnitude
    element; int8 codes of the scales against the block's largest."""
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    imax = np.abs(xs).argmax(axis=2)[:, :, None]
    scale = np.take_along_axis(xs, imax, axis=2)[:, :, 0] / np.float32(-32)
    d = (np.abs(scale).max(axis=1) / np.float32(127)).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.clip(_round(scale / df), -128, 127), 0).astype(np.int8)
        ds = (df * sc.astype(np.float32))[:, :, None]
        q = np.where(ds != 0, np.clip(_round(xs / ds), -32, 31), 0).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(nb, 2, 4, 32)  # [half, quarter, l]
    ql = np.concatenate([np.concatenate([(q[:, h, 0] & 15) | ((q[:, h, 2] & 15) << 4),
                                         (q[:, h, 1] & 15) | ((q[:, h, 3] & 15) << 4)], axis=1)
                         for h in range(2)], axis=1)
    qh = np.concatenate([(q[:, h, 0] >> 4) | ((q[:, h, 1] >> 4) << 2) | ((q[:, h, 2] >> 4) << 4)
                         | ((q[:, h, 3] >> 4) << 6) for h in range(2)], axis=1)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


K_ENCODERS = {QT.Q4_K: quantize_q4_k, QT.Q5_K: quantize_q5_k, QT.Q6_K: quantize_q6_k}


def encode(w: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 [rows, cols] -> the array GGUFWriter.add_tensor expects for qtype."""
    if qtype == QT.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == QT.F16:
        return w.astype(np.float16)
    if qtype in K_ENCODERS:
        rows = w.reshape(-1, QK_K)
        out = np.concatenate([K_ENCODERS[qtype](rows[i:i + 65536])
                              for i in range(0, rows.shape[0], 65536)], axis=0)
        return out.reshape(*w.shape[:-1], -1)
    return gq.quantize(w, qtype)


def pick_type(name: str, shape, wanted: QT) -> QT:
    """The requested type, or the fallback when the rows do not divide into blocks."""
    if len(shape) == 1:
        return QT.F32
    cols = shape[-1]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if cols % block == 0:
        return wanted
    fallback = QT.Q8_0 if cols % 32 == 0 else QT.F16
    print(f"gen_model: {name}: rows of {cols} are not a multiple of {block} for "
          f"{wanted.name}; writing {fallback.name}", file=sys.stderr)
    return fallback


# ---------------------------------------------------------------------------
# Weights


class Model:
    def __init__(self, a):
        self.a = a
        self.hd = a.head_dim or a.dim // a.heads
        rng = np.random.default_rng(a.seed)

        def draw(*shape):
            return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

        qd, kvd = a.heads * self.hd, a.kv_heads * self.hd
        self.embed = draw(a.vocab, a.dim)
        self.layers = []
        for _ in range(a.layers):
            L = dict(q=draw(qd, a.dim), k=draw(kvd, a.dim), v=draw(kvd, a.dim),
                     o=draw(a.dim, qd), gate=draw(a.ffn, a.dim), up=draw(a.ffn, a.dim),
                     down=draw(a.dim, a.ffn))
            if a.arch == "qwen2":
                L.update(q_bias=draw(qd), k_bias=draw(kvd), v_bias=draw(kvd))
            L["attn_norm"] = np.ones(a.dim, dtype=np.float32)
            L["ffn_norm"] = np.ones(a.dim, dtype=np.float32)
            self.layers.append(L)
        self.norm = np.ones(a.dim, dtype=np.float32)
        self.output = None if a.tied else draw(a.vocab, a.dim)

    def rope_factors(self):
        """Llama 3.1 rope frequency factors, as convert_hf_to_gguf computes them."""
        a = self.a
        factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
        freqs = 1.0 / (a.rope_base ** (np.arange(0, self.hd, 2, dtype=np.float32) / self.hd))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(1.0)
            elif wavelen > low_wavelen:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1.0 / ((1 - smooth) / factor + smooth))
        return np.array(out, dtype=np.float32)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order of q/k (convert_hf_to_gguf.py LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------------------
# Tokenizers

CORPUS = """Once upon a time, there was a little girl named Lily. She loved to play
outside in the park with her friends. One day, she saw a big red ball under a tree.
She ran to the ball and picked it up. "Look what I found!" she said to her mom.
Her mom smiled and said, "That is a very nice ball. Can you share it with your
friends?" Lily nodded and ran back to the park. They played with the ball all day
long, and when the sun went down they were tired and happy. The next morning, Tom
the dog wanted to play too. He barked and jumped and wagged his tail. Lily laughed
and threw the ball far away. Tom ran after it as fast as he could. It was the best
day ever. They had 3 apples, 12 cookies and 100 stars in the sky. The end.
"""

# Llama 3's pre-tokenizer regex, and an ASCII-only equivalent for training here.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_ASCII_SPLIT = re.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}|"
                          r" ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class BpeTokenizer:
    BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

    def __init__(self, vocab_size: int):
        if vocab_size < 258:
            sys.exit("gen_model: the byte-level BPE tokenizer needs a vocabulary of at least 258")
        b2u = byte_to_unicode()
        self.tokens = [b2u[b] for b in range(256)]
        n_merges = vocab_size - 256 - 2
        words = Counter("".join(b2u[b] for b in m.group(0).encode("utf-8"))
                        for m in _ASCII_SPLIT.finditer(CORPUS))
        seqs = {w: list(w) for w in words}
        self.merges = []
        known = set(self.tokens)
        while len(self.merges) < n_merges:
            pairs = Counter()
            for w, f in words.items():
                s = seqs[w]
                for i in range(len(s) - 1):
                    pairs[(s[i], s[i + 1])] += f
            if not pairs:
                break
            best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # ties: deterministic
            (x, y), _ = best
            merged = x + y
            self.merges.append(f"{x} {y}")
            if merged not in known:
                self.tokens.append(merged)
                known.add(merged)
            for w in words:
                s, out, i = seqs[w], [], 0
                while i < len(s):
                    if i + 1 < len(s) and s[i] == x and s[i + 1] == y:
                        out.append(merged)
                        i += 2
                    else:
                        out.append(s[i])
                        i += 1
                seqs[w] = out
        self.n_normal = len(self.tokens)
        fill = vocab_size - 2 - len(self.tokens)
        self.tokens += [f"<|reserved_{i}|>" for i in range(fill)]
        self.tokens += [self.BOS, self.EOS]
        self.bos, self.eos = vocab_size - 2, vocab_size - 1
        assert len(self.tokens) == vocab_size

    def is_special(self, i: int) -> bool:
        return i >= self.n_normal

    def to_gguf(self, w: gguf.GGUFWriter):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(self.tokens)
        w.add_token_types([3 if self.is_special(i) else 1 for i in range(len(self.tokens))])
        w.add_token_merges(self.merges)
        w.add_bos_token_id(self.bos)
        w.add_eos_token_id(self.eos)
        w.add_add_bos_token(True)

    def tokenizer_json(self) -> dict:
        added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False,
                      normalized=False, special=True)
                 for i, t in enumerate(self.tokens) if self.is_special(i)]
        bos = {"SpecialToken": {"id": self.BOS, "type_id": 0}}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False}]},
            "post_processor": {"type": "TemplateProcessing",
                               "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                        {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {self.BOS: {"id": self.BOS, "ids": [self.bos],
                                                             "tokens": [self.BOS]}}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(self.tokens)
                                if not self.is_special(i)},
                      "merges": self.merges},
        }


def shared_dir() -> Path:
    env = os.environ.get("SIEVE_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared"


def copy_stories_tokenizer(w: gguf.GGUFWriter, vocab: int):
    path = shared_dir() / "models" / "stories260K.gguf"
    if not path.exists():
        sys.exit(f"gen_model: {path} not found (set SIEVE_SHARED_DIR, or use --tokenizer bpe)")
    r = gguf.GGUFReader(str(path))
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    if len(toks) != vocab:
        sys.exit(f"gen_model: the stories tokenizer has {len(toks)} tokens but --vocab is "
                 f"{vocab} (use --vocab {len(toks)} or --tokenizer bpe)")
    w.add_tokenizer_model(r.fields["tokenizer.ggml.model"].contents())
    w.add_token_list(toks)
    w.add_token_scores(r.fields["tokenizer.ggml.scores"].contents())
    w.add_token_types(r.fields["tokenizer.ggml.token_type"].contents())
    for key, add in (("unknown", w.add_unk_token_id), ("bos", w.add_bos_token_id),
                     ("eos", w.add_eos_token_id), ("seperator", w.add_sep_token_id),
                     ("padding", w.add_pad_token_id)):
        f = r.fields.get(f"tokenizer.ggml.{key}_token_id")
        if f is not None:
            add(int(f.contents()))
    return (int(r.fields["tokenizer.ggml.bos_token_id"].contents()),
            int(r.fields["tokenizer.ggml.eos_token_id"].contents()))


# ---------------------------------------------------------------------------
# GGUF


def write_gguf(m: Model, path: str):
    a = m.a
    arch = a.gguf_arch or ("qwen2" if a.arch == "qwen2" else "llama")
    wtype, etype, otype = TYPES[a.type], TYPES[a.embd_type or a.type], TYPES[a.output_type or a.type]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(a.name)
    w.add_file_type(FILE_TYPE[wtype])
    if wtype not in (QT.F32, QT.F16, QT.BF16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(a.vocab)
    w.add_context_length(a.context)
    w.add_embedding_length(a.dim)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ffn)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(m.hd)
    w.add_rope_freq_base(a.rope_base)
    w.add_layer_norm_rms_eps(a.norm_eps)
    if a.head_dim and a.head_dim != a.dim // a.heads:
        w.add_key_length(m.hd)
        w.add_value_length(m.hd)
    if a.tokenizer == "stories":
        copy_stories_tokenizer(w, a.vocab)
    else:
        BpeTokenizer(a.vocab).to_gguf(w)

    types_used = Counter()

    def put(name, t, want):
        qt = pick_type(name, t.shape, want)
        data = encode(t, qt)
        if qt in (QT.F32, QT.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
        types_used[qt.name] += 1

    permute = arch != "qwen2"
    put("token_embd.weight", m.embed, etype)
    if a.rope_scaling == "llama3":
        put("rope_freqs.weight", m.rope_factors(), QT.F32)
    for i, L in enumerate(m.layers):
        p = f"blk.{i}."
        put(p + "attn_norm.weight", L["attn_norm"], QT.F32)
        put(p + "attn_q.weight", permute_qk(L["q"], a.heads) if permute else L["q"], wtype)
        put(p + "attn_k.weight", permute_qk(L["k"], a.kv_heads) if permute else L["k"], wtype)
        put(p + "attn_v.weight", L["v"], wtype)
        if "q_bias" in L:
            put(p + "attn_q.bias", L["q_bias"], QT.F32)
            put(p + "attn_k.bias", L["k_bias"], QT.F32)
            put(p + "attn_v.bias", L["v_bias"], QT.F32)
        put(p + "attn_output.weight", L["o"], wtype)
        put(p + "ffn_norm.weight", L["ffn_norm"], QT.F32)
        put(p + "ffn_gate.weight", L["gate"], wtype)
        put(p + "ffn_up.weight", L["up"], wtype)
        put(p + "ffn_down.weight", L["down"], wtype)
    put("output_norm.weight", m.norm, QT.F32)
    if m.output is not None:
        put("output.weight", m.output, otype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = os.path.getsize(path)
    print(f"gen_model: wrote {path} ({size / 1e6:.1f} MB, arch {arch}, tensors "
          + ", ".join(f"{k} x{v}" for k, v in sorted(types_used.items())) + ")")


# ---------------------------------------------------------------------------
# Hugging Face directory

ST_DTYPE = {"f32": ("F32", np.float32), "f16": ("F16", np.float16), "bf16": ("BF16", None)}


def st_bytes(t: np.ndarray, dtype: str) -> bytes:
    if dtype == "bf16":
        return gq.quantize(np.ascontiguousarray(t, dtype=np.float32), QT.BF16).tobytes()
    return np.ascontiguousarray(t, dtype=ST_DTYPE[dtype][1]).tobytes()


def write_safetensors(path: Path, tensors: list, dtype: str):
    header, blobs, off = {}, [], 0
    for name, t in tensors:
        b = st_bytes(t, dtype)
        header[name] = {"dtype": ST_DTYPE[dtype][0], "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return off


def hf_tensors(m: Model) -> list:
    out = [("model.embed_tokens.weight", m.embed)]
    for i, L in enumerate(m.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", L["attn_norm"]),
                (p + "self_attn.q_proj.weight", L["q"]),
                (p + "self_attn.k_proj.weight", L["k"]),
                (p + "self_attn.v_proj.weight", L["v"])]
        if "q_bias" in L:
            out += [(p + "self_attn.q_proj.bias", L["q_bias"]),
                    (p + "self_attn.k_proj.bias", L["k_bias"]),
                    (p + "self_attn.v_proj.bias", L["v_bias"])]
        out += [(p + "self_attn.o_proj.weight", L["o"]),
                (p + "post_attention_layernorm.weight", L["ffn_norm"]),
                (p + "mlp.gate_proj.weight", L["gate"]),
                (p + "mlp.up_proj.weight", L["up"]),
                (p + "mlp.down_proj.weight", L["down"])]
    out.append(("model.norm.weight", m.norm))
    if m.output is not None:
        out.append(("lm_head.weight", m.output))
    return out


def hf_config(m: Model, tok: BpeTokenizer, dtype: str) -> dict:
    a = m.a
    arch_class = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}[a.arch]
    c = {
        "architectures": [arch_class],
        "model_type": a.arch,
        "hidden_size": a.dim,
        "intermediate_size": a.ffn,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": m.hd,
        "max_position_embeddings": a.context,
        "rms_norm_eps": a.norm_eps,
        "rope_theta": a.rope_base,
        "rope_scaling": None,
        "vocab_size": a.vocab,
        "tie_word_embeddings": bool(a.tied),
        "hidden_act": "silu",
        "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
        "bos_token_id": tok.bos,
        "eos_token_id": tok.eos,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if a.arch == "llama":
        c.update(attention_bias=False, mlp_bias=False)
    if a.arch == "mistral":
        c.update(sliding_window=None)
    if a.arch == "qwen2":
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=a.layers)
    if a.rope_scaling == "llama3":
        c["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return c


def write_hf(m: Model, out_dir: str):
    a = m.a
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    dtype = a.hf_dtype or (a.type if a.type in ("f16", "bf16") else "f32")
    tok = BpeTokenizer(a.vocab)
    tensors = hf_tensors(m)
    if a.shards <= 1:
        total = write_safetensors(d / "model.safetensors", tensors, dtype)
        files = ["model.safetensors"]
    else:
        n = min(a.shards, len(tensors))
        elem = 2 if dtype != "f32" else 4
        target = sum(t.size for _, t in tensors) * elem / n
        groups, cur, cur_bytes = [], [], 0
        for name, t in tensors:  # consecutive tensors, cut when a shard reaches its share
            if cur and cur_bytes >= target and len(groups) < n - 1:
                groups.append(cur)
                cur, cur_bytes = [], 0
            cur.append((name, t))
            cur_bytes += t.size * elem
        groups.append(cur)
        files, weight_map, total = [], {}, 0
        for i, g in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            total += write_safetensors(d / fname, g, dtype)
            files.append(fname)
            weight_map.update({name: fname for name, _ in g})
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (d / "config.json").write_text(json.dumps(hf_config(m, tok, dtype), indent=2) + "\n")
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos, "eos_token_id": tok.eos}, indent=2) + "\n")
    (d / "tokenizer.json").write_text(json.dumps(tok.tokenizer_json(), ensure_ascii=False,
                                                  indent=1) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tok.BOS, "eos_token": tok.EOS, "add_bos_token": True,
         "model_max_length": a.context, "tokenizer_class": "PreTrainedTokenizerFast"},
        indent=2) + "\n")
    print(f"gen_model: wrote {d}/ ({total / 1e6:.1f} MB of {dtype} weights in "
          f"{', '.join(files)}; byte-level BPE tokenizer, {len(tok.merges)} merges)")


# ---------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for layouts and conventions.")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--arch", choices=["llama", "mistral", "qwen2"], default="llama")
    for k in ("dim", "layers", "heads", "kv-heads", "ffn", "vocab", "context", "seed",
              "head-dim"):
        p.add_argument("--" + k, type=int)
    p.add_argument("--rope-base", type=float, default=None,
                   help="RoPE base (default 10000, qwen2 1000000)")
    p.add_argument("--norm-eps", type=float, default=1e-5)
    p.add_argument("--rope-scaling", choices=["none", "llama3"], default="none")
    p.add_argument("--tied", action="store_true", help="share the embedding as the output matrix")
    p.add_argument("--type", choices=sorted(TYPES), default="f32", help="GGUF matrix type")
    p.add_argument("--embd-type", choices=sorted(TYPES), help="GGUF token_embd type (default --type)")
    p.add_argument("--output-type", choices=sorted(TYPES), help="GGUF output type (default --type)")
    p.add_argument("--tokenizer", choices=["stories", "bpe"], default="stories",
                   help="GGUF tokenizer (safetensors always get the BPE one)")
    p.add_argument("--gguf-arch", help="override general.architecture (e.g. mistral)")
    p.add_argument("--name", help="general.name")
    p.add_argument("--gguf", help="write a GGUF file here")
    p.add_argument("--hf", help="write a Hugging Face model directory here")
    p.add_argument("--hf-dtype", choices=sorted(ST_DTYPE), help="safetensors dtype "
                   "(default f16/bf16 when --type is, else f32)")
    p.add_argument("--shards", type=int, default=1, help="safetensors files (index when > 1)")
    a = p.parse_args(argv)
    base = dict(PRESETS["tiny"])
    if a.preset:
        base.update(PRESETS[a.preset])
    for k in ("dim", "layers", "heads", "kv_heads", "ffn", "vocab", "context", "seed"):
        if getattr(a, k) is None:
            setattr(a, k, base[k])
    if a.rope_base is None:
        a.rope_base = 1000000.0 if a.arch == "qwen2" else 10000.0
    if a.name is None:
        a.name = f"{a.preset or 'synthetic'}-{a.arch}-{a.type}"
    if not a.gguf and not a.hf:
        p.error("nothing to write: give --gguf PATH and/or --hf DIR")
    if a.heads <= 0 or a.kv_heads <= 0 or a.heads % a.kv_heads:
        p.error("--heads must be a positive multiple of --kv-heads")
    hd = a.head_dim or (a.dim // a.heads if a.dim % a.heads == 0 else 0)
    if hd <= 0 or hd % 2:
        p.error("head size must be a positive even number (dim / heads, or --head-dim)")
    if min(a.dim, a.layers, a.ffn, a.vocab, a.context) <= 0 or a.shards < 1:
        p.error("sizes must be positive")
    a.rope_scaling = None if a.rope_scaling == "none" else a.rope_scaling
    return a


def main(argv=None):
    a = parse_args(argv if argv is not None else sys.argv[1:])
    m = Model(a)
    if a.gguf:
        write_gguf(m, a.gguf)
    if a.hf:
        write_hf(m, a.hf)


if __name__ == "__main__":
    main()
