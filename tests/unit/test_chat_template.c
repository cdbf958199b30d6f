/*
 * test_chat_template.c - unit tests for runtime/chat_template.c: the exact
 * text of every family for a fixed conversation, recognition of each family
 * from real template sources, configuration names, and refusal of malformed
 * conversations.
 *
 * Every expected string is what the cited model's own chat template renders
 * through Hugging Face apply_chat_template (Python Jinja2, trim_blocks and
 * lstrip_blocks) for the same messages and BOS/EOS strings. The conversation
 * gives the assistant turn surrounding spaces so that the families that strip
 * content (llama2, llama3, gemma) are told apart from those that do not.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/chat_template.h"

/* ---- helpers ---- */

static rt_chat_msg msg(const char *role, const char *content)
{
    return (rt_chat_msg){role, strlen(role), content, strlen(content)};
}

/* system + user + assistant + user, the conversation every family renders. */
static size_t conversation(rt_chat_msg *m)
{
    m[0] = msg("system", "You are a helpful assistant");
    m[1] = msg("user", "Hello");
    m[2] = msg("assistant", "  Hi there  ");
    m[3] = msg("user", "Who are you");
    return 4;
}

static void expect_bytes(rt_chat_family f, const rt_chat_msg *m, size_t n, bool gen,
                         const char *bos, const char *eos, const char *want, size_t want_len)
{
    char *out = NULL;
    size_t len = 0;
    char err[256] = "";
    const int rc = rt_chat_render(f, m, n, gen, bos, eos, &out, &len, err, sizeof err);
    if (rc != 0)
        print_message("render failed: %s\n", err);
    assert_int_equal(rc, 0);
    assert_non_null(out);
    if (len != want_len || memcmp(out, want, len) != 0)
        print_message("expected:\n[%s]\ngot:\n[%s]\n", want, out);
    assert_int_equal(len, want_len);
    assert_memory_equal(out, want, want_len);
    assert_int_equal(out[len], '\0');
    free(out);
}

static void expect_text(rt_chat_family f, const rt_chat_msg *m, size_t n, bool gen, const char *bos,
                        const char *eos, const char *want)
{
    expect_bytes(f, m, n, gen, bos, eos, want, strlen(want));
}

/* Renders the standard conversation (or its last user message alone). */
static void expect_conversation(rt_chat_family f, bool gen, const char *bos, const char *eos,
                                const char *want)
{
    rt_chat_msg m[4];
    const size_t n = conversation(m);
    expect_text(f, m, n, gen, bos, eos, want);
}

static void expect_single_user(rt_chat_family f, const char *bos, const char *eos, const char *want)
{
    const rt_chat_msg m[1] = {msg("user", "Hello")};
    expect_text(f, m, 1, true, bos, eos, want);
}

static void expect_refusal(rt_chat_family f, const rt_chat_msg *m, size_t n, const char *needle)
{
    char *out = (char *)"sentinel";
    size_t len = 123;
    char err[256] = "";
    assert_int_equal(rt_chat_render(f, m, n, true, "<s>", "</s>", &out, &len, err, sizeof err), -1);
    assert_null(out);
    assert_int_equal(len, 0);
    if (!strstr(err, needle))
        print_message("error [%s] does not contain [%s]\n", err, needle);
    assert_non_null(strstr(err, needle));
}

/* ---- plain (ours: stories260K has no template) ---- */

static void test_plain_renders_conversation_with_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_PLAIN, true, "<s>", "</s>",
                        "system: You are a helpful assistant\n"
                        "user: Hello\n"
                        "assistant:   Hi there  \n"
                        "user: Who are you\n"
                        "assistant:");
}

static void test_plain_renders_conversation_without_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_PLAIN, false, "<s>", "</s>",
                        "system: You are a helpful assistant\n"
                        "user: Hello\n"
                        "assistant:   Hi there  \n"
                        "user: Who are you\n");
}

static void test_plain_renders_single_user_message(void **state)
{
    (void)state;
    expect_single_user(RT_CHAT_PLAIN, "<s>", "</s>", "user: Hello\nassistant:");
}

/* ---- chatml: teknium/OpenHermes-2.5-Mistral-7B ---- */

static void test_chatml_renders_conversation_with_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_CHATML, true, "<s>", "</s>",
                        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                        "<|im_start|>user\nHello<|im_end|>\n"
                        "<|im_start|>assistant\n  Hi there  <|im_end|>\n"
                        "<|im_start|>user\nWho are you<|im_end|>\n"
                        "<|im_start|>assistant\n");
}

