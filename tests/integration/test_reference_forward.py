"""An independent float64 numpy forward pass, reading the same GGUF with the `gguf`
package, against the server's next-token log-probabilities: llama (adjacent-pair RoPE),
mistral, and qwen2 (q/k/v biases, NeoX RoPE, its own rope base), F32 weights written by
tools/gen_model.py; and stories260K itself. Agreement to 2e-3 in log-probability shows the
architectures' graphs, not only their shapes, are right."""
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
from gguf import GGUFReader

import sieve_harness as h

BINARY = h.sieve_binary()
HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "..", "..", "tools", "gen_model.py")


def field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    v = f.parts[f.data[0]]
    return v.tobytes().decode() if f.types[0].name == "STRING" else v[0]


def reference_logprobs(path, tokens):
    r = GGUFReader(path)
    arch = field(r, "general.architecture")
    T = {t.name: np.array(t.data, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])
         for t in r.tensors}
    dim = int(field(r, arch + ".embedding_length"))
    nl = int(field(r, arch + ".block_count"))
    nh = int(field(r, arch + ".attention.head_count"))
    nkv = int(field(r, arch + ".attention.head_count_kv", nh))
    eps = float(field(r, arch + ".attention.layer_norm_rms_epsilon"))
    base = float(field(r, arch + ".rope.freq_base", 1e6 if arch == "qwen2" else 1e4))
    hd = dim // nh
    neox = arch == "qwen2"
    n = len(tokens)
    x = T["token_embd.weight"][tokens]
    pos = np.arange(n)
    inv = base ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # v: [n, heads, hd]
        if neox:
            a, b = v[..., : hd // 2], v[..., hd // 2:]
            return np.concatenate([a * cos[:, None] - b * sin[:, None],
                                   a * sin[:, None] + b * cos[:, None]], axis=-1)
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    for l in range(nl):
        p = "blk.%d." % l
        xb = norm(x, T[p + "attn_norm.weight"])
        q = xb @ T[p + "attn_q.weight"].T
        k = xb @ T[p + "attn_k.weight"].T
        v = xb @ T[p + "attn_v.weight"].T
        if p + "attn_q.bias" in T:
            q, k, v = q + T[p + "attn_q.bias"], k + T[p + "attn_k.bias"], v + T[p + "attn_v.bias"]
        q = rope(q.reshape(n, nh, hd))
        k = rope(k.reshape(n, nkv, hd))
        v = v.reshape(n, nkv, hd)
        g = nh // nkv
        att = np.empty((n, nh, hd))
        mask = np.triu(np.full((n, n), -np.inf), 1)
        for hh in range(nh):
            s = q[:, hh] @ k[:, hh // g].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            att[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, hh // g]
        x = x + att.reshape(n, dim) @ T[p + "attn_output.weight"].T
        xb = norm(x, T[p + "ffn_norm.weight"])
        gte = xb @ T[p + "ffn_gate.weight"].T
        up = xb @ T[p + "ffn_up.weight"].T
        x = x + (gte / (1 + np.exp(-gte)) * up) @ T[p + "ffn_down.weight"].T
    out = T.get("output.weight", T["token_embd.weight"])
    logits = norm(x[-1], T["output_norm.weight"]) @ out.T
    m = logits.max()
    return logits - m - np.log(np.exp(logits - m).sum())


class ReferenceForwardTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def check(self, path):
        srv = h.Server(BINARY, "--threads", "2", model=path).start()
        try:
            _, tok = srv.post_json("/tokenize", {"content": "Once upon a time", "add_special": True})
            tokens = tok["tokens"]
            _, r = srv.post_json("/v1/completions", {"prompt": tokens, "max_tokens": 1,
                                                     "temperature": 0, "logprobs": 20})
            got = r["choices"][0]["logprobs"]["top_logprobs"][0]
        finally:
            srv.stop()
        ref = reference_logprobs(path, tokens)
        top = np.argsort(-ref)[:5]
        # The server reports token text; map the reference's best ids through /detokenize.
        srv = h.Server(BINARY, "--threads", "1", model=path).start()
        try:
            texts = [srv.post_json("/detokenize", {"tokens": [int(i)]})[1]["content"] for i in top]
        finally:
            srv.stop()
        for i, t in zip(top, texts):
            if t in got and "\ufffd" not in t:  # byte tokens share the text U+FFFD
                self.assertAlmostEqual(got[t], ref[i], delta=2e-3, msg="%s token %r" % (path, t))
        self.assertIn(texts[0], got)

    def generated(self, arch):
        path = os.path.join(self.dir.name, "%s.gguf" % arch)
        subprocess.run([sys.executable, GEN, "--preset", "tiny", "--arch", arch, "--type", "f32",
                        "--gguf", path], check=True, capture_output=True, timeout=120)
        return path

    def test_llama(self):
        self.check(self.generated("llama"))

    def test_mistral(self):
        self.check(self.generated("mistral"))

    def test_qwen2(self):
        self.check(self.generated("qwen2"))

    def test_stories260k(self):
        self.check(os.path.join(h.shared_dir(), "models", "stories260K.gguf"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
