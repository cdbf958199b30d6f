/*
 * forward.c - one forward step of a Llama-family model over a flat batch.
 *
 * The tokens of every sequence in the batch are stacked into one [T, dim]
 * residual stream, so projections and the FFN are single matrix products over
 * all of them (GEMM for T > 1); attention runs per sequence over its own KV
 * cache. All buffers come from the model's scratch, allocated at load.
 *
 * The layers run on the model's tensor-parallel ranks (tp.c; one rank, the
 * whole model, when tp == 1): every rank computes its heads and FFN columns
 * from the same residual stream, writes its kv heads' keys and values into
 * the shared cache (disjoint columns of each slot row), and the partial
 * output and down projections are summed by an all-reduce. The sum is
 * deterministic and identical on every rank, so every rank's residual stream
 * stays the same and no other exchange is needed. The caller's thread
 * (rank 0) embeds the tokens before the layers and computes the logits after.
 */
#include "runtime/model_internal.h"

#include <stdio.h>
#include <string.h>

/* Records a rank's first failure of the step. */
static void rank_fail(rt_rank *rk, const char *what, const char *why)
{
    if (rk->rc != 0)
        return;
    rk->rc = -1;
    snprintf(rk->err, sizeof(rk->err), "%s: %s", what, why);
}

/* y = x W^T for a weight of any supported type, on the rank's pool. F32 rows
 * may be wider than K (a column slice); other types' rows are contiguous. */
static void matmul(rt_rank *rk, float *y, int ldy, const float *x, int ldx, const rt_weight *w,
                   int M, int N, int K)
{
    if (w->type == KERN_TYPE_F32) {
        kern_matmul_f32_ldw(rk->pool, y, ldy, x, ldx, w->data, (int)(w->row_bytes / sizeof(float)),
                            M, N, K);
        return;
    }
    const int rc = kern_matmul_q(rk->pool, w->type, y, ldy, x, ldx, w->data, M, N, K);
    if (rc != 0)
        rank_fail(rk, "matmul", kern_quant_strerror(rc));
}

/* ys[i] = x W_i^T for n weights sharing x: one pass of the pool when they are
 * all F32 and x is a decode batch (fewer dispatches, the matrices streamed
 * back to back), else one product after another. */
static void matmul_group(rt_rank *rk, const float *x, int ldx, int M, int K, int n,
                         float *const ys[], const int ldys[], const rt_weight *const ws[],
                         const int Ns[])
{
    bool f32 = n <= KERN_MATVEC_GROUP_MAX;
    for (int i = 0; i < n && f32; i++)
        f32 = ws[i]->type == KERN_TYPE_F32;
    if (f32) {
        kern_mv_out o[KERN_MATVEC_GROUP_MAX];
        for (int i = 0; i < n; i++)
            o[i] = (kern_mv_out){ys[i], ldys[i], ws[i]->data,
                                 (int)(ws[i]->row_bytes / sizeof(float)), Ns[i]};
        if (kern_matvec_group_f32(rk->pool, x, ldx, M, K, o, n) == 0)
            return;
    }
    for (int i = 0; i < n; i++)
        matmul(rk, ys[i], ldys[i], x, ldx, ws[i], M, Ns[i], K);
}

/* buf[0..n) = its sum over the ranks (nothing with one rank). */
static void allreduce(rt_model *m, rt_rank *rk, float *buf, size_t n)
{
    if (!m->comm)
        return;
    char why[192];
    if (kern_comm_allreduce_sum_f32(m->comm, rk->rank, buf, n, why, sizeof(why)) != 0)
        rank_fail(rk, "all-reduce", why);
}

/* res += x W^T, all ranks' parts summed: the attention output and FFN down
 * projections into the residual stream. One rank with an F32 weight adds the
 * product straight into res; otherwise it goes through buf. */
static void matmul_residual(rt_model *m, rt_rank *rk, float *res, float *buf, const float *x,
                            int ldx, const rt_weight *w, int M, int N, int K)
{
    if (!m->comm && w->type == KERN_TYPE_F32) {
        kern_matmul_f32_acc(rk->pool, res, N, x, ldx, w->data, (int)(w->row_bytes / sizeof(float)),
                            M, N, K);
        return;
    }
    matmul(rk, buf, N, x, ldx, w, M, N, K);
    allreduce(m, rk, buf, (size_t)M * (size_t)N);
    kern_add_f32(res, buf, (size_t)M * N);
}

