/*
 * test_hf_config.c - tests for runtime/hf_config.c: the config.json files of real model
 * families (values as published: Llama 3.1 8B, Qwen2.5 0.5B, Mistral 7B v0.1, SmolLM 135M)
 * parse to the right hyperparameters, Llama 3 rope scaling gives transformers' frequencies,
 * and every bad value is refused with a message naming the key.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/hf_config.h"

static const char llama31_8b[] =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":false,"
    "\"attention_dropout\":0.0,\"bos_token_id\":128000,\"eos_token_id\":[128001,128008,128009],"
    "\"hidden_act\":\"silu\",\"hidden_size\":4096,\"initializer_range\":0.02,"
    "\"intermediate_size\":14336,\"max_position_embeddings\":131072,\"mlp_bias\":false,"
    "\"model_type\":\"llama\",\"num_attention_heads\":32,\"num_hidden_layers\":32,"
    "\"num_key_value_heads\":8,\"pretraining_tp\":1,\"rms_norm_eps\":1e-05,"
    "\"rope_scaling\":{\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
    "\"original_max_position_embeddings\":8192,\"rope_type\":\"llama3\"},"
    "\"rope_theta\":500000.0,\"tie_word_embeddings\":false,\"torch_dtype\":\"bfloat16\","
    "\"transformers_version\":\"4.43.0.dev0\",\"use_cache\":true,\"vocab_size\":128256}";

static const char qwen25_05b[] =
    "{\"architectures\":[\"Qwen2ForCausalLM\"],\"attention_dropout\":0.0,"
    "\"bos_token_id\":151643,\"eos_token_id\":151643,\"hidden_act\":\"silu\","
    "\"hidden_size\":896,\"initializer_range\":0.02,\"intermediate_size\":4864,"
    "\"max_position_embeddings\":32768,\"max_window_layers\":24,\"model_type\":\"qwen2\","
    "\"num_attention_heads\":14,\"num_hidden_layers\":24,\"num_key_value_heads\":2,"
    "\"rms_norm_eps\":1e-06,\"rope_theta\":1000000.0,\"sliding_window\":32768,"
    "\"tie_word_embeddings\":true,\"torch_dtype\":\"bfloat16\","
    "\"transformers_version\":\"4.40.1\",\"use_cache\":true,\"use_sliding_window\":false,"
    "\"vocab_size\":151936}";

static const char mistral_7b[] =
    "{\"architectures\":[\"MistralForCausalLM\"],\"bos_token_id\":1,\"eos_token_id\":2,"
    "\"hidden_act\":\"silu\",\"hidden_size\":4096,\"initializer_range\":0.02,"
    "\"intermediate_size\":14336,\"max_position_embeddings\":32768,\"model_type\":\"mistral\","
    "\"num_attention_heads\":32,\"num_hidden_layers\":32,\"num_key_value_heads\":8,"
    "\"rms_norm_eps\":1e-05,\"rope_theta\":10000.0,\"sliding_window\":4096,"
    "\"tie_word_embeddings\":false,\"torch_dtype\":\"bfloat16\",\"use_cache\":true,"
    "\"vocab_size\":32000}";

static const char smollm_135m[] =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":false,"
    "\"bos_token_id\":0,\"eos_token_id\":0,\"hidden_act\":\"silu\",\"hidden_size\":576,"
    "\"intermediate_size\":1536,\"max_position_embeddings\":2048,\"model_type\":\"llama\","
    "\"num_attention_heads\":9,\"num_hidden_layers\":30,\"num_key_value_heads\":3,"
    "\"rms_norm_eps\":1e-05,\"rope_scaling\":null,\"rope_theta\":10000.0,"
    "\"tie_word_embeddings\":true,\"torch_dtype\":\"bfloat16\",\"vocab_size\":49152}";

static void parse_ok(rt_hf_config *c, const char *json)
{
    char err[256] = "";
    if (rt_hf_config_parse(c, json, strlen(json), err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }
}

static void test_llama31_config(void **state)
{
    (void)state;
    rt_hf_config c;
    parse_ok(&c, llama31_8b);
    assert_int_equal(c.arch, RT_HF_ARCH_LLAMA);
    assert_string_equal(c.model_type, "llama");
    assert_string_equal(c.architecture, "LlamaForCausalLM");
    assert_string_equal(rt_hf_arch_name(c.arch), "llama");
    assert_int_equal(c.hidden_size, 4096);
    assert_int_equal(c.num_hidden_layers, 32);
    assert_int_equal(c.num_attention_heads, 32);
    assert_int_equal(c.num_key_value_heads, 8);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.intermediate_size, 14336);
    assert_int_equal(c.max_position_embeddings, 131072);
    assert_int_equal(c.vocab_size, 128256);
    assert_true(c.rms_norm_eps == 1e-5);
    assert_true(c.rope_theta == 500000.0);
    assert_int_equal(c.rope_scaling.type, RT_HF_ROPE_LLAMA3);
    assert_true(c.rope_scaling.factor == 8.0);
    assert_true(c.rope_scaling.low_freq_factor == 1.0);
    assert_true(c.rope_scaling.high_freq_factor == 4.0);
    assert_int_equal(c.rope_scaling.original_max_position_embeddings, 8192);
    assert_false(c.tie_word_embeddings);
    assert_false(c.qkv_bias);
    assert_false(c.o_bias);
    assert_false(c.mlp_bias);
    assert_int_equal(c.sliding_window, 0);
    assert_int_equal(c.bos_token_id, 128000);
    assert_int_equal(c.n_eos, 3);
    assert_int_equal(c.eos_token_ids[0], 128001);
    assert_int_equal(c.eos_token_ids[2], 128009);
    assert_string_equal(c.torch_dtype, "bfloat16");
}

static void test_llama3_rope_frequencies_match_transformers(void **state)
{
    (void)state;
    rt_hf_config c;
    parse_ok(&c, llama31_8b);
    float f[64];
    rt_hf_rope_inv_freq(&c, f);
    /* from transformers' _compute_llama3_parameters (in double): high, medium and low bands */
    static const struct {
        int i;
        double v;
    } want[] = {
        {0, 1.0},
        {1, 0.8146172338565447},
        {28, 0.0032114459947525913},
        {29, 0.002166570763503359},
        {31, 0.0008567514129196321},
        {34, 0.00017850781276799638},
        {35, 9.556212353964683e-05},
        {63, 3.068925988914511e-07},
    };
    for (size_t k = 0; k < sizeof(want) / sizeof(want[0]); k++) {
        double got = f[want[k].i];
        if (fabs(got - want[k].v) > 1e-6 * want[k].v) {
            fail_msg("inv_freq[%d] = %.9g, want %.9g", want[k].i, got, want[k].v);
        }
    }

    /* linear scaling divides every frequency; none leaves base^(-2i/d) */
    c.rope_scaling.type = RT_HF_ROPE_LINEAR;
    c.rope_scaling.factor = 4.0;
    rt_hf_rope_inv_freq(&c, f);
    assert_true(fabs(f[1] - 0.8146172338565447 / 4.0) < 1e-7);
    c.rope_scaling.type = RT_HF_ROPE_NONE;
    rt_hf_rope_inv_freq(&c, f);
    assert_true(fabs(f[63] - pow(500000.0, -126.0 / 128.0)) < 1e-12);
}

