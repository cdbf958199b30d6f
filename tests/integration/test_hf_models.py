"""Hugging Face model directories (config.json + safetensors + tokenizer.json), written by
tools/gen_model.py with the same seeded weights as a GGUF: served from the directory (F32,
BF16, sharded) they give the GGUF's next-token log-probabilities for the same token ids,
llama (Q/K in Hugging Face's half-split order, so NeoX RoPE) and qwen2 (biases) alike; the
directory's byte-level BPE tokenizer answers /tokenize; broken directories are refused
with a message."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import sieve_harness as h

BINARY = h.sieve_binary()
HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "..", "..", "tools", "gen_model.py")
PROMPT = [1, 403, 407, 261, 378]


def top_logprobs(model):
    srv = h.Server(BINARY, "--threads", "2", model=model).start()
    try:
        _, r = srv.post_json("/v1/completions",
                             {"prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                              "logprobs": 8})
        _, tok = srv.post_json("/tokenize", {"content": "Hello world"})
        return sorted(r["choices"][0]["logprobs"]["top_logprobs"][0].values()), tok["tokens"]
    finally:
        srv.stop()


class HfModelsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def generate(self, arch, dtype="f32", shards=1):
        base = os.path.join(self.dir.name, "%s-%s-%d" % (arch, dtype, shards))
        subprocess.run([sys.executable, GEN, "--preset", "tiny", "--arch", arch, "--type", "f32",
                        "--gguf", base + ".gguf", "--hf", base, "--hf-dtype", dtype,
                        "--shards", str(shards)], check=True, capture_output=True, timeout=120)
        return base + ".gguf", base

    def same_distribution(self, a, b, tol):
        # The completions format keys alternatives by text, and byte tokens share the
        # text U+FFFD, so a list may lack a few entries: the best value must agree and
        # all but two of the shorter list must find a partner within tol.
        self.assertGreaterEqual(min(len(a), len(b)), 5)
        self.assertAlmostEqual(max(a), max(b), delta=tol)
        short, long_ = (a, b) if len(a) <= len(b) else (b, a)
        matched = sum(1 for x in short if any(abs(x - y) <= tol for y in long_))
        self.assertGreaterEqual(matched, len(short) - 2)

    def test_llama_directory_equals_its_gguf(self):
        gguf, hf = self.generate("llama")
        g, _ = top_logprobs(gguf)
        d, tokens = top_logprobs(hf)
        self.same_distribution(g, d, 1e-4)
        self.assertTrue(tokens)

    def test_qwen2_directory_equals_its_gguf(self):
        gguf, hf = self.generate("qwen2")
        self.same_distribution(top_logprobs(gguf)[0], top_logprobs(hf)[0], 1e-4)

    def test_bf16_sharded_directory(self):
        gguf, hf = self.generate("llama", "bf16", 2)
        self.assertTrue(os.path.exists(os.path.join(hf, "model.safetensors.index.json")))
        self.same_distribution(top_logprobs(gguf)[0], top_logprobs(hf)[0], 2e-2)

    def test_broken_directories_are_refused(self):
        _, hf = self.generate("llama")
        broken = os.path.join(self.dir.name, "broken")
        shutil.copytree(hf, broken)
        os.unlink(os.path.join(broken, "tokenizer.json"))
        p = subprocess.run([BINARY, "--model", broken, "--port", str(h.free_port())],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1)
        self.assertIn("tokenizer.json", p.stderr)
        with open(os.path.join(hf, "config.json")) as f:
            cfg = json.load(f)
        cfg["model_type"], cfg["architectures"] = "gemma2", ["Gemma2ForCausalLM"]
        shutil.copytree(hf, broken, dirs_exist_ok=True)
        with open(os.path.join(broken, "config.json"), "w") as f:
            json.dump(cfg, f)
        p = subprocess.run([BINARY, "--model", broken, "--port", str(h.free_port())],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1)
        self.assertIn("gemma2", p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
