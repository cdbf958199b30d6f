/*
 * chat_template.h - turns OpenAI-style chat messages into one prompt string.
 *
 * A GGUF model carries its chat template as Jinja source in the metadata key
 * `tokenizer.chat_template`. We do not run Jinja: rt_chat_family_detect()
 * recognises the common template families from markers in that source, and
 * rt_chat_render() writes each family natively, byte for byte as the family's
 * reference template renders under Hugging Face `apply_chat_template`
 * (Python Jinja2 with trim_blocks and lstrip_blocks).
 *
 * Exact renderings (S = system, U = user, A = assistant content; BOS/EOS are
 * the `bos`/`eos` arguments; "strip" is Python's str.strip(), which Jinja's
 * `trim` filter also uses; NL is a newline byte):
 *
 *   plain    (our own, for models without a template, e.g. stories260K; no
 *            special tokens, content verbatim)
 *            each message: "<role>: " content NL, role one of system, user,
 *            assistant, tool; generation prompt: "assistant:" (no space after
 *            the colon, so the model's first token carries its own space).
 *   chatml   (teknium/OpenHermes-2.5-Mistral-7B; Qwen, SmolLM, Hermes)
 *            each message: "<|im_start|>" role NL content "<|im_end|>" NL;
 *            generation prompt "<|im_start|>assistant" NL. No default system
 *            prompt is injected (Qwen's and SmolLM2's own templates add one).
 *   llama2   (meta-llama/Llama-2-7b-chat-hf)
 *            user: BOS "[INST] " strip(c) " [/INST]"; assistant: " " strip(A)
 *            " " EOS; a leading system message makes the first user content
 *            c = "<<SYS>>" NL S NL "<</SYS>>" NL NL U (stripped as a whole, as
 *            the template does). No generation prompt: the text already ends
 *            in "[/INST]".
 *   llama3   (meta-llama/Meta-Llama-3-8B-Instruct)
 *            BOS once, then each message "<|start_header_id|>" role
 *            "<|end_header_id|>" NL NL strip(content) "<|eot_id|>"; generation
 *            prompt "<|start_header_id|>assistant<|end_header_id|>" NL NL.
 *   mistral  (mistralai/Mistral-7B-Instruct-v0.2, the "v1" template)
 *            BOS, then user " [INST] " U " [/INST]" (a leading system message
 *            becomes S NL NL before the first U), assistant " " A EOS; content
 *            verbatim. No generation prompt.
 *   gemma    (google/gemma-3-4b-it)
 *            BOS, then "<start_of_turn>" (user|model) NL [S NL NL on the first
 *            turn when a system message leads] strip(content) "<end_of_turn>"
 *            NL; generation prompt "<start_of_turn>model" NL.
 *   phi3     (microsoft/Phi-3-mini-4k-instruct)
 *            each message "<|system|>" / "<|user|>" / "<|assistant|>" NL
 *            content "<|end|>" NL; then "<|assistant|>" NL with the generation
 *            prompt, or EOS without it (the template does that).
 *   zephyr   (HuggingFaceH4/zephyr-7b-beta)
 *            each message "<|system|>" / "<|user|>" / "<|assistant|>" NL
 *            content EOS NL; generation prompt "<|assistant|>" NL.
 *
 * Roles: "system", "user", "assistant"; "developer" is rendered as "system";
 * "tool" only where the family has a natural rendering (plain, chatml and
 * llama3, whose generic templates print the role name as given). llama2,
 * mistral and gemma take a system message only first and then require
 * user/assistant alternation starting with user, as their templates'
 * raise_exception does; the others take system messages anywhere.
 *
 * Contents are length-delimited bytes (NULs and template markers included)
 * and are copied verbatim apart from the stripping listed above; the caller
 * tokenizes the result with special-token parsing on, so markers a client
 * writes in its content become special tokens exactly as they would through
 * the reference templates.
 *
 * All functions are pure and thread-safe.
 */