static void test_qwen2_config(void **state)
{
    (void)state;
    rt_hf_config c;
    parse_ok(&c, qwen25_05b);
    assert_int_equal(c.arch, RT_HF_ARCH_QWEN2);
    assert_int_equal(c.head_dim, 64);
    assert_int_equal(c.num_key_value_heads, 2);
    assert_true(c.rope_theta == 1e6);
    assert_true(c.tie_word_embeddings);
    assert_true(c.qkv_bias);
    assert_false(c.o_bias);
    assert_int_equal(c.sliding_window, 0); /* use_sliding_window is false */
    assert_int_equal(c.rope_scaling.type, RT_HF_ROPE_NONE);
    assert_int_equal(c.bos_token_id, 151643);
    assert_int_equal(c.n_eos, 1);
    assert_int_equal(c.eos_token_ids[0], 151643);

    char buf[sizeof(qwen25_05b) + 16];
    snprintf(buf, sizeof(buf), "%s", qwen25_05b);
    char *p = strstr(buf, "\"use_sliding_window\":false");
    memcpy(p, "\"use_sliding_window\":true ", strlen("\"use_sliding_window\":false"));
    parse_ok(&c, buf);
    assert_int_equal(c.sliding_window, 32768);
}

static void test_mistral_and_smollm_configs(void **state)
{
    (void)state;
    rt_hf_config c;
    parse_ok(&c, mistral_7b);
    assert_int_equal(c.arch, RT_HF_ARCH_MISTRAL);
    assert_int_equal(c.sliding_window, 4096);
    assert_false(c.qkv_bias);
    assert_int_equal(c.bos_token_id, 1);
    assert_int_equal(c.eos_token_ids[0], 2);

    parse_ok(&c, smollm_135m);
    assert_int_equal(c.arch, RT_HF_ARCH_LLAMA);
    assert_int_equal(c.head_dim, 64);
    assert_true(c.tie_word_embeddings);
    assert_int_equal(c.rope_scaling.type, RT_HF_ROPE_NONE);

    /* the bare minimum takes transformers' defaults */
    parse_ok(&c, "{\"model_type\":\"llama\",\"hidden_size\":64,\"num_hidden_layers\":2,"
                 "\"num_attention_heads\":4,\"intermediate_size\":128,"
                 "\"max_position_embeddings\":256,\"vocab_size\":100}");
    assert_int_equal(c.num_key_value_heads, 4);
    assert_true(c.rope_theta == 10000.0);
    assert_true(c.rms_norm_eps == 1e-6);
    assert_false(c.tie_word_embeddings);
    assert_int_equal(c.bos_token_id, -1);
    assert_int_equal(c.n_eos, 0);
    assert_string_equal(c.torch_dtype, "");
    assert_string_equal(c.architecture, "");

    /* an explicit head_dim wins over hidden_size / heads (Mistral Nemo style) */
    parse_ok(&c, "{\"architectures\":[\"MistralForCausalLM\"],\"hidden_size\":5120,"
                 "\"head_dim\":128,\"num_hidden_layers\":2,\"num_attention_heads\":32,"
                 "\"num_key_value_heads\":8,\"intermediate_size\":128,"
                 "\"max_position_embeddings\":256,\"vocab_size\":100,\"sliding_window\":null}");
    assert_int_equal(c.arch, RT_HF_ARCH_MISTRAL);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.sliding_window, 0);
}

