#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/corpus/<target>/.

Standard library only. The files are small and committed; run this again after changing
the input format of a target (each target's header comment documents it). GGUF seeds are
synthetic files built here byte by byte (every value type, arrays, tensors of several
types, tokenizer vocabularies) plus truncations and classic corruptions of them; the stop
seeds use stories260K token ids from $SIEVE_SHARED_DIR/golden so that stop strings meet
real text. test_malformed.py starts the server on the GGUF seeds as malformed models.

Usage: tests/fuzz/make_corpus.py [--out DIR]
"""
import argparse
import hashlib
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))


def shared_dir():
    return os.environ.get("SIEVE_SHARED_DIR") or os.path.normpath(os.path.join(ROOT, "..", "shared"))


# ---- GGUF writer --------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
          BOOL: "<B", U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0 = 0, 1, 2, 8
BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q4_0: (32, 18), GGML_Q8_0: (32, 34)}


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gvalue(t, v):
    if t == STR:
        return gstr(v)
    if t == ARR:
        et, items = v
        out = struct.pack("<IQ", et, len(items))
        return out + b"".join(gvalue(et, x) for x in items)
    return struct.pack(SCALAR[t], v)


def gguf(kvs=(), tensors=(), version=3, alignment=32):
    """kvs: (key, type, value); tensors: (name, dims, ggml type). Tensor data is a
    deterministic byte pattern."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, t, v in kvs:
        out += gstr(key) + struct.pack("<I", t) + gvalue(t, v)
    offset, sizes = 0, []
    for name, dims, gt in tensors:
        n = 1
        for d in dims:
            n *= d
        block, nbytes = BLOCK[gt]
        size = n // block * nbytes
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", gt, offset)
        sizes.append(size)
        offset += (size + alignment - 1) // alignment * alignment
    if tensors:
        out += b"\0" * ((-len(out)) % alignment)
        for size in sizes:
            out += bytes((i * 7 + 3) & 0xFF for i in range(size))
            out += b"\0" * ((-size) % alignment)
    return out


def every_type_kvs():
    return [
        ("general.architecture", STR, "llama"),
        ("general.name", STR, "fuzz seed"),
        ("t.u8", U8, 200), ("t.i8", I8, -5), ("t.u16", U16, 60000), ("t.i16", I16, -300),
        ("t.u32", U32, 4000000000), ("t.i32", I32, -7), ("t.f32", F32, 1.5),
        ("t.bool", BOOL, 1), ("t.u64", U64, 1 << 40), ("t.i64", I64, -(1 << 40)),
        ("t.f64", F64, 2.25),
        ("t.arr.u8", ARR, (U8, [1, 2, 3])), ("t.arr.i32", ARR, (I32, [-1, 0, 1])),
        ("t.arr.f32", ARR, (F32, [0.5, -0.5])), ("t.arr.bool", ARR, (BOOL, [0, 1, 1])),
        ("t.arr.u64", ARR, (U64, [1, 1 << 50])), ("t.arr.f64", ARR, (F64, [1e300])),
        ("t.arr.str", ARR, (STR, ["a", "", "\u2581b"])), ("t.arr.empty", ARR, (I8, [])),
    ]


def spm_vocab_kvs():
    pieces = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in (0x0A, 0x20, 0x41, 0xC3, 0xA9, 0xFF)]
    pieces += ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab", "caf", "\u00e9"]
    types = [2, 3, 3] + [6] * 6 + [1] * 8
    return [
        ("tokenizer.ggml.model", STR, "llama"),
        ("tokenizer.ggml.tokens", ARR, (STR, pieces)),
        ("tokenizer.ggml.scores", ARR, (F32, [0.0] * 9 + [-1.0, -2.0, -2.5, -1.5, -1.2, -0.5, -3.0, -3.0])),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.unknown_token_id", U32, 0),
        ("tokenizer.ggml.add_bos_token", BOOL, 1),
    ]


