#!/usr/bin/env python3
"""soak.py - sieve under steady load for a long while: does anything leak or degrade?

Starts its own server (--binary, --model, --server-args) on a free 127.0.0.1 port and keeps
--concurrency client threads busy for --minutes with a mix of requests: /v1/completions and
/v1/chat/completions, streaming and not, of random lengths, a fraction of them abandoned by
the client on purpose (before the response, in the middle of the body, or in the middle of
the stream). Every minute it prints the requests done, the errors, the server's RSS (VmRSS
from /proc/PID/status), the KV blocks in use (/metrics) and latency percentiles.

At the end, after the load stops and the server has gone idle, it checks that every KV block
is free, that the server still answers and exits with 0 on SIGTERM, and that its RSS did not
grow by more than --rss-growth-mib from the end of the first minute (the warm-up: the KV pool,
the worker pool and allocator arenas are touched then) to the end. It exits with 1 when any
request failed unexpectedly or a check failed. Standard library only; loopback only.
"""
import argparse
import http.client
import json
import os
import random
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
WORDS = ("Once upon a time there was a little girl named Lily who loved to play outside "
         "in the park with her dog and her big red ball and one day she saw a bird").split()
HEADERS = {"Content-Type": "application/json"}
DISCONNECTS = ("before_response", "mid_body", "mid_stream")


def percentile(values, p):
    """Linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def ms(x):
    return "-" if x is None else "%.0f" % (x * 1e3)


# ---- the server -------------------------------------------------------------------

def default_model():
    shared = os.environ.get("SIEVE_SHARED_DIR") or os.path.join(ROOT, "..", "shared")
    return os.path.normpath(os.path.join(shared, "models", "stories260K.gguf"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="sieve-soak-", suffix=".log", delete=False)
        cmd = [args.binary, "--host", "127.0.0.1", "--port", str(self.port), "--model",
               args.model] + shlex.split(args.server_args or "")
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit("soak: %s exited with %d:\n%s" % (args.binary, self.proc.returncode,
                                                          self.logs()[-4000:]))
            try:
                if self.get("/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        sys.exit("soak: the server did not answer /health within 60 s (log: %s)" % self.log.name)

    def logs(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def connect(self, timeout):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path, timeout=10.0):
        conn = self.connect(timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def rss_mib(self):
        try:
            with open("/proc/%d/status" % self.proc.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return None

    def metrics(self):
        """{name: value} of the unlabelled sieve_* samples; {} when /metrics fails."""
        out = {}
        try:
            status, data = self.get("/metrics")
        except OSError:
            return out
        if status != 200:
            return out
        for line in data.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
                try:
                    out[parts[0]] = float(parts[1])
                except ValueError:
                    pass
        return out

    def stop(self):
        """SIGTERM, then SIGKILL after 60 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


# ---- requests ---------------------------------------------------------------------

class Stats:
    """Outcomes of the requests finished in one reporting interval."""

    def __init__(self):
        self.ok = 0
        self.errors = []
        self.disconnects = 0
        self.latency = []
        self.ttft = []


