/*
 * metrics.c - GET /metrics in the Prometheus text exposition format (0.0.4):
 * the engine's counters, gauges and histograms, all named sieve_*.
 */
#include "server/metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *buf;
    size_t len, cap;
    bool oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        const int n = vsnprintf(b->buf ? b->buf + b->len : NULL, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 8192;
        while (cap < b->len + (size_t)n + 1)
            cap *= 2;
        char *nb = realloc(b->buf, cap);
        if (!nb) {
            b->oom = true;
            return;
        }
        b->buf = nb;
        b->cap = cap;
    }
}

static void metric(sbuf *b, const char *name, const char *type, const char *help)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void hist(sbuf *b, const char *name, const char *help, const sched_hist *h)
{
    metric(b, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        sb_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[i], (unsigned long long)cum);
    }
    cum += h->counts[h->n_bounds];
    sb_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    sb_printf(b, "%s_sum %.9g\n%s_count %llu\n", name, h->sum, name, (unsigned long long)h->count);
}

char *srv_metrics_text(const sched_stats *st, const char *model_name, size_t *len)
{
    sbuf b = {0};
    metric(&b, "sieve_model_info", "gauge", "The served model (value 1).");
    sb_printf(&b, "sieve_model_info{model=\"%s\"} 1\n", model_name);
    metric(&b, "sieve_requests_running", "gauge", "Sequences being prefilled or decoded.");
    sb_printf(&b, "sieve_requests_running %d\n", st->running);
    metric(&b, "sieve_requests_waiting", "gauge", "Sequences queued for admission.");
    sb_printf(&b, "sieve_requests_waiting %d\n", st->waiting);
    metric(&b, "sieve_requests_finished_total", "counter",
           "Finished sequences (one per choice) by finish reason.");
    static const char *reasons[SCHED_FINISH_COUNT] = {"none",      "length", "stop",
                                                      "cancelled", "error",  "timeout"};
    for (int i = 1; i < SCHED_FINISH_COUNT; i++)
        sb_printf(&b, "sieve_requests_finished_total{reason=\"%s\"} %llu\n", reasons[i],
                  (unsigned long long)st->finished_by_reason[i]);
    metric(&b, "sieve_prompt_tokens_total", "counter",
           "Prompt tokens computed (prefix-cache hits excluded).");
    sb_printf(&b, "sieve_prompt_tokens_total %llu\n", (unsigned long long)st->prompt_tokens);
    metric(&b, "sieve_generation_tokens_total", "counter", "Tokens generated.");
    sb_printf(&b, "sieve_generation_tokens_total %llu\n", (unsigned long long)st->generated_tokens);
    metric(&b, "sieve_preemptions_total", "counter",
           "Sequences preempted (blocks freed, recomputed later) for lack of KV blocks.");
    sb_printf(&b, "sieve_preemptions_total %llu\n", (unsigned long long)st->preemptions);
    metric(&b, "sieve_engine_steps_total", "counter", "Forward steps run by the engine.");
    sb_printf(&b, "sieve_engine_steps_total %llu\n", (unsigned long long)st->steps);
    metric(&b, "sieve_kv_blocks_total", "gauge", "KV cache blocks in the pool.");
    sb_printf(&b, "sieve_kv_blocks_total %d\n", st->kv_blocks_total);
    metric(&b, "sieve_kv_blocks_used", "gauge", "KV cache blocks referenced by sequences.");
    sb_printf(&b, "sieve_kv_blocks_used %d\n", st->kv_blocks_used);
    metric(&b, "sieve_kv_blocks_cached", "gauge",
           "Unreferenced KV blocks kept for prefix-cache hits (evictable).");
    sb_printf(&b, "sieve_kv_blocks_cached %d\n", st->kv_blocks_cached);
    metric(&b, "sieve_kv_block_size_tokens", "gauge", "Tokens per KV block.");
    sb_printf(&b, "sieve_kv_block_size_tokens %d\n", st->kv_block_size);
    metric(&b, "sieve_kv_bytes_per_token", "gauge", "KV cache bytes per token (all layers).");
    sb_printf(&b, "sieve_kv_bytes_per_token %zu\n", st->kv_bytes_per_token);
    metric(&b, "sieve_kv_bytes_used", "gauge",
           "KV pool bytes held by sequences, by cache format (fp includes prompts not yet "
           "compressed).");
    for (int f = 0; f < RT_KV_N_FORMATS; f++)
        sb_printf(
            &b, "sieve_kv_bytes_used{format=\"%s\"} %llu\n", rt_kv_format_name((rt_kv_format)f),
            (unsigned long long)(st->kv_blocks_by_format[f] * (double)st->kv_block_bytes + 0.5));
    metric(&b, "sieve_prefix_cache_queries_total", "counter",
           "Prompt tokens looked up in the prefix cache.");
    sb_printf(&b, "sieve_prefix_cache_queries_total %llu\n",
              (unsigned long long)st->prefix_query_tokens);
    metric(&b, "sieve_prefix_cache_hits_total", "counter",
           "Prompt tokens whose KV came from the prefix cache.");
    sb_printf(&b, "sieve_prefix_cache_hits_total %llu\n",
              (unsigned long long)st->prefix_hit_tokens);
    static const char *policies[3] = {"dense", "flex", "power"};
    metric(&b, "sieve_prefill_requests_total", "counter",
           "Finished sequences by prefill attention policy.");
    for (int i = 0; i < 3; i++)
        sb_printf(&b, "sieve_prefill_requests_total{policy=\"%s\"} %llu\n", policies[i],
                  (unsigned long long)st->policy_requests[i]);
    metric(&b, "sieve_prefill_blocks_computed_total", "counter",
           "Attention blocks computed under sparse policies (density numerator).");
    for (int i = 1; i < 3; i++)
        sb_printf(&b, "sieve_prefill_blocks_computed_total{policy=\"%s\"} %llu\n", policies[i],
                  (unsigned long long)st->policy_blocks_computed[i]);
    metric(&b, "sieve_prefill_blocks_causal_total", "counter",
           "Causal attention blocks of sequences under sparse policies (density denominator).");
    for (int i = 1; i < 3; i++)
        sb_printf(&b, "sieve_prefill_blocks_causal_total{policy=\"%s\"} %llu\n", policies[i],
                  (unsigned long long)st->policy_blocks_causal[i]);
    hist(&b, "sieve_time_to_first_token_seconds", "Arrival to first generated token.", &st->ttft);
    hist(&b, "sieve_time_per_output_token_seconds",
         "Mean time between generated tokens of a finished sequence.", &st->tpot);
    hist(&b, "sieve_e2e_request_latency_seconds", "Arrival to finish of a sequence.", &st->e2e);
    hist(&b, "sieve_step_duration_seconds", "Duration of one engine step.", &st->step_time);
    hist(&b, "sieve_batch_size_tokens", "Tokens in one engine step.", &st->batch_tokens);
    if (b.oom) {
        free(b.buf);
        return NULL;
    }
    *len = b.len;
    return b.buf;
}
