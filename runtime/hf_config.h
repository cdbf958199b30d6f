/*
 * hf_config.h - the hyperparameters of a Hugging Face model directory's config.json.
 *
 * Supported architectures (by model_type, cross-checked with architectures[0]):
 *  - llama   (LlamaForCausalLM): optional attention_bias / mlp_bias, Llama 3 rope scaling;
 *  - mistral (MistralForCausalLM): optional sliding_window;
 *  - qwen2   (Qwen2ForCausalLM): biases on q/k/v (not o), optional sliding window.
 * Anything else is refused with a message naming the architecture; so are quantized
 * checkpoints (quantization_config), activations other than SiLU and rope scaling types
 * other than "linear" and "llama3". Every value is type- and range-checked; messages name the
 * key. Defaults are transformers' for the architecture.
 */
#ifndef SIEVE_RUNTIME_HF_CONFIG_H
#define SIEVE_RUNTIME_HF_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { RT_HF_ARCH_LLAMA, RT_HF_ARCH_MISTRAL, RT_HF_ARCH_QWEN2 } rt_hf_arch;

typedef enum {
    RT_HF_ROPE_NONE,   /* no rope_scaling, or type "default" */
    RT_HF_ROPE_LINEAR, /* positions divided by factor */
    RT_HF_ROPE_LLAMA3, /* Llama 3.1's per-frequency scaling */
} rt_hf_rope_type;

enum { RT_HF_MAX_EOS = 8 };

typedef struct {
    rt_hf_arch arch;
    char model_type[32];   /* "llama", "mistral", "qwen2" */
    char architecture[64]; /* architectures[0], or "" when absent */
    int hidden_size;
    int num_hidden_layers;
    int num_attention_heads;
    int num_key_value_heads; /* num_attention_heads when absent */
    int head_dim;            /* "head_dim", or hidden_size / num_attention_heads */
    int intermediate_size;
    int max_position_embeddings;
    int vocab_size; /* rows of the embedding; may exceed the tokenizer's vocabulary */
    double rms_norm_eps;
    double rope_theta;
    struct {
        rt_hf_rope_type type;
        double factor;
        double low_freq_factor, high_freq_factor; /* llama3 */
        int original_max_position_embeddings;     /* llama3 */
    } rope_scaling;
    bool tie_word_embeddings; /* lm_head shares embed_tokens (no lm_head.weight) */
    bool qkv_bias;            /* q_proj, k_proj, v_proj have .bias tensors */
    bool o_bias;              /* o_proj has a .bias tensor */
    bool mlp_bias;            /* gate/up/down_proj have .bias tensors */
    int sliding_window;       /* attention window in tokens; 0 = full attention */
    int32_t bos_token_id;     /* -1 when null or absent */
    int32_t eos_token_ids[RT_HF_MAX_EOS];
    int n_eos;            /* eos_token_id may be one id or a list */
    char torch_dtype[16]; /* "float32", "float16", "bfloat16", or "" when absent */
} rt_hf_config;

/* Parses len bytes of config.json. Returns 0, or -1 with a message naming the key. */
int rt_hf_config_parse(rt_hf_config *cfg, const char *json, size_t len, char *err, size_t errlen);

/* Reads config.json from path, which is the file or the directory holding it. */
int rt_hf_config_load(rt_hf_config *cfg, const char *path, char *err, size_t errlen);

/* The rotary inverse frequencies of the head_dim / 2 pairs, with rope_scaling applied:
 * inv_freq[i] = rope_theta^(-2i / head_dim), divided by factor for "linear", and adjusted per
 * wavelength for "llama3" exactly as transformers' _compute_llama3_parameters does. */
void rt_hf_rope_inv_freq(const rt_hf_config *cfg, float *inv_freq);

const char *rt_hf_arch_name(rt_hf_arch arch);

#endif
