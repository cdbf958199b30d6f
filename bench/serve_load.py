#!/usr/bin/env python3
"""serve_load.py - a bounded, loopback-only load generator for sieve's /v1/completions.

For every (concurrency, streaming) row it runs `concurrency` client threads, each sending
`--requests-per-client` greedy requests one after the other (temperature 0, ignore_eos, so
every request produces exactly --max-tokens tokens), and reports aggregate output tok/s,
requests/s, time to first token, per-token latency and end-to-end latency percentiles.

Non-streaming clients keep one persistent HTTP/1.1 connection each (keep-alive); streaming
requests use a fresh connection each. Unless --url is given, the script starts its own
server (--binary, --model, --server-args) on a free loopback port and stops it by PID at
the end. It talks only to 127.0.0.1 / localhost / ::1 and stops by itself: no request
starts after --duration-cap seconds, and requests still running then are abandoned.

Standard library only.
"""
import argparse
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WORDS = ("Once upon a time there was a little girl named Lily who loved to play outside "
         "in the park with her dog and her big red ball and one day she saw a bird").split()


# ---- statistics ----------------------------------------------------------------

def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ---- the server -------------------------------------------------------------------

def default_model():
    shared = os.environ.get("SIEVE_SHARED_DIR") or os.path.join(ROOT, "..", "shared")
    return os.path.normpath(os.path.join(shared, "models", "stories260K.gguf"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    """Where requests go: host, port, and (when we started it) the server process."""

    def __init__(self, host, port, proc=None, log=None):
        self.host, self.port, self.proc, self.log = host, port, proc, log

    def connect(self, timeout):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path, timeout=5.0):
        conn = self.connect(timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def stop(self):
        if not self.proc:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log:
            self.log.close()


def start_server(args):
    port = args.port or free_port()
    log = tempfile.NamedTemporaryFile(prefix="sieve-bench-", suffix=".log", delete=False)
    cmd = [args.binary, "--host", "127.0.0.1", "--port", str(port), "--model", args.model]
    cmd += shlex.split(args.server_args or "")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    t = Target("127.0.0.1", port, proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log.name, errors="replace") as f:
                sys.exit("serve_load: %s exited with %d:\n%s" % (args.binary, proc.returncode,
                                                                   f.read()))
        try:
            if t.get("/health", timeout=1)[0] == 200:
                return t, cmd, log.name
        except OSError:
            pass
        time.sleep(0.05)
    t.stop()
    sys.exit("serve_load: the server did not answer /health within 60 s (log: %s)" % log.name)


def target_from_url(url):
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if u.scheme != "http":
        sys.exit("serve_load: only http:// URLs are supported, got %r" % url)
    if u.hostname not in LOOPBACK:
        sys.exit("serve_load: refusing %r: only 127.0.0.1, localhost and ::1 are allowed"
                 % u.hostname)
    return Target(u.hostname, u.port or 80)


def preemptions(target):
    """sieve_preemptions_total from /metrics, or None when it cannot be read."""
    try:
        status, data = target.get("/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("sieve_preemptions_total "):
            return float(line.split()[1])
    return None


# ---- requests ---------------------------------------------------------------------

class Result:
    __slots__ = ("ok", "error", "start", "end", "tokens", "ttft", "gaps", "chunks")

    def __init__(self, start):
        self.ok, self.error, self.start, self.end = False, None, start, None
        self.tokens, self.ttft, self.gaps, self.chunks = 0, None, [], 0


def request_body(args, prompt, stream):
    body = {"model": args.model_name, "prompt": prompt, "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


HEADERS = {"Content-Type": "application/json"}


def send_plain(conn, body, res):
    """One non-streaming request on a kept-alive connection."""
    conn.request("POST", "/v1/completions", body=body, headers=HEADERS)
    r = conn.getresponse()
    data = r.read()
    res.end = time.monotonic()
    if r.status != 200:
        res.error = "HTTP %d: %s" % (r.status, data[:200].decode(errors="replace"))
        return
    res.tokens = json.loads(data)["usage"]["completion_tokens"]
    res.ok = True


def send_stream(target, body, res, timeout):
    """One streaming request on a fresh connection: times each content chunk."""
    conn = target.connect(timeout)
    try:
        conn.request("POST", "/v1/completions", body=body, headers=HEADERS)
        r = conn.getresponse()
        if r.status != 200:
            res.end = time.monotonic()
            res.error = "HTTP %d: %s" % (r.status, r.read()[:200].decode(errors="replace"))
            return
        last = None
        done = False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            now = time.monotonic()
            ev = json.loads(payload)
            if ev.get("error"):
                res.error = "stream error: %s" % ev["error"].get("message")
            if ev.get("usage"):
                res.tokens = ev["usage"]["completion_tokens"]
            if any(c.get("text") for c in ev.get("choices") or []):
                res.chunks += 1
                if last is None:
                    res.ttft = now - res.start
                else:
                    res.gaps.append(now - last)
                last = now
        res.end = time.monotonic()
        if not done and not res.error:
            res.error = "stream ended without [DONE]"
        res.ok = res.error is None
    finally:
        conn.close()


def client(args, target, idx, stream, deadline, out):
    """Sends requests_per_client requests in sequence; appends a Result for each."""
    conn = None
    for k in range(args.requests_per_client):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        # Distinct prompts (a rotation of the word list) so prefix caching does not
        # turn the benchmark into a cache benchmark.
        prompt = make_prompt(args.prompt_words, idx * args.requests_per_client + k)
        body = request_body(args, prompt, stream)
        res = Result(time.monotonic())
        try:
            if stream:
                send_stream(target, body, res, timeout=left)
            else:
                if conn is None:
                    conn = target.connect(timeout=left)
                conn.timeout = left
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                send_plain(conn, body, res)
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            res.end = time.monotonic()
            res.error = "%s: %s" % (type(e).__name__, e)
            if conn is not None:
                conn.close()
                conn = None
        out.append(res)
    if conn is not None:
        conn.close()


def make_prompt(n_words, rot):
    return " ".join(WORDS[(rot + i) % len(WORDS)] for i in range(n_words))


def prompt_tokens_of(args, target, words):
    """usage.prompt_tokens of the prompt of this many words (BOS included)."""
    conn = target.connect(30)
    try:
        conn.request("POST", "/v1/completions", headers=HEADERS, body=json.dumps(
            {"model": args.model_name, "prompt": make_prompt(words, 0), "max_tokens": 1,
             "temperature": 0}).encode())
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    if r.status != 200:
        sys.exit("serve_load: the calibration request failed: HTTP %d %s" % (r.status, data[:300]))
    return json.loads(data)["usage"]["prompt_tokens"]


def calibrate_prompt(args, target):
    """Picks the word count whose prompt is closest to --prompt-tokens tokens (a few
    probes); returns (words, tokens)."""
    seen = {}
    want = args.prompt_tokens
    # Start at no more than 64 words: a long target (e.g. 1499 tokens) probed with
    # want - 1 words would overflow the model's context before the first scaling step.
    words = max(1, min(want - 1, 64))
    for i in range(10):
        if words in seen:
            break
        got = seen[words] = prompt_tokens_of(args, target, words)
        if got == want:
            break
        if i < 3 and abs(got - want) > 2:  # scale first, then step by one word
            words = max(1, round(words * want / got))
        else:
            words = max(1, words + (1 if got < want else -1))
    best = min(seen, key=lambda w: (abs(seen[w] - args.prompt_tokens), w))
    return best, seen[best]


def model_name(target):
    status, data = target.get("/v1/models")
    if status != 200:
        sys.exit("serve_load: GET /v1/models answered %d" % status)
    return json.loads(data)["data"][0]["id"]


# ---- one row ----------------------------------------------------------------------

def run_row(args, target, concurrency, stream, deadline):
    results = []
    p0 = preemptions(target)
    threads = [threading.Thread(target=client, daemon=True,
                                args=(args, target, i, stream, deadline, results))
               for i in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 1.0)
    truncated = any(t.is_alive() for t in threads)
    results = list(results)
    ends = [r.end for r in results if r.end is not None]
    wall = (max(ends) if ends else time.monotonic()) - t0
    p1 = preemptions(target)
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    e2e = [r.end - r.start for r in ok]
    if stream:
        ttft = [r.ttft for r in ok if r.ttft is not None]
        itl = [g for r in ok for g in r.gaps]
        chunks = sum(r.chunks for r in ok)
    else:
        ttft = []
        itl = [(r.end - r.start) / r.tokens for r in ok if r.tokens]
        chunks = 0
    errors = [r.error for r in results if not r.ok]
    ms = lambda v: None if v is None else v * 1000.0
    return {
        "concurrency": concurrency,
        "stream": stream,
        "requests": len(results),
        "requests_planned": concurrency * args.requests_per_client,
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": errors[:3],
        "truncated": truncated or len(results) < concurrency * args.requests_per_client,
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_per_s": tokens / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_ms_p50": ms(percentile(ttft, 50)),
        "ttft_ms_p99": ms(percentile(ttft, 99)),
        "per_token_ms_p50": ms(percentile(itl, 50)),
        "per_token_ms_p99": ms(percentile(itl, 99)),
        "per_token_kind": "inter-chunk gap" if stream else "latency / tokens",
        "tokens_per_chunk": (tokens / chunks) if chunks else None,
        "e2e_ms_p50": ms(percentile(e2e, 50)),
        "e2e_ms_p99": ms(percentile(e2e, 99)),
        "preemptions": (p1 - p0) if p0 is not None and p1 is not None else None,
    }


# ---- output -----------------------------------------------------------------------

COLUMNS = [("conc", "concurrency", "d"), ("stream", "stream", "s"), ("reqs", "ok", "d"),
           ("err", "errors", "d"), ("wall s", "wall_s", ".1f"),
           ("out tok/s", "output_tok_per_s", ".0f"), ("req/s", "requests_per_s", ".2f"),
           ("TTFT p50", "ttft_ms_p50", ".1f"), ("TTFT p99", "ttft_ms_p99", ".1f"),
           ("tok p50", "per_token_ms_p50", ".2f"), ("tok p99", "per_token_ms_p99", ".2f"),
           ("E2E p50", "e2e_ms_p50", ".0f"), ("E2E p99", "e2e_ms_p99", ".0f"),
           ("preempt", "preemptions", ".0f")]


def cell(row, key, fmt):
    v = row.get(key)
    if v is None:
        return "n/a"
    if key == "stream":
        return "on" if v else "off"
    if key == "ok" and row.get("truncated"):
        return "%d*" % v
    return format(v, fmt)


def print_table(rows, info):
    print("sieve serve_load: %s" % info["model"])
    print("  server: %s" % info["server"])
    print("  prompt ~%d tokens, max_tokens %d (ignore_eos, temperature 0), %d requests per "
          "client, client and server share %d CPUs" % (info["prompt_tokens"], info["max_tokens"],
                                                       info["requests_per_client"],
                                                       info["cpus"]))
    print("  latencies in ms; 'tok' = per-token latency: streaming, the gap between content "
          "chunks; non-streaming, request latency / tokens")
    cells = [[h for h, _, _ in COLUMNS]] + [[cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for n, line in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
    if any(r["truncated"] for r in rows):
        print("  * stopped by --duration-cap before every planned request ran")
    for r in rows:
        for e in r["error_samples"]:
            print("  error (conc %d, stream %s): %s" % (r["concurrency"],
                                                      "on" if r["stream"] else "off", e))


# ---- main -------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "sieve"),
                   help="server binary to start (default: build/sieve)")
    p.add_argument("--model", default=default_model(),
                   help="GGUF model for the started server (default: "
                        "$SIEVE_SHARED_DIR/models/stories260K.gguf)")
    p.add_argument("--port", type=int, default=0,
                   help="port for the started server (default: a free one)")
    p.add_argument("--url", help="use a running server instead, e.g. http://127.0.0.1:8080 "
                                 "(loopback only)")
    p.add_argument("--server-args", default="",
                   help="extra flags for the started server, e.g. '--threads 2 "
                        "--max-running-seqs 32'")
    p.add_argument("--concurrency", default="1,4,16,64",
                   help="comma-separated client counts (default 1,4,16,64)")
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--stream", choices=("both", "on", "off"), default="both")
    p.add_argument("--duration-cap", type=float, default=600.0,
                   help="seconds after which no request starts and the run ends (default 600)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="also write the results as JSON, to PATH or (without one) stdout")
    a = p.parse_args(argv)
    try:
        a.concurrency_list = [int(x) for x in a.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error("--concurrency must be a comma-separated list of integers")
    if not a.concurrency_list or any(c < 1 or c > 1024 for c in a.concurrency_list):
        p.error("--concurrency values must be 1..1024")
    for name in ("requests_per_client", "max_tokens", "prompt_tokens"):
        if getattr(a, name) < 1:
            p.error("--%s must be at least 1" % name.replace("_", "-"))
    if a.duration_cap <= 0:
        p.error("--duration-cap must be positive")
    return a


def main(argv):
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.duration_cap
    if args.url:
        target, server_desc, log = target_from_url(args.url), args.url, None
    else:
        target, cmd, log = start_server(args)
        server_desc = " ".join(shlex.quote(c) for c in cmd)
    try:
        args.model_name = model_name(target)
        args.prompt_words, prompt_tokens = calibrate_prompt(args, target)
        modes = {"both": [False, True], "on": [True], "off": [False]}[args.stream]
        rows = []
        for c in args.concurrency_list:
            for stream in modes:
                if time.monotonic() >= deadline:
                    break
                rows.append(run_row(args, target, c, stream, deadline))
        info = {"model": args.model_name if args.url else args.model, "server": server_desc,
                "prompt_tokens": prompt_tokens, "max_tokens": args.max_tokens,
                "requests_per_client": args.requests_per_client, "cpus": os.cpu_count() or 0,
                "duration_s": time.monotonic() - started, "duration_cap_s": args.duration_cap}
        print_table(rows, info)
        if args.json:
            doc = json.dumps({"info": info, "rows": rows}, indent=2)
            if args.json == "-":
                print(doc)
            else:
                with open(args.json, "w") as f:
                    f.write(doc + "\n")
        return 1 if any(r["errors"] for r in rows) else 0
    finally:
        target.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
