/*
 * chat_template.c - native renderers for the chat-template families named in
 * chat_template.h, and their recognition from Jinja source.
 *
 * Rendering is two passes over the messages: validate every message first
 * (roles, placement of system messages, alternation), so that a refused
 * request allocates nothing, then append the family's text to a growable
 * buffer. Contents are length-delimited and copied verbatim; where a reference
 * template applies `| trim` or `.strip()`, the bytes are appended first and the
 * appended span is stripped in place with Python's whitespace rules, so that
 * stripping covers exactly what the template's expression covered (Llama 2
 * strips the system block and the first user message as one string).
 *
 * Invariant of sbuf: when !failed, p holds len bytes plus a NUL at p[len].
 */
#include "runtime/chat_template.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const family_names[RT_CHAT_COUNT] = {
    [RT_CHAT_PLAIN] = "plain",   [RT_CHAT_CHATML] = "chatml",   [RT_CHAT_LLAMA2] = "llama2",
    [RT_CHAT_LLAMA3] = "llama3", [RT_CHAT_MISTRAL] = "mistral", [RT_CHAT_GEMMA] = "gemma",
    [RT_CHAT_PHI3] = "phi3",     [RT_CHAT_ZEPHYR] = "zephyr",
};

/* ---- detection ---- */

static bool has(const char *h, size_t hl, const char *needle)
{
    return memmem(h, hl, needle, strlen(needle)) != NULL;
}

int rt_chat_family_detect(const char *jinja, size_t len)
{
    if (!jinja || len == 0)
        return -1;
    if (has(jinja, len, "<|im_start|>")) {
        if (has(jinja, len, "<|im_sep|>") || has(jinja, len, "<end_of_utterance>"))
            return -1;
        return RT_CHAT_CHATML;
    }
    if (has(jinja, len, "<|start_header_id|>") && has(jinja, len, "<|end_header_id|>"))
        return RT_CHAT_LLAMA3;
    if (has(jinja, len, "<start_of_turn>"))
        return RT_CHAT_GEMMA;
    if (has(jinja, len, "[INST]"))
        return has(jinja, len, "<<SYS>>") ? RT_CHAT_LLAMA2 : RT_CHAT_MISTRAL;
    const bool user = has(jinja, len, "<|user|>");
    const bool assistant = has(jinja, len, "<|assistant|>");
    if (has(jinja, len, "<|end|>") && (user || assistant))
        return RT_CHAT_PHI3;
    if (user && assistant &&
        (has(jinja, len, "eos_token") || has(jinja, len, "</s>") ||
         has(jinja, len, "<|endoftext|>")))
        return RT_CHAT_ZEPHYR;
    return -1;
}

int rt_chat_family_from_name(const char *name)
{
    if (!name)
        return -1;
    for (int f = 0; f < RT_CHAT_COUNT; f++)
        if (strcmp(name, family_names[f]) == 0)
            return f;
    return -1;
}

const char *rt_chat_family_name(rt_chat_family f)
{
    if ((unsigned)f >= (unsigned)RT_CHAT_COUNT)
        return "unknown";
    return family_names[f];
}

bool rt_chat_template_includes_bos(rt_chat_family f)
{
    return f == RT_CHAT_LLAMA2 || f == RT_CHAT_LLAMA3 || f == RT_CHAT_MISTRAL || f == RT_CHAT_GEMMA;
}

/* ---- errors ---- */

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* A client's role bytes made safe to quote in a message (which may end up in
 * JSON): printable ASCII kept, anything else '?', at most 32 bytes. */
