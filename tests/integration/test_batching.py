"""Integration tests of continuous batching against the real server on a free loopback port:
batch invariance (with and without preemption), cancellation of clients that hang up
(streaming and non-streaming), prefix caching, 429 when the queue is full, and the
/metrics text format. Every server is stopped by PID in tearDownClass whatever happens.

Only the standard library is used; metrics are read from GET /metrics.
"""
import http.client
import json
import os
import re
import socket
import struct
import threading
import time
import unittest

import sieve_harness as h

BINARY = h.sieve_binary()
MODEL = "stories260K"
KV_BYTES_PER_TOKEN = 1280  # stories260K: 5 layers x 4 kv heads x 16 dims x (K + V) x f32


def golden():
    with open(os.path.join(h.shared_dir(), "golden", "stories260K-greedy.json")) as f:
        return json.load(f)["cases"]


# ---- helpers -----------------------------------------------------------------

METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^{}]*\})? (\S+)$')


def parse_metrics(text):
    """{(name, labels): float} of every sample line in a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def metrics(srv):
    status, _, data = srv.request("GET", "/metrics", timeout=10)
    if status != 200:
        raise AssertionError("GET /metrics answered %d" % status)
    return parse_metrics(data.decode())


def metric(m, name, labels=""):
    return m[(name, labels)]


def cancelled(m):
    return metric(m, "sieve_requests_finished_total", '{reason="cancelled"}')


def finished_length(m):
    return metric(m, "sieve_requests_finished_total", '{reason="length"}')


def wait_idle(srv, timeout=10.0):
    """Polls /metrics until no KV block is used and nothing runs; returns the last sample
    and the seconds it took."""
    t0 = time.monotonic()
    m = metrics(srv)
    while time.monotonic() - t0 < timeout:
        if (metric(m, "sieve_kv_blocks_used") == 0 and metric(m, "sieve_requests_running") == 0
                and metric(m, "sieve_requests_waiting") == 0):
            break
        time.sleep(0.05)
        m = metrics(srv)
    return m, time.monotonic() - t0


def run_concurrently(fns, timeout=120):
    """Calls every fn at once (a barrier releases them together); returns their results
    in order. An exception in fn becomes its result."""
    results = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i):
        try:
            barrier.wait(30)
            results[i] = fns[i]()
        except Exception as e:  # reported by the caller's assertions
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def complete(srv, timeout=120, **body):
    body.setdefault("model", MODEL)
    body.setdefault("temperature", 0)
    status, headers, data = srv.request("POST", "/v1/completions", body, timeout=timeout)
    return status, headers, json.loads(data) if data else None


def open_request(port, body):
    """Sends one POST /v1/completions on a raw socket and returns the socket unread."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return s


def close_abruptly(s, reset):
    """reset: an RST (SO_LINGER 0) rather than an orderly FIN."""
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def read_sse_chunks(s, n):
    """Reads from s until n SSE 'data:' events arrived; returns the bytes read."""
    buf = b""
    while buf.count(b"data: {") < n:
        b = s.recv(4096)
        if not b:
            raise AssertionError("the stream ended early: %r" % buf[-300:])
        buf += b
    return buf


# ---- tests -------------------------------------------------------------------

class BatchInvarianceTest(unittest.TestCase):
    """Greedy completions do not depend on what else is in the batch."""

    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--threads", "2").start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def test_16_concurrent_greedy_completions_equal_their_golden_text(self):
        cases = golden()
        picks = [cases[i % len(cases)] for i in range(16)]
        results = run_concurrently([
            (lambda c=c: complete(self.srv, prompt=c["prompt"], max_tokens=32)) for c in picks])
        for case, r in zip(picks, results):
            self.assertIsInstance(r, tuple, r)
            status, _, body = r
            self.assertEqual(status, 200, body)
            self.assertEqual(body["choices"][0]["text"], case["completion_text"], case["prompt"])
            self.assertEqual(body["usage"]["completion_tokens"], 32)


