#!/usr/bin/env python3
"""Writes docs/config.md and config/sieve.json from the key table in config/config.c.

The table reaches this script through `sieve --config-schema` (every key with its type,
default, range, flag, environment variable and text), and the example error messages in
the reference are produced by running the binary, so the documents say what the code does.

    tools/gen_config_doc.py [--sieve build/sieve]          # rewrite both files
    tools/gen_config_doc.py [--sieve build/sieve] --check  # exit 1 if either is stale

tests/integration/test_deploy.py runs the --check form.
"""
import argparse
import difflib
import json
import os
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DOC = os.path.join(ROOT, "docs", "config.md")
EXAMPLE = os.path.join(ROOT, "config", "sieve.json")
# The built-in model default is made absolute at build time; the documents show it as
# written in the repository.
REPO_DEFAULT_MODEL = "../shared/models/stories260K.gguf"


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env.update(extra)
    return env


def schema(sieve):
    out = subprocess.run([sieve, "--config-schema"], check=True, capture_output=True,
                         text=True, env=clean_env())
    keys = json.loads(out.stdout)
    for k in keys:
        if k["key"] == "model":
            k["default"] = REPO_DEFAULT_MODEL
    return keys


def human_bytes(n):
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return "%d %s" % (n // size, unit)
    return None


def show_int(k, n):
    h = human_bytes(n) if k["arg"] == "BYTES" and n else None
    return "%d (%s)" % (n, h) if h else "%d" % n


def show_default(k):
    d = k["default"]
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, int):
        return show_int(k, d)
    if isinstance(d, list):
        return json.dumps(d)
    return json.dumps(d)


def show_range(k):
    if "min" in k:
        return "%s .. %s" % (show_int(k, k["min"]), show_int(k, k["max"]))
    if "max_items" in k:
        return "at most %d items" % k["max_items"]
    if "max_bytes" in k:
        return "at most %d bytes" % k["max_bytes"]
    return "true or false"


def run_example(sieve, args, env=None, stdin=None):
    """The binary's stderr for one invocation, as a reader would see it."""
    r = subprocess.run([sieve] + args, input=stdin or "", capture_output=True, text=True,
                       env=clean_env(**(env or {})), timeout=30)
    lines = [l.replace("/dev/stdin", "sieve.json") for l in r.stderr.splitlines()
             if not l.startswith("sieve: note:")]
    return r.returncode, "\n".join(lines)


ERROR_EXAMPLES = [
    # (what, how to reproduce shown to the reader, args, env, stdin)
    ("unknown key (with the nearest known key)", '{"prot": 8080}',
     ["--check-config", "/dev/stdin"], None, '{"prot": 8080}'),
    ("wrong type", '{"port": "8080"}', ["--check-config", "/dev/stdin"], None,
     '{"port": "8080"}'),
    ("out of range", '{"port": 70000}', ["--check-config", "/dev/stdin"], None,
     '{"port": 70000}'),
    ("invalid JSON (line and column)", '{"port": 8080,}', ["--check-config", "/dev/stdin"],
     None, '{"port": 8080,}'),
    ("top level not an object", '[{"port": 8080}]', ["--check-config", "/dev/stdin"], None,
     '[{"port": 8080}]'),
    ("rule between keys", '{"max_running_seqs": 64, "max_batch_tokens": 32}',
     ["--check-config", "/dev/stdin"], None, '{"max_running_seqs": 64, "max_batch_tokens": 32}'),
    ("unknown flag (with the nearest known flag)", "sieve --prot 8080", ["--prot", "8080"],
     None, None),
    ("flag without its value", "sieve --port", ["--port"], None, None),
    ("bad flag value", "sieve --threads many", ["--threads", "many"], None, None),
    ("bad environment value (names the variable)", "SIEVE_PORT=http sieve",
     ["--check-config", "/dev/stdin"], {"SIEVE_PORT": "http"}, "{}"),
    ("unknown environment variable (a warning, not an error)",
     "SIEVE_PROT=8080 sieve", ["--check-config", "/dev/stdin"],
     {"SIEVE_PROT": "8080"}, "{}"),
]


def error_examples(sieve):
    out = []
    for what, shown, args, env, stdin in ERROR_EXAMPLES:
        rc, text = run_example(sieve, args, env, stdin)
        # The warning example succeeds; keep its warning line only.
        if rc == 0:
            text = "\n".join(l for l in text.splitlines() if "warning" in l)
        if stdin is not None and not shown.startswith("SIEVE_"):
            shown = "sieve --check-config sieve.json` with `sieve.json` = `" + shown
        out.append("%s, `%s`:\n\n```\n%s\n```\n" % (what, shown, text))
    return "\n".join(out)