class Load:
    def __init__(self, args, srv):
        self.args, self.srv = args, srv
        self.lock = threading.Lock()
        self.cur = Stats()
        self.total = Stats()
        self.stop_at = None
        self.first_errors = []
        status, data = srv.get("/v1/models")
        self.model = json.loads(data)["data"][0]["id"] if status == 200 else None

    def swap(self):
        with self.lock:
            s, self.cur = self.cur, Stats()
        return s

    def record(self, kind, latency=None, ttft=None, error=None):
        with self.lock:
            for s in (self.cur, self.total):
                if error is not None:
                    s.errors.append(error)
                elif kind == "disconnect":
                    s.disconnects += 1
                else:
                    s.ok += 1
                    s.latency.append(latency)
                    if ttft is not None:
                        s.ttft.append(ttft)
            if error is not None and len(self.first_errors) < 10:
                self.first_errors.append(error)

    def body(self, rng, chat, stream, n):
        rot = rng.randrange(len(WORDS))
        words = " ".join(WORDS[(rot + i) % len(WORDS)] for i in range(rng.randint(4, 24)))
        b = {"model": self.model, "max_tokens": n, "temperature": rng.choice((0, 0.8)),
             "seed": rng.randrange(1 << 30)}
        if chat:
            b["messages"] = [{"role": "user", "content": words}]
        else:
            b["prompt"] = words
        if stream:
            b["stream"] = True
        return json.dumps(b).encode()

    def worker(self, idx):
        rng = random.Random(self.args.seed * 1000 + idx)
        conn = None  # a kept-alive connection for the non-streaming requests
        while time.monotonic() < self.stop_at:
            chat = rng.random() < 0.5
            stream = rng.random() < 0.5
            path = "/v1/chat/completions" if chat else "/v1/completions"
            lo, hi = self.args.max_tokens
            body = self.body(rng, chat, stream, rng.randint(lo, hi))
            if rng.random() < self.args.disconnect_fraction:
                self.disconnect(rng, path, body)
                continue
            t0 = time.monotonic()
            try:
                if stream:
                    ttft, err = self.stream(path, body)
                else:
                    if conn is None:
                        conn = self.srv.connect(self.args.request_timeout)
                    ttft, err = None, self.plain(conn, path, body)
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                ttft, err = None, "%s: %s" % (type(e).__name__, e)
                if conn is not None:
                    conn.close()
                    conn = None
            if err:
                self.record("request", error="%s%s: %s" % (path, " stream" if stream else "", err))
            else:
                self.record("request", latency=time.monotonic() - t0, ttft=ttft)
        if conn is not None:
            conn.close()

    def plain(self, conn, path, body):
        conn.request("POST", path, body=body, headers=HEADERS)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            return "HTTP %d: %s" % (r.status, data[:200].decode(errors="replace"))
        j = json.loads(data)
        if not j["choices"] or j["choices"][0].get("finish_reason") not in ("stop", "length"):
            return "unexpected answer: %s" % data[:200].decode(errors="replace")
        if j["usage"]["completion_tokens"] < 1:
            return "no completion tokens"
        return None

    def stream(self, path, body):
        """(ttft, error) of one streamed request on a fresh connection."""
        t0 = time.monotonic()
        conn = self.srv.connect(self.args.request_timeout)
        try:
            conn.request("POST", path, body=body, headers=HEADERS)
            r = conn.getresponse()
            if r.status != 200:
                return None, "HTTP %d: %s" % (r.status, r.read()[:200].decode(errors="replace"))
            ttft, finish = None, None
            while True:
                line = r.readline()
                if not line:
                    return ttft, "the stream ended without [DONE]"
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                ev = json.loads(payload)
                if ev.get("error"):
                    return ttft, "stream error: %s" % ev["error"].get("message")
                for c in ev.get("choices") or []:
                    text = c.get("text") or (c.get("delta") or {}).get("content")
                    if text and ttft is None:
                        ttft = time.monotonic() - t0
                    finish = c.get("finish_reason") or finish
            if finish not in ("stop", "length"):
                return ttft, "the stream had no finish_reason"
            return ttft, None
        finally:
            conn.close()

    def disconnect(self, rng, path, body):
        """A client that goes away on purpose; an unexpected failure still counts."""
        how = rng.choice(DISCONNECTS)
        if how == "mid_stream" and b'"stream": true' not in body:
            body = body[:-1] + b', "stream": true}'
        head = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body)))
        try:
            with socket.create_connection(("127.0.0.1", self.srv.port),
                                          timeout=self.args.request_timeout) as s:
                if how == "mid_body":
                    s.sendall(head + body[:len(body) // 2])
                    time.sleep(rng.random() * 0.05)
                elif how == "before_response":
                    s.sendall(head + body)
                    time.sleep(rng.random() * 0.2)  # while it is tokenized or decoded
                else:
                    s.sendall(head + body)
                    got = b""
                    while b"data:" not in got:  # the first event, then hang up
                        b = s.recv(4096)
                        if not b:
                            break
                        got += b
                    if not got.startswith(b"HTTP/1.1 200"):
                        raise OSError("answered %r" % got[:60])
                if rng.random() < 0.5:  # half the time an RST rather than a FIN
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as e:
            self.record("disconnect", error="disconnect %s: %s" % (how, e))
            return
        self.record("disconnect")


# ---- main -------------------------------------------------------------------------

def parse_range(s):
    a, _, b = s.partition(":")
    lo, hi = int(a), int(b or a)
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError("want N or LO:HI with 1 <= LO <= HI")
    return lo, hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "sieve"))
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--server-args", default="", help="extra flags for the server")
    ap.add_argument("--max-tokens", type=parse_range, default=(8, 96),
                    help="max_tokens of each request, drawn from LO:HI (default 8:96)")
    ap.add_argument("--disconnect-fraction", type=float, default=0.05,
                    help="requests the client abandons on purpose (default 0.05)")
    ap.add_argument("--rss-growth-mib", type=float, default=32.0,
                    help="the most the RSS may grow after the first minute (default 32)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--interval", type=float, default=60.0,
                    help="seconds between report lines (default 60)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the per-interval figures and the summary here")
    args = ap.parse_args()

    srv = Server(args)
    load = Load(args, srv)
    rows = []
    failures = []
    try:
        rss0 = srv.rss_mib()
        print("soak: %s, %d clients for %.1f min, max_tokens %d..%d, %.0f%% disconnects; "
              "RSS at start %.1f MiB" % (" ".join(shlex.quote(c) for c in srv.cmd),
                                         args.concurrency, args.minutes, args.max_tokens[0],
                                         args.max_tokens[1], 100 * args.disconnect_fraction,
                                         rss0), flush=True)
        print("%5s %6s %4s %5s %6s %8s %9s %8s %8s %8s %9s %9s" % (
            "min", "reqs", "err", "disc", "req/s", "RSS MiB", "KV used", "lat p50", "lat p90",
            "lat p99", "TTFT p50", "TTFT p99"), flush=True)
        t_start = time.monotonic()
        load.stop_at = t_start + args.minutes * 60.0
        threads = [threading.Thread(target=load.worker, args=(i,), daemon=True)
                   for i in range(args.concurrency)]
        for t in threads:
            t.start()
        k = 0
        t_prev = t_start
        while True:
            k += 1
            t_next = min(t_start + k * args.interval, load.stop_at)
            while time.monotonic() < t_next:
                time.sleep(min(1.0, max(0.0, t_next - time.monotonic())))
                if srv.proc.poll() is not None:
                    break
            if srv.proc.poll() is not None:
                failures.append("the server exited with %d during the run" % srv.proc.returncode)
                break
            s = load.swap()
            now = time.monotonic()
            m = srv.metrics()
            row = {"minute": (now - t_start) / 60.0, "requests": s.ok, "errors": len(s.errors),
                   "disconnects": s.disconnects, "req_per_s": s.ok / max(now - t_prev, 1e-9),
                   "rss_mib": srv.rss_mib(), "kv_blocks_used": m.get("sieve_kv_blocks_used"),
                   "kv_blocks_total": m.get("sieve_kv_blocks_total"),
                   "latency_p50": percentile(s.latency, 50),
                   "latency_p90": percentile(s.latency, 90),
                   "latency_p99": percentile(s.latency, 99), "ttft_p50": percentile(s.ttft, 50),
                   "ttft_p99": percentile(s.ttft, 99)}
            rows.append(row)
            t_prev = now
            kv = "-" if row["kv_blocks_used"] is None else "%d/%d" % (row["kv_blocks_used"],
                                                                     row["kv_blocks_total"])
            print("%5.1f %6d %4d %5d %6.1f %8.1f %9s %8s %8s %8s %9s %9s" % (
                row["minute"], s.ok, len(s.errors), s.disconnects, row["req_per_s"],
                row["rss_mib"] or 0, kv, ms(row["latency_p50"]), ms(row["latency_p90"]),
                ms(row["latency_p99"]), ms(row["ttft_p50"]), ms(row["ttft_p99"])), flush=True)
            if now >= load.stop_at:
                break
        for t in threads:
            t.join(args.request_timeout + 10)
        if any(t.is_alive() for t in threads):
            failures.append("some clients were still waiting %.0f s after the end"
                            % (args.request_timeout + 10))
        tail = load.swap()  # requests that finished after the last line
        # Idle: wait for the engine to empty (cancelled sequences go at its next step).
        idle = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and srv.proc.poll() is None:
            idle = srv.metrics()
            if (idle.get("sieve_requests_running") == 0 and
                    idle.get("sieve_requests_waiting") == 0 and
                    idle.get("sieve_kv_blocks_used") == 0):
                break
            time.sleep(0.2)
        rss_end = srv.rss_mib()
        alive = False
        try:
            alive = srv.get("/health", timeout=10)[0] == 200
        except OSError:
            pass
    finally:
        rc = srv.stop()

    tot = load.total
    base = rows[0]["rss_mib"] if rows and rows[0]["rss_mib"] else rss0
    peak = max([r["rss_mib"] or 0 for r in rows] + [rss_end or 0])
    growth = (rss_end or 0) - (base or 0)
    print()
    print("soak: %d requests, %d errors, %d deliberate disconnects in %.1f min (%d finished "
          "after the last line); %.2f req/s" % (
              tot.ok, len(tot.errors), tot.disconnects, args.minutes, tail.ok,
              tot.ok / (args.minutes * 60.0)))
    print("soak: latency p50/p90/p99 %s/%s/%s ms, TTFT p50/p99 %s/%s ms (whole run)" % (
        ms(percentile(tot.latency, 50)), ms(percentile(tot.latency, 90)),
        ms(percentile(tot.latency, 99)), ms(percentile(tot.ttft, 50)),
        ms(percentile(tot.ttft, 99))))
    print("soak: RSS %.1f MiB at start, %.1f after the first interval, %.1f peak, %.1f at the "
          "end when idle (growth %+.1f MiB, bound %.0f)" % (rss0 or 0, base or 0, peak,
                                                          rss_end or 0, growth,
                                                          args.rss_growth_mib))
    print("soak: when idle: %s KV blocks used, %s running, %s waiting; /health %s; exit code %s"
          % tuple(["%g" % idle[k] if k in idle else "?" for k in (
              "sieve_kv_blocks_used", "sieve_requests_running", "sieve_requests_waiting")]
                  + ["200" if alive else "FAILED", rc]))
    if tot.errors:
        failures.append("%d requests failed, first: %s" % (len(tot.errors), load.first_errors))
    if growth > args.rss_growth_mib:
        failures.append("RSS grew %.1f MiB after the first interval (bound %.0f)"
                        % (growth, args.rss_growth_mib))
    if idle.get("sieve_kv_blocks_used") != 0:
        failures.append("KV blocks still in use when idle: %s" % idle.get("sieve_kv_blocks_used"))
    if not alive:
        failures.append("the server did not answer /health at the end")
    if rc != 0:
        failures.append("the server exited with %s" % rc)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows,
                       "requests": tot.ok, "errors": len(tot.errors),
                       "disconnects": tot.disconnects, "rss_start_mib": rss0,
                       "rss_base_mib": base, "rss_peak_mib": peak, "rss_end_mib": rss_end,
                       "idle_metrics": idle, "exit_code": rc, "failures": failures}, f, indent=1)
    for f in failures:
        print("soak: FAILED: %s" % f)
    if not failures:
        print("soak: OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