static void test_chatml_renders_conversation_without_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_CHATML, false, "<s>", "</s>",
                        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                        "<|im_start|>user\nHello<|im_end|>\n"
                        "<|im_start|>assistant\n  Hi there  <|im_end|>\n"
                        "<|im_start|>user\nWho are you<|im_end|>\n");
}

static void test_chatml_renders_single_user_message(void **state)
{
    (void)state;
    expect_single_user(RT_CHAT_CHATML, "<s>", "</s>",
                       "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
}

/* ---- llama2: meta-llama/Llama-2-7b-chat-hf ---- */

static void test_llama2_renders_conversation_with_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_LLAMA2, true, "<s>", "</s>",
                        "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\n"
                        "Hello [/INST] Hi there </s>"
                        "<s>[INST] Who are you [/INST]");
}

static void test_llama2_generation_prompt_adds_nothing(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_LLAMA2, false, "<s>", "</s>",
                        "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\n"
                        "Hello [/INST] Hi there </s>"
                        "<s>[INST] Who are you [/INST]");
}

static void test_llama2_renders_single_user_message(void **state)
{
    (void)state;
    expect_single_user(RT_CHAT_LLAMA2, "<s>", "</s>", "<s>[INST] Hello [/INST]");
}

/* content.strip() covers the system block and the first user message as one
 * string: user whitespace after the block survives at its start, and a
 * whitespace-only first user message lets the strip eat the block's "\n\n". */
static void test_llama2_strips_system_block_and_first_user_as_one_string(void **state)
{
    (void)state;
    const rt_chat_msg a[3] = {msg("system", "  S  "), msg("user", "  U  "),
                              msg("assistant", "\tA\n")};
    expect_text(RT_CHAT_LLAMA2, a, 3, true, "<s>", "</s>",
                "<s>[INST] <<SYS>>\n  S  \n<</SYS>>\n\n  U [/INST] A </s>");
    const rt_chat_msg b[2] = {msg("system", "S"), msg("user", " \n ")};
    expect_text(RT_CHAT_LLAMA2, b, 2, true, "<s>", "</s>",
                "<s>[INST] <<SYS>>\nS\n<</SYS>> [/INST]");
}

/* ---- llama3: meta-llama/Meta-Llama-3-8B-Instruct ---- */

static void test_llama3_renders_conversation_with_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_LLAMA3, true, "<|begin_of_text|>", "<|end_of_text|>",
                        "<|begin_of_text|>"
                        "<|start_header_id|>system<|end_header_id|>\n\n"
                        "You are a helpful assistant<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

static void test_llama3_renders_conversation_without_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_LLAMA3, false, "<|begin_of_text|>", "<|end_of_text|>",
                        "<|begin_of_text|>"
                        "<|start_header_id|>system<|end_header_id|>\n\n"
                        "You are a helpful assistant<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>");
}

static void test_llama3_renders_single_user_message(void **state)
{
    (void)state;
    expect_single_user(RT_CHAT_LLAMA3, "<|begin_of_text|>", "<|end_of_text|>",
                       "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                       "Hello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
}

/* `| trim` is Python's str.strip(): it removes U+3000, U+00A0, U+2028 and the
 * ASCII separators 0x1c..0x1f, but not U+200B (not whitespace to Python). */
static void test_llama3_trims_content_with_python_whitespace_rules(void **state)
{
    (void)state;
    const rt_chat_msg m[1] = {msg("user", "\xe3\x80\x80\xc2\xa0\x1f hi\xe2\x80\x8b"
                                          " \xe2\x80\xa8\t\n")};
    expect_text(RT_CHAT_LLAMA3, m, 1, false, "<|begin_of_text|>", "",
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                "hi\xe2\x80\x8b<|eot_id|>");
}

/* ---- mistral: mistralai/Mistral-7B-Instruct-v0.2 ("v1" template) ---- */

static void test_mistral_renders_conversation_with_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_MISTRAL, true, "<s>", "</s>",
                        "<s> [INST] You are a helpful assistant\n\nHello [/INST]"
                        "   Hi there  </s>"
                        " [INST] Who are you [/INST]");
}

static void test_mistral_generation_prompt_adds_nothing(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_MISTRAL, false, "<s>", "</s>",
                        "<s> [INST] You are a helpful assistant\n\nHello [/INST]"
                        "   Hi there  </s>"
                        " [INST] Who are you [/INST]");
}

static void test_mistral_renders_single_user_message(void **state)
{
    (void)state;
    expect_single_user(RT_CHAT_MISTRAL, "<s>", "</s>", "<s> [INST] Hello [/INST]");
}

/* ---- gemma: google/gemma-3-4b-it ---- */

