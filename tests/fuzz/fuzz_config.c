/*
 * fuzz_config.c - libFuzzer target for the configuration file loader
 * (config/config.c: cfg_load_json over the defaults, then cfg_validate and
 * cfg_to_json).
 *
 * Input: the text of a configuration file (any bytes, not NUL-terminated).
 *
 * Checked on every input: a refusal has a message and leaves every string of
 * the configuration NUL-terminated inside its field; an acceptance too, and
 * its effective values (cfg_to_json) are a JSON object that, loaded over the
 * defaults again, gives the same effective values (unless API keys are set,
 * which cfg_to_json redacts); cfg_validate answers either way with a message
 * when it refuses.
 */
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "config/config.h"
#include "tests/fuzz/fuzz_common.h"

static void check_strings(const cfg_config *c)
{
    FUZZ_CHECK(memchr(c->model, 0, sizeof(c->model)), "model not terminated");
    FUZZ_CHECK(memchr(c->model_name, 0, sizeof(c->model_name)), "model_name not terminated");
    FUZZ_CHECK(memchr(c->host, 0, sizeof(c->host)), "host not terminated");
    FUZZ_CHECK(memchr(c->chat_template, 0, sizeof(c->chat_template)), "chat_template");
    FUZZ_CHECK(memchr(c->api_key_file, 0, sizeof(c->api_key_file)), "api_key_file");
    FUZZ_CHECK(c->n_api_keys >= 0 && c->n_api_keys <= CFG_API_KEYS_MAX, "n_api_keys %d",
               c->n_api_keys);
    for (int i = 0; i < c->n_api_keys; i++)
        FUZZ_CHECK(memchr(c->api_keys[i], 0, CFG_API_KEY_LEN), "api_keys[%d]", i);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static cfg_config c, again;
    char err[1024] = "";
    cfg_defaults(&c);
    if (cfg_load_json(&c, (const char *)data, size, err, sizeof(err)) != 0) {
        FUZZ_CHECK(err[0] != 0, "refused without a message");
        FUZZ_CHECK(memchr(err, 0, sizeof(err)), "message not terminated");
        check_strings(&c);
        return 0;
    }
    check_strings(&c);
    char verr[1024] = "";
    if (cfg_validate(&c, verr, sizeof(verr)) != 0)
        FUZZ_CHECK(verr[0] != 0, "cfg_validate refused without a message");

    char *text = cfg_to_json(&c);
    FUZZ_CHECK(text != NULL, "cfg_to_json returned NULL");
    json_error_t jerr;
    json_t *j = json_loads(text, 0, &jerr);
    FUZZ_CHECK(j && json_is_object(j), "cfg_to_json is not a JSON object: %s", jerr.text);
    json_decref(j);
    if (c.n_api_keys == 0) {
        cfg_defaults(&again);
        FUZZ_CHECK(cfg_load_json(&again, text, strlen(text), err, sizeof(err)) == 0,
                   "cfg_to_json does not load back: %s", err);
        char *text2 = cfg_to_json(&again);
        FUZZ_CHECK(text2 && strcmp(text, text2) == 0, "values change on reload:\n%s\n%s", text,
                   text2 ? text2 : "(null)");
        free(text2);
    }
    free(text);
    return 0;
}