/* Replaces the first occurrence of from in base by to and expects a refusal naming needles. */
static void expect_refused(const char *base, const char *from, const char *to, ...)
{
    char buf[4096];
    const char *p = from ? strstr(base, from) : NULL;
    if (from && !p) {
        fail_msg("'%s' is not in the base config", from);
    }
    if (p) {
        snprintf(buf, sizeof(buf), "%.*s%s%s", (int)(p - base), base, to, p + strlen(from));
    } else {
        snprintf(buf, sizeof(buf), "%s", base);
    }
    rt_hf_config c;
    char err[512] = "";
    if (rt_hf_config_parse(&c, buf, strlen(buf), err, sizeof(err)) == 0) {
        fail_msg("accepted %s", buf);
    }
    assert_int_equal(c.hidden_size, 0); /* nothing half-filled is left behind */
    va_list ap;
    va_start(ap, to);
    for (const char *s = va_arg(ap, const char *); s; s = va_arg(ap, const char *)) {
        if (!strstr(err, s)) {
            va_end(ap);
            fail_msg("message \"%s\" lacks \"%s\"", err, s);
        }
    }
    va_end(ap);
}

static void test_bad_configs_are_refused_naming_the_key(void **state)
{
    (void)state;
    const char *L = llama31_8b;
    expect_refused(L, "\"model_type\":\"llama\"", "\"model_type\":\"gemma2\"", "gemma2",
                   "LlamaForCausalLM", "unsupported architecture", NULL);
    expect_refused(L, "[\"LlamaForCausalLM\"]", "[\"LlamaForSequenceClassification\"]",
                   "LlamaForSequenceClassification", NULL);
    expect_refused("{\"architectures\":[\"Phi3ForCausalLM\"],\"model_type\":\"phi3\"}", NULL, NULL,
                   "Phi3ForCausalLM", "phi3", NULL);
    expect_refused("{\"hidden_size\":4}", NULL, NULL, "neither 'model_type' nor", NULL);
    expect_refused(L, "\"hidden_size\":4096,", "", "'hidden_size' is missing", NULL);
    expect_refused(L, "\"hidden_size\":4096", "\"hidden_size\":\"4096\"", "'hidden_size'",
                   "integer", NULL);
    expect_refused(L, "\"hidden_size\":4096", "\"hidden_size\":4096.5", "'hidden_size'", NULL);
    expect_refused(L, "\"num_hidden_layers\":32", "\"num_hidden_layers\":0",
                   "'num_hidden_layers' = 0 is out of range", NULL);
    expect_refused(L, "\"vocab_size\":128256", "\"vocab_size\":99999999999", "'vocab_size'", NULL);
    expect_refused(L, "\"num_key_value_heads\":8", "\"num_key_value_heads\":5",
                   "'num_attention_heads' 32 is not a multiple of 'num_key_value_heads' 5", NULL);
    expect_refused(L, "\"hidden_size\":4096", "\"hidden_size\":4090",
                   "'hidden_size' 4090 is not a multiple of 'num_attention_heads' 32", NULL);
    expect_refused(L, "\"hidden_size\":4096", "\"head_dim\":63,\"hidden_size\":4096",
                   "head size 63 is odd", NULL);
    expect_refused(L, "\"rms_norm_eps\":1e-05", "\"rms_norm_eps\":-1", "'rms_norm_eps'", NULL);
    expect_refused(L, "\"rope_theta\":500000.0", "\"rope_theta\":0", "'rope_theta'", NULL);
    expect_refused(L, "\"rope_type\":\"llama3\"", "\"rope_type\":\"yarn\"", "yarn", "rope_scaling",
                   NULL);
    expect_refused(L, "\"low_freq_factor\":1.0,", "", "'rope_scaling.low_freq_factor'", NULL);
    expect_refused(L, "\"high_freq_factor\":4.0", "\"high_freq_factor\":0.5",
                   "'rope_scaling.high_freq_factor'", NULL);
    expect_refused(L, "\"hidden_act\":\"silu\"", "\"hidden_act\":\"gelu\"", "'hidden_act'", "gelu",
                   NULL);
    expect_refused(L, "\"use_cache\":true", "\"quantization_config\":{\"quant_method\":\"gptq\"}",
                   "'quantization_config'", "gptq", NULL);
    expect_refused(L, "[128001,128008,128009]", "[128001,128256]", "'eos_token_id'", "128256",
                   NULL);
    expect_refused(L, "\"bos_token_id\":128000", "\"bos_token_id\":-3", "'bos_token_id'", NULL);
    expect_refused(L, "\"torch_dtype\":\"bfloat16\"", "\"torch_dtype\":\"float8_e4m3fn\"",
                   "'torch_dtype'", "float8_e4m3fn", NULL);
    expect_refused(L, "\"tie_word_embeddings\":false", "\"tie_word_embeddings\":\"no\"",
                   "'tie_word_embeddings'", NULL);
    expect_refused(L, "\"architectures\":[\"LlamaForCausalLM\"]", "\"architectures\":[]",
                   "'architectures'", NULL);
    expect_refused(L, "\"model_type\":\"llama\"", "\"model_type\":\"llama\",\"model_type\":\"x\"",
                   "invalid JSON", NULL);
    expect_refused("{\"hidden_size\":", NULL, NULL, "invalid JSON", NULL);
    expect_refused("[1]", NULL, NULL, "not an object", NULL);
}

static void test_load_reads_a_file_or_a_directory(void **state)
{
    (void)state;
    char dir[] = "/tmp/sieve_cfg_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(qwen25_05b, f);
    fclose(f);
    rt_hf_config c;
    char err[256] = "";
    if (rt_hf_config_load(&c, dir, err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }
    assert_int_equal(c.arch, RT_HF_ARCH_QWEN2);
    memset(&c, 0, sizeof(c));
    assert_int_equal(rt_hf_config_load(&c, path, err, sizeof(err)), 0);
    assert_int_equal(c.hidden_size, 896);
    unlink(path);
    assert_int_equal(rt_hf_config_load(&c, dir, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "cannot open"));
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama31_config),
        cmocka_unit_test(test_llama3_rope_frequencies_match_transformers),
        cmocka_unit_test(test_qwen2_config),
        cmocka_unit_test(test_mistral_and_smollm_configs),
        cmocka_unit_test(test_bad_configs_are_refused_naming_the_key),
        cmocka_unit_test(test_load_reads_a_file_or_a_directory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
