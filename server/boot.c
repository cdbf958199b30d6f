/*
 * boot.c - loads the model and starts the engine, off the loop thread, with a
 * progress line for large models. Separate from http.c so that the loop keeps
 * answering /health ("loading") while this runs.
 */
#include "server/boot.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void print_progress(void *ctx, float frac)
{
    int *last = ctx;
    const int pct = (int)(frac * 100.0f);
    if (pct >= *last + 10 || (pct == 100 && *last != 100)) {
        *last = pct;
        fprintf(stderr, "sieve: loading weights %d%%\n", pct);
    }
}

int srv_boot_model(const cfg_config *cfg, rt_model **model_out, sched_engine **engine_out,
                   char *err, size_t errlen)
{
    *model_out = NULL;
    *engine_out = NULL;
    int threads = cfg->threads;
    if (threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n > 0 ? (int)n : 1;
    }
    /* The backend, before anything loads: a GPU when the configuration allows
     * one and one is usable, else the CPU, with the reason on one line. */
    int ids[CFG_DEVICES_MAX];
    const rt_device_request dr = {
        .pref = strcmp(cfg->device, "cpu") == 0    ? RT_DEVICE_CPU
                : strcmp(cfg->device, "cuda") == 0 ? RT_DEVICE_CUDA
                                                   : RT_DEVICE_AUTO,
        .devices = ids,
        .n_devices = cfg_devices(cfg, ids, CFG_DEVICES_MAX),
        .tp = cfg->tensor_parallel_size,
    };
    rt_backend_choice bc;
    if (rt_backend_select(&dr, &bc, err, errlen) != 0)
        return -1;
    fprintf(stderr, "sieve: backend %s\n", bc.why);
    int last = -10;
    rt_model_opts mo = {.n_threads = threads,
                        .max_batch_tokens = cfg->max_batch_tokens,
                        .n_ctx = cfg->context_length,
                        .progress = print_progress,
                        .progress_ctx = &last,
                        .tp = cfg->tensor_parallel_size,
                        .backend = bc.backend,
                        .device = bc.device,
                        .devices = bc.n_devices > 0 ? bc.devices : NULL,
                        .cuda_graphs_off = !cfg->cuda_graphs};
    rt_model *model = NULL;
    const double t0 = sched_now();
    char inner[768];
    if (rt_model_load(&model, cfg->model, &mo, inner, sizeof(inner)) != 0) {
        snprintf(err, errlen, "cannot load model '%s': %s", cfg->model, inner);
        return -1;
    }
    const rt_hparams *hp = rt_model_hparams(model);
    fprintf(stderr,
            "sieve: loaded %s (%s, %d layers, dim %d, %d heads / %d kv, vocab %d, ctx %d) "
            "in %.2f s; backend %s, %d threads, tensor parallel %d\n",
            cfg->model, hp->arch, hp->n_layers, hp->dim, hp->n_heads, hp->n_kv_heads, hp->n_vocab,
            rt_model_n_ctx(model), sched_now() - t0, rt_backend_name(rt_model_backend(model)),
            threads, cfg->tensor_parallel_size);
    sched_opts so = {.max_running_seqs = cfg->max_running_seqs,
                     .max_waiting = cfg->max_waiting,
                     .kv_cache_bytes = cfg->kv_cache_bytes,
                     .kv_block_size = cfg->kv_block_size,
                     .prefix_caching = cfg->prefix_caching};
    sched_engine *engine = sched_engine_create(model, &so, inner, sizeof(inner));
    if (!engine) {
        snprintf(err, errlen, "cannot start the engine: %s", inner);
        rt_model_destroy(model);
        return -1;
    }
    sched_stats st;
    sched_engine_stats(engine, &st);
    fprintf(
        stderr, "sieve: KV cache %d blocks of %d tokens (%.1f MiB, %d tokens), prefix caching %s\n",
        st.kv_blocks_total, st.kv_block_size,
        (double)st.kv_blocks_total * st.kv_block_size * (double)st.kv_bytes_per_token / 1048576.0,
        st.kv_blocks_total * st.kv_block_size, cfg->prefix_caching ? "on" : "off");
    *model_out = model;
    *engine_out = engine;
    return 0;
}