static void test_gemma_renders_conversation_with_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_GEMMA, true, "<bos>", "<eos>",
                        "<bos><start_of_turn>user\nYou are a helpful assistant\n\n"
                        "Hello<end_of_turn>\n"
                        "<start_of_turn>model\nHi there<end_of_turn>\n"
                        "<start_of_turn>user\nWho are you<end_of_turn>\n"
                        "<start_of_turn>model\n");
}

static void test_gemma_renders_conversation_without_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_GEMMA, false, "<bos>", "<eos>",
                        "<bos><start_of_turn>user\nYou are a helpful assistant\n\n"
                        "Hello<end_of_turn>\n"
                        "<start_of_turn>model\nHi there<end_of_turn>\n"
                        "<start_of_turn>user\nWho are you<end_of_turn>\n");
}

static void test_gemma_renders_single_user_message(void **state)
{
    (void)state;
    expect_single_user(RT_CHAT_GEMMA, "<bos>", "<eos>",
                       "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n");
}

/* The system prefix is `content + '\n\n'`, untrimmed; the user text after it
 * is trimmed on its own. */
static void test_gemma_keeps_system_prefix_verbatim_and_trims_user(void **state)
{
    (void)state;
    const rt_chat_msg m[2] = {msg("system", " S "), msg("user", "  U  ")};
    expect_text(RT_CHAT_GEMMA, m, 2, false, "<bos>", "<eos>",
                "<bos><start_of_turn>user\n S \n\nU<end_of_turn>\n");
}

/* ---- phi3: microsoft/Phi-3-mini-4k-instruct ---- */

static void test_phi3_renders_conversation_with_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_PHI3, true, "<s>", "<|endoftext|>",
                        "<|system|>\nYou are a helpful assistant<|end|>\n"
                        "<|user|>\nHello<|end|>\n"
                        "<|assistant|>\n  Hi there  <|end|>\n"
                        "<|user|>\nWho are you<|end|>\n"
                        "<|assistant|>\n");
}

/* The template's `{% else %}{{ eos_token }}` ends a prompt without one. */
static void test_phi3_ends_with_eos_without_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_PHI3, false, "<s>", "<|endoftext|>",
                        "<|system|>\nYou are a helpful assistant<|end|>\n"
                        "<|user|>\nHello<|end|>\n"
                        "<|assistant|>\n  Hi there  <|end|>\n"
                        "<|user|>\nWho are you<|end|>\n"
                        "<|endoftext|>");
}

static void test_phi3_renders_single_user_message(void **state)
{
    (void)state;
    expect_single_user(RT_CHAT_PHI3, "<s>", "<|endoftext|>",
                       "<|user|>\nHello<|end|>\n<|assistant|>\n");
}

/* ---- zephyr: HuggingFaceH4/zephyr-7b-beta ---- */

static void test_zephyr_renders_conversation_with_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_ZEPHYR, true, "<s>", "</s>",
                        "<|system|>\nYou are a helpful assistant</s>\n"
                        "<|user|>\nHello</s>\n"
                        "<|assistant|>\n  Hi there  </s>\n"
                        "<|user|>\nWho are you</s>\n"
                        "<|assistant|>\n");
}

static void test_zephyr_renders_conversation_without_generation_prompt(void **state)
{
    (void)state;
    expect_conversation(RT_CHAT_ZEPHYR, false, "<s>", "</s>",
                        "<|system|>\nYou are a helpful assistant</s>\n"
                        "<|user|>\nHello</s>\n"
                        "<|assistant|>\n  Hi there  </s>\n"
                        "<|user|>\nWho are you</s>\n");
}

static void test_zephyr_renders_single_user_message(void **state)
{
    (void)state;
    expect_single_user(RT_CHAT_ZEPHYR, "<s>", "</s>", "<|user|>\nHello</s>\n<|assistant|>\n");
}

/* ---- BOS ---- */

static void test_includes_bos_exactly_for_families_whose_template_writes_it(void **state)
{
    (void)state;
    assert_false(rt_chat_template_includes_bos(RT_CHAT_PLAIN));
    assert_false(rt_chat_template_includes_bos(RT_CHAT_CHATML));
    assert_true(rt_chat_template_includes_bos(RT_CHAT_LLAMA2));
    assert_true(rt_chat_template_includes_bos(RT_CHAT_LLAMA3));
    assert_true(rt_chat_template_includes_bos(RT_CHAT_MISTRAL));
    assert_true(rt_chat_template_includes_bos(RT_CHAT_GEMMA));
    assert_false(rt_chat_template_includes_bos(RT_CHAT_PHI3));
    assert_false(rt_chat_template_includes_bos(RT_CHAT_ZEPHYR));
}