def render_doc(sieve, keys):
    by_name = {k["key"]: k for k in keys}
    port = by_name["port"]
    lines = []
    w = lines.append
    w("# Configuration reference\n")
    w("<!-- Generated by tools/gen_config_doc.py from the key table in config/config.c; "
      "edit that table, then run the script. tests/integration/test_deploy.py checks that "
      "this file is in sync. -->\n")
    w("sieve reads one set of keys from four places. Every key can be given in a JSON "
      "file, as an environment variable and as a command-line flag: `max_body_bytes` in a "
      "file is `SIEVE_MAX_BODY_BYTES` in the environment and `--max-body-bytes` on the "
      "command line.\n")
    w("## Precedence\n")
    w("Lowest first; a later source overrides an earlier one key by key:\n")
    w("1. built-in defaults (the *default* column below);")
    w("2. the configuration files, `--config FILE` (may be repeated: later files win; "
      "without any `--config`, the file named by `$SIEVE_CONFIG`, if set);")
    w("3. `SIEVE_*` environment variables;")
    w("4. command-line flags, whatever their position relative to `--config`.\n")
    w("So `SIEVE_PORT=9000 sieve --config sieve.json --port 9001` listens on 9001, and "
      "without `--port` on 9000 whatever `sieve.json` says.\n")
    w("## Configuration files\n")
    w("A file is one JSON object. [`config/sieve.json`](../config/sieve.json) lists every "
      "key with its default value, so it is a complete starting point. Keys starting with "
      "`_` are comments and ignored. An unknown key, a value of the wrong type, a value out "
      "of range, invalid JSON, a duplicated key and a top level that is not an object are "
      "all errors: the server does not start (exit status 2) and the message names the "
      "file, the key and the problem, suggesting the nearest known key for a typo.\n")
    w("## Environment variables\n")
    w("`SIEVE_` followed by the key in upper case (`SIEVE_PORT`, `SIEVE_MODEL`, "
      "`SIEVE_KV_CACHE_BYTES`). An empty variable counts as unset. Values are written as on "
      "the command line: integers in decimal, booleans as `true`, `false`, `1` or `0`, and "
      "the list `api_keys` as comma-separated keys. A bad value is an error naming the "
      "variable. A `SIEVE_*` variable that is no key is reported on stderr with the nearest "
      "known variable but not refused, since the environment is shared with other software; "
      "`SIEVE_CONFIG` (the configuration file) and `SIEVE_SHARED_DIR` (the test data folder "
      "of the build) are known and not reported.\n")
    w("On Kubernetes, a Service named `sieve` makes the kubelet inject "
      "`SIEVE_PORT=tcp://10.0.0.1:%d` and similar variables into every pod of the namespace "
      "unless the pod sets `enableServiceLinks: false`, which the manifests in `deploy/k8s/` "
      "do.\n" % port["default"])
    w("## Command-line flags\n")
    w("`--flag VALUE` or `--flag=VALUE`. An unknown flag is an error suggesting the nearest "
      "known one. Besides the keys:\n")
    w("| flag | what |")
    w("| --- | --- |")
    w("| `--config FILE` | load a configuration file (repeatable) |")
    w("| `--check-config FILE` | build the whole configuration (the file, then the "
      "environment and the other flags) and validate it without serving: on success print "
      "`config OK` on stderr and the effective values as JSON on stdout (API keys "
      "redacted) and exit 0; otherwise print the error and exit 2. A model file that is "
      "not readable where the check runs is noted, not refused. |")
    w("| `--config-schema` | print every key (type, default, range, flag, variable, text) "
      "as JSON; this reference is generated from it |")
    w("| `--help`, `--version` | usage and version, exit 0 |\n")
    w("```sh")
    w("sieve --check-config /etc/sieve/sieve.json && systemctl restart sieve")
    w("kubectl create configmap sieve-config --from-file=sieve.json --dry-run=client -o yaml")
    w("```\n")
    w("## Errors\n")
    w("What each class of mistake prints (exit status 2; the messages come from running "
      "the server):\n")
    w(error_examples(sieve))
    w("## Keys\n")
    w("| key | type | default | range | environment | flag |")
    w("| --- | --- | --- | --- | --- | --- |")
    for k in keys:
        w("| [`%s`](#%s) | %s | `%s` | %s | `%s` | `%s %s` |" % (
            k["key"], k["key"], k["type"], show_default(k), show_range(k), k["env"],
            k["flag"], k["arg"]))
    w("")
    for k in keys:
        w("### %s\n" % k["key"])
        w("%s\n" % k["doc"])
        w("- type: %s; default `%s`; range: %s" % (k["type"], show_default(k), show_range(k)))
        w("- environment: `%s`; flag: `%s %s`\n" % (k["env"], k["flag"], k["arg"]))
    w("## Deployment\n")
    w("The container image, Docker Compose, Kubernetes and systemd files in "
      "[`deploy/`](../deploy/README.md) set these keys through a mounted file, a "
      "ConfigMap or `SIEVE_*` variables; see the *Deploy* section of the "
      "[README](../README.md#deploy).")
    return "\n".join(lines).rstrip("\n") + "\n"


def render_example(keys):
    out = ['{',
           '  "_comment": "sieve configuration. Every key is optional; the values below are the '
           'defaults. Keys starting with \'_\' are comments. Precedence: defaults < this file < '
           'SIEVE_* environment variables < command-line flags. docs/config.md describes every '
           'key; this file is generated from the same table by tools/gen_config_doc.py.",']
    for i, k in enumerate(keys):
        note = "%s %s, %s; default %s. %s, %s." % (
            k["doc"], k["type"][0].upper() + k["type"][1:], show_range(k), show_default(k),
            k["env"], k["flag"])
        comma = "," if i + 1 < len(keys) else ""
        out.append("")
        out.append("  %s: %s," % (json.dumps("_" + k["key"]), json.dumps(note)))
        out.append("  %s: %s%s" % (json.dumps(k["key"]), json.dumps(k["default"]), comma))
    out.append("}")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sieve", default=os.path.join(ROOT, "build", "sieve"))
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args()
    keys = schema(args.sieve)
    outputs = {DOC: render_doc(args.sieve, keys), EXAMPLE: render_example(keys)}
    stale = False
    for path, text in outputs.items():
        try:
            with open(path) as f:
                old = f.read()
        except FileNotFoundError:
            old = ""
        if old == text:
            continue
        if args.check:
            stale = True
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(True), text.splitlines(True), path, path + " (generated)"))
        else:
            with open(path, "w") as f:
                f.write(text)
            print("wrote", os.path.relpath(path, ROOT))
    if stale:
        print("\nstale: run tools/gen_config_doc.py --sieve PATH/TO/sieve", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