/* Row `id` of the embedding table as f32. */
static void embed(const rt_model *m, int32_t id, float *out)
{
    const rt_weight *e = &m->tok_embd;
    const char *row = (const char *)e->data + (size_t)id * e->row_bytes;
    if (e->type == KERN_TYPE_F32)
        memcpy(out, row, sizeof(float) * (size_t)m->hp.dim);
    else
        kern_dequant_row(e->type, row, out, (size_t)m->hp.dim);
}

/* Resolves each sequence's cache view: a private rt_kv becomes its one-block
 * pool; then checks every count against what the cache can hold. */
static int check_batch(const rt_model *m, rt_seq_batch *seqs, int n_seqs, char *err, size_t errlen)
{
    long total = 0;
    for (int i = 0; i < n_seqs; i++) {
        rt_seq_batch *b = &seqs[i];
        if (b->kv) {
            b->pool = b->kv->pool;
            b->blocks = &b->kv->block0;
            b->n_blocks = 1;
            b->n_past = b->kv->len;
        }
        /* A compressed sequence without prefix hits may have no fp table. */
        const bool no_table = !b->blocks && b->n_blocks == 0 && b->kvq;
        if (!b->pool || (!b->blocks && !no_table) || b->n_tokens <= 0 || !b->tokens ||
            b->n_past < 0) {
            snprintf(err, errlen, "forward: sequence %d has no tokens or no cache", i);
            return -1;
        }
        const long slots = (long)b->n_blocks * b->pool->block_size;
        /* A compressed sequence's direct steps keep their rows out of fp
         * blocks: its table covers only the positions still in them. */
        const bool fp_rows = !b->kvq || rt_kvq_needs_fp(b->kvq, b->n_tokens);
        if (fp_rows && (long)b->n_past + b->n_tokens > slots) {
            snprintf(err, errlen, "forward: sequence %d needs %d positions, its cache holds %ld", i,
                     b->n_past + b->n_tokens, slots);
            return -1;
        }
        if (b->kvq && (b->kv || m->tp > 1)) {
            snprintf(err, errlen,
                     "forward: sequence %d: a compressed KV cache needs pool blocks "
                     "and tp 1",
                     i);
            return -1;
        }
        /* Blocks starting below the compressed positions may have been
         * released (the rest of such a block is never read as fp). */
        const int nc = b->kvq ? rt_kvq_n_compressed(b->kvq) : 0;
        for (int j = 0; j < b->n_blocks; j++)
            if (((long)j * b->pool->block_size >= nc || b->blocks[j] != -1) &&
                (b->blocks[j] < 0 || b->blocks[j] >= b->pool->n_blocks)) {
                snprintf(err, errlen, "forward: sequence %d: block %d is not in the pool", i,
                         b->blocks[j]);
                return -1;
            }
        for (int t = 0; t < b->n_tokens; t++)
            if (b->tokens[t] < 0 || b->tokens[t] >= m->hp.n_vocab) {
                snprintf(err, errlen, "forward: token id %d is outside the vocabulary [0, %d)",
                         b->tokens[t], m->hp.n_vocab);
                return -1;
            }
        total += b->n_tokens;
    }
    if (total > m->max_batch_tokens) {
        snprintf(err, errlen, "forward: %ld tokens exceed the step limit of %d", total,
                 m->max_batch_tokens);
        return -1;
    }
    return 0;
}

/* Row of the pool's layer holding position pos of a sequence. */
static inline size_t slot_row(const rt_seq_batch *b, int pos)
{
    const int bs = b->pool->block_size;
    return (size_t)b->blocks[pos / bs] * (size_t)bs + (size_t)(pos % bs);
}

/* Block counts of a dense pass over the chunk on a grid of B: every causal
 * block of every head, so dense layers count in the density as computed. */
static void add_dense_blocks(rt_attn_stats *st, const kern_attn_args *a, int B)
{
    const int q0 = (a->ctx_len - a->n_q) / B, q1 = (a->ctx_len - 1) / B;
    int64_t blocks = 0;
    for (int r = q0; r <= q1; r++)
        blocks += r + 1;
    st->computed += blocks * a->n_heads;
    st->causal += blocks * a->n_heads;
}

/* Exact attention. Long prefill chunks go through the block-sparse kernel
 * with every causal block selected: the same result (within rounding), but
 * its query tiles reuse each K/V tile across rows, several times faster than
 * the row-at-a-time kernel; decode and short chunks stay on the latter. */