/* Whatever the conversation, a family that includes BOS starts with it. */
static void test_families_that_include_bos_start_with_it(void **state)
{
    (void)state;
    rt_chat_msg m[4];
    const size_t n = conversation(m);
    for (int f = 0; f < RT_CHAT_COUNT; f++) {
        char *out = NULL;
        size_t len = 0;
        char err[128];
        assert_int_equal(rt_chat_render((rt_chat_family)f, m, n, true, "<BOS>", "<EOS>", &out, &len,
                                        err, sizeof err),
                         0);
        assert_int_equal(len >= 5 && memcmp(out, "<BOS>", 5) == 0,
                         rt_chat_template_includes_bos((rt_chat_family)f));
        free(out);
    }
}

static void test_null_bos_and_eos_render_as_empty(void **state)
{
    (void)state;
    expect_single_user(RT_CHAT_LLAMA2, NULL, NULL, "[INST] Hello [/INST]");
    const rt_chat_msg m[2] = {msg("user", "U"), msg("assistant", "A")};
    expect_text(RT_CHAT_ZEPHYR, m, 2, false, NULL, NULL, "<|user|>\nU\n<|assistant|>\nA\n");
}

/* ---- detection from real template sources ---- */

static int detect(const char *jinja)
{
    return rt_chat_family_detect(jinja, strlen(jinja));
}

/* teknium/OpenHermes-2.5-Mistral-7B */
static const char TMPL_CHATML[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}";

/* HuggingFaceTB/SmolLM2-1.7B-Instruct (opening) */
static const char TMPL_SMOLLM2[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";

/* meta-llama/Llama-2-7b-chat-hf */
static const char TMPL_LLAMA2[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = "
    "messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
    "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
    "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + "
    "'[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/* meta-llama/Meta-Llama-3-8B-Instruct */
static const char TMPL_LLAMA3[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] "
    "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/* mistralai/Mistral-7B-Instruct-v0.2 ("v1", with a system prompt; raise_exception
 * branches left out) */
static const char TMPL_MISTRAL_V1[] =
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = "
    "messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n"
    "    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + "
    "' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + "
    "' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n    {%- endif %}\n{%- endfor %}\n";

/* mistralai/Mistral-7B-Instruct-v0.1 (original, no system message) */
static const char TMPL_MISTRAL_V01[] =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}";

/* google/gemma-7b-it */
static const char TMPL_GEMMA[] =
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
    "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
    "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\\n'}}{% endif %}";

/* microsoft/Phi-3-mini-4k-instruct */
static const char TMPL_PHI3[] =
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + "
    "message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + "
    "message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
    "{% endif %}";

/* HuggingFaceH4/zephyr-7b-beta */
static const char TMPL_ZEPHYR[] =
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
    "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == "
    "'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}";

static void test_detect_recognises_chatml_templates(void **state)
{
    (void)state;
    assert_int_equal(detect(TMPL_CHATML), RT_CHAT_CHATML);
    assert_int_equal(detect(TMPL_SMOLLM2), RT_CHAT_CHATML);
}

static void test_detect_recognises_llama2_template(void **state)
{
    (void)state;
    assert_int_equal(detect(TMPL_LLAMA2), RT_CHAT_LLAMA2);
}

static void test_detect_recognises_llama3_template(void **state)
{
    (void)state;
    assert_int_equal(detect(TMPL_LLAMA3), RT_CHAT_LLAMA3);
}

static void test_detect_recognises_mistral_templates(void **state)
{
    (void)state;
    assert_int_equal(detect(TMPL_MISTRAL_V1), RT_CHAT_MISTRAL);
    assert_int_equal(detect(TMPL_MISTRAL_V01), RT_CHAT_MISTRAL);
}

static void test_detect_recognises_gemma_template(void **state)
{
    (void)state;
    assert_int_equal(detect(TMPL_GEMMA), RT_CHAT_GEMMA);
}

static void test_detect_recognises_phi3_template(void **state)
{
    (void)state;
    assert_int_equal(detect(TMPL_PHI3), RT_CHAT_PHI3);
}

static void test_detect_recognises_zephyr_template(void **state)
{
    (void)state;
    assert_int_equal(detect(TMPL_ZEPHYR), RT_CHAT_ZEPHYR);
}

