"""Integration tests: malformed input against the real server on a free loopback port.

- A catalogue of malformed API requests (bad JSON, wrong types, huge numbers, negative
  counts, deep nesting, huge strings, invalid UTF-8, wrong content types, bad methods,
  unknown paths, /tokenize and /detokenize abuse), each sent as raw bytes: every one gets
  the documented 4xx with an OpenAI error object ({"error": {message, type, param, code}},
  param and code checked where the README names them), and the server keeps serving
  golden completions throughout.
- HTTP-level abuse that libmicrohttpd answers before sieve sees a request (bad header
  lines, bad Content-Length, bad chunked framing, oversized headers and URIs, unknown HTTP
  versions): the right 4xx/5xx status or a closed connection, and service continues.
- Malformed model files: every GGUF seed of the fuzz corpus (tests/fuzz/corpus/fuzz_gguf)
  and corrupted copies of stories260K.gguf (truncations, header, metadata and tensor-info
  corruptions) written to a temporary folder: start-up fails with exit code 1 and a
  "cannot load model" message naming the file, never a signal; random byte flips in the
  metadata either fail the same way or give a server that answers a completion and exits 0
  on SIGTERM.

Only the standard library. Any sanitizer report in a server's output fails the test (under
scripts/test-sanitize.sh the server is the ASan/UBSan build).
"""
import http.client
import json
import os
import random
import signal
import socket
import struct
import subprocess
import tempfile
import time
import unittest

import sieve_harness as h

BINARY = h.sieve_binary()
MODEL = "stories260K"
N_VOCAB = 512
N_CTX = 2048
MAX_BODY = 1 << 20
ANY = object()  # a param or code that is not checked
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "UndefinedBehaviorSanitizer")
C, H, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"


def golden():
    with open(os.path.join(h.shared_dir(), "golden", "stories260K-greedy.json")) as f:
        return json.load(f)["cases"]


