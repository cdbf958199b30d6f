/*
 * fuzz_hf_config.c - libFuzzer target for the parser of a Hugging Face model
 * directory's config.json (runtime/hf_config.c: rt_hf_config_parse,
 * rt_hf_rope_inv_freq).
 *
 * Input: the text of a config.json (any bytes, not NUL-terminated).
 *
 * Checked on every input: a refusal has a message; an acceptance has a known
 * architecture, positive sizes, attention heads that group the key/value
 * heads evenly, NUL-terminated strings, at most RT_HF_MAX_EOS end ids, and
 * rotary inverse frequencies that are finite and positive for every pair.
 */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runtime/hf_config.h"
#include "tests/fuzz/fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    rt_hf_config c;
    char err[512] = "";
    if (rt_hf_config_parse(&c, (const char *)data, size, err, sizeof(err)) != 0) {
        FUZZ_CHECK(err[0] != 0 && memchr(err, 0, sizeof(err)), "refused without a message");
        return 0;
    }
    FUZZ_CHECK(c.arch == RT_HF_ARCH_LLAMA || c.arch == RT_HF_ARCH_MISTRAL ||
                   c.arch == RT_HF_ARCH_QWEN2,
               "arch %d", c.arch);
    FUZZ_CHECK(strcmp(rt_hf_arch_name(c.arch), "") != 0, "arch name");
    FUZZ_CHECK(memchr(c.model_type, 0, sizeof(c.model_type)) &&
                   memchr(c.architecture, 0, sizeof(c.architecture)) &&
                   memchr(c.torch_dtype, 0, sizeof(c.torch_dtype)),
               "a string is not terminated");
    FUZZ_CHECK(c.hidden_size > 0 && c.num_hidden_layers > 0 && c.num_attention_heads > 0 &&
                   c.num_key_value_heads > 0 && c.head_dim > 0 && c.intermediate_size > 0 &&
                   c.max_position_embeddings > 0 && c.vocab_size > 0,
               "a size is not positive");
    FUZZ_CHECK(c.num_attention_heads % c.num_key_value_heads == 0, "%d heads, %d kv heads",
               c.num_attention_heads, c.num_key_value_heads);
    FUZZ_CHECK(c.n_eos >= 0 && c.n_eos <= RT_HF_MAX_EOS, "n_eos %d", c.n_eos);
    FUZZ_CHECK(c.sliding_window >= 0, "sliding_window %d", c.sliding_window);
    FUZZ_CHECK(c.rms_norm_eps > 0 && isfinite(c.rms_norm_eps), "rms_norm_eps %g", c.rms_norm_eps);
    FUZZ_CHECK(c.rope_theta > 0 && isfinite(c.rope_theta), "rope_theta %g", c.rope_theta);
    if (c.head_dim % 2 == 0 && c.head_dim <= 1 << 16) {
        float *inv = malloc(sizeof(float) * (size_t)(c.head_dim / 2));
        FUZZ_CHECK(inv != NULL, "malloc");
        rt_hf_rope_inv_freq(&c, inv);
        for (int i = 0; i < c.head_dim / 2; i++)
            FUZZ_CHECK(isfinite(inv[i]) && inv[i] >= 0.0f, "inv_freq[%d] = %g", i, inv[i]);
        free(inv);
    }
    return 0;
}
