/*
 * fuzz_chat_template.c - libFuzzer target for the chat-template renderer and
 * family detection (runtime/chat_template.c: rt_chat_render,
 * rt_chat_family_detect, rt_chat_family_from_name).
 *
 * Input: byte 0 picks the family (mod RT_CHAT_COUNT); byte 1 holds flags (bit
 * 0: add_generation_prompt, bit 1: NULL bos/eos); then messages, each a role
 * byte (0-7: one of the roles below, 8 and up: the role's bytes follow as a
 * one-byte length and the bytes) and a content of a little-endian 16-bit
 * length and that many bytes (cut short by the end of the input). The whole
 * input is also fed to rt_chat_family_detect as Jinja source.
 *
 * Checked on every input: a refusal leaves *out NULL and *out_len 0 and has a
 * message; an acceptance is NUL-terminated at out_len; the plain family
 * renders exactly "<role>: content\n" per message then "assistant:" (with
 * "developer" shown as "system"); families that copy contents verbatim
 * (chatml, mistral, phi3, zephyr) contain every content; detection returns
 * -1 or a family other than plain.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runtime/chat_template.h"
#include "tests/fuzz/fuzz_common.h"

#define MAX_MSGS 64

static const char *const roles[] = {"system",    "user", "assistant", "tool",
                                    "developer", "",     "User",      "function"};

static bool plain_role(const rt_chat_msg *m, const char **shown)
{
    static const char *const ok[] = {"system", "user", "assistant", "tool", "developer"};
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
        if (m->role_len == strlen(ok[i]) && memcmp(m->role, ok[i], m->role_len) == 0) {
            *shown = i == 4 ? "system" : ok[i];
            return true;
        }
    return false;
}

/* The plain family's rendering, or NULL when a role is not one it takes. */
static char *expect_plain(const rt_chat_msg *m, size_t n, bool gen, size_t *len)
{
    size_t cap = 16;
    for (size_t i = 0; i < n; i++)
        cap += m[i].content_len + 16;
    char *s = malloc(cap);
    FUZZ_CHECK(s != NULL, "malloc");
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        const char *role;
        if (!plain_role(&m[i], &role)) {
            free(s);
            return NULL;
        }
        o += (size_t)sprintf(s + o, "%s: ", role);
        if (m[i].content_len) {
            memcpy(s + o, m[i].content, m[i].content_len);
            o += m[i].content_len;
        }
        s[o++] = '\n';
    }
    if (gen)
        o += (size_t)sprintf(s + o, "assistant:");
    *len = o;
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const int fam = rt_chat_family_detect((const char *)data, size);
    FUZZ_CHECK(fam == -1 || (fam > RT_CHAT_PLAIN && fam < RT_CHAT_COUNT), "detect gave %d", fam);
    char name[17];
    const size_t nl = size < 16 ? size : 16;
    memcpy(name, data, nl);
    name[nl] = 0;
    const int byname = rt_chat_family_from_name(name);
    FUZZ_CHECK(byname == -1 || strcmp(rt_chat_family_name((rt_chat_family)byname), name) == 0,
               "from_name('%s') = %d", name, byname);
    if (size < 2)
        return 0;

    const rt_chat_family f = (rt_chat_family)(data[0] % RT_CHAT_COUNT);
    const bool gen = data[1] & 1, null_specials = data[1] & 2;
    rt_chat_msg msgs[MAX_MSGS];
    size_t n = 0, p = 2;
    while (p < size && n < MAX_MSGS) {
        rt_chat_msg *m = &msgs[n++];
        const uint8_t r = data[p++];
        if (r < 8) {
            m->role = roles[r];
            m->role_len = strlen(roles[r]);
        } else {
            size_t rl = p < size ? data[p++] % 24 : 0;
            rl = rl < size - p ? rl : size - p;
            m->role = rl ? (const char *)data + p : NULL;
            m->role_len = rl;
            p += rl;
        }
        size_t cl = p + 2 <= size ? fuzz_u16(data + p) : 0;
        p = p + 2 <= size ? p + 2 : size;
        cl = cl < size - p ? cl : size - p;
        m->content = cl ? (const char *)data + p : NULL;
        m->content_len = cl;
        p += cl;
    }

    char *out = (char *)data; /* must be replaced by NULL or a result */
    size_t out_len = 12345;
    char err[256] = "";
    const char *bos = null_specials ? NULL : "<s>", *eos = null_specials ? NULL : "</s>";
    if (rt_chat_render(f, msgs, n, gen, bos, eos, &out, &out_len, err, sizeof(err)) != 0) {
        FUZZ_CHECK(out == NULL && out_len == 0, "a refusal left output");
        FUZZ_CHECK(err[0] != 0, "refused without a message (family %s, %zu messages)",
                   rt_chat_family_name(f), n);
        FUZZ_CHECK(memchr(err, 0, sizeof(err)) != NULL, "message not terminated");
        return 0;
    }
    FUZZ_CHECK(n > 0, "rendered an empty conversation");
    FUZZ_CHECK(out != NULL && out[out_len] == 0, "result not NUL-terminated");
    if (f == RT_CHAT_PLAIN) {
        size_t el = 0;
        char *want = expect_plain(msgs, n, gen, &el);
        FUZZ_CHECK(want != NULL, "plain accepted a role it does not take");
        FUZZ_CHECK(el == out_len && memcmp(want, out, el) == 0,
                   "plain rendering differs (%zu vs %zu bytes)", out_len, el);
        free(want);
    }
    if (f == RT_CHAT_CHATML || f == RT_CHAT_MISTRAL || f == RT_CHAT_PHI3 || f == RT_CHAT_ZEPHYR)
        for (size_t i = 0; i < n; i++)
            FUZZ_CHECK(msgs[i].content_len == 0 ||
                           memmem(out, out_len, msgs[i].content, msgs[i].content_len),
                       "%s: messages[%zu].content is missing", rt_chat_family_name(f), i);
    free(out);
    return 0;
}