#define TILED_MIN_ROWS 128
#define TILED_BLOCK 64
static void dense_attention(rt_rank *rk, const kern_attn_args *a)
{
    if (a->n_q >= TILED_MIN_ROWS) {
        kern_block_mask mk;
        if (kern_block_mask_init(&mk, rk->mask_bits, rk->mask_words, TILED_BLOCK, 1, a->ctx_len,
                                 a->n_q) == KERN_SPARSE_OK) {
            kern_block_mask_fill_causal(&mk);
            if (kern_attention_block_sparse_f32(rk->pool, a, &mk) == KERN_SPARSE_OK)
                return;
        }
    }
    kern_attention_f32(rk->pool, a);
}

/* Attention of one sequence in layer l under its policy, over the rank's
 * heads; counts go to st. The policy's parameters were checked when the
 * request was accepted; a kernel that still refuses them falls back to dense
 * attention, which is always correct. Both sparse kernels select blocks per
 * head (FlexPrefill merges only within a kv group, which a rank holds whole),
 * so a rank's selection is the one the whole model would make for its heads. */
static void attend(rt_rank *rk, const rt_seq_batch *b, int l, const kern_attn_args *a,
                   rt_attn_stats *st)
{
    const rt_attn_policy *p = b->policy;
    if (p && p->prefill == RT_PREFILL_FLEX) {
        kern_flex_result res;
        if (kern_flexprefill_attention_f32(rk->pool, a, &p->flex, rk->flex_ws, &res) ==
            KERN_SPARSE_OK) {
            st->computed += res.blocks.computed;
            st->causal += res.blocks.causal;
            if (res.path == KERN_FLEX_SPARSE)
                st->sparse_chunks++;
            else
                st->dense_chunks++;
            return;
        }
    } else if (p && p->prefill == RT_PREFILL_POWER &&
               !kern_power_layer_is_dense(l, p->power_dense_count, p->power_period)) {
        kern_sparse_stats ps = {0, 0};
        if (kern_power_attention_f32(rk->pool, a, &p->power, rk->mask_bits, rk->mask_words, &ps) ==
            KERN_SPARSE_OK) {
            st->computed += ps.computed;
            st->causal += ps.causal;
            st->sparse_chunks++;
            return;
        }
    }
    dense_attention(rk, a);
    if (p && p->prefill != RT_PREFILL_DENSE) {
        add_dense_blocks(st, a,
                         p->prefill == RT_PREFILL_FLEX ? p->flex.block_size : p->power.block_size);
        st->dense_chunks++;
    }
}

/* RoPE on n_heads heads of each of T rows at positions pos. */
static void rope(const rt_model *m, float *x, const int32_t *pos, int T, int n_heads)
{
    const rt_hparams *hp = &m->hp;
    if (m->rope_inv_freq)
        kern_rope_table_f32(x, pos, T, n_heads, hp->head_dim, hp->rope_dim, m->rope_inv_freq,
                            hp->rope_neox);
    else if (hp->rope_neox)
        kern_rope_neox_f32(x, pos, T, n_heads, hp->head_dim, hp->rope_dim, hp->rope_base);
    else
        kern_rope_f32(x, pos, T, n_heads, hp->head_dim, hp->rope_dim, hp->rope_base);
}

/* Row-wise elementwise work of a prompt chunk, split over the rank's pool
 * (each row's result is the same whichever thread computes it). A decode
 * step's few rows stay on the caller: a dispatch would cost more. */
enum { ROWS_RMSNORM, ROWS_SWIGLU, ROWS_ROPE };
#define ROWS_PARALLEL_MIN 16

typedef struct {
    const rt_model *m;
    int op, n, n_heads; /* n: floats per row */
    float *out;
    const float *x, *y; /* rmsnorm: x, weights; swiglu: gate, up */
    const int32_t *pos;
    int rows;
} rows_job;

static void rows_run(const rows_job *j, int r0, int r1)
{
    const size_t off = (size_t)r0 * (size_t)j->n;
    switch (j->op) {
    case ROWS_RMSNORM:
        kern_rmsnorm_f32(j->out + off, j->x + off, j->y, r1 - r0, j->n, j->m->hp.norm_eps);
        break;
    case ROWS_SWIGLU:
        kern_swiglu_f32(j->out + off, j->x + off, j->y + off, (size_t)(r1 - r0) * (size_t)j->n);
        break;
    default:
        rope(j->m, j->out + off, j->pos + r0, r1 - r0, j->n_heads);
        break;
    }
}

