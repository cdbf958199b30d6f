/*
 * test_config.c - unit tests for config/config.c: defaults, JSON loading (every
 * kind of key, and each kind of error naming the key), the shipped
 * config/sieve.json, SIEVE_* environment variables, command-line flags, the
 * precedence defaults < file < environment < flags, typo suggestions for keys,
 * flags and variables, --check-config, API keys and the key file, and
 * validation. Error checks assert on substrings of the message, so a message
 * that stops naming the key or the problem fails.
 *
 * main() clears every SIEVE_* variable but SIEVE_SHARED_DIR first, so a
 * developer's environment cannot change the results; tests that set one unset
 * it before they return.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/config.h"

/* ---- helpers ---- */

static int load(cfg_config *c, const char *json, char *err, size_t errlen)
{
    err[0] = '\0';
    return cfg_load_json(c, json, strlen(json), err, errlen);
}

static void assert_contains(const char *haystack, const char *needle)
{
    if (!strstr(haystack, needle))
        fail_msg("expected \"%s\" in \"%s\"", needle, haystack);
}

static bool ends_with(const char *s, const char *suffix)
{
    const size_t ls = strlen(s), lx = strlen(suffix);
    return ls >= lx && strcmp(s + ls - lx, suffix) == 0;
}

/* Every field but model (the caller compares that one). */
static void assert_same_except_model(const cfg_config *a, const cfg_config *b)
{
    assert_string_equal(a->model_name, b->model_name);
    assert_string_equal(a->host, b->host);
    assert_int_equal(a->port, b->port);
    assert_int_equal(a->threads, b->threads);
    assert_int_equal(a->max_body_bytes, b->max_body_bytes);
    assert_int_equal(a->context_length, b->context_length);
    assert_int_equal(a->max_running_seqs, b->max_running_seqs);
    assert_int_equal(a->max_batch_tokens, b->max_batch_tokens);
    assert_int_equal(a->drain_timeout_s, b->drain_timeout_s);
    assert_int_equal(a->max_waiting, b->max_waiting);
    assert_int_equal(a->default_max_tokens, b->default_max_tokens);
    assert_int_equal(a->connection_timeout_s, b->connection_timeout_s);
    assert_int_equal(a->max_connections, b->max_connections);
    assert_int_equal(a->log_requests, b->log_requests);
    assert_string_equal(a->device, b->device);
    assert_string_equal(a->devices, b->devices);
    assert_int_equal(a->tensor_parallel_size, b->tensor_parallel_size);
}

/* Writes text to a new temporary file; path receives its name. */
static void write_temp(char *path, size_t n, const char *text)
{
    const char *dir = getenv("TMPDIR");
    snprintf(path, n, "%s/sieve_test_config_XXXXXX", dir && *dir ? dir : "/tmp");
    const int fd = mkstemp(path);
    assert_true(fd >= 0);
    const size_t len = strlen(text);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    assert_int_equal(close(fd), 0);
}

/* argv from a NULL-terminated list of literals (cfg_parse_args does not write). */
static int parse(cfg_config *c, char *err, size_t errlen, const char *const *args)
{
    char *argv[32];
    int argc = 0;
    argv[argc++] = (char *)"sieve";
    for (; *args; args++)
        argv[argc++] = (char *)*args;
    argv[argc] = NULL;
    err[0] = '\0';
    cfg_defaults(c);
    return cfg_parse_args(c, argc, argv, err, errlen);
}

/* Runs parse() with stdout and stderr sent to temporary files; *out and *errout
 * receive what was printed (caller frees). */
static int parse_captured(cfg_config *c, char *err, size_t errlen, const char *const *args,
                          char **out, char **errout)
{
    fflush(stdout);
    fflush(stderr);
    FILE *fo = tmpfile(), *fe = tmpfile();
    assert_non_null(fo);
    assert_non_null(fe);
    const int saved_out = dup(STDOUT_FILENO), saved_err = dup(STDERR_FILENO);
    assert_true(dup2(fileno(fo), STDOUT_FILENO) >= 0);
    assert_true(dup2(fileno(fe), STDERR_FILENO) >= 0);
    const int rc = parse(c, err, errlen, args);
    fflush(stdout);
    fflush(stderr);
    dup2(saved_out, STDOUT_FILENO);
    dup2(saved_err, STDERR_FILENO);
    close(saved_out);
    close(saved_err);
    FILE *files[2] = {fo, fe};
    char **dst[2] = {out, errout};
    for (int i = 0; i < 2; i++) {
        const long n = ftell(files[i]);
        assert_true(n >= 0);
        char *buf = calloc((size_t)n + 1, 1);
        assert_non_null(buf);
        rewind(files[i]);
        assert_int_equal(fread(buf, 1, (size_t)n, files[i]), (size_t)n);
        fclose(files[i]);
        *dst[i] = buf;
    }
    return rc;
}

/* What cfg_load_env warned about. */
static char *env_warnings(cfg_config *c, int *rc, char *err, size_t errlen)
{
    FILE *w = tmpfile();
    assert_non_null(w);
    err[0] = '\0';
    *rc = cfg_load_env(c, w, err, errlen);
    const long n = ftell(w);
    char *buf = calloc((size_t)n + 1, 1);
    assert_non_null(buf);
    rewind(w);
    assert_int_equal(fread(buf, 1, (size_t)n, w), (size_t)n);
    fclose(w);
    return buf;
}

/* Unsets every SIEVE_* variable but SIEVE_SHARED_DIR. */
static void clear_sieve_env(void)
{
    extern char **environ;
    char names[64][128];
    int n = 0;
    for (char **e = environ; *e && n < 64; e++) {
        const char *eq = strchr(*e, '=');
        const size_t len = eq ? (size_t)(eq - *e) : strlen(*e);
        if (strncmp(*e, "SIEVE_", 6) == 0 && len < sizeof names[0] &&
            strncmp(*e, "SIEVE_SHARED_DIR=", 17) != 0)
            snprintf(names[n++], sizeof names[0], "%.*s", (int)len, *e);
    }
    for (int i = 0; i < n; i++)
        unsetenv(names[i]);
}

/* ---- defaults ---- */

