"""The same seeded weights stored as F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K and Q6_K
(written by tools/gen_model.py) load and run; their next-token log-probabilities stay
within a per-type tolerance of the F32 model's (measured 2026-11-30: F16 3e-4, BF16 2e-3,
Q8_0 1e-2, Q6_K 2e-2, Q5_K 6e-2, Q4_K 9e-2, Q4_0 0.12), and the greedy text of F16 and
BF16 equals F32's. Architectures other than the supported ones are refused by name."""
import os
import subprocess
import sys
import tempfile
import unittest

import sieve_harness as h

BINARY = h.sieve_binary()
HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "..", "..", "tools", "gen_model.py")
TOL = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 5e-2, "q6_k": 6e-2, "q5_k": 0.15, "q4_k": 0.25,
       "q4_0": 0.3}


def generate(path, *args):
    subprocess.run([sys.executable, GEN, "--preset", "tiny", "--gguf", path, *args],
                   check=True, capture_output=True, timeout=120)


class ModelTypesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.results = {}
        for t in ["f32"] + list(TOL):
            path = os.path.join(cls.dir.name, "tiny-%s.gguf" % t)
            generate(path, "--type", t)
            srv = h.Server(BINARY, "--threads", "2", model=path).start()
            try:
                _, r = srv.post_json("/v1/completions", {"prompt": "Once upon a time",
                                                         "max_tokens": 1, "temperature": 0,
                                                         "logprobs": 20})
                _, g = srv.post_json("/v1/completions", {"prompt": "Once upon a time",
                                                         "max_tokens": 16, "temperature": 0})
                cls.results[t] = (r["choices"][0]["logprobs"]["top_logprobs"][0],
                                  g["choices"][0]["text"])
            finally:
                srv.stop()

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def test_every_type_stays_within_its_tolerance_of_f32(self):
        ref, _ = self.results["f32"]
        for t, tol in TOL.items():
            lp, _ = self.results[t]
            common = [k for k in lp if k in ref]
            self.assertGreaterEqual(len(common), 10, t)
            worst = max(abs(lp[k] - ref[k]) for k in common)
            self.assertLess(worst, tol, "%s: max |d logprob| %.4f" % (t, worst))

    def test_16_bit_types_give_the_f32_greedy_text(self):
        for t in ("f16", "bf16"):
            self.assertEqual(self.results[t][1], self.results["f32"][1], t)

    def test_unsupported_architecture_is_refused_by_name(self):
        path = os.path.join(self.dir.name, "gemma.gguf")
        generate(path, "--type", "f32", "--gguf-arch", "gemma")
        p = subprocess.run([BINARY, "--model", path, "--port", str(h.free_port())],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1)
        self.assertIn("unsupported architecture 'gemma'", p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