static void quote_role(char *dst, size_t cap, const char *role, size_t len)
{
    enum { MAX_SHOWN = 32 };
    size_t shown = len < MAX_SHOWN ? len : MAX_SHOWN;
    if (shown + 4 > cap)
        shown = cap > 4 ? cap - 4 : 0;
    size_t k = 0;
    for (size_t i = 0; i < shown; i++) {
        const unsigned char c = (unsigned char)role[i];
        dst[k++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (shown < len)
        for (int i = 0; i < 3; i++)
            dst[k++] = '.';
    dst[k] = '\0';
}

/* ---- roles ---- */

typedef enum { ROLE_UNKNOWN, ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL } chat_role;

static bool bytes_are(const char *s, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(s, lit, n) == 0;
}

static chat_role role_of(const rt_chat_msg *m)
{
    if (!m->role)
        return ROLE_UNKNOWN;
    if (bytes_are(m->role, m->role_len, "system") || bytes_are(m->role, m->role_len, "developer"))
        return ROLE_SYSTEM;
    if (bytes_are(m->role, m->role_len, "user"))
        return ROLE_USER;
    if (bytes_are(m->role, m->role_len, "assistant"))
        return ROLE_ASSISTANT;
    if (bytes_are(m->role, m->role_len, "tool"))
        return ROLE_TOOL;
    return ROLE_UNKNOWN;
}

/* The name a template prints for a role ("developer" prints as "system"). */
static const char *role_name(chat_role r)
{
    switch (r) {
    case ROLE_SYSTEM:
        return "system";
    case ROLE_USER:
        return "user";
    case ROLE_ASSISTANT:
        return "assistant";
    case ROLE_TOOL:
        return "tool";
    default:
        return "?";
    }
}

/* Families whose reference template prints any role name as given. */
static bool family_takes_tool(rt_chat_family f)
{
    return f == RT_CHAT_PLAIN || f == RT_CHAT_CHATML || f == RT_CHAT_LLAMA3;
}

/* Families whose template takes one leading system message and then raises
 * unless user/assistant alternate starting with user. */
static bool family_is_strict(rt_chat_family f)
{
    return f == RT_CHAT_LLAMA2 || f == RT_CHAT_MISTRAL || f == RT_CHAT_GEMMA;
}

static int validate(rt_chat_family f, const rt_chat_msg *msgs, size_t n, char *err, size_t errlen)
{
    const char *fname = family_names[f];
    const size_t first = role_of(&msgs[0]) == ROLE_SYSTEM ? 1 : 0;
    for (size_t i = 0; i < n; i++) {
        const rt_chat_msg *m = &msgs[i];
        if (!m->role && m->role_len)
            return fail(err, errlen, "messages[%zu]: role is NULL with length %zu", i, m->role_len);
        if (!m->content && m->content_len)
            return fail(err, errlen, "messages[%zu]: content is NULL with length %zu", i,
                        m->content_len);
        const chat_role r = role_of(m);
        if (r == ROLE_UNKNOWN) {
            char q[40];
            quote_role(q, sizeof q, m->role ? m->role : "", m->role_len);
            return fail(err, errlen,
                        "messages[%zu]: unknown role '%s' (expected system, developer, user, "
                        "assistant or tool)",
                        i, q);
        }
        if (r == ROLE_TOOL && !family_takes_tool(f))
            return fail(err, errlen,
                        "messages[%zu]: role 'tool' is not supported by the %s chat template", i,
                        fname);
        if (!family_is_strict(f) || i < first)
            continue;
        if (r == ROLE_SYSTEM)
            return fail(err, errlen,
                        "messages[%zu]: the %s chat template accepts a system message only as "
                        "the first message",
                        i, fname);
        const chat_role want = (i - first) % 2 == 0 ? ROLE_USER : ROLE_ASSISTANT;
        if (r != want)
            return fail(err, errlen,
                        "messages[%zu]: conversation roles must alternate user/assistant "
                        "(expected %s, got '%s')",
                        i, role_name(want), role_name(r));
    }
    if (family_is_strict(f) && first == n)
        return fail(err, errlen,
                    "messages: the %s chat template needs a user message after the system "
                    "message",
                    fname);
    return 0;
}

/* ---- output buffer ---- */

typedef struct {
    char *p;
    size_t len, cap;
    bool failed;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->failed || n == 0)
        return;
    if (n > SIZE_MAX - 1 - b->len) {
        b->failed = true;
        return;
    }
    const size_t need = b->len + n + 1;
    if (need > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < need)
            cap = cap > SIZE_MAX / 2 ? need : cap * 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->failed = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_content(sbuf *b, const rt_chat_msg *m)
{
    sb_put(b, m->content, m->content_len);
}

/* Byte length of the whitespace character at p (at most n bytes), or 0. The
 * set is Python's str.isspace(), which str.strip() and Jinja's trim use:
 * \t \n \v \f \r, U+001C..U+001F, space, U+0085, U+00A0, U+1680,
 * U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000 (UTF-8 encoded). */
static size_t ws_len(const unsigned char *p, size_t n)
{
    const unsigned char c = p[0];
    if ((c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20))
        return 1;
    if (c == 0xc2 && n >= 2 && (p[1] == 0x85 || p[1] == 0xa0))
        return 2;
    if (n < 3)
        return 0;
    if (c == 0xe1 && p[1] == 0x9a && p[2] == 0x80)
        return 3;
    if (c == 0xe2 && p[1] == 0x80 &&
        (p[2] <= 0x8a ? p[2] >= 0x80 : (p[2] == 0xa8 || p[2] == 0xa9 || p[2] == 0xaf)))
        return 3;
    if (c == 0xe2 && p[1] == 0x81 && p[2] == 0x9f)
        return 3;
    if (c == 0xe3 && p[1] == 0x80 && p[2] == 0x80)
        return 3;
    return 0;
}

/* Strips leading and trailing whitespace from b->p[start..len) in place. The
 * trailing end is found scanning forward, since UTF-8 cannot be decoded
 * backwards without care; whitespace sequences start with lead bytes, which
 * never occur inside another character, so a bytewise scan is exact. */
static void sb_strip_from(sbuf *b, size_t start)
{
    if (b->failed)
        return;
    const unsigned char *p = (const unsigned char *)b->p;
    size_t i = start;
    size_t w;
    while (i < b->len && (w = ws_len(p + i, b->len - i)) > 0)
        i += w;
    size_t end = i;
    for (size_t j = i; j < b->len;) {
        w = ws_len(p + j, b->len - j);
        if (w) {
            j += w;
        } else {
            j++;
            end = j;
        }
    }
    memmove(b->p + start, b->p + i, end - i);
    b->len = start + (end - i);
    b->p[b->len] = '\0';
}

/* ---- renderers ---- */

typedef struct {
    const rt_chat_msg *msgs;
    size_t n;
    bool gen;
    const char *bos, *eos;
} render_in;

/* Index of the first message after an optional leading system message. */
static size_t loop_start(const render_in *in)
{
    return role_of(&in->msgs[0]) == ROLE_SYSTEM ? 1 : 0;
}

static void render_plain(sbuf *b, const render_in *in)
{
    for (size_t i = 0; i < in->n; i++) {
        sb_puts(b, role_name(role_of(&in->msgs[i])));
        sb_puts(b, ": ");
        sb_content(b, &in->msgs[i]);
        sb_puts(b, "\n");
    }
    if (in->gen)
        sb_puts(b, "assistant:");
}

static void render_chatml(sbuf *b, const render_in *in)
{
    for (size_t i = 0; i < in->n; i++) {
        sb_puts(b, "<|im_start|>");
        sb_puts(b, role_name(role_of(&in->msgs[i])));
        sb_puts(b, "\n");
        sb_content(b, &in->msgs[i]);
        sb_puts(b, "<|im_end|>\n");
    }
    if (in->gen)
        sb_puts(b, "<|im_start|>assistant\n");
}

static void render_llama2(sbuf *b, const render_in *in)
{
    const size_t first = loop_start(in);
    for (size_t i = first; i < in->n; i++) {
        const rt_chat_msg *m = &in->msgs[i];
        const bool user = role_of(m) == ROLE_USER;
        if (user) {
            sb_puts(b, in->bos);
            sb_puts(b, "[INST] ");
        } else {
            sb_puts(b, " ");
        }
        const size_t start = b->len;
        if (i == first && first == 1) {
            sb_puts(b, "<<SYS>>\n");
            sb_content(b, &in->msgs[0]);
            sb_puts(b, "\n<</SYS>>\n\n");
        }
        sb_content(b, m);
        sb_strip_from(b, start);
        if (user) {
            sb_puts(b, " [/INST]");
        } else {
            sb_puts(b, " ");
            sb_puts(b, in->eos);
        }
    }
}

static void render_llama3(sbuf *b, const render_in *in)
{
    sb_puts(b, in->bos);
    for (size_t i = 0; i < in->n; i++) {
        sb_puts(b, "<|start_header_id|>");
        sb_puts(b, role_name(role_of(&in->msgs[i])));
        sb_puts(b, "<|end_header_id|>\n\n");
        const size_t start = b->len;
        sb_content(b, &in->msgs[i]);
        sb_strip_from(b, start);
        sb_puts(b, "<|eot_id|>");
    }
    if (in->gen)
        sb_puts(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

static void render_mistral(sbuf *b, const render_in *in)
{
    const size_t first = loop_start(in);
    sb_puts(b, in->bos);
    for (size_t i = first; i < in->n; i++) {
        const rt_chat_msg *m = &in->msgs[i];
        if (role_of(m) == ROLE_USER) {
            sb_puts(b, " [INST] ");
            if (i == first && first == 1) {
                sb_content(b, &in->msgs[0]);
                sb_puts(b, "\n\n");
            }
            sb_content(b, m);
            sb_puts(b, " [/INST]");
        } else {
            sb_puts(b, " ");
            sb_content(b, m);
            sb_puts(b, in->eos);
        }
    }
}

static void render_gemma(sbuf *b, const render_in *in)
{
    const size_t first = loop_start(in);
    sb_puts(b, in->bos);
    for (size_t i = first; i < in->n; i++) {
        const rt_chat_msg *m = &in->msgs[i];
        sb_puts(b, role_of(m) == ROLE_USER ? "<start_of_turn>user\n" : "<start_of_turn>model\n");
        if (i == first && first == 1) {
            sb_content(b, &in->msgs[0]);
            sb_puts(b, "\n\n");
        }
        const size_t start = b->len;
        sb_content(b, m);
        sb_strip_from(b, start);
        sb_puts(b, "<end_of_turn>\n");
    }
    if (in->gen)
        sb_puts(b, "<start_of_turn>model\n");
}

/* phi3 and zephyr differ only in the turn terminator and in what follows the
 * last turn without a generation prompt. */
static void render_pipe_roles(sbuf *b, const render_in *in, const char *turn_end)
{
    for (size_t i = 0; i < in->n; i++) {
        sb_puts(b, "<|");
        sb_puts(b, role_name(role_of(&in->msgs[i])));
        sb_puts(b, "|>\n");
        sb_content(b, &in->msgs[i]);
        sb_puts(b, turn_end);
        sb_puts(b, "\n");
    }
    if (in->gen)
        sb_puts(b, "<|assistant|>\n");
}

static void render_phi3(sbuf *b, const render_in *in)
{
    render_pipe_roles(b, in, "<|end|>");
    if (!in->gen)
        sb_puts(b, in->eos);
}

static void render_zephyr(sbuf *b, const render_in *in)
{
    render_pipe_roles(b, in, in->eos);
}

int rt_chat_render(rt_chat_family f, const rt_chat_msg *msgs, size_t n, bool add_generation_prompt,
                   const char *bos, const char *eos, char **out, size_t *out_len, char *err,
                   size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    if (!out || !out_len)
        return fail(err, errlen, "chat template: NULL output pointer");
    *out = NULL;
    *out_len = 0;
    if ((unsigned)f >= (unsigned)RT_CHAT_COUNT)
        return fail(err, errlen, "chat template: unknown family %d", (int)f);
    if (!msgs || n == 0)
        return fail(err, errlen, "messages: at least one message is required");
    if (validate(f, msgs, n, err, errlen) != 0)
        return -1;

    const render_in in = {msgs, n, add_generation_prompt, bos ? bos : "", eos ? eos : ""};
    sbuf b = {0};
    switch (f) {
    case RT_CHAT_PLAIN:
        render_plain(&b, &in);
        break;
    case RT_CHAT_CHATML:
        render_chatml(&b, &in);
        break;
    case RT_CHAT_LLAMA2:
        render_llama2(&b, &in);
        break;
    case RT_CHAT_LLAMA3:
        render_llama3(&b, &in);
        break;
    case RT_CHAT_MISTRAL:
        render_mistral(&b, &in);
        break;
    case RT_CHAT_GEMMA:
        render_gemma(&b, &in);
        break;
    case RT_CHAT_PHI3:
        render_phi3(&b, &in);
        break;
    case RT_CHAT_ZEPHYR:
        render_zephyr(&b, &in);
        break;
    case RT_CHAT_COUNT:
        break;
    }
    /* Every family writes at least one marker per message, so a NULL buffer
     * here can only mean a failed allocation. */
    if (b.failed || !b.p) {
        free(b.p);
        return fail(err, errlen, "chat template: out of memory rendering %zu messages", n);
    }
    *out = b.p;
    *out_len = b.len;
    return 0;
}
