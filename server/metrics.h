/*
 * metrics.h - Prometheus text for GET /metrics. Private to server/.
 */
#ifndef SIEVE_SERVER_METRICS_H
#define SIEVE_SERVER_METRICS_H

#include <stddef.h>

#include "scheduler/scheduler.h"

/* The exposition text (malloc-ed, caller frees), or NULL when out of memory. */
char *srv_metrics_text(const sched_stats *st, const char *model_name, size_t *len);

#endif
