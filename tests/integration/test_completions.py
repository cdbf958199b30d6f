"""Integration tests: the real server answering /v1/completions, /v1/models and /health
on a free loopback port, with good and bad requests. The server is stopped by PID in
tearDownClass whatever happens."""
import http.client
import json
import os
import threading
import unittest

import sieve_harness as h

BINARY = h.sieve_binary()


def golden():
    with open(os.path.join(h.shared_dir(), "golden", "stories260K-greedy.json")) as f:
        return json.load(f)["cases"]


class CompletionsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--max-body-bytes", "65536", "--threads", "2").start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def complete(self, **body):
        body.setdefault("model", "stories260K")
        return self.srv.post_json("/v1/completions", body)

    def assert_error(self, status, body, want_status, param=None, code=None):
        self.assertEqual(status, want_status, body)
        self.assertIn("error", body)
        err = body["error"]
        self.assertEqual(set(err), {"message", "type", "param", "code"})
        self.assertTrue(err["message"])
        if param is not None:
            self.assertEqual(err["param"], param)
        if code is not None:
            self.assertEqual(err["code"], code)

    def test_health_and_models(self):
        status, _, data = self.srv.request("GET", "/health")
        self.assertEqual((status, json.loads(data)), (200, {"status": "ok"}))
        status, _, data = self.srv.request("GET", "/v1/models")
        self.assertEqual(status, 200)
        models = json.loads(data)
        self.assertEqual(models["object"], "list")
        self.assertEqual([m["id"] for m in models["data"]], ["stories260K"])
        self.assertEqual(models["data"][0]["object"], "model")
        status, _, data = self.srv.request("GET", "/v1/models/stories260K")
        self.assertEqual((status, json.loads(data)["id"]), (200, "stories260K"))

    def test_readme_curl_example(self):
        status, body = self.complete(prompt="Once upon a time", max_tokens=16, temperature=0)
        self.assertEqual(status, 200, body)
        self.assertTrue(body["choices"][0]["text"].startswith(", there was a little girl named Lily"))
        self.assertEqual(body["object"], "text_completion")
        self.assertTrue(body["id"].startswith("cmpl-"))
        self.assertEqual(body["usage"], {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21})
        self.assertEqual(body["choices"][0]["finish_reason"], "length")

    def test_greedy_matches_golden_for_every_prompt(self):
        for case in golden():
            status, body = self.complete(prompt=case["prompt"], max_tokens=32, temperature=0)
            self.assertEqual(status, 200, body)
            self.assertEqual(body["choices"][0]["text"], case["completion_text"], case["prompt"])
            self.assertEqual(body["usage"]["prompt_tokens"], len(case["prompt_token_ids"]))
            self.assertEqual(body["usage"]["completion_tokens"], 32)
            self.assertEqual(body["choices"][0]["finish_reason"], "length")

    def test_token_id_prompt_gives_the_same_completion(self):
        case = golden()[1]
        status, body = self.complete(prompt=case["prompt_token_ids"], max_tokens=32, temperature=0)
        self.assertEqual(status, 200, body)
        self.assertEqual(body["choices"][0]["text"], case["completion_text"])

    def test_concurrent_requests_each_get_their_golden_completion(self):
        cases = golden()
        results = [None] * len(cases)

        def run(i):
            results[i] = self.complete(prompt=cases[i]["prompt"], max_tokens=32, temperature=0)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for case, (status, body) in zip(cases, results):
            self.assertEqual(status, 200, body)
            self.assertEqual(body["choices"][0]["text"], case["completion_text"])

    def test_stop_string_ends_the_completion_and_is_not_emitted(self):
        status, body = self.complete(prompt="Once upon a time", max_tokens=32, temperature=0,
                                     stop=["Lily", "zzz"])
        self.assertEqual(status, 200, body)
        self.assertEqual(body["choices"][0]["text"], ", there was a little girl named ")
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        # A stop string that spans several tokens.
        status, body = self.complete(prompt="Once upon a time", max_tokens=32, temperature=0,
                                     stop="girl named")
        self.assertEqual(body["choices"][0]["text"], ", there was a little ")

    def test_seeded_sampling_is_reproducible(self):
        params = dict(prompt="The little dog", max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
        a = self.complete(**params)[1]["choices"][0]["text"]
        b = self.complete(**params)[1]["choices"][0]["text"]
        self.assertEqual(a, b)
        texts = {self.complete(**dict(params, seed=s))[1]["choices"][0]["text"] for s in range(6)}
        self.assertGreater(len(texts), 1)

    def test_default_max_tokens_is_16(self):
        status, body = self.complete(prompt="Once upon a time", temperature=0)
        self.assertEqual(body["usage"]["completion_tokens"], 16)

    def test_keep_alive_serves_several_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=30)
        try:
            for _ in range(3):
                conn.request("POST", "/v1/completions",
                             body=json.dumps({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                self.assertEqual(r.status, 200)
                json.loads(r.read())
        finally:
            conn.close()

    def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(self):
        cases = [
            (b"{not json", 400, None, None),
            (b"", 400, None, None),
            (b"[1,2]", 400, None, None),
            (json.dumps({"prompt": 5}).encode(), 400, "prompt", None),
            (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature", None),
            (json.dumps({"prompt": "x", "temperature": 3}).encode(), 400, "temperature", None),
            (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens", None),
            (json.dumps({"prompt": "x", "top_p": 2}).encode(), 400, "top_p", None),
            (json.dumps({"prompt": "x", "stop": [1]}).encode(), 400, "stop", None),
            (json.dumps({"prompt": [1, 99999]}).encode(), 400, "prompt", None),
            (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model", "model_not_found"),
            (json.dumps({"prompt": "x", "n": 0}).encode(), 400, "n", None),
            (json.dumps({"prompt": "x", "suffix": "y"}).encode(), 400, "suffix", "unsupported_parameter"),
            (json.dumps({"prompt": "x", "max_tokens": 5000}).encode(), 400, "max_tokens", None),
        ]
        for raw, want, param, code in cases:
            status, _, data = self.srv.request("POST", "/v1/completions", raw=raw)
            self.assert_error(status, json.loads(data), want, param, code)
        self.test_readme_curl_example()

    def test_prompt_longer_than_the_context_is_refused(self):
        status, body = self.complete(prompt="hello " * 2100, max_tokens=4)
        self.assert_error(status, body, 400, "prompt", "context_length_exceeded")
        status, body = self.complete(prompt="Once upon a time", max_tokens=2045)
        self.assert_error(status, body, 400, None, "context_length_exceeded")

    def test_oversized_body_gets_413(self):
        big = json.dumps({"prompt": "a" * 70000}).encode()
        status, _, data = self.srv.request("POST", "/v1/completions", raw=big)
        self.assert_error(status, json.loads(data), 413, None, "request_too_large")
        status, _, _ = self.srv.request("GET", "/health")
        self.assertEqual(status, 200)

    def test_unknown_path_and_wrong_method(self):
        status, _, data = self.srv.request("GET", "/v1/nothing")
        self.assert_error(status, json.loads(data), 404)
        status, headers, data = self.srv.request("GET", "/v1/completions")
        self.assert_error(status, json.loads(data), 405)
        self.assertEqual(headers.get("Allow"), "POST")


class ShutdownTest(unittest.TestCase):
    def test_sigterm_lets_a_request_in_flight_finish(self):
        srv = h.Server(BINARY, "--threads", "1").start()
        try:
            result = {}

            def run():
                result["r"] = srv.post_json("/v1/completions",
                                            {"prompt": "Once upon a time", "max_tokens": 1500,
                                             "temperature": 0, "ignore_eos": True})

            t = threading.Thread(target=run)
            t.start()
            import time
            time.sleep(0.05)
            rc = srv.stop()
            t.join(60)
            self.assertEqual(rc, 0, srv.logs())
            status, body = result["r"]
            self.assertEqual(status, 200, body)
            self.assertEqual(body["usage"]["completion_tokens"], 1500)
        finally:
            srv.stop()

    def test_bad_model_file_fails_start_with_a_message(self):
        import subprocess
        import tempfile
        with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
            f.write(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
            f.flush()
            p = subprocess.run([BINARY, "--model", f.name, "--port", str(h.free_port())],
                               capture_output=True, text=True, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("cannot load model", p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
