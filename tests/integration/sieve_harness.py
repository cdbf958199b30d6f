"""Starts the real sieve binary on a free loopback port for integration tests.

The server is started with the given flags, /health is polled until it answers, and
stop() kills it by PID (SIGTERM, then SIGKILL) -- call it from a finally block or
tearDownClass so a failing test never leaves a server behind.
"""
import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time


def shared_dir():
    d = os.environ.get("SIEVE_SHARED_DIR")
    if d:
        return d
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "shared"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sieve_binary():
    """--sieve PATH from the command line (CTest passes it), else build/sieve."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--sieve")
    args, rest = p.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    if args.sieve:
        return args.sieve
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "..", "..", "build", "sieve")


class Server:
    def __init__(self, binary, *flags, model=None):
        self.binary = binary
        self.port = free_port()
        self.model = model or os.path.join(shared_dir(), "models", "stories260K.gguf")
        self.flags = list(flags)
        self.proc = None
        self.log_path = None

    def start(self, timeout=30.0):
        import tempfile
        self.log = tempfile.NamedTemporaryFile(prefix="sieve-", suffix=".log", delete=False)
        self.log_path = self.log.name
        cmd = [self.binary, "--host", "127.0.0.1", "--port", str(self.port),
               "--model", self.model] + self.flags
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("sieve exited with %d:\n%s" % (self.proc.returncode, self.logs()))
            try:
                status, _, _ = self.request("GET", "/health", timeout=1)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("sieve did not answer /health within %.0f s" % timeout)

    def logs(self):
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=60.0):
        """Stops the server; returns its exit code."""
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.log.close()
        self.proc = None
        return rc

    def request(self, method, path, body=None, headers=None, timeout=60, raw=None):
        """One request on a fresh connection: (status, headers dict, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            h = {"Content-Type": "application/json"} if data is not None else {}
            h.update(headers or {})
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def post_json(self, path, body, **kw):
        status, headers, data = self.request("POST", path, body, **kw)
        return status, json.loads(data) if data else None