class PreemptionTest(unittest.TestCase):
    """A KV cache of ~300 tokens for 16 sequences of ~75 tokens: sequences are preempted
    and recomputed, and still produce exactly their solo output."""

    KV_TOKENS = 300
    MAX_TOKENS = 64

    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--threads", "2", "--context-length", "256",
                           "--kv-cache-bytes", str(cls.KV_TOKENS * KV_BYTES_PER_TOKEN),
                           "--kv-block-size", "4", "--max-running-seqs", "16").start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def test_the_cache_is_as_small_as_configured(self):
        m = metrics(self.srv)
        self.assertEqual(metric(m, "sieve_kv_bytes_per_token"), KV_BYTES_PER_TOKEN)
        self.assertEqual(metric(m, "sieve_kv_block_size_tokens"), 4)
        self.assertEqual(metric(m, "sieve_kv_blocks_total"), self.KV_TOKENS // 4)

    def test_preempted_sequences_produce_their_solo_output(self):
        cases = golden()
        need = sum(len(cases[i % len(cases)]["prompt_token_ids"]) + self.MAX_TOKENS
                   for i in range(16))
        self.assertGreater(need, 2 * self.KV_TOKENS)  # preemption is unavoidable
        solo = {}
        for c in cases:
            status, _, body = complete(self.srv, prompt=c["prompt"], max_tokens=self.MAX_TOKENS,
                                       logprobs=0)
            self.assertEqual(status, 200, body)
            choice = body["choices"][0]
            self.assertEqual("".join(choice["logprobs"]["tokens"][:32]), c["completion_text"],
                             c["prompt"])
            solo[c["prompt"]] = choice["text"]
        before = metrics(self.srv)
        picks = [cases[i % len(cases)] for i in range(16)]
        results = run_concurrently([
            (lambda c=c: complete(self.srv, prompt=c["prompt"], max_tokens=self.MAX_TOKENS))
            for c in picks])
        after, _ = wait_idle(self.srv)
        for case, r in zip(picks, results):
            self.assertIsInstance(r, tuple, r)
            status, _, body = r
            self.assertEqual(status, 200, body)
            self.assertEqual(body["usage"]["completion_tokens"], self.MAX_TOKENS)
            self.assertEqual(body["choices"][0]["text"], solo[case["prompt"]], case["prompt"])
            self.assertTrue(body["choices"][0]["text"].startswith(case["completion_text"]))
        self.assertGreater(metric(after, "sieve_preemptions_total"),
                           metric(before, "sieve_preemptions_total"))
        self.assertEqual(metric(after, "sieve_kv_blocks_used"), 0)


class CancellationTest(unittest.TestCase):
    """Clients that hang up get their sequences cancelled and their KV blocks freed."""

    maxDiff = None

    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--threads", "2").start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def assert_idle(self, m, took):
        gauges = {k: metric(m, k) for k in
                  ("sieve_kv_blocks_used", "sieve_requests_running", "sieve_requests_waiting")}
        self.assertEqual(gauges, dict.fromkeys(gauges, 0.0),
                         "gauges still not idle %.1f s after every client hung up" % took)

    def test_streaming_clients_that_hang_up_are_cancelled(self):
        before = metrics(self.srv)
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000,
                "temperature": 0, "ignore_eos": True, "stream": True}

        def client(i):
            s = open_request(self.srv.port, body)
            try:
                read_sse_chunks(s, 2)
            finally:
                close_abruptly(s, reset=i % 2 == 0)
            return True

        results = run_concurrently([(lambda i=i: client(i)) for i in range(20)], timeout=60)
        for r in results:
            self.assertIs(r, True, r)
        after, took = wait_idle(self.srv)
        self.assertEqual(cancelled(after) - cancelled(before), 20)
        self.assertEqual(finished_length(after), finished_length(before))
        self.assert_idle(after, took)

    def test_non_streaming_clients_that_hang_up_are_cancelled(self):
        before = metrics(self.srv)
        body = {"model": MODEL, "prompt": "The little dog", "max_tokens": 1500,
                "temperature": 0, "ignore_eos": True}
        socks = [open_request(self.srv.port, body) for _ in range(5)]
        time.sleep(0.2)
        # On a loaded machine the server may not have read them yet: hang up only once
        # all five are with the engine, so each must be noticed on a suspended socket.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            m = metrics(self.srv)
            if metric(m, "sieve_requests_running") + metric(m, "sieve_requests_waiting") >= 5:
                break
            time.sleep(0.02)
        for i, s in enumerate(socks):
            close_abruptly(s, reset=i % 2 == 1)
        after, took = wait_idle(self.srv)
        self.assertEqual(cancelled(after) - cancelled(before), 5)
        # None ran to its end: the hang-up was noticed while the answer was computed
        # (the five take seconds together; they were cancelled within 10 s of the hang-up).
        self.assertEqual(finished_length(after), finished_length(before))
        self.assert_idle(after, took)
        status, _, body = complete(self.srv, prompt="Once upon a time", max_tokens=8)
        self.assertEqual(status, 200, body)