static void test_detect_returns_minus_one_for_unknown_templates(void **state)
{
    (void)state;
    /* eachadea/vicuna-13b-1.1 */
    assert_int_equal(detect("{%- for message in messages %}{%- if message['role'] == 'system' "
                            "-%}{{- '' + message['content'] + '\\n\\n' -}}{%- else -%}{%- if "
                            "message['role'] == 'user' -%}{{-'USER: ' + message['content'] + "
                            "'\\n'-}}{%- else -%}{{-'ASSISTANT: ' + message['content'] + "
                            "'</s>\\n' -}}{%- endif -%}{%- endif -%}{%- endfor -%}"),
                     -1);
    /* microsoft/phi-4 borrows <|im_start|> but is not ChatML */
    assert_int_equal(detect("{% for message in messages %}{% if (message['role'] == 'system') "
                            "%}{{'<|im_start|>system<|im_sep|>' + message['content'] + "
                            "'<|im_end|>'}}{% endif %}{% endfor %}"),
                     -1);
    assert_int_equal(detect("INVALID TEMPLATE"), -1);
    assert_int_equal(rt_chat_family_detect("", 0), -1);
    assert_int_equal(rt_chat_family_detect(NULL, 10), -1);
}

/* The source is length-delimited: a marker past len is not seen, and NUL
 * bytes inside the source do not end it. */
static void test_detect_reads_exactly_len_bytes(void **state)
{
    (void)state;
    static const char src[] = "{{ x }}\0<|im_start|>";
    assert_int_equal(rt_chat_family_detect(src, sizeof src - 1), RT_CHAT_CHATML);
    assert_int_equal(rt_chat_family_detect(src, 8), -1);
    assert_int_equal(rt_chat_family_detect(TMPL_LLAMA3, 30), -1);
}

/* ---- names ---- */

static void test_from_name_maps_every_name_and_back(void **state)
{
    (void)state;
    static const char *const names[RT_CHAT_COUNT] = {"plain",   "chatml", "llama2", "llama3",
                                                     "mistral", "gemma",  "phi3",   "zephyr"};
    for (int f = 0; f < RT_CHAT_COUNT; f++) {
        assert_int_equal(rt_chat_family_from_name(names[f]), f);
        assert_string_equal(rt_chat_family_name((rt_chat_family)f), names[f]);
    }
}

static void test_from_name_rejects_unknown_names(void **state)
{
    (void)state;
    assert_int_equal(rt_chat_family_from_name("llama"), -1);
    assert_int_equal(rt_chat_family_from_name("ChatML"), -1);
    assert_int_equal(rt_chat_family_from_name("chatml "), -1);
    assert_int_equal(rt_chat_family_from_name(""), -1);
    assert_int_equal(rt_chat_family_from_name(NULL), -1);
    assert_string_equal(rt_chat_family_name(RT_CHAT_COUNT), "unknown");
    assert_string_equal(rt_chat_family_name((rt_chat_family)-1), "unknown");
}

/* ---- roles ---- */