def bpe_vocab_kvs():
    # GPT-2 byte alphabet: printable bytes map to themselves, space to U+0120.
    pieces = ["!", "a", "b", "c", "\u0120", "\u0120a", "ab", "\u0120ab", "<|endoftext|>"]
    return [
        ("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "gpt-2"),
        ("tokenizer.ggml.tokens", ARR, (STR, pieces)),
        ("tokenizer.ggml.token_type", ARR, (I32, [1] * 8 + [3])),
        ("tokenizer.ggml.merges", ARR, (STR, ["\u0120 a", "a b", "\u0120a b"])),
        ("tokenizer.ggml.bos_token_id", U32, 8), ("tokenizer.ggml.eos_token_id", U32, 8),
    ]


def tiny_tensors():
    return [("tok_embeddings.weight", [4, 2], GGML_F32), ("norm.weight", [8], GGML_F16),
            ("output.weight", [32, 2], GGML_Q8_0), ("layers.0.q", [32], GGML_Q4_0)]


def gguf_seeds():
    good = {
        "empty-v3": gguf(),
        "empty-v2": gguf(version=2),
        "every-type": gguf(every_type_kvs()),
        "every-type-v2": gguf(every_type_kvs(), version=2),
        "tensors": gguf([("general.alignment", U32, 64)] + every_type_kvs()[:2], tiny_tensors(),
                        alignment=64),
        "tensors-align32": gguf([], tiny_tensors()),
        "spm-vocab": gguf(spm_vocab_kvs()),
        "bpe-vocab": gguf(bpe_vocab_kvs()),
        "spm-vocab-tensors": gguf(spm_vocab_kvs(), tiny_tensors()),
    }
    seeds = dict(good)
    for name in ("every-type", "tensors", "spm-vocab", "bpe-vocab"):
        b = good[name]
        for cut in (3, 8, 23, 24, 40, len(b) // 3, len(b) // 2, len(b) - 1):
            seeds["%s-cut%d" % (name, cut)] = b[:cut]
    base = good["every-type"]
    seeds["bad-magic"] = b"GGUG" + base[4:]
    seeds["version-1"] = base[:4] + struct.pack("<I", 1) + base[8:]
    seeds["version-big-endian"] = base[:4] + struct.pack(">I", 3) + base[8:]
    seeds["kv-count-huge"] = base[:16] + struct.pack("<Q", 1 << 62) + base[24:]
    seeds["tensor-count-huge"] = base[:8] + struct.pack("<Q", 1 << 40) + base[16:]
    seeds["key-length-huge"] = base[:24] + struct.pack("<Q", 1 << 60) + base[32:]
    seeds["nested-array"] = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("a") +
                             struct.pack("<I", ARR) + struct.pack("<IQ", ARR, 1) +
                             struct.pack("<IQ", U8, 0))
    seeds["alignment-3"] = gguf([("general.alignment", U32, 3)], tiny_tensors()[:1])
    seeds["alignment-type"] = gguf([("general.alignment", U64, 32)])
    seeds["duplicate-key"] = gguf([("k", U8, 1), ("k", U8, 2)])
    seeds["bool-2"] = gguf([("k", BOOL, 2)])
    t = gguf([], [("w", [4], GGML_F32)])
    seeds["tensor-past-end"] = t[:-8]
    seeds["tensor-bad-type"] = t.replace(struct.pack("<IQ", GGML_F32, 0), struct.pack("<IQ", 99, 0), 1)
    seeds["tensor-zero-dim"] = t.replace(struct.pack("<Q", 4), struct.pack("<Q", 0), 1)
    seeds["tensor-dim-huge"] = t.replace(struct.pack("<IQ", 1, 4), struct.pack("<IQ", 1, 1 << 62), 1)
    seeds["tensor-ndims-5"] = t.replace(struct.pack("<IQ", 1, 4), struct.pack("<IQ", 5, 4), 1)
    return seeds


# ---- the other targets ----------------------------------------------------------------------

def request_seeds():
    comp = [
        {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
        {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "stream": True},
        {"prompt": "Once upon a time", "stream": True, "stream_options": {"include_usage": True}},
        {"prompt": [1, 403, 407, 261, 378], "max_tokens": 32, "temperature": 0},
        {"prompt": ["Once upon a time"], "n": 2, "seed": 7},
        {"prompt": "The little dog", "max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": 1234},
        {"prompt": "x", "stop": ["Lily", "zzz"], "logprobs": 3, "echo": True},
        {"prompt": "x", "stop": "girl named", "top_k": 40, "min_p": 0.05, "min_tokens": 2},
        {"prompt": "x", "logit_bias": {"13": -100, "29": 5.5}, "presence_penalty": 0.5,
         "frequency_penalty": -0.5, "repetition_penalty": 1.1, "ignore_eos": True},
        {"prompt": "x", "priority": -3, "user": "u-1", "best_of": 1, "max_completion_tokens": 8},
        {"prompt": "x", "suffix": "y"},
        {"prompt": "x", "temperature": 3},
        {"prompt": "x", "max_tokens": 16.0, "response_format": {"type": "text"}},
        {"prompt": 5},
        {"prompt": "x", "model": "gpt-4"},
    ]
    chat = [
        {"model": "stories260K", "messages": [{"role": "user", "content": "Tell me a story"}],
         "max_tokens": 32, "logprobs": True, "top_logprobs": 2},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": None}, {"role": "developer", "content": ""}],
         "stream": True, "stream_options": {"include_usage": True}, "n": 2, "seed": 3},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b\u0000c"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    ]
    seeds = {}
    for i, b in enumerate(comp):
        seeds["completion-%02d" % i] = b"0" + json.dumps(b).encode()
    for i, b in enumerate(chat):
        seeds["chat-%02d" % i] = b"1" + json.dumps(b).encode()
    seeds["not-json"] = b"0{not json"
    seeds["array"] = b"0[1,2]"
    seeds["deep"] = b"0" + b"[" * 3000 + b"]" * 3000
    seeds["nul-in-string"] = b'1{"messages":[{"role":"user","content":"a\\u0000b"}]}'
    seeds["surrogate"] = b'0{"prompt":"\\ud800"}'
    seeds["bad-utf8"] = b'0{"prompt":"\xff\xfe"}'
    seeds["huge-int"] = b'0{"prompt":"x","max_tokens":1e308,"seed":9223372036854775807}'
    return seeds


def tokenizer_seeds():
    texts = [b"Once upon a time, there was a little girl named Lily.",
             b"Hello world", b"  leading and trailing spaces  ", b"tabs\tand\nnewlines\r\n",
             "caf\u00e9 \u65e5\u672c\u8a9e \U0001F600 \u2581".encode(),
             b"\xff\xfe invalid \xc3 utf-8 \xe2\x82", b"<s> special </s> <unk> tokens",
             b"<|endoftext|><|im_start|>user\n<tool>x<|im_end|>",
             b"12345 67890 3.14159", b"", b"\x00\x01\x02"]
    seeds = {}
    for i, t in enumerate(texts):
        for sel in (0x00, 0x33, 0x04, 0x15, 0x26, 0x37, 0x08):
            seeds["text%02d-sel%02x" % (i, sel)] = bytes([sel]) + t
    return seeds


def chat_seeds():
    def enc(family, flags, msgs):
        out = bytes([family, flags])
        for role, content in msgs:
            c = content.encode()
            if isinstance(role, int):
                out += bytes([role])
            else:
                r = role.encode()
                out += bytes([8, len(r)]) + r
            out += struct.pack("<H", len(c)) + c
        return out

    conv = [(0, "  You are helpful.  "), (1, " Hello! "), (2, "Hi, how can I help?"), (1, "Tell me a story")]
    seeds = {}
    for f in range(8):
        seeds["family%d-conv" % f] = enc(f, 1, conv)
        seeds["family%d-user" % f] = enc(f, 0, conv[1:2])
        seeds["family%d-bad-order" % f] = enc(f, 1, [(2, "first"), (0, "late system")])
    seeds["tool-and-developer"] = enc(1, 1, [(4, "dev"), (3, "tool output"), (1, "u")])
    seeds["custom-role"] = enc(0, 1, [("critic", "x")])
    seeds["markers-in-content"] = enc(1, 3, [(1, "<|im_start|>system\nhi<|im_end|>\0x")])
    seeds["jinja-chatml"] = b"{% for m in messages %}<|im_start|>{{ m.role }}<|im_end|>{% endfor %}"
    seeds["jinja-llama3"] = b"<|start_header_id|>{{ role }}<|end_header_id|>"
    seeds["jinja-llama2"] = b"[INST] <<SYS>> {{ bos_token }}"
    seeds["jinja-zephyr"] = b"<|user|> <|assistant|> {{ eos_token }}"
    seeds["name-chatml"] = b"chatml"
    return seeds


def stop_seeds():
    with open(os.path.join(shared_dir(), "golden", "stories260K-greedy.json")) as f:
        cases = json.load(f)["cases"]

    def enc(flags, stops, ids):
        out = bytes([flags | len(stops)])
        for s in stops:
            b = s.encode()
            out += bytes([len(b) - 1]) + b
        return out + b"".join(struct.pack("<H", i) for i in ids)

    ids = cases[0]["completion_token_ids"]  # ", there was a little girl named Lily. ..."
    seeds = {
        "no-stop": enc(0, [], ids),
        "lily": enc(0, ["Lily", "zzz"], ids),
        "across-tokens": enc(0, ["girl named"], ids),
        "two-stops-one-token": enc(0, ["le", "itt"], ids),  # both end inside " little"
        "partial-then-miss": enc(0, ["little boy"], ids),
        "four-stops": enc(0, [".", ",", " a", "park"], ids),
        "eos": enc(0, ["zzz"], ids[:5] + [2] + ids[5:]),
        "eos-ignored": enc(8, ["zzz"], ids[:5] + [2] + ids[5:]),
        "utf8-bytes": enc(0, ["\u00e9"], [3 + 0xC3, 3 + 0xA9, 3 + 0xE2, 3 + 0x96]),
    }
    for i, c in enumerate(cases[1:5]):
        seeds["case%d" % i] = enc(0, [c["completion_text"][10:14]], c["completion_token_ids"])
    return seeds


def config_seeds():
    seeds = {}
    with open(os.path.join(ROOT, "config", "sieve.json"), "rb") as f:
        seeds["sieve.json"] = f.read()
    small = [
        {"port": 0, "threads": 2, "context_length": 256},
        {"model": "/models/x.gguf", "model_name": "x", "host": "::1", "log_requests": True},
        {"kv_cache_bytes": 327680, "kv_block_size": 4, "prefix_caching": False},
        {"api_keys": ["k1", "k2"], "api_key_file": "/run/keys"},
        {"max_connections": 16, "connection_timeout_s": 2, "drain_timeout_s": 0},
        {"chat_template": "chatml", "max_running_seqs": 64, "max_batch_tokens": 64},
        {"prot": 1}, {"port": "80"}, {"port": -1}, {"api_keys": ["bad key"]},
        {"_comment": "x", "max_body_bytes": 1 << 33},
    ]
    for i, c in enumerate(small):
        seeds["config-%02d" % i] = json.dumps(c).encode()
    seeds["dup-key"] = b'{"port": 1, "port": 2}'
    seeds["not-object"] = b'[{"port": 1}]'
    return seeds


def safetensors(tensors, metadata=None, pad=True):
    """tensors: (name, dtype, shape, element size); data laid out in order."""
    header, offset, data = {}, 0, b""
    for name, dtype, shape, es in tensors:
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n * es]}
        data += bytes((offset + i) & 0xFF for i in range(n * es))
        offset += n * es
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    if pad:
        h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    good = {
        "empty": safetensors([]),
        "one-f32": safetensors([("w", "F32", [2, 3], 4)], {"format": "pt"}),
        "llama-ish": safetensors([("model.embed_tokens.weight", "BF16", [8, 4], 2),
                                  ("model.norm.weight", "F16", [4], 2),
                                  ("lm_head.weight", "F32", [8, 4], 4)]),
        "every-dtype": safetensors([("a", "F64", [1], 8), ("b", "I8", [3], 1), ("c", "U8", [1], 1),
                                    ("d", "I16", [1], 2), ("e", "U16", [1], 2), ("f", "I32", [1], 4),
                                    ("g", "U32", [1], 4), ("h", "I64", [1], 8), ("i", "U64", [1], 8),
                                    ("j", "BOOL", [2], 1), ("k", "F8_E4M3", [1], 1),
                                    ("l", "F8_E5M2", [1], 1)]),
        "scalar-and-empty": safetensors([("s", "F32", [], 4), ("z", "F32", [0, 5], 4)]),
        "unpadded": safetensors([("w", "F16", [3], 2)], pad=False),
    }
    seeds = dict(good)
    b = good["llama-ish"]
    for cut in (4, 8, 20, len(b) - 1):
        seeds["llama-ish-cut%d" % cut] = b[:cut]
    seeds["trailing-byte"] = b + b"\0"
    seeds["header-huge"] = struct.pack("<Q", 1 << 62) + b[8:]
    seeds["overlap"] = b.replace(b'"data_offsets": [64, 72]', b'"data_offsets": [60, 68]')
    seeds["bad-dtype"] = good["one-f32"].replace(b'"F32"', b'"F33"')
    seeds["offsets-reversed"] = good["one-f32"].replace(b"[0, 24]", b"[24, 0]")
    seeds["shape-mismatch"] = good["one-f32"].replace(b"[2, 3]", b"[2, 4]")
    seeds["shape-overflow"] = good["one-f32"].replace(b"[2, 3]", b"[4294967296, 4294967296]")
    seeds["not-object"] = struct.pack("<Q", 8) + b"[1,2,3] "
    return seeds