static void test_config_defaults(void **state)
{
    (void)state;
    cfg_config c;
    memset(&c, 0x5a, sizeof c);
    cfg_defaults(&c);
    assert_int_equal(c.port, 8080);
    assert_string_equal(c.host, "127.0.0.1");
    assert_true(ends_with(c.model, "models/stories260K.gguf"));
    assert_string_equal(c.model_name, "");
    assert_int_equal(c.threads, 0);
    assert_int_equal(c.max_body_bytes, 8 << 20);
    assert_int_equal(c.max_running_seqs, 16);
    assert_int_equal(c.max_batch_tokens, 512);
    assert_false(c.log_requests);
    char err[256] = "";
    assert_int_equal(cfg_validate(&c, err, sizeof err), 0);
}

/* ---- cfg_load_json ---- */

static void test_config_load_json_sets_every_kind_of_key(void **state)
{
    (void)state;
    cfg_config c, d;
    cfg_defaults(&c);
    cfg_defaults(&d);
    char err[512];
    const char *json = "{\"model\": \"/m/x.gguf\", \"model_name\": \"tiny\", \"host\": \"0.0.0.0\","
                       " \"port\": 9001, \"threads\": 3, \"max_body_bytes\": 4294967296,"
                       " \"context_length\": 2048, \"max_running_seqs\": 4,"
                       " \"max_batch_tokens\": 64, \"drain_timeout_s\": 5, \"max_waiting\": 7,"
                       " \"default_max_tokens\": 32, \"connection_timeout_s\": 60,"
                       " \"max_connections\": 10, \"log_requests\": true}";
    if (load(&c, json, err, sizeof err) != 0)
        fail_msg("load failed: %s", err);
    assert_string_equal(c.model, "/m/x.gguf"); /* string */
    assert_string_equal(c.model_name, "tiny");
    assert_string_equal(c.host, "0.0.0.0");
    assert_int_equal(c.port, 9001); /* int */
    assert_int_equal(c.threads, 3);
    assert_true(c.max_body_bytes == (int64_t)1 << 32); /* int64 above 2^31 */
    assert_int_equal(c.context_length, 2048);
    assert_int_equal(c.max_running_seqs, 4);
    assert_int_equal(c.max_batch_tokens, 64);
    assert_int_equal(c.drain_timeout_s, 5);
    assert_int_equal(c.max_waiting, 7);
    assert_int_equal(c.default_max_tokens, 32);
    assert_int_equal(c.connection_timeout_s, 60);
    assert_int_equal(c.max_connections, 10);
    assert_true(c.log_requests); /* bool */

    /* Loading applies over the current values: keys not named keep theirs. */
    assert_int_equal(load(&c, "{\"log_requests\": false, \"port\": 0}", err, sizeof err), 0);
    assert_false(c.log_requests);
    assert_int_equal(c.port, 0);
    assert_int_equal(c.threads, 3);
    assert_string_equal(c.model_name, "tiny");
    /* An empty object changes nothing. */
    assert_int_equal(load(&d, "{}", err, sizeof err), 0);
    cfg_config e;
    cfg_defaults(&e);
    assert_string_equal(d.model, e.model);
    assert_same_except_model(&d, &e);
}

static void test_config_unknown_key_suggests_nearest(void **state)
{
    (void)state;
    cfg_config c;
    cfg_defaults(&c);
    char err[512];
    assert_int_equal(load(&c, "{\"prot\": 9000}", err, sizeof err), -1);
    assert_contains(err, "'prot'");
    assert_contains(err, "'port'");
    assert_int_equal(c.port, 8080);

    assert_int_equal(load(&c, "{\"max_runing_seqs\": 2}", err, sizeof err), -1);
    assert_contains(err, "'max_running_seqs'");

    /* Nothing close: the key is named, nothing is suggested. */
    assert_int_equal(load(&c, "{\"completely_unrelated\": 1}", err, sizeof err), -1);
    assert_contains(err, "'completely_unrelated'");
    assert_null(strstr(err, "did you mean"));
}

static void test_config_wrong_type_names_the_key(void **state)
{
    (void)state;
    cfg_config c;
    cfg_defaults(&c);
    char err[512];
    assert_int_equal(load(&c, "{\"port\": \"x\"}", err, sizeof err), -1);
    assert_contains(err, "'port'");
    assert_contains(err, "integer");
    assert_int_equal(c.port, 8080);

    assert_int_equal(load(&c, "{\"port\": 80.5}", err, sizeof err), -1);
    assert_contains(err, "'port'");
    assert_int_equal(load(&c, "{\"host\": 5}", err, sizeof err), -1);
    assert_contains(err, "'host'");
    assert_contains(err, "string");
    assert_int_equal(load(&c, "{\"log_requests\": 1}", err, sizeof err), -1);
    assert_contains(err, "'log_requests'");
    assert_contains(err, "boolean");
    assert_int_equal(load(&c, "{\"max_body_bytes\": null}", err, sizeof err), -1);
    assert_contains(err, "'max_body_bytes'");
}

static void test_config_out_of_range_names_key_and_range(void **state)
{
    (void)state;
    cfg_config c;
    cfg_defaults(&c);
    char err[512];
    assert_int_equal(load(&c, "{\"port\": 70000}", err, sizeof err), -1);
    assert_contains(err, "'port'");
    assert_contains(err, "70000");
    assert_contains(err, "[0, 65535]");
    assert_int_equal(c.port, 8080);

    assert_int_equal(load(&c, "{\"port\": -1}", err, sizeof err), -1);
    assert_contains(err, "[0, 65535]");
    assert_int_equal(load(&c, "{\"max_body_bytes\": 1023}", err, sizeof err), -1);
    assert_contains(err, "'max_body_bytes'");
    assert_contains(err, "[1024, 4294967296]");
    assert_int_equal(load(&c, "{\"max_body_bytes\": 4294967297}", err, sizeof err), -1);
    /* An int key given a value that only fits 64 bits is out of range, not
     * truncated. */
    assert_int_equal(load(&c, "{\"threads\": 4294967297}", err, sizeof err), -1);
    assert_contains(err, "'threads'");
    assert_int_equal(c.threads, 0);
    /* The bounds themselves are accepted. */
    assert_int_equal(load(&c, "{\"port\": 65535, \"max_running_seqs\": 1}", err, sizeof err), 0);
    assert_int_equal(c.port, 65535);
}