def exchange(port, raw, timeout=20):
    """Sends raw bytes on a fresh connection and reads one response:
    (status, headers dict, body bytes), or (None, {}, b"") when the server closed the
    connection without answering."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (413) and close before reading everything
        r = http.client.HTTPResponse(s)
        try:
            r.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None, {}, b""
        return r.status, dict(r.getheaders()), r.read()
    finally:
        s.close()


def request_bytes(method, path, body=b"", headers=None):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    hdrs = {"Host": "127.0.0.1", "Content-Type": "application/json"}
    if method not in ("GET", "HEAD") or body:
        hdrs["Content-Length"] = str(len(body))
    hdrs.update(headers or {})
    head = "%s %s HTTP/1.1\r\n" % (method, path) + "".join(
        "%s: %s\r\n" % kv for kv in hdrs.items() if kv[1] is not None) + "\r\n"
    return head.encode("latin-1") + body


def nested(n, open_, close_, inner=b"1"):
    return open_ * n + inner + close_ * n


def catalogue():
    """(name, method, path, body, headers, status, param, code). Bodies are bytes or JSON
    values; param/code None means JSON null, ANY means not checked."""
    P = {"prompt": "Once upon a time", "max_tokens": 4}
    M = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    cases = []

    def add(name, body, status=400, param=ANY, code=ANY, path=C, method="POST", headers=None):
        cases.append((name, method, path, body, headers, status, param, code))

    # Bad JSON, both endpoints.
    for path in (C, H):
        tag = "chat " if path == H else ""
        add(tag + "not json", b"{not json", param=None, path=path)
        add(tag + "empty body", b"", param=None, path=path)
        add(tag + "array body", b"[1,2]", param=None, path=path)
        add(tag + "truncated object", b'{"prompt": "x"', param=None, path=path)
    add("lone brace", b"{", param=None)
    add("trailing comma", b'{"prompt": "x",}', param=None)
    add("trailing garbage", b'{"prompt": "x"} trailing', param=None)
    add("single quotes", b"{'prompt': 'x'}", param=None)
    add("NaN literal", b'{"prompt": "x", "temperature": NaN}', param=None)
    add("Infinity literal", b'{"prompt": "x", "temperature": Infinity}', param=None)
    add("comment", b'/* c */ {"prompt": "x"}', param=None)
    add("byte order mark", b'\xef\xbb\xbf{"prompt": "x"}', param=None)
    add("null body", b"null", param=None)
    add("string body", b'"prompt"', param=None, path=H)
    add("number body", b"42", param=None)
    # Wrong types.
    for v in (5, {}, True, [[1, 2]], ["a", "b"], [1.5], [-1], [N_VOCAB], []):
        add("prompt %s" % json.dumps(v), {"prompt": v}, param="prompt")
    add("prompt missing", {"max_tokens": 4}, param="prompt")
    for field, v in (("max_tokens", "10"), ("max_tokens", 1.5), ("max_tokens", True),
                     ("temperature", "hot"), ("temperature", []), ("top_p", "x"), ("n", "2"),
                     ("stream", "yes"), ("stop", 5), ("stop", [1]), ("logit_bias", []),
                     ("seed", "x"), ("user", 5), ("model", 5), ("echo", "x"),
                     ("ignore_eos", "no"), ("presence_penalty", "1"), ("priority", "high"),
                     ("max_completion_tokens", "8"), ("min_tokens", 2.5), ("top_k", "40"),
                     ("logprobs", True)):
        add("%s %s" % (field, json.dumps(v)), dict(P, **{field: v}), param=field)
    add("stream_options without stream", dict(P, stream_options={"include_usage": True}),
        param="stream_options")
    add("include_usage not bool", dict(P, stream=True, stream_options={"include_usage": "y"}),
        param="stream_options")
    add("five stop strings", dict(P, stop=["a", "b", "c", "d", "e"]), param="stop")
    add("stop of 300 bytes", dict(P, stop="a" * 300), param="stop")
    add("logit_bias key not an id", dict(P, logit_bias={"abc": 1}), param="logit_bias")
    add("logit_bias value string", dict(P, logit_bias={"1": "x"}), param="logit_bias")
    add("logit_bias value 1000", dict(P, logit_bias={"1": 1000}), param="logit_bias")
    add("logprobs 21", dict(P, logprobs=21), param="logprobs")
    add("model gpt-4", dict(P, model="gpt-4"), status=404, param="model", code="model_not_found")
    add("response_format json_object", dict(P, response_format={"type": "json_object"}),
        param="response_format", code="unsupported_parameter")
    add("response_format string", dict(P, response_format="json"), param="response_format")
    add("suffix", dict(P, suffix="y"), param="suffix", code="unsupported_parameter")
    add("best_of 3", dict(P, best_of=3), param="best_of", code="unsupported_parameter")
    add("presence_penalty 3", dict(P, presence_penalty=3), param="presence_penalty")
    add("repetition_penalty 0", dict(P, repetition_penalty=0), param="repetition_penalty")
    add("min_p 2", dict(P, min_p=2), param="min_p")
    add("top_p 0", dict(P, top_p=0), param="top_p")
    # Chat messages.
    add("chat tools", dict(M, tools=[{"type": "function"}]), path=H, param="tools",
        code="unsupported_parameter")
    add("chat top_logprobs without logprobs", dict(M, top_logprobs=2), path=H,
        param="top_logprobs")
    add("chat logprobs 5", dict(M, logprobs=5), path=H, param="logprobs")
    add("messages string", {"messages": "hi"}, path=H, param="messages")
    add("messages empty", {"messages": []}, path=H, param="messages")
    add("messages missing", {"max_tokens": 4}, path=H, param="messages")
    add("message not object", {"messages": [1]}, path=H, param="messages[0]")
    add("content missing", {"messages": [{"role": "user"}]}, path=H,
        param="messages[0].content")
    add("role robot", {"messages": [{"role": "robot", "content": "x"}]}, path=H,
        param="messages[0].role")
    add("role number", {"messages": [{"role": 5, "content": "x"}]}, path=H,
        param="messages[0].role")
    add("content number", {"messages": [{"role": "user", "content": 5}]}, path=H,
        param="messages[0].content")
    add("content image part", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, path=H,
        param="messages[0].content", code="unsupported_parameter")
    add("content part text number", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}, path=H, param="messages[0].content")
    # Huge numbers.
    add("max_tokens 1e308", dict(P, max_tokens=1e308), param="max_tokens")
    add("max_tokens 10^23", b'{"prompt": "x", "max_tokens": 99999999999999999999999}', param=None)
    add("temperature 1e400", b'{"prompt": "x", "temperature": 1e400}', param=None)
    add("seed 2^64", b'{"prompt": "x", "seed": 18446744073709551616}', param=None)
    add("n 1000000", dict(P, n=1000000), param="n")
    add("top_k 2^40", dict(P, top_k=1 << 40), param="top_k")
    add("priority 10^12", dict(P, priority=10 ** 12), param="priority")
    add("max_tokens past the context", dict(P, max_tokens=N_CTX + 1), param="max_tokens")
    add("logit_bias id 10^20", dict(P, logit_bias={"100000000000000000000": 1}),
        param="logit_bias")
    # Negative counts.
    for field, v in (("max_tokens", -1), ("max_tokens", 0), ("n", 0), ("n", -5),
                     ("top_k", -2), ("min_tokens", -1), ("logprobs", -1),
                     ("max_completion_tokens", -3)):
        add("%s %d" % (field, v), dict(P, **{field: v}), param=field)
    add("chat top_logprobs -1", dict(M, logprobs=True, top_logprobs=-1), path=H,
        param="top_logprobs")
    add("min_tokens over max_tokens", dict(P, min_tokens=10, max_tokens=5), param="min_tokens")
    add("logit_bias id -1", dict(P, logit_bias={"-1": 1}), param="logit_bias")
    # Deep nesting: jansson's depth limit (2048) refuses these without deep recursion.
    add("100000 nested arrays as prompt",
        b'{"prompt": ' + nested(100000, b"[", b"]") + b"}", param=None)
    add("100000 nested objects in an unknown field",
        b'{"prompt": "x", "x": ' + nested(100000, b'{"a":', b"}") + b"}", param=None)
    add("100000 nested arrays as the body", nested(100000, b"[", b"]"), param=None)
    add("3000 nested arrays in chat content", b'{"messages": [{"role": "user", "content": '
        + nested(3000, b"[", b"]") + b"}]}", path=H, param=None)
    add("100000 nested arrays to /tokenize", b'{"content": ' + nested(100000, b"[", b"]") + b"}",
        path=TOK, param=None)
    # Huge strings.
    add("prompt over max_body_bytes", {"prompt": "a" * (MAX_BODY + 10)}, status=413,
        param=None, code="request_too_large")
    add("prompt over the context", {"prompt": "hello " * 3000, "max_tokens": 4},
        param="prompt", code="context_length_exceeded")
    add("stop of 10000 bytes", dict(P, stop="s" * 10000), param="stop")
    add("model name of 100 KB", dict(P, model="m" * 100000), status=404, param="model",
        code="model_not_found")
    add("chat content over the context", {"messages": [{"role": "user", "content": "a b " * 5000}],
                                           "max_tokens": 4}, path=H, param="messages",
        code="context_length_exceeded")
    add("/tokenize over max_body_bytes", {"content": "a" * (MAX_BODY + 10)}, path=TOK,
        status=413, param=None, code="request_too_large")
    # Invalid UTF-8 inside JSON strings.
    add("prompt with 0xFF", b'{"prompt": "a\xffb"}', param=None)
    add("prompt with an overlong slash", b'{"prompt": "a\xc0\xafb"}', param=None)
    add("prompt with a lone surrogate escape", b'{"prompt": "a\\ud800b"}', param=None)
    add("key with invalid UTF-8", b'{"pro\xffmpt": "x"}', param=None)
    add("string ending mid-character", b'{"prompt": "a\xe2\x82"}', param=None)
    add("chat content with an encoded surrogate",
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', path=H, param=None)
    # Wrong content types with bodies that are not JSON.
    add("form-encoded body", b"prompt=hello&max_tokens=4", param=None,
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    add("multipart body", b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--b--',
        param=None, headers={"Content-Type": "multipart/form-data; boundary=b"})
    add("UTF-16 body", '{"prompt": "hi"}'.encode("utf-16"), param=None,
        headers={"Content-Type": "application/json; charset=utf-16"})
    add("POST with Content-Length 0", b"", param=None, headers={"Content-Length": "0"})
    add("body over the limit announced with Expect", b"", status=413, param=None,
        code="request_too_large",
        headers={"Content-Length": "99999999999", "Expect": "100-continue"})
    # Bad methods (405 with Allow).
    for method, path in (("GET", C), ("PUT", C), ("DELETE", H), ("PATCH", H), ("OPTIONS", C),
                         ("BREW", C), ("POST", "/v1/models"), ("POST", "/health"),
                         ("DELETE", "/metrics"), ("GET", TOK), ("PUT", DETOK)):
        add("%s %s" % (method, path), b"", method=method, path=path, status=405, param=None,
            code="method_not_allowed")
    # Unknown paths.
    for path in ("/v2/completions", "/v1/completions/", "/v1/chat/completion", "/v1/embeddings",
                 "/../../etc/passwd", "/v1/" + "x" * 3000, "/v1/models/gpt-4"):
        code = "model_not_found" if path.startswith("/v1/models/") else "not_found"
        add("GET %s" % path[:40], b"", method="GET", path=path, status=404, param=ANY, code=code)
    add("POST unknown path", P, path="/v1/completion", status=404, param=None, code="not_found")
    # /tokenize and /detokenize.
    add("/tokenize content number", {"content": 5}, path=TOK, param="content")
    add("/tokenize add_special string", {"content": "x", "add_special": "yes"}, path=TOK,
        param="add_special")
    add("/tokenize body array", b"[]", path=TOK, param=None)
    add("/detokenize tokens string", {"tokens": "x"}, path=DETOK, param="tokens")
    add("/detokenize token -1", {"tokens": [-1]}, path=DETOK, param="tokens")
    add("/detokenize token past the vocabulary", {"tokens": [1, N_VOCAB]}, path=DETOK,
        param="tokens")
    add("/detokenize token 2^63", b'{"tokens": [9223372036854775807]}', path=DETOK,
        param="tokens")
    return cases


class MalformedRequestTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--threads", "2", "--max-body-bytes", str(MAX_BODY),
                           "--connection-timeout", "5").start()

    @classmethod
    def tearDownClass(cls):
        logs = cls.srv.logs()
        cls.srv.stop()
        for mark in SANITIZER_MARKS:
            assert mark not in logs, logs[-4000:]

    def assert_serving(self):
        self.assertIsNone(self.srv.proc.poll(), "the server died:\n" + self.srv.logs()[-3000:])
        case = golden()[0]
        status, body = self.srv.post_json(C, {"prompt": case["prompt"], "max_tokens": 32,
                                              "temperature": 0})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["choices"][0]["text"], case["completion_text"])

    def assert_openai_error(self, name, status, headers, data, want_status, param, code):
        self.assertEqual(status, want_status, "%s: %r" % (name, data[:300]))
        self.assertTrue(headers.get("Content-Type", "").startswith("application/json"),
                        "%s: %r" % (name, headers))
        body = json.loads(data)
        self.assertEqual(set(body), {"error"}, name)
        err = body["error"]
        self.assertEqual(set(err), {"message", "type", "param", "code"}, name)
        self.assertIsInstance(err["message"], str, name)
        self.assertTrue(err["message"], name)
        self.assertIsInstance(err["type"], str, name)
        if param is not ANY:
            self.assertEqual(err["param"], param, "%s: %s" % (name, err))
        if code is not ANY:
            self.assertEqual(err["code"], code, "%s: %s" % (name, err))
        if want_status == 405:
            self.assertIn("Allow", headers, name)

    def test_catalogue_of_malformed_requests_gets_openai_errors(self):
        cases = catalogue()
        self.assertGreaterEqual(len(cases), 60)
        for i, (name, method, path, body, headers, want, param, code) in enumerate(cases):
            with self.subTest(name):
                status, hdrs, data = exchange(self.srv.port, request_bytes(method, path, body,
                                                                           headers))
                self.assert_openai_error(name, status, hdrs, data, want, param, code)
            if i % 20 == 19:
                self.assert_serving()
        self.assert_serving()
        print("\n  %d malformed requests, each a 4xx with an OpenAI error object" % len(cases))

    def test_json_with_any_content_type_is_served(self):
        # README's curl examples send JSON as application/x-www-form-urlencoded (curl -d);
        # the body decides, the Content-Type header is not checked.
        for ctype in ("application/x-www-form-urlencoded", "text/plain", None):
            status, _, data = exchange(self.srv.port, request_bytes(
                "POST", C, {"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0},
                {"Content-Type": ctype}))
            self.assertEqual(status, 200, data)

    def test_http_level_abuse_gets_a_status_or_a_close(self):
        # libmicrohttpd answers these itself, before sieve's handler runs, so their bodies
        # are its HTML pages, not OpenAI error objects.
        cases = [
            ("header line of 100 KB", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100000
             + b"\r\n\r\n", {431}),
            ("1000 header lines", b"GET /health HTTP/1.1\r\nHost: x\r\n"
             + b"".join(b"X-%d: y\r\n" % i for i in range(1000)) + b"\r\n", {431}),
            ("URI of 40 KB", b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414}),
            ("Content-Length -1", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
             b"Content-Length: -1\r\n\r\n{}", {400}),
            ("Content-Length abc", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
             b"Content-Length: abc\r\n\r\n{}", {400}),
            ("bad chunk size", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
             b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", {400}),
            ("header without a colon", b"GET /health HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
             {400}),
            ("HTTP/9.9", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", {505}),
            ("request line garbage", b"GARBAGE\r\n\r\n", {None, 400}),
            ("binary noise", bytes(range(256)) * 4, {None, 400}),
        ]
        for name, raw, want in cases:
            with self.subTest(name):
                status, _, _ = exchange(self.srv.port, raw, timeout=10)
                self.assertIn(status, want, name)
        self.assert_serving()

    def test_chunked_body_is_parsed_like_any_other(self):
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                          for i in range(0, len(body), 7))
        raw = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        status, _, data = exchange(self.srv.port, raw)
        self.assertEqual(status, 200, data)


# ---- malformed model files ---------------------------------------------------------------

def gguf_layout(data):
    """Offsets in a GGUF v2/v3 file: header fields, each kv (key, type and value offsets),
    each tensor info and the data section."""
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_value(t, p):
        if t == 8:
            (n,) = struct.unpack_from("<Q", data, p)
            return p + 8 + n
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, p)
            p += 12
            if et == 8:
                for _ in range(n):
                    p = skip_value(8, p)
                return p
            return p + n * sizes[et]
        return p + sizes[t]

    kvs = {}
    for _ in range(n_kv):
        at = pos
        (klen,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8:pos + 8 + klen].decode()
        pos += 8 + klen
        (t,) = struct.unpack_from("<I", data, pos)
        kvs[key] = {"at": at, "type_at": pos, "value_at": pos + 4, "type": t}
        pos = skip_value(t, pos + 4)
        kvs[key]["end"] = pos
    tensors = []
    for _ in range(n_tensors):
        at = pos
        (nlen,) = struct.unpack_from("<Q", data, pos)
        name = data[pos + 8:pos + 8 + nlen].decode()
        pos += 8 + nlen
        (nd,) = struct.unpack_from("<I", data, pos)
        dims_at = pos + 4
        pos = dims_at + 8 * nd
        tensors.append({"name": name, "at": at, "ndims_at": dims_at - 4, "dims_at": dims_at,
                        "type_at": pos, "offset_at": pos + 4})
        pos += 12
    return {"kvs": kvs, "tensors": tensors, "infos_end": pos,
            "data_at": (pos + 31) // 32 * 32}


def patch(data, at, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def model_corruptions(real):
    """(name, bytes) of copies of the real model that must be refused at start-up."""
    L = gguf_layout(real)
    kv, tn = L["kvs"], L["tensors"]
    out = [("empty", b""), ("magic only", real[:4])]
    for cut in (8, 16, 24, kv["general.architecture"]["end"] - 3, L["infos_end"] - 5,
                L["data_at"], L["data_at"] + 1000, len(real) // 2, len(real) - 1):
        out.append(("truncated at %d" % cut, real[:cut]))
    out += [
        ("bad magic", b"GGUX" + real[4:]),
        ("version 1", patch(real, 4, "<I", 1)),
        ("version 4", patch(real, 4, "<I", 4)),
        ("tensor count 2^63", patch(real, 8, "<Q", 1 << 63)),
        ("kv count 2^63", patch(real, 16, "<Q", 1 << 63)),
        ("kv count + 1", patch(real, 16, "<Q", len(kv) + 1)),
        ("tensor count - 1", patch(real, 8, "<Q", len(tn) - 1)),
        ("first key length 2^62", patch(real, 24, "<Q", 1 << 62)),
        ("architecture string length 2^40",
         patch(real, kv["general.architecture"]["value_at"], "<Q", 1 << 40)),
        ("architecture value type 99", patch(real, kv["general.architecture"]["type_at"], "<I", 99)),
        ("tokens array count 2^60",
         patch(real, kv["tokenizer.ggml.tokens"]["value_at"] + 4, "<Q", 1 << 60)),
        ("first tensor type 99", patch(real, tn[0]["type_at"], "<I", 99)),
        ("first tensor ndims 5", patch(real, tn[0]["ndims_at"], "<I", 5)),
        ("first tensor dim 0", patch(real, tn[0]["dims_at"], "<Q", 0)),
        ("first tensor dim 2^40", patch(real, tn[0]["dims_at"], "<Q", 1 << 40)),
        ("last tensor offset past the end", patch(real, tn[-1]["offset_at"], "<Q", 1 << 40)),
        ("last tensor offset unaligned", patch(real, tn[-1]["offset_at"], "<Q",
                                               struct.unpack_from("<Q", real, tn[-1]["offset_at"])[0] + 1)),
    ]
    for key, value, fmt in (("llama.embedding_length", 0, "<I"),
                            ("llama.embedding_length", 1 << 30, "<I"),
                            ("llama.attention.head_count", 0, "<I"),
                            ("llama.attention.head_count", 3, "<I"),
                            ("llama.attention.head_count_kv", 0, "<I"),
                            ("llama.attention.head_count_kv", 3, "<I"),
                            ("llama.block_count", 0, "<I"),
                            ("llama.block_count", 1000, "<I"),
                            ("llama.feed_forward_length", 7, "<I"),
                            ("llama.context_length", 0, "<I")):
        if key in kv and kv[key]["type"] in (4, 5):
            out.append(("%s = %d" % (key, value), patch(real, kv[key]["value_at"], fmt, value)))
    # A duplicated tensor name (same length, so the layout stays).
    for a in tn:
        b = [t for t in tn if t is not a and len(t["name"]) == len(a["name"])]
        if b:
            name = a["name"].encode()
            out.append(("duplicate tensor name", real[:b[0]["at"] + 8] + name
                        + real[b[0]["at"] + 8 + len(name):]))
            break
    return out


class MalformedModelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="sieve-models-")
        with open(os.path.join(h.shared_dir(), "models", "stories260K.gguf"), "rb") as f:
            cls.real = f.read()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def write(self, name, data):
        path = os.path.join(self.tmp.name, "".join(c if c.isalnum() else "_" for c in name)
                            + ".gguf")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def start(self, path, timeout=60):
        """Runs sieve on path: ("exit", code, output) when it stops by itself, or
        ("served", code after SIGTERM, output) when it came up, answered a completion
        (asserted) and was stopped."""
        port = h.free_port()
        log = tempfile.TemporaryFile()
        p = subprocess.Popen([BINARY, "--host", "127.0.0.1", "--port", str(port), "--model", path,
                              "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            outcome = None
            while time.monotonic() < deadline and outcome is None:
                if p.poll() is not None:
                    outcome = "exit"
                    break
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    c.request("GET", "/health")
                    if c.getresponse().status == 200:
                        c.request("POST", "/v1/completions", body=json.dumps(
                            {"prompt": "Once upon a time", "max_tokens": 8}),
                            headers={"Content-Type": "application/json"})
                        r = c.getresponse()
                        r.read()
                        self.assertIn(r.status, (200, 400), path)
                        outcome = "served"
                    c.close()
                except OSError:
                    pass
                time.sleep(0.02)
            if outcome != "exit":
                p.send_signal(signal.SIGTERM)
            try:
                code = p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                code = p.wait()
                outcome = "ignored SIGTERM"
            log.seek(0)
            return outcome or "hung", code, log.read().decode(errors="replace")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()

    def assert_refused(self, name, path):
        outcome, code, out = self.start(path)
        for mark in SANITIZER_MARKS:
            self.assertNotIn(mark, out, "%s:\n%s" % (name, out[-3000:]))
        self.assertEqual(outcome, "exit", "%s: the server %s instead of refusing the model:\n%s"
                         % (name, outcome, out[-2000:]))
        self.assertEqual(code, 1, "%s: exit code %d (negative: killed by that signal):\n%s"
                         % (name, code, out[-2000:]))
        self.assertIn("cannot load model", out, name)
        self.assertIn(os.path.basename(path), out, name)

    def test_gguf_fuzz_seeds_are_refused_with_a_message(self):
        seeds = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "corpus",
                             "fuzz_gguf")
        names = sorted(os.listdir(seeds))
        self.assertGreater(len(names), 20)
        for name in names:
            with self.subTest(name):
                with open(os.path.join(seeds, name), "rb") as f:
                    self.assert_refused(name, self.write("seed-" + name, f.read()))
        print("\n  %d GGUF fuzz seeds refused with exit code 1" % len(names))

    def test_corrupted_copies_of_the_real_model_are_refused(self):
        cases = model_corruptions(self.real)
        self.assertGreater(len(cases), 30)
        for name, data in cases:
            with self.subTest(name):
                self.assert_refused(name, self.write(name, data))
        print("\n  %d corrupted copies of stories260K.gguf refused with exit code 1" % len(cases))

    def test_paths_that_are_not_model_files_are_refused(self):
        for name, path in (("missing file", os.path.join(self.tmp.name, "missing.gguf")),
                           ("a directory", self.tmp.name), ("/dev/null", "/dev/null")):
            with self.subTest(name):
                self.assert_refused(name, path)

    def test_random_metadata_byte_flips_never_crash(self):
        L = gguf_layout(self.real)
        rng = random.Random(1234)
        outcomes = {}
        for i in range(16):
            b = bytearray(self.real)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(24, L["infos_end"])] ^= 1 << rng.randrange(8)
            path = self.write("flip%d" % i, bytes(b))
            outcome, code, out = self.start(path)
            for mark in SANITIZER_MARKS:
                self.assertNotIn(mark, out, "flip %d:\n%s" % (i, out[-3000:]))
            if outcome == "exit":
                self.assertEqual(code, 1, "flip %d: exit code %d:\n%s" % (i, code, out[-2000:]))
                self.assertIn("cannot load model", out)
            else:
                self.assertEqual(outcome, "served", "flip %d: %s" % (i, out[-2000:]))
                self.assertEqual(code, 0, "flip %d: exit code %d after SIGTERM" % (i, code))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        print("\n  16 metadata bit-flip copies: %s" % outcomes)

    def test_a_fifo_as_the_model_is_refused(self):
        # open() on a FIFO would block until a writer appears; rt_gguf_open opens without
        # blocking and then refuses what is not a regular file.
        fifo = os.path.join(self.tmp.name, "model.fifo")
        os.mkfifo(fifo)
        outcome, code, out = self.start(fifo, timeout=5)
        self.assertEqual((outcome, code), ("exit", 1), out[-2000:])


if __name__ == "__main__":
    unittest.main(verbosity=2)
