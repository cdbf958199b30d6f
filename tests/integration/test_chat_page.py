"""The chat page at / : served by the binary, and driven in headless Chromium (Debian's
`chromium` package) through its ?q= parameter, which sends one message on load: the test
checks that the streamed assistant reply and its token usage appear in the page."""
import json
import os
import re
import select
import shutil
import subprocess
import time
import unittest
import urllib.parse

import sieve_harness as h

BINARY = h.sieve_binary()


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    JSON commands on its fd 3, answers and events on its fd 4, each ended by a NUL byte).

    The page is polled in real time until the reply is complete. (--dump-dom with
    --virtual-time-budget raced: virtual time runs on while a streamed body is still
    arriving, so a slow stream -- a loaded machine, the sanitized server -- was cut.)"""

    def __init__(self, path):
        self.cmd_r, self.cmd_w = os.pipe()
        self.out_r, self.out_w = os.pipe()

        def fds():
            os.dup2(self.cmd_r, 3)
            os.dup2(self.out_w, 4)

        env = dict(os.environ, HOME=os.environ.get("TMPDIR", "/tmp"))
        self.proc = subprocess.Popen(
            [path, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", "about:blank"], preexec_fn=fds, pass_fds=(3, 4),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        os.close(self.cmd_r)
        os.close(self.out_w)
        self.buf = b""
        self.next_id = 0

    def call(self, method, params=None, session=None, timeout=30):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                m = json.loads(raw)
                if m.get("id") == self.next_id:
                    if "error" in m:
                        raise RuntimeError("%s: %s" % (method, m["error"]))
                    return m["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.out_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer %s" % method)
            chunk = os.read(self.out_r, 1 << 16)
            if not chunk:
                raise EOFError("chromium exited")
            self.buf += chunk

    def evaluate(self, session, expression):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                      session)
        return r["result"].get("value")

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, RuntimeError, EOFError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.out_r)


class ChatPageTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = h.Server(BINARY, "--threads", "1").start()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def test_page_is_served_as_html(self):
        status, headers, body = self.srv.request("GET", "/")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/html"))
        self.assertIn(b"/v1/chat/completions", body)
        self.assertIn(b'id="prefill"', body)   # the attention-policy controls
        self.assertIn(b'id="kv_cache"', body)

    def test_reply_appears_in_headless_chromium(self):
        browser = chromium()
        if not browser:
            self.skipTest("chromium is not installed (apt-get install chromium)")
        url = "http://127.0.0.1:%d/?max_tokens=24&q=%s" % (self.srv.port,
                                                          urllib.parse.quote("Once upon a time"))
        b = Browser(browser)
        try:
            target = b.call("Target.createTarget", {"url": url})["targetId"]
            session = b.call("Target.attachToTarget",
                             {"targetId": target, "flatten": True})["sessionId"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # data-replies is set when [DONE] is read
                if b.evaluate(session, "document.body ? document.body.dataset.replies : null") \
                        == "1":
                    break
                time.sleep(0.1)
            dom = b.evaluate(session, "document.documentElement.outerHTML")
        finally:
            b.close()
        self.assertIn('class="msg user">Once upon a time', dom)
        self.assertIn('data-replies="1"', dom)  # the stream ran to [DONE]
        m = re.search(r'<div class="msg assistant" id="reply-1">([^<]*)<div class="meta">'
                      r'(\d+) prompt \+ (\d+) completion tokens', dom)
        self.assertIsNotNone(m, dom[-3000:])
        self.assertTrue(m.group(1).strip(), "the reply is empty")
        self.assertGreater(int(m.group(3)), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