static void test_config_invalid_json_reports_line_and_column(void **state)
{
    (void)state;
    cfg_config c;
    cfg_defaults(&c);
    char err[512];
    /* The missing ':' is on line 3. */
    assert_int_equal(load(&c, "{\n  \"port\": 80,\n  \"host\" \"x\"\n}", err, sizeof err), -1);
    assert_contains(err, "line 3");
    assert_contains(err, "column ");
    assert_int_equal(c.port, 8080);

    assert_int_equal(load(&c, "{\"port\": 80", err, sizeof err), -1);
    assert_contains(err, "invalid JSON");
    /* Duplicate keys are refused rather than one silently winning. */
    assert_int_equal(load(&c, "{\"port\": 80, \"port\": 81}", err, sizeof err), -1);
}

static void test_config_non_object_top_level_refused(void **state)
{
    (void)state;
    cfg_config c;
    cfg_defaults(&c);
    char err[512];
    /* An array parses as JSON and is refused by the object check. */
    const char *arrays[] = {"[1, 2]", "[]", "[{\"port\": 1}]"};
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++) {
        err[0] = '\0';
        assert_int_equal(cfg_load_json(&c, arrays[i], strlen(arrays[i]), err, sizeof err), -1);
        assert_contains(err, "top level must be a JSON object");
    }
    assert_int_equal(c.port, 8080);
    /* Bare scalars are refused too (jansson rejects them as a document). */
    const char *scalars[] = {"42", "\"port\"", "null", "true"};
    for (size_t i = 0; i < sizeof scalars / sizeof scalars[0]; i++) {
        err[0] = '\0';
        assert_int_equal(cfg_load_json(&c, scalars[i], strlen(scalars[i]), err, sizeof err), -1);
        assert_true(err[0] != '\0');
    }
}

static void test_config_underscore_keys_are_ignored(void **state)
{
    (void)state;
    cfg_config c;
    cfg_defaults(&c);
    char err[512];
    assert_int_equal(
        load(&c, "{\"_comment\": 5, \"_port\": \"x\", \"_\": [1], \"port\": 81}", err, sizeof err),
        0);
    assert_int_equal(c.port, 81);
}

/* ---- the shipped config/sieve.json ---- */