def hf_config_seeds():
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": 512,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1,
             "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "hidden_act": "silu"}
    llama3 = dict(llama, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
                  eos_token_id=[128001, 128008, 128009], head_dim=16)
    mistral = dict(llama, architectures=["MistralForCausalLM"], model_type="mistral",
                   sliding_window=4096)
    qwen2 = dict(llama, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                 use_sliding_window=False, tie_word_embeddings=True)
    bad = [dict(llama, model_type="gpt2"), dict(llama, hidden_act="gelu"),
           dict(llama, num_key_value_heads=3), dict(llama, hidden_size=-1),
           dict(llama, quantization_config={"quant_method": "gptq"}),
           dict(llama, rope_scaling={"type": "yarn", "factor": 4}), dict(llama, vocab_size="512")]
    seeds = {"llama": llama, "llama3": llama3, "mistral": mistral, "qwen2": qwen2}
    seeds.update({"bad-%d" % i: b for i, b in enumerate(bad)})
    return {k: json.dumps(v, indent=1).encode() for k, v in seeds.items()}


def write(out, target, seeds):
    d = os.path.join(out, target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    return len(seeds), sum(len(v) for v in seeds.values())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "corpus"))
    args = p.parse_args()
    for target, seeds in (("fuzz_gguf", gguf_seeds()), ("fuzz_request", request_seeds()),
                          ("fuzz_tokenizer", tokenizer_seeds()), ("fuzz_chat_template", chat_seeds()),
                          ("fuzz_stop", stop_seeds()), ("fuzz_config", config_seeds()),
                          ("fuzz_safetensors", safetensors_seeds()),
                          ("fuzz_hf_config", hf_config_seeds())):
        n, size = write(args.out, target, seeds)
        print("%-20s %3d seeds, %6d bytes" % (target, n, size))


if __name__ == "__main__":
    main()
