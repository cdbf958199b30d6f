"""Device selection at start-up: with device "auto" the server serves on a GPU when one is
usable and otherwise on the CPU, saying why in one log line; "cpu" and an empty devices list
keep it on the CPU; "cuda" without a usable GPU fails start-up with a clear message and exit
status 1 (never a crash or a hang); bad values of the keys are refused before anything
starts; tensor_parallel_size reaches the runtime and gives the same greedy text.

On a machine with a GPU and a CUDA build, "auto" and "cuda" serve on the GPU instead; the
tests check the log says so and that the server answers."""
import re
import subprocess
import unittest

import sieve_harness as h

BINARY = h.sieve_binary()
PROMPT = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}


def backend_line(logs):
    m = re.search(r"^sieve: backend (\w+) \((.*)\)$", logs, re.M)
    return (m.group(1), m.group(2)) if m else (None, None)


def complete(srv):
    status, body = srv.post_json("/v1/completions", PROMPT)
    if status != 200:
        raise AssertionError("completion failed: %s %s" % (status, body))
    return body["choices"][0]["text"]


class DeviceSelectionTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.auto = h.Server(BINARY).start()
        cls.auto_backend, cls.auto_why = backend_line(cls.auto.logs())
        cls.auto_text = complete(cls.auto)

    @classmethod
    def tearDownClass(cls):
        cls.auto.stop()

    def test_auto_logs_the_backend_and_why(self):
        self.assertIn(self.auto_backend, ("cpu", "cuda"), self.auto.logs())
        if self.auto_backend == "cpu":
            # Whichever reason applies here: no CUDA in the build, or none on the machine.
            self.assertRegex(self.auto_why, r"built without CUDA|no CUDA device is present")
        self.assertRegex(self.auto.logs(), r"loaded .* backend %s," % self.auto_backend)
        self.assertTrue(self.auto_text)

    def test_device_cpu_says_it_was_configured(self):
        srv = h.Server(BINARY, "--device", "cpu").start()
        try:
            backend, why = backend_line(srv.logs())
            self.assertEqual(backend, "cpu")
            self.assertIn('device "cpu"', why)
            if self.auto_backend == "cpu":
                self.assertEqual(complete(srv), self.auto_text)
            else:
                self.assertTrue(complete(srv))
        finally:
            srv.stop()

    def test_empty_devices_list_runs_on_the_cpu(self):
        srv = h.Server(BINARY, "--devices", "").start()
        try:
            backend, why = backend_line(srv.logs())
            self.assertEqual(backend, "cpu")
            if self.auto_backend == "cpu":
                # Nothing would be used anyway; the first reason that applies is given.
                self.assertRegex(why, r"built without CUDA|devices list is empty")
            else:
                self.assertIn("devices list is empty", why)
        finally:
            srv.stop()

    def test_device_cuda_without_a_gpu_fails_start_up_clearly(self):
        srv = h.Server(BINARY, "--device", "cuda")
        if self.auto_backend == "cuda":
            srv.start()
            try:
                self.assertEqual(backend_line(srv.logs())[0], "cuda")
                self.assertTrue(complete(srv))
            finally:
                srv.stop()
            return
        cmd = [BINARY, "--host", "127.0.0.1", "--port", "0", "--model", srv.model,
               "--device", "cuda"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1, p.stderr)  # not a signal, not a hang
        self.assertIn('device "cuda" was requested but no GPU can be used', p.stderr)
        self.assertRegex(p.stderr, r"built without CUDA|no CUDA device is present")
        self.assertNotIn("serving model", p.stderr)

    def test_device_cuda_with_an_absent_index_fails(self):
        if self.auto_backend != "cuda":
            self.skipTest("needs a GPU (the no-GPU case is covered above)")
        cmd = [BINARY, "--port", "0", "--device", "cuda", "--devices", "63"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("device 63 is not present", p.stderr)

    def test_bad_values_are_refused_before_start(self):
        for flags, want in ((["--device", "gpu"], "'device': 'gpu' is not one of auto, cpu, cuda"),
                            (["--devices", "0,x"], "--devices: expected"),
                            (["--devices", "1,1"], "listed twice"),
                            (["--tensor-parallel-size", "9"], "out of range [1, 8]")):
            p = subprocess.run([BINARY, "--port", "0"] + flags, capture_output=True, text=True,
                               timeout=30)
            self.assertEqual(p.returncode, 2, (flags, p.stderr))
            self.assertIn(want, p.stderr)

    def test_tensor_parallel_size_gives_the_same_greedy_text(self):
        srv = h.Server(BINARY, "--tensor-parallel-size", "2", "--device", "cpu").start()
        try:
            self.assertIn("tensor parallel 2", srv.logs())
            if self.auto_backend == "cpu":
                self.assertEqual(complete(srv), self.auto_text)
            else:
                self.assertTrue(complete(srv))
        finally:
            srv.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