static void rows_task(void *ctx, int t, int n_tasks)
{
    const rows_job *j = ctx;
    rows_run(j, (int)((long)j->rows * t / n_tasks), (int)((long)j->rows * (t + 1) / n_tasks));
}

static void par_rows(rt_rank *rk, const rows_job *j)
{
    const int threads = kern_pool_size(rk->pool);
    if (j->rows < ROWS_PARALLEL_MIN || threads < 2)
        rows_run(j, 0, j->rows);
    else
        kern_pool_run(rk->pool, rows_task, (void *)j, threads);
}

static void par_rmsnorm(const rt_model *m, rt_rank *rk, float *out, const float *x, const float *w,
                        int rows)
{
    const rows_job j = {
        .m = m, .op = ROWS_RMSNORM, .n = m->hp.dim, .out = out, .x = x, .y = w, .rows = rows};
    par_rows(rk, &j);
}

/* gate = silu(gate) * up over rows of n. */
static void par_swiglu(const rt_model *m, rt_rank *rk, float *gate, const float *up, int rows,
                       int n)
{
    const rows_job j = {
        .m = m, .op = ROWS_SWIGLU, .n = n, .out = gate, .x = gate, .y = up, .rows = rows};
    par_rows(rk, &j);
}

/* RoPE in place on rows of n_heads heads. */
static void par_rope(const rt_model *m, rt_rank *rk, float *x, const int32_t *pos, int rows,
                     int n_heads)
{
    const rows_job j = {.m = m,
                        .op = ROWS_ROPE,
                        .n = n_heads * m->hp.head_dim,
                        .n_heads = n_heads,
                        .out = x,
                        .pos = pos,
                        .rows = rows};
    par_rows(rk, &j);
}

/* Query rows of sequence b in the last layer. Only the last row of a sequence
 * that wants logits is read after it; every other row needs its K and V alone
 * (they go to the cache). A sequence with a compressed cache keeps every row:
 * its packing scores probe rows in every layer. */
static int last_layer_rows(const rt_seq_batch *b)
{
    return b->kvq ? b->n_tokens : b->logits ? 1 : 0;
}