static void test_developer_renders_as_system(void **state)
{
    (void)state;
    const rt_chat_msg m[2] = {msg("developer", "D"), msg("user", "U")};
    expect_text(RT_CHAT_CHATML, m, 2, false, "", "",
                "<|im_start|>system\nD<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
    expect_text(RT_CHAT_MISTRAL, m, 2, false, "<s>", "</s>", "<s> [INST] D\n\nU [/INST]");
}

static void test_tool_renders_where_the_template_prints_roles(void **state)
{
    (void)state;
    const rt_chat_msg m[1] = {msg("tool", "42")};
    expect_text(RT_CHAT_CHATML, m, 1, false, "", "", "<|im_start|>tool\n42<|im_end|>\n");
    expect_text(RT_CHAT_LLAMA3, m, 1, false, "<|begin_of_text|>", "",
                "<|begin_of_text|><|start_header_id|>tool<|end_header_id|>\n\n42<|eot_id|>");
    expect_text(RT_CHAT_PLAIN, m, 1, false, "", "", "tool: 42\n");
}

static void test_tool_is_refused_naming_the_role(void **state)
{
    (void)state;
    const rt_chat_msg m[2] = {msg("user", "U"), msg("tool", "42")};
    const rt_chat_family refusing[] = {RT_CHAT_LLAMA2, RT_CHAT_MISTRAL, RT_CHAT_GEMMA, RT_CHAT_PHI3,
                                       RT_CHAT_ZEPHYR};
    for (size_t i = 0; i < sizeof refusing / sizeof refusing[0]; i++)
        expect_refusal(refusing[i], m, 2, "messages[1]: role 'tool' is not supported");
}

static void test_unknown_role_is_refused_naming_it(void **state)
{
    (void)state;
    const rt_chat_msg m[2] = {msg("user", "U"), msg("bot", "B")};
    for (int f = 0; f < RT_CHAT_COUNT; f++)
        expect_refusal((rt_chat_family)f, m, 2, "messages[1]: unknown role 'bot'");
    /* Role matching is exact: case and trailing bytes count. */
    const rt_chat_msg upper[1] = {msg("User", "U")};
    expect_refusal(RT_CHAT_CHATML, upper, 1, "messages[0]: unknown role 'User'");
    const rt_chat_msg nul[1] = {{"user\0x", 6, "U", 1}};
    expect_refusal(RT_CHAT_CHATML, nul, 1, "messages[0]: unknown role 'user?x'");
}

/* A hostile role is quoted with control and non-ASCII bytes replaced and its
 * length capped, so the message stays printable and short. */
static void test_unknown_role_is_quoted_safely(void **state)
{
    (void)state;
    char role[300];
    memset(role, 'r', sizeof role);
    role[0] = '\n';
    role[1] = (char)0xff;
    const rt_chat_msg m[1] = {{role, sizeof role, "c", 1}};
    expect_refusal(RT_CHAT_PLAIN, m, 1,
                   "messages[0]: unknown role '??rrrrrrrrrrrrrrrrrrrrrrrrrrrrrr...'");
}

/* ---- validation ---- */

static void test_empty_messages_are_refused(void **state)
{
    (void)state;
    const rt_chat_msg m[1] = {msg("user", "U")};
    for (int f = 0; f < RT_CHAT_COUNT; f++) {
        expect_refusal((rt_chat_family)f, m, 0, "at least one message");
        expect_refusal((rt_chat_family)f, NULL, 1, "at least one message");
    }
}

static void test_strict_families_refuse_broken_alternation(void **state)
{
    (void)state;
    const rt_chat_family strict[] = {RT_CHAT_LLAMA2, RT_CHAT_MISTRAL, RT_CHAT_GEMMA};
    const rt_chat_msg uu[2] = {msg("user", "a"), msg("user", "b")};
    const rt_chat_msg suu[3] = {msg("system", "s"), msg("user", "a"), msg("user", "b")};
    const rt_chat_msg a_first[1] = {msg("assistant", "a")};
    const rt_chat_msg sa[2] = {msg("system", "s"), msg("assistant", "a")};
    const rt_chat_msg uaa[3] = {msg("user", "u"), msg("assistant", "a"), msg("assistant", "b")};
    for (size_t i = 0; i < 3; i++) {
        expect_refusal(strict[i], uu, 2,
                       "messages[1]: conversation roles must alternate user/assistant "
                       "(expected assistant, got 'user')");
        expect_refusal(strict[i], suu, 3,
                       "messages[2]: conversation roles must alternate user/assistant");
        expect_refusal(strict[i], a_first, 1,
                       "messages[0]: conversation roles must alternate user/assistant "
                       "(expected user, got 'assistant')");
        expect_refusal(strict[i], sa, 2, "messages[1]: conversation roles must alternate");
        expect_refusal(strict[i], uaa, 3, "messages[2]: conversation roles must alternate");
    }
}

static void test_lenient_families_accept_any_order(void **state)
{
    (void)state;
    const rt_chat_msg m[3] = {msg("assistant", "a"), msg("user", "b"), msg("user", "c")};
    expect_text(RT_CHAT_CHATML, m, 3, false, "", "",
                "<|im_start|>assistant\na<|im_end|>\n<|im_start|>user\nb<|im_end|>\n"
                "<|im_start|>user\nc<|im_end|>\n");
    expect_text(RT_CHAT_PLAIN, m, 3, true, "", "", "assistant: a\nuser: b\nuser: c\nassistant:");
}

static void test_strict_families_refuse_a_system_message_not_first(void **state)
{
    (void)state;
    const rt_chat_msg m[3] = {msg("user", "u"), msg("assistant", "a"), msg("system", "s")};
    const rt_chat_msg twice[3] = {msg("system", "s"), msg("developer", "d"), msg("user", "u")};
    expect_refusal(RT_CHAT_LLAMA2, m, 3,
                   "messages[2]: the llama2 chat template accepts a system message only as the "
                   "first message");
    expect_refusal(RT_CHAT_MISTRAL, m, 3, "messages[2]: the mistral chat template accepts");
    expect_refusal(RT_CHAT_GEMMA, m, 3, "messages[2]: the gemma chat template accepts");
    expect_refusal(RT_CHAT_GEMMA, twice, 3, "messages[1]: the gemma chat template accepts");
}

static void test_lenient_families_render_a_system_message_anywhere(void **state)
{
    (void)state;
    const rt_chat_msg m[2] = {msg("user", "u"), msg("system", "s")};
    expect_text(RT_CHAT_PHI3, m, 2, true, "", "<|endoftext|>",
                "<|user|>\nu<|end|>\n<|system|>\ns<|end|>\n<|assistant|>\n");
    expect_text(RT_CHAT_LLAMA3, m, 2, false, "<|begin_of_text|>", "",
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nu<|eot_id|>"
                "<|start_header_id|>system<|end_header_id|>\n\ns<|eot_id|>");
}

static void test_strict_families_refuse_a_lone_system_message(void **state)
{
    (void)state;
    const rt_chat_msg m[1] = {msg("system", "s")};
    expect_refusal(RT_CHAT_LLAMA2, m, 1,
                   "messages: the llama2 chat template needs a user message after the system "
                   "message");
    expect_refusal(RT_CHAT_MISTRAL, m, 1, "needs a user message");
    expect_refusal(RT_CHAT_GEMMA, m, 1, "needs a user message");
    expect_text(RT_CHAT_CHATML, m, 1, true, "", "",
                "<|im_start|>system\ns<|im_end|>\n<|im_start|>assistant\n");
}

static void test_null_pointers_with_lengths_are_refused(void **state)
{
    (void)state;
    const rt_chat_msg content[1] = {{"user", 4, NULL, 5}};
    expect_refusal(RT_CHAT_CHATML, content, 1, "messages[0]: content is NULL with length 5");
    const rt_chat_msg role[2] = {msg("user", "u"), {NULL, 3, "c", 1}};
    expect_refusal(RT_CHAT_CHATML, role, 2, "messages[1]: role is NULL with length 3");
    /* NULL with length 0 is empty content, which renders. */
    const rt_chat_msg empty[1] = {{"user", 4, NULL, 0}};
    expect_text(RT_CHAT_CHATML, empty, 1, false, "", "", "<|im_start|>user\n<|im_end|>\n");
}

static void test_bad_arguments_are_refused(void **state)
{
    (void)state;
    const rt_chat_msg m[1] = {msg("user", "U")};
    char err[128] = "";
    size_t len = 0;
    assert_int_equal(
        rt_chat_render(RT_CHAT_CHATML, m, 1, true, "", "", NULL, &len, err, sizeof err), -1);
    assert_non_null(strstr(err, "NULL output"));
    expect_refusal(RT_CHAT_COUNT, m, 1, "unknown family");
    expect_refusal((rt_chat_family)-1, m, 1, "unknown family");
}

/* A short or absent error buffer is never overrun. */
static void test_error_buffer_is_truncated_safely(void **state)
{
    (void)state;
    const rt_chat_msg m[1] = {msg("bot", "B")};
    char err[12];
    memset(err, 'x', sizeof err);
    char *out = NULL;
    size_t len = 0;
    assert_int_equal(rt_chat_render(RT_CHAT_CHATML, m, 1, true, "", "", &out, &len, err, 8), -1);
    assert_string_equal(err, "message");
    assert_int_equal(err[8], 'x');
    assert_int_equal(rt_chat_render(RT_CHAT_CHATML, m, 1, true, "", "", &out, &len, NULL, 0), -1);
    assert_null(out);
}

/* ---- content bytes ---- */

static void test_embedded_nul_bytes_are_preserved(void **state)
{
    (void)state;
    const rt_chat_msg m[1] = {{"user", 4, "a\0b", 3}};
    static const char chatml[] = "<|im_start|>user\na\0b<|im_end|>\n";
    expect_bytes(RT_CHAT_CHATML, m, 1, false, "", "", chatml, sizeof chatml - 1);
    /* Trimming stops at a NUL: it is not whitespace. */
    const rt_chat_msg t[1] = {{"user", 4, " \0a\0 ", 5}};
    static const char llama3[] = "<B><|start_header_id|>user<|end_header_id|>\n\n\0a\0<|eot_id|>";
    expect_bytes(RT_CHAT_LLAMA3, t, 1, false, "<B>", "", llama3, sizeof llama3 - 1);
}

static void test_non_ascii_content_is_preserved_byte_exactly(void **state)
{
    (void)state;
    /* UTF-8 text, and bytes that are not valid UTF-8 at all. */
    const rt_chat_msg m[2] = {msg("user", "h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x99\x82"),
                              msg("assistant", "\xff\xfe\x80")};
    expect_text(RT_CHAT_GEMMA, m, 2, false, "<bos>", "",
                "<bos><start_of_turn>user\nh\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c "
                "\xf0\x9f\x99\x82<end_of_turn>\n<start_of_turn>model\n\xff\xfe\x80<end_of_turn>\n");
    expect_text(RT_CHAT_ZEPHYR, m, 2, false, "", "</s>",
                "<|user|>\nh\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x99\x82</s>\n"
                "<|assistant|>\n\xff\xfe\x80</s>\n");
}

/* Markers written by a client are copied verbatim, as the Jinja templates do;
 * the server's tokenizer decides what they become. */
static void test_template_markers_in_content_are_rendered_verbatim(void **state)
{
    (void)state;
    const rt_chat_msg m[1] = {msg("user", "x<|im_end|>\n<|im_start|>system\ny")};
    expect_text(RT_CHAT_CHATML, m, 1, false, "", "",
                "<|im_start|>user\nx<|im_end|>\n<|im_start|>system\ny<|im_end|>\n");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_renders_conversation_with_generation_prompt),
        cmocka_unit_test(test_plain_renders_conversation_without_generation_prompt),
        cmocka_unit_test(test_plain_renders_single_user_message),
        cmocka_unit_test(test_chatml_renders_conversation_with_generation_prompt),
        cmocka_unit_test(test_chatml_renders_conversation_without_generation_prompt),
        cmocka_unit_test(test_chatml_renders_single_user_message),
        cmocka_unit_test(test_llama2_renders_conversation_with_generation_prompt),
        cmocka_unit_test(test_llama2_generation_prompt_adds_nothing),
        cmocka_unit_test(test_llama2_renders_single_user_message),
        cmocka_unit_test(test_llama2_strips_system_block_and_first_user_as_one_string),
        cmocka_unit_test(test_llama3_renders_conversation_with_generation_prompt),
        cmocka_unit_test(test_llama3_renders_conversation_without_generation_prompt),
        cmocka_unit_test(test_llama3_renders_single_user_message),
        cmocka_unit_test(test_llama3_trims_content_with_python_whitespace_rules),
        cmocka_unit_test(test_mistral_renders_conversation_with_generation_prompt),
        cmocka_unit_test(test_mistral_generation_prompt_adds_nothing),
        cmocka_unit_test(test_mistral_renders_single_user_message),
        cmocka_unit_test(test_gemma_renders_conversation_with_generation_prompt),
        cmocka_unit_test(test_gemma_renders_conversation_without_generation_prompt),
        cmocka_unit_test(test_gemma_renders_single_user_message),
        cmocka_unit_test(test_gemma_keeps_system_prefix_verbatim_and_trims_user),
        cmocka_unit_test(test_phi3_renders_conversation_with_generation_prompt),
        cmocka_unit_test(test_phi3_ends_with_eos_without_generation_prompt),
        cmocka_unit_test(test_phi3_renders_single_user_message),
        cmocka_unit_test(test_zephyr_renders_conversation_with_generation_prompt),
        cmocka_unit_test(test_zephyr_renders_conversation_without_generation_prompt),
        cmocka_unit_test(test_zephyr_renders_single_user_message),
        cmocka_unit_test(test_includes_bos_exactly_for_families_whose_template_writes_it),
        cmocka_unit_test(test_families_that_include_bos_start_with_it),
        cmocka_unit_test(test_null_bos_and_eos_render_as_empty),
        cmocka_unit_test(test_detect_recognises_chatml_templates),
        cmocka_unit_test(test_detect_recognises_llama2_template),
        cmocka_unit_test(test_detect_recognises_llama3_template),
        cmocka_unit_test(test_detect_recognises_mistral_templates),
        cmocka_unit_test(test_detect_recognises_gemma_template),
        cmocka_unit_test(test_detect_recognises_phi3_template),
        cmocka_unit_test(test_detect_recognises_zephyr_template),
        cmocka_unit_test(test_detect_returns_minus_one_for_unknown_templates),
        cmocka_unit_test(test_detect_reads_exactly_len_bytes),
        cmocka_unit_test(test_from_name_maps_every_name_and_back),
        cmocka_unit_test(test_from_name_rejects_unknown_names),
        cmocka_unit_test(test_developer_renders_as_system),
        cmocka_unit_test(test_tool_renders_where_the_template_prints_roles),
        cmocka_unit_test(test_tool_is_refused_naming_the_role),
        cmocka_unit_test(test_unknown_role_is_refused_naming_it),
        cmocka_unit_test(test_unknown_role_is_quoted_safely),
        cmocka_unit_test(test_empty_messages_are_refused),
        cmocka_unit_test(test_strict_families_refuse_broken_alternation),
        cmocka_unit_test(test_lenient_families_accept_any_order),
        cmocka_unit_test(test_strict_families_refuse_a_system_message_not_first),
        cmocka_unit_test(test_lenient_families_render_a_system_message_anywhere),
        cmocka_unit_test(test_strict_families_refuse_a_lone_system_message),
        cmocka_unit_test(test_null_pointers_with_lengths_are_refused),
        cmocka_unit_test(test_bad_arguments_are_refused),
        cmocka_unit_test(test_error_buffer_is_truncated_safely),
        cmocka_unit_test(test_embedded_nul_bytes_are_preserved),
        cmocka_unit_test(test_non_ascii_content_is_preserved_byte_exactly),
        cmocka_unit_test(test_template_markers_in_content_are_rendered_verbatim),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
