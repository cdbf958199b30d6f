"""Operations in the server: CORS (headers and preflight), HTTPS through libmicrohttpd with
a configured certificate, the connection limit (503 past it, service continues), the
header limit (431), and --check-config on the shipped file."""
import http.client
import os
import socket
import ssl
import subprocess
import tempfile
import time
import unittest

import sieve_harness as h

BINARY = h.sieve_binary()


class CorsAndLimitsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--cors-origins", "https://app.example,https://b.example",
                           "--max-connections", "4", "--max-header-bytes", "8192").start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def test_cors_echoes_an_allowed_origin_only(self):
        _, hdrs, _ = self.srv.request("GET", "/v1/models", headers={"Origin": "https://b.example"})
        self.assertEqual(hdrs.get("Access-Control-Allow-Origin"), "https://b.example")
        _, hdrs, _ = self.srv.request("GET", "/v1/models", headers={"Origin": "https://evil.example"})
        self.assertNotIn("Access-Control-Allow-Origin", hdrs)

    def test_preflight_is_answered(self):
        status, hdrs, _ = self.srv.request("OPTIONS", "/v1/chat/completions",
                                           headers={"Origin": "https://app.example",
                                                    "Access-Control-Request-Method": "POST"})
        self.assertEqual(status, 204)
        self.assertIn("POST", hdrs.get("Access-Control-Allow-Methods", ""))
        self.assertIn("Authorization", hdrs.get("Access-Control-Allow-Headers", ""))

    def test_connections_past_the_limit_get_503_and_service_continues(self):
        idle = []
        try:
            for _ in range(6):
                s = socket.create_connection(("127.0.0.1", self.srv.port), timeout=5)
                idle.append(s)
            time.sleep(0.2)
            status, hdrs, body = self.srv.request("GET", "/v1/models")
            self.assertEqual(status, 503, body)
            self.assertIn(b"too_many_connections", body)
            self.assertIn("Retry-After", hdrs)
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)
        status, _, _ = self.srv.request("GET", "/v1/models")
        self.assertEqual(status, 200)

    def test_oversized_headers_get_431(self):
        status, _, _ = self.srv.request("GET", "/health", headers={"X-Big": "a" * 20000})
        self.assertEqual(status, 431)
        status, _, _ = self.srv.request("GET", "/health")
        self.assertEqual(status, 200)


class TlsTest(unittest.TestCase):
    def test_https_with_a_configured_certificate(self):
        d = tempfile.mkdtemp()
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                       check=True, capture_output=True, timeout=60)
        port = h.free_port()
        p = subprocess.Popen([BINARY, "--port", str(port), "--tls-cert-file", cert,
                              "--tls-key-file", key], stderr=subprocess.PIPE)
        try:
            ctx = ssl.create_default_context(cafile=cert)
            ctx.check_hostname = False
            deadline = time.time() + 30
            while True:
                try:
                    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
                    c.request("GET", "/health")
                    r = c.getresponse()
                    if r.status == 200:
                        break
                except OSError:
                    pass
                self.assertLess(time.time(), deadline, "no HTTPS answer")
                time.sleep(0.1)
            c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
            c.request("POST", "/v1/completions",
                      body=b'{"prompt":"Once upon a time","max_tokens":4,"temperature":0}',
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            self.assertEqual(r.status, 200)
            self.assertIn(b"text_completion", r.read())
        finally:
            p.terminate()
            p.wait(30)

    def test_one_tls_file_without_the_other_is_refused(self):
        p = subprocess.run([BINARY, "--tls-cert-file", "/nonexistent.pem", "--port", "0"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 2)
        self.assertIn("tls_key_file", p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