static void test_config_shipped_file_equals_defaults(void **state)
{
    (void)state;
    /* The repository root: this file is <root>/tests/unit/test_config.c. */
    const char *self = __FILE__, *suffix = "tests/unit/test_config.c";
    assert_true(ends_with(self, suffix));
    char path[2048];
    snprintf(path, sizeof path, "%.*s%s", (int)(strlen(self) - strlen(suffix)), self,
             "config/sieve.json");
    cfg_config c, d;
    cfg_defaults(&c);
    cfg_defaults(&d);
    char err[1024] = "";
    if (cfg_load_file(&c, path, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_string_equal(c.model, "../shared/models/stories260K.gguf");
    assert_same_except_model(&c, &d);
    /* And every field, including any not listed above: both structs start from
     * cfg_defaults (zeroed first), so with model made equal they are equal
     * byte for byte. */
    memcpy(c.model, d.model, sizeof c.model);
    assert_memory_equal(&c, &d, sizeof c);
    snprintf(c.model, sizeof c.model, "../shared/models/stories260K.gguf");
    assert_int_equal(cfg_validate(&c, err, sizeof err), 0);
}

static void test_config_load_file_missing_names_the_path(void **state)
{
    (void)state;
    cfg_config c;
    cfg_defaults(&c);
    char err[512] = "";
    assert_int_equal(cfg_load_file(&c, "/nonexistent/sieve-test.json", err, sizeof err), -1);
    assert_contains(err, "/nonexistent/sieve-test.json");
}

static void test_config_load_file_error_names_the_file(void **state)
{
    (void)state;
    char path[512];
    write_temp(path, sizeof path, "{\"port\": \"x\"}");
    cfg_config c;
    cfg_defaults(&c);
    char err[1024] = "";
    const int rc = cfg_load_file(&c, path, err, sizeof err);
    unlink(path);
    assert_int_equal(rc, -1);
    assert_contains(err, path);
    assert_contains(err, "'port'");
}

/* ---- cfg_parse_args ---- */

static void test_config_flags_override_config_file_in_any_order(void **state)
{
    (void)state;
    char path[512];
    write_temp(path, sizeof path, "{\"port\": 1111, \"threads\": 3, \"host\": \"10.0.0.1\"}");
    cfg_config c;
    char err[1024];

    const char *file_only[] = {"--config", path, NULL};
    assert_int_equal(parse(&c, err, sizeof err, file_only), 0);
    assert_int_equal(c.port, 1111);
    assert_int_equal(c.threads, 3);

    const char *flag_first[] = {"--port", "9000", "--config", path, NULL};
    assert_int_equal(parse(&c, err, sizeof err, flag_first), 0);
    assert_int_equal(c.port, 9000);
    assert_int_equal(c.threads, 3);
    assert_string_equal(c.host, "10.0.0.1");

    const char *flag_last[] = {"--config", path, "--port=9000", "--host", "::1", NULL};
    assert_int_equal(parse(&c, err, sizeof err, flag_last), 0);
    assert_int_equal(c.port, 9000);
    assert_int_equal(c.threads, 3);
    assert_string_equal(c.host, "::1");
    unlink(path);
}

static void test_config_flag_value_forms(void **state)
{
    (void)state;
    cfg_config c;
    char err[512];
    const char *eq[] = {"--port=9000", NULL};
    assert_int_equal(parse(&c, err, sizeof err, eq), 0);
    assert_int_equal(c.port, 9000);
    const char *sep[] = {"--port", "9000", NULL};
    assert_int_equal(parse(&c, err, sizeof err, sep), 0);
    assert_int_equal(c.port, 9000);

    const char *many[] = {"--model",
                          "/x/y.gguf",
                          "--model-name=m",
                          "--threads",
                          "2",
                          "--max-body-bytes=4000000000",
                          "--log-requests",
                          "true",
                          "--max-running-seqs",
                          "3",
                          NULL};
    if (parse(&c, err, sizeof err, many) != 0)
        fail_msg("%s", err);
    assert_string_equal(c.model, "/x/y.gguf");
    assert_string_equal(c.model_name, "m");
    assert_int_equal(c.threads, 2);
    assert_true(c.max_body_bytes == 4000000000LL); /* int64 above 2^31 */
    assert_true(c.log_requests);
    assert_int_equal(c.max_running_seqs, 3);
}

static void test_config_unknown_flag_is_an_error(void **state)
{
    (void)state;
    cfg_config c;
    char err[512];
    const char *args[] = {"--prot", "9000", NULL};
    assert_int_equal(parse(&c, err, sizeof err, args), -1);
    assert_contains(err, "--prot");
    const char *positional[] = {"model.gguf", NULL};
    assert_int_equal(parse(&c, err, sizeof err, positional), -1);
    assert_contains(err, "model.gguf");
}

static void test_config_missing_flag_value_is_an_error(void **state)
{
    (void)state;
    cfg_config c;
    char err[512];
    const char *args[] = {"--threads", "2", "--port", NULL};
    assert_int_equal(parse(&c, err, sizeof err, args), -1);
    assert_contains(err, "--port");
    assert_contains(err, "needs a value");
    const char *cfg[] = {"--config", NULL};
    assert_int_equal(parse(&c, err, sizeof err, cfg), -1);
    assert_contains(err, "--config");
}

static void test_config_non_integer_flag_value_is_an_error(void **state)
{
    (void)state;
    cfg_config c;
    char err[512];
    const char *abc[] = {"--threads", "abc", NULL};
    assert_int_equal(parse(&c, err, sizeof err, abc), -1);
    assert_contains(err, "--threads");
    assert_contains(err, "'abc'");
    const char *trailing[] = {"--port=80x", NULL};
    assert_int_equal(parse(&c, err, sizeof err, trailing), -1);
    assert_contains(err, "--port");
    const char *empty[] = {"--port=", NULL};
    assert_int_equal(parse(&c, err, sizeof err, empty), -1);
    const char *range[] = {"--port", "70000", NULL};
    assert_int_equal(parse(&c, err, sizeof err, range), -1);
    assert_contains(err, "'port'");
    assert_contains(err, "[0, 65535]");
    const char *boolean[] = {"--log-requests", "yes", NULL};
    assert_int_equal(parse(&c, err, sizeof err, boolean), -1);
    assert_contains(err, "--log-requests");
}

static void test_config_help_returns_one(void **state)
{
    (void)state;
    cfg_config c;
    char err[512];
    char *out, *errout;
    const char *help[] = {"--port", "9000", "--help", NULL};
    assert_int_equal(parse_captured(&c, err, sizeof err, help, &out, &errout), 1);
    assert_contains(out, "usage: sieve");
    free(out);
    free(errout);
    const char *h[] = {"-h", NULL};
    assert_int_equal(parse_captured(&c, err, sizeof err, h, &out, &errout), 1);
    assert_contains(out, "--check-config FILE");
    free(out);
    free(errout);
    const char *version[] = {"--version", NULL};
    assert_int_equal(parse_captured(&c, err, sizeof err, version, &out, &errout), 1);
    free(out);
    free(errout);
    assert_contains(cfg_usage(), "--port");
    assert_contains(cfg_usage(), "--config");
}

static void test_config_parse_args_validates_the_result(void **state)
{
    (void)state;
    cfg_config c;
    char err[1024];
    /* Each value is accepted by its own key, but the whole is invalid. */
    const char *host[] = {"--host=", NULL};
    assert_int_equal(parse(&c, err, sizeof err, host), -1);
    assert_contains(err, "'host'");

    char path[512];
    write_temp(path, sizeof path, "{\"model\": \"\"}");
    const char *file[] = {"--config", path, NULL};
    const int rc = parse(&c, err, sizeof err, file);
    unlink(path);
    assert_int_equal(rc, -1);
    assert_contains(err, "'model'");
}

/* ---- environment variables and precedence ---- */

static void test_config_precedence_file_then_env_then_flags(void **state)
{
    (void)state;
    char path[512];
    write_temp(path, sizeof path,
               "{\"port\": 1111, \"threads\": 3, \"host\": \"10.0.0.1\", \"max_waiting\": 5}");
    cfg_config c, d;
    cfg_defaults(&d);
    char err[1024];

    /* File over defaults. */
    const char *file_only[] = {"--config", path, NULL};
    assert_int_equal(parse(&c, err, sizeof err, file_only), 0);
    assert_int_equal(c.port, 1111);
    assert_int_equal(c.threads, 3);
    assert_int_equal(c.max_running_seqs, d.max_running_seqs); /* default kept */

    /* Environment over the file. */
    setenv("SIEVE_PORT", "2222", 1);
    setenv("SIEVE_THREADS", "4", 1);
    assert_int_equal(parse(&c, err, sizeof err, file_only), 0);
    assert_int_equal(c.port, 2222);
    assert_int_equal(c.threads, 4);
    assert_string_equal(c.host, "10.0.0.1"); /* file, no variable */
    assert_int_equal(c.max_waiting, 5);

    /* Flags over the environment, wherever they stand. */
    const char *flags[] = {"--port", "3333", "--config", path, "--max-waiting=6", NULL};
    assert_int_equal(parse(&c, err, sizeof err, flags), 0);
    assert_int_equal(c.port, 3333);
    assert_int_equal(c.threads, 4); /* environment */
    assert_int_equal(c.max_waiting, 6);
    assert_string_equal(c.host, "10.0.0.1");

    /* Environment over defaults without any file. */
    const char *none[] = {NULL};
    assert_int_equal(parse(&c, err, sizeof err, none), 0);
    assert_int_equal(c.port, 2222);
    assert_string_equal(c.host, d.host);
    unsetenv("SIEVE_PORT");
    unsetenv("SIEVE_THREADS");
    unlink(path);
}

static void test_config_env_sets_every_kind_of_key(void **state)
{
    (void)state;
    cfg_config c;
    char err[512];
    setenv("SIEVE_MODEL", "/models/x.gguf", 1);
    setenv("SIEVE_MAX_BODY_BYTES", "4000000000", 1);
    setenv("SIEVE_LOG_REQUESTS", "1", 1);
    setenv("SIEVE_PREFIX_CACHING", "false", 1);
    setenv("SIEVE_KV_CACHE_BYTES", "1048576", 1);
    setenv("SIEVE_API_KEYS", " key-one , key-two,k3\n", 1); /* as a mounted secret */
    setenv("SIEVE_MODEL_NAME", "", 1);                      /* empty = unset */
    const char *none[] = {NULL};
    if (parse(&c, err, sizeof err, none) != 0)
        fail_msg("%s", err);
    assert_string_equal(c.model, "/models/x.gguf");
    assert_true(c.max_body_bytes == 4000000000LL);
    assert_true(c.log_requests);
    assert_false(c.prefix_caching);
    assert_true(c.kv_cache_bytes == 1048576);
    assert_int_equal(c.n_api_keys, 3);
    assert_string_equal(c.api_keys[0], "key-one");
    assert_string_equal(c.api_keys[1], "key-two");
    assert_string_equal(c.api_keys[2], "k3");
    assert_string_equal(c.model_name, "");
    unsetenv("SIEVE_MODEL");
    unsetenv("SIEVE_MAX_BODY_BYTES");
    unsetenv("SIEVE_LOG_REQUESTS");
    unsetenv("SIEVE_PREFIX_CACHING");
    unsetenv("SIEVE_KV_CACHE_BYTES");
    unsetenv("SIEVE_API_KEYS");
    unsetenv("SIEVE_MODEL_NAME");
}

static void test_config_bad_env_value_names_the_variable(void **state)
{
    (void)state;
    cfg_config c;
    char err[512];
    const char *none[] = {NULL};
    struct {
        const char *var, *val, *want1, *want2;
    } cases[] = {
        {"SIEVE_PORT", "abc", "environment variable SIEVE_PORT", "'abc'"},
        {"SIEVE_PORT", "70000", "SIEVE_PORT", "[0, 65535]"},
        {"SIEVE_THREADS", "99999999999999999999999", "SIEVE_THREADS", "out of range"},
        {"SIEVE_LOG_REQUESTS", "yes", "SIEVE_LOG_REQUESTS", "true or false"},
        {"SIEVE_API_KEYS", "good,,bad", "SIEVE_API_KEYS", "empty"},
        {"SIEVE_API_KEYS", "has space", "SIEVE_API_KEYS", "visible ASCII"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        setenv(cases[i].var, cases[i].val, 1);
        assert_int_equal(parse(&c, err, sizeof err, none), -1);
        assert_contains(err, cases[i].want1);
        assert_contains(err, cases[i].want2);
        unsetenv(cases[i].var);
    }
    /* Out of range also names the key the variable sets. */
    setenv("SIEVE_PORT", "-5", 1);
    assert_int_equal(parse(&c, err, sizeof err, none), -1);
    assert_contains(err, "config key 'port'");
    unsetenv("SIEVE_PORT");
}

static void test_config_unknown_env_is_warned_with_suggestion(void **state)
{
    (void)state;
    cfg_config c;
    cfg_defaults(&c);
    char err[512];
    int rc;
    setenv("SIEVE_PROT", "9000", 1);
    setenv("SIEVE_MAX_RUNING_SEQS", "2", 1);
    setenv("SIEVE_SOMETHING_ELSE_ENTIRELY", "1", 1);
    setenv("SIEVE_CONFIG", "", 1); /* known: the file variable */
    char *w = env_warnings(&c, &rc, err, sizeof err);
    assert_int_equal(rc, 0); /* warned, not refused */
    assert_contains(w, "SIEVE_PROT");
    assert_contains(w, "did you mean SIEVE_PORT?");
    assert_contains(w, "did you mean SIEVE_MAX_RUNNING_SEQS?");
    assert_contains(w, "unknown environment variable SIEVE_SOMETHING_ELSE_ENTIRELY ignored\n");
    assert_null(strstr(w, "SIEVE_CONFIG"));
    assert_null(strstr(w, "SIEVE_SHARED_DIR"));
    assert_int_equal(c.port, 8080);
    free(w);
    /* The warning comes even when another variable is refused. */
    setenv("SIEVE_PORT", "x", 1);
    w = env_warnings(&c, &rc, err, sizeof err);
    assert_int_equal(rc, -1);
    assert_contains(err, "SIEVE_PORT");
    assert_contains(w, "did you mean SIEVE_PORT?");
    free(w);
    unsetenv("SIEVE_PORT");
    unsetenv("SIEVE_PROT");
    unsetenv("SIEVE_MAX_RUNING_SEQS");
    unsetenv("SIEVE_SOMETHING_ELSE_ENTIRELY");
    unsetenv("SIEVE_CONFIG");
}

static void test_config_sieve_config_names_the_file(void **state)
{
    (void)state;
    char a[512], b[512];
    write_temp(a, sizeof a, "{\"port\": 1111, \"threads\": 2}");
    write_temp(b, sizeof b, "{\"port\": 2222}");
    cfg_config c;
    char err[1024];
    setenv("SIEVE_CONFIG", a, 1);
    const char *none[] = {NULL};
    assert_int_equal(parse(&c, err, sizeof err, none), 0);
    assert_int_equal(c.port, 1111);
    /* A --config on the command line replaces it. */
    const char *explicit_file[] = {"--config", b, NULL};
    assert_int_equal(parse(&c, err, sizeof err, explicit_file), 0);
    assert_int_equal(c.port, 2222);
    assert_int_equal(c.threads, 0);
    /* Several files apply in order. */
    const char *two[] = {"--config", a, "--config", b, NULL};
    assert_int_equal(parse(&c, err, sizeof err, two), 0);
    assert_int_equal(c.port, 2222);
    assert_int_equal(c.threads, 2);
    setenv("SIEVE_CONFIG", "/nonexistent/sieve.json", 1);
    assert_int_equal(parse(&c, err, sizeof err, none), -1);
    assert_contains(err, "/nonexistent/sieve.json");
    unsetenv("SIEVE_CONFIG");
    unlink(a);
    unlink(b);
}

/* ---- typo suggestions on the command line ---- */

static void test_config_unknown_flag_suggests_nearest(void **state)
{
    (void)state;
    cfg_config c;
    char err[512];
    const char *prot[] = {"--prot", "9000", NULL};
    assert_int_equal(parse(&c, err, sizeof err, prot), -1);
    assert_contains(err, "'--prot'");
    assert_contains(err, "did you mean --port?");
    const char *eq[] = {"--max-runing-seqs=2", NULL};
    assert_int_equal(parse(&c, err, sizeof err, eq), -1);
    assert_contains(err, "'--max-runing-seqs'");
    assert_contains(err, "did you mean --max-running-seqs?");
    const char *meta[] = {"--check-confg", "x.json", NULL};
    assert_int_equal(parse(&c, err, sizeof err, meta), -1);
    assert_contains(err, "did you mean --check-config?");
    const char *far[] = {"--completely-unrelated", "1", NULL};
    assert_int_equal(parse(&c, err, sizeof err, far), -1);
    assert_contains(err, "--completely-unrelated");
    assert_null(strstr(err, "did you mean"));
    const char *positional[] = {"/models/m.gguf", NULL};
    assert_int_equal(parse(&c, err, sizeof err, positional), -1);
    assert_contains(err, "did you mean --model /models/m.gguf?");
}

/* ---- --check-config ---- */

static void test_config_check_config_prints_effective_values(void **state)
{
    (void)state;
    char path[512];
    write_temp(path, sizeof path,
               "{\"port\": 1111, \"threads\": 3, \"api_keys\": [\"secret-key-1\"]}");
    cfg_config c;
    char err[1024];
    char *out, *errout;
    setenv("SIEVE_THREADS", "5", 1);
    const char *args[] = {"--check-config", path, "--max-waiting", "9", NULL};
    const int rc = parse_captured(&c, err, sizeof err, args, &out, &errout);
    unsetenv("SIEVE_THREADS");
    unlink(path);
    if (rc != 1)
        fail_msg("rc %d: %s", rc, err);
    assert_contains(errout, "config OK");
    json_error_t jerr;
    json_t *j = json_loads(out, 0, &jerr);
    if (!j)
        fail_msg("stdout is not JSON: %s\n%s", jerr.text, out);
    assert_int_equal(json_integer_value(json_object_get(j, "port")), 1111);     /* file */
    assert_int_equal(json_integer_value(json_object_get(j, "threads")), 5);     /* env */
    assert_int_equal(json_integer_value(json_object_get(j, "max_waiting")), 9); /* flag */
    assert_int_equal(json_integer_value(json_object_get(j, "max_running_seqs")), 16);
    assert_true(json_is_true(json_object_get(j, "prefix_caching")));
    /* Every key is there, and the key itself is not. */
    assert_int_equal(json_object_size(j), 31);
    assert_null(strstr(out, "secret-key-1"));
    assert_string_equal(json_string_value(json_object_get(j, "api_keys")), "<1 redacted>");
    /* The redacted value never loads back as keys. */
    cfg_config d;
    cfg_defaults(&d);
    assert_int_equal(cfg_load_json(&d, out, strlen(out), err, sizeof err), -1);
    assert_contains(err, "'api_keys'");
    json_decref(j);
    free(out);
    free(errout);
}

static void test_config_check_config_reports_errors(void **state)
{
    (void)state;
    char path[512];
    write_temp(path, sizeof path, "{\"prot\": 1111}");
    cfg_config c;
    char err[1024];
    char *out, *errout;
    const char *bad[] = {"--check-config", path, NULL};
    assert_int_equal(parse_captured(&c, err, sizeof err, bad, &out, &errout), -1);
    assert_contains(err, path);
    assert_contains(err, "did you mean 'port'?");
    assert_string_equal(out, ""); /* nothing on stdout: no "config OK" */
    assert_null(strstr(errout, "config OK"));
    free(out);
    free(errout);
    unlink(path);

    /* A good file made invalid by a flag is an error too. */
    write_temp(path, sizeof path, "{\"max_running_seqs\": 64}");
    const char *rule[] = {"--check-config", path, "--max-batch-tokens", "32", NULL};
    assert_int_equal(parse_captured(&c, err, sizeof err, rule, &out, &errout), -1);
    assert_contains(err, "'max_batch_tokens'");
    free(out);
    free(errout);
    unlink(path);

    const char *missing[] = {"--check-config", NULL};
    assert_int_equal(parse(&c, err, sizeof err, missing), -1);
    assert_contains(err, "--check-config needs a file name");
    const char *absent[] = {"--check-config=/nonexistent/x.json", NULL};
    assert_int_equal(parse(&c, err, sizeof err, absent), -1);
    assert_contains(err, "/nonexistent/x.json");
}

static void test_config_schema_and_help_list_every_key(void **state)
{
    (void)state;
    char *s = cfg_schema_json();
    assert_non_null(s);
    json_error_t jerr;
    json_t *a = json_loads(s, 0, &jerr);
    assert_non_null(a);
    assert_int_equal(json_array_size(a), 31);
    size_t i;
    json_t *k;
    json_array_foreach(a, i, k)
    {
        const char *name = json_string_value(json_object_get(k, "key"));
        const char *flag = json_string_value(json_object_get(k, "flag"));
        const char *env = json_string_value(json_object_get(k, "env"));
        assert_non_null(name);
        /* The three spellings of one key. */
        char want[128];
        snprintf(want, sizeof want, "--%s", name);
        for (char *p = want; *p; p++)
            if (*p == '_')
                *p = '-';
        if (strcmp(name, "drain_timeout_s") != 0 && strcmp(name, "connection_timeout_s") != 0)
            assert_string_equal(flag, want);
        snprintf(want, sizeof want, "SIEVE_%s", name);
        for (char *p = want; *p; p++)
            if (*p >= 'a' && *p <= 'z')
                *p = (char)(*p - 'a' + 'A');
        assert_string_equal(env, want);
        assert_true(strlen(json_string_value(json_object_get(k, "doc"))) > 20);
        assert_non_null(json_object_get(k, "default"));
        snprintf(want, sizeof want, "  %s ", flag);
        assert_contains(cfg_usage(), want);
    }
    json_decref(a);
    free(s);
    cfg_config c;
    char err[256];
    char *out, *errout;
    const char *schema[] = {"--config-schema", NULL};
    assert_int_equal(parse_captured(&c, err, sizeof err, schema, &out, &errout), 1);
    assert_contains(out, "\"SIEVE_KV_CACHE_BYTES\"");
    free(out);
    free(errout);
    const char *version[] = {"--version", NULL};
    assert_int_equal(parse_captured(&c, err, sizeof err, version, &out, &errout), 1);
    assert_contains(out, "sieve ");
    free(out);
    free(errout);
}

/* ---- API keys ---- */

static void test_config_api_keys_from_json(void **state)
{
    (void)state;
    cfg_config c;
    cfg_defaults(&c);
    char err[512];
    assert_int_equal(load(&c, "{\"api_keys\": [\"a1\", \"sk-B_2.~+/=\"]}", err, sizeof err), 0);
    assert_int_equal(c.n_api_keys, 2);
    assert_string_equal(c.api_keys[1], "sk-B_2.~+/=");
    /* A later source replaces the list rather than appending to it. */
    assert_int_equal(load(&c, "{\"api_keys\": [\"z\"]}", err, sizeof err), 0);
    assert_int_equal(c.n_api_keys, 1);
    assert_string_equal(c.api_keys[0], "z");

    assert_int_equal(load(&c, "{\"api_keys\": \"a1\"}", err, sizeof err), -1);
    assert_contains(err, "'api_keys'");
    assert_contains(err, "array of strings");
    assert_int_equal(load(&c, "{\"api_keys\": [\"a\", 2]}", err, sizeof err), -1);
    assert_contains(err, "array of strings");
    assert_int_equal(load(&c, "{\"api_keys\": [\"has space\"]}", err, sizeof err), -1);
    assert_contains(err, "'api_keys'[0]");
    assert_int_equal(load(&c, "{\"api_keys\": [\"ok\", \"\"]}", err, sizeof err), -1);
    assert_contains(err, "'api_keys'[1]");
    assert_int_equal(c.n_api_keys, 1); /* unchanged by the failed loads */
    assert_string_equal(c.api_keys[0], "z");

    char big[65 * 4 + 32] = "{\"api_keys\": [";
    for (int i = 0; i < 65; i++)
        strcat(big, i ? ",\"k\"" : "\"k\"");
    strcat(big, "]}");
    assert_int_equal(load(&c, big, err, sizeof err), -1);
    assert_contains(err, "more than 64");
    char long_key[300];
    memset(long_key, 'x', 256);
    long_key[256] = '\0';
    char json[400];
    snprintf(json, sizeof json, "{\"api_keys\": [\"%s\"]}", long_key);
    assert_int_equal(load(&c, json, err, sizeof err), -1);
    assert_contains(err, "longer than 255");
}

static void test_config_api_key_file(void **state)
{
    (void)state;
    char keys[512];
    write_temp(keys, sizeof keys,
               "# team keys\n\n  alpha-key  \r\nbeta-key\n\t# indented comment\ngamma");
    cfg_config c;
    char err[1024];
    setenv("SIEVE_API_KEYS", "env-key", 1);
    const char *args[] = {"--api-key-file", keys, NULL};
    if (parse(&c, err, sizeof err, args) != 0)
        fail_msg("%s", err);
    unsetenv("SIEVE_API_KEYS");
    assert_int_equal(c.n_api_keys, 4); /* the list's keys first, then the file's */
    assert_string_equal(c.api_keys[0], "env-key");
    assert_string_equal(c.api_keys[1], "alpha-key");
    assert_string_equal(c.api_keys[2], "beta-key");
    assert_string_equal(c.api_keys[3], "gamma");
    assert_string_equal(c.api_key_file, keys);
    unlink(keys);

    /* Missing, empty, and a bad line (named by file and line, without the key). */
    const char *missing[] = {"--api-key-file", "/nonexistent/keys", NULL};
    assert_int_equal(parse(&c, err, sizeof err, missing), -1);
    assert_contains(err, "'api_key_file'");
    assert_contains(err, "/nonexistent/keys");

    write_temp(keys, sizeof keys, "# nothing but comments\n\n");
    const char *empty[] = {"--api-key-file", keys, NULL};
    assert_int_equal(parse(&c, err, sizeof err, empty), -1);
    assert_contains(err, "holds no key");
    unlink(keys);

    write_temp(keys, sizeof keys, "good\nsecret with space\n");
    const char *bad[] = {"--api-key-file", keys, NULL};
    assert_int_equal(parse(&c, err, sizeof err, bad), -1);
    char where[600];
    snprintf(where, sizeof where, "%s:2", keys);
    assert_contains(err, where);
    assert_null(strstr(err, "secret"));
    unlink(keys);
}

/* ---- cfg_validate ---- */

static void test_config_validate_rejects_out_of_range_fields(void **state)
{
    (void)state;
    cfg_config c;
    char err[512] = "";
    cfg_defaults(&c);
    c.port = 70000;
    assert_int_equal(cfg_validate(&c, err, sizeof err), -1);
    assert_contains(err, "'port'");
    assert_contains(err, "70000");

    cfg_defaults(&c);
    c.max_body_bytes = ((int64_t)1 << 32) + 1;
    assert_int_equal(cfg_validate(&c, err, sizeof err), -1);
    assert_contains(err, "'max_body_bytes'");

    cfg_defaults(&c);
    c.max_running_seqs = 0;
    assert_int_equal(cfg_validate(&c, err, sizeof err), -1);
    assert_contains(err, "'max_running_seqs'");

    cfg_defaults(&c);
    c.model[0] = '\0';
    assert_int_equal(cfg_validate(&c, err, sizeof err), -1);
    assert_contains(err, "'model'");

    cfg_defaults(&c);
    c.host[0] = '\0';
    assert_int_equal(cfg_validate(&c, err, sizeof err), -1);
    assert_contains(err, "'host'");
}

/* device, devices and tensor_parallel_size: their defaults, every spelling of
 * the device list (array, comma string, empty, "auto") and the errors. */
static void test_config_device_keys(void **state)
{
    (void)state;
    cfg_config c;
    char err[512] = "";
    int ids[CFG_DEVICES_MAX];
    cfg_defaults(&c);
    assert_string_equal(c.device, "auto");
    assert_string_equal(c.devices, "auto");
    assert_int_equal(c.tensor_parallel_size, 1);
    assert_int_equal(cfg_devices(&c, ids, CFG_DEVICES_MAX), -1);
    assert_int_equal(cfg_validate(&c, err, sizeof err), 0);

    assert_int_equal(load(&c,
                          "{\"device\": \"cuda\", \"devices\": [2, 0], "
                          "\"tensor_parallel_size\": 2}",
                          err, sizeof err),
                     0);
    assert_string_equal(c.device, "cuda");
    assert_string_equal(c.devices, "2,0");
    assert_int_equal(c.tensor_parallel_size, 2);
    assert_int_equal(cfg_devices(&c, ids, CFG_DEVICES_MAX), 2);
    assert_int_equal(ids[0], 2);
    assert_int_equal(ids[1], 0);
    assert_int_equal(load(&c, "{\"devices\": []}", err, sizeof err), 0);
    assert_int_equal(cfg_devices(&c, ids, CFG_DEVICES_MAX), 0); /* none: the CPU */
    assert_int_equal(load(&c, "{\"devices\": \" 1 , 3\"}", err, sizeof err), 0);
    assert_int_equal(cfg_devices(&c, ids, CFG_DEVICES_MAX), 2);
    assert_int_equal(ids[1], 3);
    assert_int_equal(load(&c, "{\"devices\": \"auto\"}", err, sizeof err), 0);
    assert_int_equal(cfg_devices(&c, ids, CFG_DEVICES_MAX), -1);

    assert_int_equal(load(&c, "{\"devices\": [0, 64]}", err, sizeof err), -1);
    assert_contains(err, "'devices'[1]");
    assert_int_equal(load(&c, "{\"devices\": [\"0\"]}", err, sizeof err), -1);
    assert_contains(err, "'devices'[0]");
    assert_int_equal(load(&c, "{\"devices\": 0}", err, sizeof err), -1);
    assert_contains(err, "array of device indices or a string");
    assert_int_equal(load(&c, "{\"devices\": \"0,,1\"}", err, sizeof err), -1);
    assert_contains(err, "'devices'");
    assert_int_equal(load(&c, "{\"devices\": \"1,1\"}", err, sizeof err), -1);
    assert_contains(err, "listed twice");
    assert_int_equal(load(&c, "{\"tensor_parallel_size\": 0}", err, sizeof err), -1);
    assert_contains(err, "'tensor_parallel_size'");

    const char *flags[] = {"--device", "cpu", "--devices=3", "--tensor-parallel-size", "4", NULL};
    if (parse(&c, err, sizeof err, flags) != 0)
        fail_msg("%s", err);
    assert_string_equal(c.device, "cpu");
    assert_int_equal(cfg_devices(&c, ids, CFG_DEVICES_MAX), 1);
    assert_int_equal(ids[0], 3);
    assert_int_equal(c.tensor_parallel_size, 4);
    const char *bad[] = {"--device", "gpu", NULL};
    assert_int_equal(parse(&c, err, sizeof err, bad), -1);
    assert_contains(err, "'device'");
    assert_contains(err, "auto, cpu, cuda");

    setenv("SIEVE_DEVICES", "5", 1);
    cfg_defaults(&c);
    assert_int_equal(cfg_load_env(&c, NULL, err, sizeof err), 0);
    unsetenv("SIEVE_DEVICES");
    assert_int_equal(cfg_devices(&c, ids, CFG_DEVICES_MAX), 1);
    assert_int_equal(ids[0], 5);
}

int main(void)
{
    clear_sieve_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_defaults),
        cmocka_unit_test(test_config_load_json_sets_every_kind_of_key),
        cmocka_unit_test(test_config_unknown_key_suggests_nearest),
        cmocka_unit_test(test_config_wrong_type_names_the_key),
        cmocka_unit_test(test_config_out_of_range_names_key_and_range),
        cmocka_unit_test(test_config_invalid_json_reports_line_and_column),
        cmocka_unit_test(test_config_non_object_top_level_refused),
        cmocka_unit_test(test_config_underscore_keys_are_ignored),
        cmocka_unit_test(test_config_shipped_file_equals_defaults),
        cmocka_unit_test(test_config_load_file_missing_names_the_path),
        cmocka_unit_test(test_config_load_file_error_names_the_file),
        cmocka_unit_test(test_config_flags_override_config_file_in_any_order),
        cmocka_unit_test(test_config_flag_value_forms),
        cmocka_unit_test(test_config_unknown_flag_is_an_error),
        cmocka_unit_test(test_config_missing_flag_value_is_an_error),
        cmocka_unit_test(test_config_non_integer_flag_value_is_an_error),
        cmocka_unit_test(test_config_help_returns_one),
        cmocka_unit_test(test_config_parse_args_validates_the_result),
        cmocka_unit_test(test_config_precedence_file_then_env_then_flags),
        cmocka_unit_test(test_config_env_sets_every_kind_of_key),
        cmocka_unit_test(test_config_bad_env_value_names_the_variable),
        cmocka_unit_test(test_config_unknown_env_is_warned_with_suggestion),
        cmocka_unit_test(test_config_sieve_config_names_the_file),
        cmocka_unit_test(test_config_unknown_flag_suggests_nearest),
        cmocka_unit_test(test_config_check_config_prints_effective_values),
        cmocka_unit_test(test_config_check_config_reports_errors),
        cmocka_unit_test(test_config_schema_and_help_list_every_key),
        cmocka_unit_test(test_config_api_keys_from_json),
        cmocka_unit_test(test_config_api_key_file),
        cmocka_unit_test(test_config_validate_rejects_out_of_range_fields),
        cmocka_unit_test(test_config_device_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
