"""The "attention" request object over HTTP: validation (400 naming the field), the
`sieve` object in responses, FlexPrefill with gamma 1 giving the dense answer and gamma
0.9 a density below 1 on a ~1500-token prompt, PowerAttention, 'auto', and sparse KV never
leaking into the prefix cache that dense requests use."""
import json
import unittest

import sieve_harness as h

BINARY = h.sieve_binary()
TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
        "the park. ") * 50
FLEX = {"block_size": 32, "min_budget": 64}


class AttentionTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--threads", "2").start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def complete(self, attention=None, prompt=TEXT, **kw):
        body = dict(prompt=prompt, max_tokens=16, temperature=0, **kw)
        if attention is not None:
            body["attention"] = attention
        return self.srv.post_json("/v1/completions", body)

    def test_dense_reports_density_1(self):
        status, r = self.complete()
        self.assertEqual(status, 200, r)
        self.assertEqual(r["sieve"]["prefill"], "dense")
        self.assertEqual(r["sieve"]["prefill_density"], 1.0)
        self.assertEqual(r["sieve"]["kv_cache"], "fp")
        self.assertEqual(r["sieve"]["kv_bytes_per_token"], 1280)
        self.assertGreater(r["usage"]["prompt_tokens"], 1400)

    def test_flex_gamma_1_equals_dense_and_gamma_09_is_sparse(self):
        _, dense = self.complete()
        _, g1 = self.complete({"prefill": "flex", "flex": dict(FLEX, gamma=1.0)})
        self.assertEqual(g1["choices"][0]["text"], dense["choices"][0]["text"])
        self.assertEqual(g1["sieve"]["prefill"], "flex")
        self.assertEqual(g1["sieve"]["prefix_cache_hit_tokens"], 0)  # sparse KV is private
        _, g9 = self.complete({"prefill": "flex", "flex": dict(FLEX, gamma=0.9)})
        self.assertLess(g9["sieve"]["prefill_density"], 1.0)
        self.assertGreater(g9["sieve"]["prefill_density"], 0.0)

    def test_flex_on_a_short_prompt_runs_dense_and_says_so(self):
        status, r = self.complete({"prefill": "flex"}, prompt="Once upon a time")
        self.assertEqual(status, 200)
        self.assertEqual(r["sieve"]["prefill_density"], 1.0)
        self.assertIn("ran dense", r["sieve"]["prefill_note"])

    def test_power_is_sparse(self):
        status, r = self.complete({"prefill": "power", "power": {"block_size": 32}})
        self.assertEqual(status, 200, r)
        self.assertEqual(r["sieve"]["prefill"], "power")
        self.assertLess(r["sieve"]["prefill_density"], 1.0)

    def test_auto_uses_dense_below_the_threshold(self):
        status, r = self.complete({"prefill": "auto"})
        self.assertEqual(r["sieve"]["prefill"], "dense")  # default threshold 4096 tokens

    def test_dense_after_sparse_still_hits_only_dense_blocks(self):
        prompt = "The little dog ran to the park. " * 60
        _, first = self.complete(prompt=prompt)
        _, sparse = self.complete({"prefill": "flex", "flex": dict(FLEX, gamma=0.9)},
                                  prompt=prompt)
        _, again = self.complete(prompt=prompt)
        self.assertEqual(again["choices"][0]["text"], first["choices"][0]["text"])
        self.assertGreater(again["sieve"]["prefix_cache_hit_tokens"], 0)

    def test_streaming_usage_chunk_carries_the_sieve_object(self):
        status, headers, data = self.srv.request(
            "POST", "/v1/completions",
            {"prompt": TEXT, "max_tokens": 4, "stream": True,
             "stream_options": {"include_usage": True},
             "attention": {"prefill": "flex", "flex": dict(FLEX, gamma=0.9)}})
        events = [json.loads(line[6:]) for line in data.decode().split("\n\n")
                  if line.startswith("data: {")]
        self.assertIn("sieve", events[-1])
        self.assertLess(events[-1]["sieve"]["prefill_density"], 1.0)

    def test_metrics_count_requests_and_blocks_per_policy(self):
        def metrics():
            _, _, data = self.srv.request("GET", "/metrics")
            out = {}
            for line in data.decode().splitlines():
                if line.startswith("sieve_prefill_"):
                    name, value = line.rsplit(" ", 1)
                    out[name] = float(value)
            return out
        before = metrics()
        self.complete({"prefill": "flex", "flex": dict(FLEX, gamma=0.9)})
        after = metrics()
        key = 'sieve_prefill_requests_total{policy="flex"}'
        self.assertEqual(after[key], before[key] + 1)
        comp = 'sieve_prefill_blocks_computed_total{policy="flex"}'
        caus = 'sieve_prefill_blocks_causal_total{policy="flex"}'
        self.assertGreater(after[caus] - before[caus], after[comp] - before[comp])

    def test_bad_attention_objects_get_400_naming_the_field(self):
        cases = [
            ({"prefill": "sparse"}, "attention.prefill"),
            ({"prefill": 3}, "attention.prefill"),
            ({"flex": {"gamma": 1.5}}, "attention.flex.gamma"),
            ({"flex": {"gamma": "x"}}, "attention.flex.gamma"),
            ({"flex": {"tau": -1}}, "attention.flex.tau"),
            ({"flex": {"block_size": 4}}, "attention.flex.block_size"),
            ({"flex": {"min_budget": -1}}, "attention.flex.min_budget"),
            ({"flex": {"colour": 1}}, "attention.flex.colour"),
            ({"power": {"window_blocks": 0}}, "attention.power.window_blocks"),
            ({"power": {"dense_layers": "lots"}}, "attention.power.dense_layers"),
            ({"kv_cache": "q8_0"}, "attention.kv_cache"),
            ({"kv_cache": 8}, "attention.kv_cache"),
            ({"zip": {"salient_fraction": 1.5}}, "attention.zip.salient_fraction"),
            ({"zip": {"high_bits": 3}}, "attention.zip.high_bits"),
            ({"zip": {"high_bits": 2, "low_bits": 4}}, "attention.zip.low_bits"),
            ({"zip": {"flush_tokens": 0}}, "attention.zip.flush_tokens"),
            ({"zip": {"ratio": 1}}, "attention.zip.ratio"),
            ({"zip": 1}, "attention.zip"),
            ("flex", "attention"),
        ]
        for att, param in cases:
            status, r = self.complete(att, prompt="hi")
            self.assertEqual(status, 400, att)
            self.assertEqual(r["error"]["param"], param, att)


if __name__ == "__main__":
    unittest.main(verbosity=2)
