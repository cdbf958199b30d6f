/*
 * fuzz_common.h - helpers shared by the libFuzzer targets in tests/fuzz/: a
 * check that stops the run with a message (libFuzzer then saves the input as
 * a crash), and where the shared folder and the repository's fixtures are.
 *
 * Every target checks the contract of the code it drives, not only that
 * nothing crashed: a broken FUZZ_CHECK is a finding like a sanitizer report.
 */
#ifndef SIEVE_FUZZ_COMMON_H
#define SIEVE_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed: ", __FILE__, __LINE__, #cond);          \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Set by the build (scripts/build-fuzz.sh or CMake's SIEVE_FUZZ) to absolute
 * paths; the environment variable SIEVE_SHARED_DIR wins over the first. */
#ifndef SIEVE_FUZZ_SHARED_DIR
#define SIEVE_FUZZ_SHARED_DIR "../shared"
#endif
#ifndef SIEVE_FUZZ_SOURCE_DIR
#define SIEVE_FUZZ_SOURCE_DIR "."
#endif

/* $SIEVE_SHARED_DIR/rel (or the build's shared folder); a static buffer. */
static inline const char *fuzz_shared_path(const char *rel)
{
    static char buf[4096];
    const char *dir = getenv("SIEVE_SHARED_DIR");
    snprintf(buf, sizeof(buf), "%s/%s", dir && *dir ? dir : SIEVE_FUZZ_SHARED_DIR, rel);
    return buf;
}

/* A file of the repository (tests/fixtures/...); a static buffer. */
static inline const char *fuzz_source_path(const char *rel)
{
    static char buf[4096];
    snprintf(buf, sizeof(buf), "%s/%s", SIEVE_FUZZ_SOURCE_DIR, rel);
    return buf;
}

/* Reads a little-endian uint16 from p (2 bytes available). */
static inline unsigned fuzz_u16(const uint8_t *p)
{
    return (unsigned)p[0] | (unsigned)p[1] << 8;
}

#endif