void rt_forward_rank(rt_model *m, rt_rank *rk)
{
    const rt_hparams *hp = &m->hp;
    const rt_seq_batch *seqs = m->step_seqs;
    const int n_seqs = m->step_n_seqs, T = m->step_T;
    rt_scratch *s = &rk->s;
    const int dim = hp->dim, hd = hp->head_dim, kv_full = hp->n_kv_heads * hd;
    const int qd = rk->n_h * hd, kvd = rk->n_kvh * hd, ffn = rk->n_f;
    const size_t kv_off = (size_t)rk->kvh0 * (size_t)hd; /* the rank's columns of a KV row */

    rk->rc = 0;
    rk->err[0] = 0;
    memset(rk->stats, 0, sizeof(rt_attn_stats) * (size_t)n_seqs);
    /* Rank 0 embedded the tokens; it writes its stream again only after the
     * first all-reduce, which every rank reaches after this copy. */
    if (rk->rank != 0)
        memcpy(s->x, m->ranks[0].s.x, sizeof(float) * (size_t)T * (size_t)dim);

    for (int l = 0; l < hp->n_layers; l++) {
        const rt_layer *L = &rk->layers[l];
        const bool last = l == hp->n_layers - 1;
        par_rmsnorm(m, rk, s->xb, s->x, L->attn_norm, T);
        /* The last layer carries only the rows read after it past K and V
         * (a prompt chunk without logits: none), gathered in order. */
        int Tq = T;
        const float *xq = s->xb;
        const int32_t *qpos = m->pos;
        if (last) {
            int row = 0;
            Tq = 0;
            for (int i = 0; i < n_seqs; i++) {
                const int n = seqs[i].n_tokens, nq = last_layer_rows(&seqs[i]);
                for (int t = n - nq; t < n; t++)
                    s->rows[Tq++] = row + t;
                row += n;
            }
            if (Tq < T) {
                for (int r = 0; r < Tq; r++) {
                    memcpy(s->proj + (size_t)r * dim, s->xb + (size_t)s->rows[r] * dim,
                           sizeof(float) * (size_t)dim);
                    s->pos[r] = m->pos[s->rows[r]];
                }
                xq = s->proj;
                qpos = s->pos;
            }
        }
        {
            float *const ys[3] = {s->k, s->v, s->q};
            const int ldys[3] = {kvd, kvd, qd}, Ns[3] = {kvd, kvd, qd};
            const rt_weight *const ws[3] = {&L->wk, &L->wv, &L->wq};
            if (Tq == T) {
                matmul_group(rk, s->xb, dim, T, dim, 3, ys, ldys, ws, Ns);
            } else {
                matmul_group(rk, s->xb, dim, T, dim, 2, ys, ldys, ws, Ns);
                if (Tq > 0)
                    matmul(rk, s->q, qd, xq, dim, &L->wq, Tq, qd, dim);
            }
        }
        if (L->bq) {
            for (int t = 0; t < Tq; t++)
                kern_add_f32(s->q + (size_t)t * qd, L->bq, (size_t)qd);
            for (int t = 0; t < T; t++) {
                kern_add_f32(s->k + (size_t)t * kvd, L->bk, (size_t)kvd);
                kern_add_f32(s->v + (size_t)t * kvd, L->bv, (size_t)kvd);
            }
        }
        par_rope(m, rk, s->q, qpos, Tq, rk->n_h);
        par_rope(m, rk, s->k, m->pos, T, rk->n_kvh);

        int row = 0, qrow = 0;
        for (int i = 0; i < n_seqs; i++) {
            const rt_seq_batch *b = &seqs[i];
            const int n = b->n_tokens, nq = last ? last_layer_rows(b) : n;
            const size_t layer_off = (size_t)l * (size_t)b->pool->n_blocks *
                                     (size_t)b->pool->block_size * (size_t)kv_full;
            float *kc = b->pool->k + layer_off + kv_off, *vc = b->pool->v + layer_off + kv_off;
            const bool fp_rows = !b->kvq || rt_kvq_needs_fp(b->kvq, n);
            for (int t = 0; fp_rows && t < n; t++) {
                const size_t r = slot_row(b, b->n_past + t);
                memcpy(kc + r * kv_full, s->k + (size_t)(row + t) * kvd,
                       sizeof(float) * (size_t)kvd);
                memcpy(vc + r * kv_full, s->v + (size_t)(row + t) * kvd,
                       sizeof(float) * (size_t)kvd);
            }
            row += n;
            if (nq == 0)
                continue;
            kern_attn_args a = {
                .q = s->q + (size_t)qrow * qd,
                .k = kc,
                .v = vc,
                .out = s->att + (size_t)qrow * qd,
                .n_q = nq,
                .ctx_len = b->n_past + n,
                .n_heads = rk->n_h,
                .n_kv_heads = rk->n_kvh,
                .head_dim = hd,
                .kv_stride = kv_full,
                .blocks = b->blocks,
                .block_size = b->pool->block_size,
            };
            qrow += nq;
            if (b->kvq) {
                /* The compressed cache attends over its pages (and any fp
                 * rows), or hands back f32 rows for the exact or sparse
                 * kernel; then it scores and packs what the step's plan says,
                 * the new rows straight from the scratch. */
                const float *kn = s->k + (size_t)(row - n) * kvd,
                            *vn = s->v + (size_t)(row - n) * kvd;
                char why[200];
                kern_attn_args dense;
                int krc = rt_kvq_attend(b->kvq, rk->pool, l, &a, kn, vn, &rk->kvq_ws, &dense, why,
                                        sizeof(why));
                if (krc == 1) {
                    attend(rk, b, l, &dense, &rk->stats[i]);
                    krc = 0;
                }
                if (krc == 0)
                    krc = rt_kvq_after_attention(b->kvq, rk->pool, l, &a, kn, vn, &rk->kvq_ws, why,
                                                 sizeof(why));
                if (krc != 0)
                    rank_fail(rk, "compressed KV", why);
            } else {
                attend(rk, b, l, &a, &rk->stats[i]);
            }
        }
        if (Tq < T) {
            /* The residual stream keeps the same rows as the queries. Every
             * rank compacts alike, so the all-reduces below agree. */
            for (int r = 0; r < Tq; r++)
                if (s->rows[r] != r)
                    memcpy(s->x + (size_t)r * dim, s->x + (size_t)s->rows[r] * dim,
                           sizeof(float) * (size_t)dim);
            if (Tq == 0)
                break;
        }
        matmul_residual(m, rk, s->x, s->proj, s->att, qd, &L->wo, Tq, dim, qd);

        par_rmsnorm(m, rk, s->xb, s->x, L->ffn_norm, Tq);
        {
            float *const ys[2] = {s->gate, s->up};
            const int ld[2] = {ffn, ffn};
            const rt_weight *const ws[2] = {&L->w_gate, &L->w_up};
            matmul_group(rk, s->xb, dim, Tq, dim, 2, ys, ld, ws, ld);
        }
        par_swiglu(m, rk, s->gate, s->up, Tq, ffn);
        matmul_residual(m, rk, s->x, s->proj, s->gate, ffn, &L->w_down, Tq, dim, ffn);
    }
}

