/*
 * test_config.c - unit tests for config/config.c: defaults, JSON loading (every
 * kind of key, and each kind of error naming the key), the shipped
 * config/sieve.json, command-line flags and their precedence over --config, and
 * validation. Error checks assert on substrings of the message, so a message
 * that stops naming the key or the problem fails.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

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
    assert_string_equal(c.model, "/m/x.gguf");         /* string */
    assert_string_equal(c.model_name, "tiny");
    assert_string_equal(c.host, "0.0.0.0");
    assert_int_equal(c.port, 9001);                      /* int */
    assert_int_equal(c.threads, 3);
    assert_true(c.max_body_bytes == (int64_t)1 << 32);   /* int64 above 2^31 */
    assert_int_equal(c.context_length, 2048);
    assert_int_equal(c.max_running_seqs, 4);
    assert_int_equal(c.max_batch_tokens, 64);
    assert_int_equal(c.drain_timeout_s, 5);
    assert_int_equal(c.max_waiting, 7);
    assert_int_equal(c.default_max_tokens, 32);
    assert_int_equal(c.connection_timeout_s, 60);
    assert_int_equal(c.max_connections, 10);
    assert_true(c.log_requests);                         /* bool */

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
    assert_int_equal(load(&c, "{\"_comment\": 5, \"_port\": \"x\", \"_\": [1], \"port\": 81}", err,
                          sizeof err),
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

    const char *many[] = {"--model", "/x/y.gguf", "--model-name=m", "--threads", "2",
                          "--max-body-bytes=4000000000", "--log-requests", "true",
                          "--max-running-seqs", "3", NULL};
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
    const char *help[] = {"--port", "9000", "--help", NULL};
    assert_int_equal(parse(&c, err, sizeof err, help), 1);
    const char *h[] = {"-h", NULL};
    assert_int_equal(parse(&c, err, sizeof err, h), 1);
    const char *version[] = {"--version", NULL};
    assert_int_equal(parse(&c, err, sizeof err, version), 1);
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

int main(void)
{
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
        cmocka_unit_test(test_config_validate_rejects_out_of_range_fields),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