#ifndef SIEVE_RUNTIME_CHAT_TEMPLATE_H
#define SIEVE_RUNTIME_CHAT_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>

typedef enum {
    RT_CHAT_PLAIN,
    RT_CHAT_CHATML,
    RT_CHAT_LLAMA2,
    RT_CHAT_LLAMA3,
    RT_CHAT_MISTRAL,
    RT_CHAT_GEMMA,
    RT_CHAT_PHI3,
    RT_CHAT_ZEPHYR,
    RT_CHAT_COUNT
} rt_chat_family;

/* One message; neither string needs a NUL terminator. A NULL pointer is
 * allowed only with length 0. */
typedef struct {
    const char *role;
    size_t role_len;
    const char *content;
    size_t content_len;
} rt_chat_msg;

/* Recognises a family from a Jinja template's source (len bytes, no NUL
 * needed), by markers:
 *   "<|im_start|>"                                     -> chatml
 *       (not with "<|im_sep|>" (Phi-4) or "<end_of_utterance>" (SmolVLM),
 *        which only borrow the token: -1)
 *   "<|start_header_id|>" and "<|end_header_id|>"      -> llama3
 *   "<start_of_turn>"                                  -> gemma
 *   "[INST]" with "<<SYS>>"                            -> llama2
 *   "[INST]" without "<<SYS>>"                         -> mistral
 *   "<|end|>" with "<|user|>" or "<|assistant|>"       -> phi3
 *   "<|user|>" and "<|assistant|>" with "eos_token", "</s>" or
 *       "<|endoftext|>" (the turn terminator)          -> zephyr
 * checked in that order. Returns the family, or -1 when none matches (also
 * for NULL or empty input). Never returns RT_CHAT_PLAIN: that is the
 * caller's choice for a model without a template. */
int rt_chat_family_detect(const char *jinja, size_t len);

/* By configuration name ("plain", "chatml", "llama2", "llama3", "mistral",
 * "gemma", "phi3", "zephyr"; exact, case-sensitive); -1 when unknown or NULL. */
int rt_chat_family_from_name(const char *name);

/* The configuration name of f, or "unknown" when f is out of range. */
const char *rt_chat_family_name(rt_chat_family f);

/* Whether rt_chat_render() writes the BOS string itself for family f (llama2,
 * llama3, mistral, gemma: their templates start with bos_token). The caller
 * tokenizes with add_bos = !rt_chat_template_includes_bos(f), so BOS appears
 * exactly once. */
bool rt_chat_template_includes_bos(rt_chat_family f);

/* Renders msgs[0..n) for family f (see the top of this file for each family's
 * exact text). add_generation_prompt appends the family's assistant prefix
 * (nothing for llama2 and mistral, whose prompt already ends in "[/INST]").
 * bos/eos: the model's BOS/EOS piece strings (e.g. "<s>", "</s>"), used by
 * the families that write them; NULL is taken as "".
 *
 * On success returns 0 and stores a malloc-ed, NUL-terminated string in *out
 * (caller frees) and its length, not counting the terminator, in *out_len
 * (the text may itself contain NUL bytes copied from contents). On failure
 * returns -1, leaves *out NULL and *out_len 0, and writes a message naming
 * the offending message into err, e.g. "messages[2]: conversation roles must
 * alternate user/assistant (expected user, got 'assistant')". Refused: no
 * messages, an unknown role, "tool" in a family without a rendering for it,
 * a system message that is not first (llama2, mistral, gemma), broken
 * alternation, a strict family given only a system message, a NULL pointer
 * with a non-zero length, and allocation failure. */
int rt_chat_render(rt_chat_family f, const rt_chat_msg *msgs, size_t n, bool add_generation_prompt,
                   const char *bos, const char *eos, char **out, size_t *out_len, char *err,
                   size_t errlen);

#endif
