/*
 * testutil.h - small helpers shared by the unit tests: where the shared
 * folder is, and loading a JSON file from it.
 */
#ifndef SIEVE_TESTUTIL_H
#define SIEVE_TESTUTIL_H

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

/* $SIEVE_SHARED_DIR/rel, or ../shared/rel when the variable is unset. */
static inline const char *tu_shared_path(const char *rel)
{
    static char buf[4096];
    const char *dir = getenv("SIEVE_SHARED_DIR");
    snprintf(buf, sizeof(buf), "%s/%s", dir && *dir ? dir : "../shared", rel);
    return buf;
}

static inline json_t *tu_load_json(const char *rel)
{
    json_error_t e;
    json_t *j = json_load_file(tu_shared_path(rel), 0, &e);
    if (!j)
        fprintf(stderr, "cannot load %s: %s\n", tu_shared_path(rel), e.text);
    return j;
}

#endif