class PrefixCachingTest(unittest.TestCase):
    LONG_PROMPT = " ".join(c["prompt"] + "." for c in golden()) * 4

    @classmethod
    def setUpClass(cls):
        cls.on = h.Server(BINARY, "--threads", "2").start()
        cls.off = h.Server(BINARY, "--threads", "2", "--prefix-caching", "false").start()

    @classmethod
    def tearDownClass(cls):
        cls.on.stop()
        cls.off.stop()

    def hits_of_two_identical_requests(self, srv):
        hits = []
        for _ in range(2):
            status, _, body = complete(srv, prompt=self.LONG_PROMPT, max_tokens=4)
            self.assertEqual(status, 200, body)
            self.assertGreaterEqual(body["usage"]["prompt_tokens"], 280)
            hits.append(metric(metrics(srv), "sieve_prefix_cache_hits_total"))
        return hits[1] - hits[0]

    def test_a_repeated_prompt_hits_the_prefix_cache(self):
        self.assertGreaterEqual(self.hits_of_two_identical_requests(self.on), 256)

    def test_without_prefix_caching_nothing_hits(self):
        self.assertEqual(self.hits_of_two_identical_requests(self.off), 0)
        self.assertEqual(metric(metrics(self.off), "sieve_prefix_cache_hits_total"), 0)


class QueueFullTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--threads", "2", "--max-running-seqs", "1",
                           "--max-waiting", "1").start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def test_requests_beyond_the_queue_get_429_with_retry_after(self):
        results = run_concurrently([
            (lambda: complete(self.srv, prompt="Once upon a time", max_tokens=1000,
                              ignore_eos=True)) for _ in range(6)])
        n429 = 0
        for r in results:
            self.assertIsInstance(r, tuple, r)
            status, headers, body = r
            if status == 429:
                n429 += 1
                self.assertIn("Retry-After", headers)
                self.assertRegex(headers["Retry-After"], r"^\d+$")
                self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
                self.assertTrue(body["error"]["message"])
            else:
                self.assertEqual(status, 200, body)
                self.assertEqual(body["usage"]["completion_tokens"], 1000)
        self.assertGreaterEqual(n429, 1)
        self.assertLessEqual(n429, 4)  # one runs and one waits


class MetricsFormatTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--threads", "2").start()
        for c in golden()[:3]:
            complete(cls.srv, prompt=c["prompt"], max_tokens=8)

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def test_every_line_is_a_comment_or_a_sieve_sample(self):
        status, headers, data = self.srv.request("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers.get("Content-Type", "").startswith("text/plain"), headers)
        text = data.decode()
        self.assertTrue(text.endswith("\n"))
        for line in text.splitlines():
            if line.startswith("#"):
                self.assertRegex(line, r"^# (HELP sieve_\w+ .+|TYPE sieve_\w+ "
                                       r"(counter|gauge|histogram|summary|untyped))$")
                continue
            m = METRIC_LINE.match(line)
            self.assertIsNotNone(m, repr(line))
            self.assertTrue(m.group(1).startswith("sieve_"), line)
            float(m.group(3))
            if m.group(2):
                self.assertRegex(m.group(2), r'^\{\w+="[^"]*"(,\w+="[^"]*")*\}$')

    def test_histogram_buckets_are_cumulative_and_end_with_inf_equal_to_count(self):
        status, _, data = self.srv.request("GET", "/metrics")
        lines = data.decode().splitlines()
        hists = [l.split()[2] for l in lines if l.startswith("# TYPE") and l.endswith("histogram")]
        self.assertIn("sieve_time_to_first_token_seconds", hists)
        samples = [METRIC_LINE.match(l) for l in lines if not l.startswith("#")]
        for name in hists:
            buckets = [(m.group(2), float(m.group(3))) for m in samples
                       if m.group(1) == name + "_bucket"]
            self.assertGreater(len(buckets), 1, name)
            bounds = [re.match(r'^\{le="([^"]+)"\}$', lab).group(1) for lab, _ in buckets]
            self.assertEqual(bounds[-1], "+Inf", name)
            numeric = [float(b) for b in bounds[:-1]]
            self.assertEqual(numeric, sorted(numeric), name)
            self.assertEqual(len(set(numeric)), len(numeric), name)
            counts = [v for _, v in buckets]
            self.assertEqual(counts, sorted(counts), name + " buckets are not cumulative")
            count = [float(m.group(3)) for m in samples if m.group(1) == name + "_count"]
            total = [float(m.group(3)) for m in samples if m.group(1) == name + "_sum"]
            self.assertEqual(len(count), 1, name)
            self.assertEqual(len(total), 1, name)
            self.assertEqual(counts[-1], count[0], name)
        m = parse_metrics(data.decode())
        self.assertGreaterEqual(metric(m, "sieve_time_to_first_token_seconds_count"), 3)

    def test_counters_add_up_after_traffic(self):
        m = metrics(self.srv)
        self.assertGreaterEqual(finished_length(m), 3)
        self.assertGreaterEqual(metric(m, "sieve_prompt_tokens_total"),
                                sum(len(c["prompt_token_ids"]) for c in golden()[:3]))
        self.assertGreaterEqual(metric(m, "sieve_generation_tokens_total"), 3 * 8)


if __name__ == "__main__":
    unittest.main(verbosity=2)
