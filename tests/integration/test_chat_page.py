"""The chat page at / : served by the binary, and driven in headless Chromium (Debian's
`chromium` package) through its ?q= parameter, which sends one message on load: the test
checks that the streamed assistant reply and its token usage appear in the page."""
import os
import re
import shutil
import subprocess
import unittest
import urllib.parse

import sieve_harness as h

BINARY = h.sieve_binary()
with open(BINARY, "rb") as _f:
    # Headless Chromium's virtual time runs on while a streamed body is still arriving, so
    # it can dump the page before a slow stream ends; the ASan/UBSan server of
    # scripts/test-sanitize.sh decodes several times slower, so it gets a shorter reply.
    MAX_TOKENS = 4 if b"__asan_init" in _f.read() else 24


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


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
        url = "http://127.0.0.1:%d/?max_tokens=%d&q=%s" % (
            self.srv.port, MAX_TOKENS, urllib.parse.quote("Once upon a time"))
        env = dict(os.environ, HOME=os.environ.get("TMPDIR", "/tmp"))
        # The browser dumps the page when its virtual-time budget runs out; on a
        # loaded machine the stream may not have finished by then, so allow a
        # few attempts before calling it a failure.
        for attempt in range(5):
            p = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                                "--disable-dev-shm-usage", "--virtual-time-budget=30000",
                                "--dump-dom", url],
                               capture_output=True, text=True, timeout=120, env=env)
            self.assertEqual(p.returncode, 0, p.stderr[-2000:])
            dom = p.stdout
            if 'data-replies="1"' in dom:
                break
        self.assertIn('class="msg user">Once upon a time', dom)
        self.assertIn('data-replies="1"', dom)  # the stream ran to [DONE]
        m = re.search(r'<div class="msg assistant" id="reply-1">([^<]*)<div class="meta">'
                      r'(\d+) prompt \+ (\d+) completion tokens', dom)
        self.assertIsNotNone(m, dom[-3000:])
        self.assertTrue(m.group(1).strip(), "the reply is empty")
        self.assertGreater(int(m.group(3)), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
