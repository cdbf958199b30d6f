"""API keys: with keys configured (flag or key file), the API needs
'Authorization: Bearer KEY' -- no key and a wrong key get 401 with an OpenAI error object
and WWW-Authenticate, the right key (any of several) works, including through the
official client; health probes, /metrics and the chat page stay open."""
import json
import os
import tempfile
import unittest

import openai

import sieve_harness as h

BINARY = h.sieve_binary()


class AuthTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.keyfile = tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False)
        cls.keyfile.write("# one key per line\nkey-from-file\n")
        cls.keyfile.close()
        cls.srv = h.Server(BINARY, "--api-keys", "alpha-key,beta-key",
                           "--api-key-file", cls.keyfile.name).start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()
        os.unlink(cls.keyfile.name)

    def complete(self, headers):
        status, hdrs, data = self.srv.request(
            "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4,
                                        "temperature": 0}, headers=headers)
        return status, hdrs, json.loads(data)

    def test_missing_key_is_401(self):
        status, hdrs, body = self.complete({})
        self.assertEqual(status, 401)
        self.assertEqual(body["error"]["code"], "invalid_api_key")
        self.assertIn("API key", body["error"]["message"])
        self.assertEqual(hdrs.get("WWW-Authenticate"), "Bearer")

    def test_wrong_key_is_401(self):
        for value in ("Bearer nope", "Bearer alpha-key2", "Bearer alpha-ke", "Basic alpha-key",
                      "alpha-key"):
            status, _, body = self.complete({"Authorization": value})
            self.assertEqual(status, 401, value)
            self.assertEqual(body["error"]["type"], "invalid_request_error")

    def test_each_configured_key_works(self):
        for key in ("alpha-key", "beta-key", "key-from-file"):
            status, _, body = self.complete({"Authorization": "Bearer " + key})
            self.assertEqual(status, 200, key)
            self.assertTrue(body["choices"][0]["text"])

    def test_official_client_with_and_without_key(self):
        base = "http://127.0.0.1:%d/v1" % self.srv.port
        good = openai.OpenAI(base_url=base, api_key="beta-key", max_retries=0)
        self.assertEqual([m.id for m in good.models.list()], ["stories260K"])
        bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError) as ctx:
            bad.models.list()
        self.assertEqual(ctx.exception.status_code, 401)

    def test_tokenize_needs_a_key_too(self):
        status, _, _ = self.srv.request("POST", "/tokenize", {"content": "hi"})
        self.assertEqual(status, 401)
        status, _, _ = self.srv.request("POST", "/tokenize", {"content": "hi"},
                                        headers={"Authorization": "Bearer alpha-key"})
        self.assertEqual(status, 200)

    def test_probes_metrics_and_page_stay_open(self):
        for path in ("/health", "/live", "/metrics", "/"):
            status, _, _ = self.srv.request("GET", path)
            self.assertEqual(status, 200, path)


if __name__ == "__main__":
    unittest.main(verbosity=2)