/* Adds the step's attention counts of every rank to the sequences' stats:
 * blocks summed over the ranks' heads, chunks counted once (every rank takes
 * the same path: it depends on the chunk's shape, not on heads). */
static void merge_stats(rt_model *m, rt_seq_batch *seqs, int n_seqs)
{
    for (int i = 0; i < n_seqs; i++) {
        rt_attn_stats *st = seqs[i].stats;
        if (!st)
            continue;
        for (int r = 0; r < m->tp; r++) {
            st->computed += m->ranks[r].stats[i].computed;
            st->causal += m->ranks[r].stats[i].causal;
        }
        st->dense_chunks += m->ranks[0].stats[i].dense_chunks;
        st->sparse_chunks += m->ranks[0].stats[i].sparse_chunks;
    }
}

int rt_forward(rt_model *m, rt_seq_batch *seqs, int n_seqs, char *err, size_t errlen)
{
    if (n_seqs <= 0)
        return 0;
    if (check_batch(m, seqs, n_seqs, err, errlen) != 0)
        return -1;
    if (m->cuda) /* the whole step on the GPU (forward_cuda.c) */
        return rt_cuda_forward(m, seqs, n_seqs, err, errlen);
    const rt_hparams *hp = &m->hp;
    rt_rank *r0 = &m->ranks[0];
    const int dim = hp->dim;

    /* Embeddings and positions, sequence after sequence. */
    int T = 0;
    for (int i = 0; i < n_seqs; i++) {
        for (int t = 0; t < seqs[i].n_tokens; t++, T++) {
            embed(m, seqs[i].tokens[t], r0->s.x + (size_t)T * dim);
            m->pos[T] = seqs[i].n_past + t;
        }
    }
    for (int i = 0; i < n_seqs; i++)
        if (seqs[i].kvq &&
            rt_kvq_begin_step(seqs[i].kvq, seqs[i].n_past, seqs[i].n_tokens, err, errlen) != 0) {
            for (int j = 0; j < i; j++)
                if (seqs[j].kvq)
                    rt_kvq_end_step(seqs[j].kvq, false);
            return -1;
        }
    m->step_seqs = seqs;
    m->step_n_seqs = n_seqs;
    m->step_T = T;
    const int rc = rt_tp_run_step(m, err, errlen);
    m->step_seqs = NULL;
    for (int i = 0; i < n_seqs; i++)
        if (seqs[i].kvq)
            rt_kvq_end_step(seqs[i].kvq, rc == 0);
    if (rc != 0)
        return -1;
    merge_stats(m, seqs, n_seqs);

    /* Logits only for the last token of the sequences that ask for them; the
     * residual stream holds the last layer's rows (last_layer_rows). */
    int n_out = 0, row = 0;
    for (int i = 0; i < n_seqs; i++) {
        row += last_layer_rows(&seqs[i]);
        if (seqs[i].logits)
            kern_rmsnorm_f32(m->last + (size_t)n_out++ * dim, r0->s.x + (size_t)(row - 1) * dim,
                             m->output_norm, 1, dim, hp->norm_eps);
    }
    matmul(r0, m->logits, hp->n_vocab, m->last, dim, &m->output, n_out, hp->n_vocab, dim);
    if (r0->rc != 0) {
        snprintf(err, errlen, "forward: logits: %s", r0->err);
        return -1;
    }
    n_out = 0;
    for (int i = 0; i < n_seqs; i++) {
        if (seqs[i].kv)
            seqs[i].kv->len += seqs[i].n_tokens;
        if (seqs[i].logits)
            memcpy(seqs[i].logits, m->logits + (size_t)n_out++ * hp->n_vocab,
                   sizeof(float) * (size_t)hp->n_vocab);
    }
    return 0;
}
