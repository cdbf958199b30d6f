/*
 * main.c - sieve's entry point: configuration, model, engine, HTTP server.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "config/config.h"
#include "runtime/model.h"
#include "scheduler/scheduler.h"
#include "server/server.h"

int main(int argc, char **argv)
{
    cfg_config cfg;
    cfg_defaults(&cfg);
    char err[1024];
    int rc = cfg_parse_args(&cfg, argc, argv, err, sizeof(err));
    if (rc == 1)
        return 0;
    if (rc != 0) {
        fprintf(stderr, "sieve: %s\n", err);
        return 2;
    }
    if (cfg.threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        cfg.threads = n > 0 ? (int)n : 1;
    }
    rt_model_opts mo = {.n_threads = cfg.threads,
                        .max_batch_tokens = cfg.max_batch_tokens,
                        .n_ctx = cfg.context_length};
    rt_model *model = NULL;
    double t0 = sched_now();
    if (rt_model_load(&model, cfg.model, &mo, err, sizeof(err)) != 0) {
        fprintf(stderr, "sieve: cannot load model '%s': %s\n", cfg.model, err);
        return 1;
    }
    const rt_hparams *hp = rt_model_hparams(model);
    fprintf(stderr,
            "sieve: loaded %s (%s, %d layers, dim %d, %d heads / %d kv, vocab %d, ctx %d) "
            "in %.2f s; backend cpu, %d threads\n",
            cfg.model, hp->arch, hp->n_layers, hp->dim, hp->n_heads, hp->n_kv_heads, hp->n_vocab,
            rt_model_n_ctx(model), sched_now() - t0, cfg.threads);
    sched_opts so = {.max_running_seqs = cfg.max_running_seqs,
                     .max_waiting = cfg.max_waiting,
                     .kv_cache_bytes = cfg.kv_cache_bytes,
                     .kv_block_size = cfg.kv_block_size,
                     .prefix_caching = cfg.prefix_caching};
    sched_engine *engine = sched_engine_create(model, &so, err, sizeof(err));
    if (!engine) {
        fprintf(stderr, "sieve: cannot start the engine: %s\n", err);
        rt_model_destroy(model);
        return 1;
    }
    sched_stats st;
    sched_engine_stats(engine, &st);
    fprintf(stderr, "sieve: KV cache %d blocks of %d tokens (%.1f MiB, %d tokens), prefix caching %s\n",
            st.kv_blocks_total, st.kv_block_size,
            (double)st.kv_blocks_total * st.kv_block_size * (double)st.kv_bytes_per_token / 1048576.0,
            st.kv_blocks_total * st.kv_block_size, cfg.prefix_caching ? "on" : "off");
    srv_server *srv = NULL;
    if (srv_create(&srv, &cfg, model, engine, err, sizeof(err)) != 0) {
        fprintf(stderr, "sieve: %s\n", err);
        sched_engine_destroy(engine);
        rt_model_destroy(model);
        return 1;
    }
    rc = srv_run(srv);
    srv_destroy(srv);
    sched_engine_destroy(engine);
    rt_model_destroy(model);
    fprintf(stderr, "sieve: stopped\n");
    return rc;
}
