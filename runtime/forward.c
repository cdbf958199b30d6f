/*
 * forward.c - one forward step of a Llama-family model over a flat batch.
 *
 * The tokens of every sequence in the batch are stacked into one [T, dim]
 * residual stream, so projections and the FFN are single matrix products over
 * all of them (GEMM for T > 1); attention runs per sequence over its own KV
 * cache. All buffers come from the model's scratch, allocated at load.
 */
#include "runtime/model_internal.h"

#include <stdio.h>
#include <string.h>

/* y = x W^T for a weight of any supported type. */
static void matmul(rt_model *m, float *y, int ldy, const float *x, int ldx, const rt_weight *w,
                   int M, int N, int K)
{
    if (w->type == KERN_TYPE_F32)
        kern_matmul_f32(m->pool, y, ldy, x, ldx, w->data, M, N, K);
    else
        kern_matmul_q(m->pool, w->type, y, ldy, x, ldx, w->data, M, N, K);
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
static int check_batch(const rt_model *m, rt_seq_batch *seqs, int n_seqs, char *err,
                       size_t errlen)
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
        if (!b->pool || !b->blocks || b->n_tokens <= 0 || !b->tokens || b->n_past < 0) {
            snprintf(err, errlen, "forward: sequence %d has no tokens or no cache", i);
            return -1;
        }
        const long slots = (long)b->n_blocks * b->pool->block_size;
        if ((long)b->n_past + b->n_tokens > slots) {
            snprintf(err, errlen, "forward: sequence %d needs %d positions, its cache holds %ld",
                     i, b->n_past + b->n_tokens, slots);
            return -1;
        }
        for (int j = 0; j < b->n_blocks; j++)
            if (b->blocks[j] < 0 || b->blocks[j] >= b->pool->n_blocks) {
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

/* Attention of one sequence in layer l under its policy. The policy's
 * parameters were checked when the request was accepted; a kernel that still
 * refuses them falls back to dense attention, which is always correct. */
static void attend(rt_model *m, const rt_seq_batch *b, int l, const kern_attn_args *a)
{
    const rt_attn_policy *p = b->policy;
    rt_attn_stats *st = b->stats;
    if (p && p->prefill == RT_PREFILL_FLEX) {
        kern_flex_result res;
        if (kern_flexprefill_attention_f32(m->pool, a, &p->flex, m->flex_ws, &res) ==
            KERN_SPARSE_OK) {
            if (st) {
                st->computed += res.blocks.computed;
                st->causal += res.blocks.causal;
                if (res.path == KERN_FLEX_SPARSE)
                    st->sparse_chunks++;
                else
                    st->dense_chunks++;
            }
            return;
        }
    } else if (p && p->prefill == RT_PREFILL_POWER &&
               !kern_power_layer_is_dense(l, p->power_dense_count, p->power_period)) {
        kern_sparse_stats ps = {0, 0};
        if (kern_power_attention_f32(m->pool, a, &p->power, m->mask_bits, m->mask_words, &ps) ==
            KERN_SPARSE_OK) {
            if (st) {
                st->computed += ps.computed;
                st->causal += ps.causal;
                st->sparse_chunks++;
            }
            return;
        }
    }
    kern_attention_f32(m->pool, a);
    if (st && p && p->prefill != RT_PREFILL_DENSE) {
        add_dense_blocks(st, a, p->prefill == RT_PREFILL_FLEX ? p->flex.block_size
                                                                : p->power.block_size);
        st->dense_chunks++;
    }
}

int rt_forward(rt_model *m, rt_seq_batch *seqs, int n_seqs, char *err, size_t errlen)
{
    if (n_seqs <= 0)
        return 0;
    if (check_batch(m, seqs, n_seqs, err, errlen) != 0)
        return -1;
    const rt_hparams *hp = &m->hp;
    rt_scratch *s = &m->s;
    const int dim = hp->dim, hd = hp->head_dim;
    const int qd = hp->n_heads * hd, kvd = hp->n_kv_heads * hd, ffn = hp->ffn_dim;

    /* Embeddings and positions, sequence after sequence. */
    int T = 0;
    for (int i = 0; i < n_seqs; i++) {
        for (int t = 0; t < seqs[i].n_tokens; t++, T++) {
            embed(m, seqs[i].tokens[t], s->x + (size_t)T * dim);
            s->pos[T] = seqs[i].n_past + t;
        }
    }

    for (int l = 0; l < hp->n_layers; l++) {
        const rt_layer *L = &m->layers[l];
        kern_rmsnorm_f32(s->xb, s->x, L->attn_norm, T, dim, hp->norm_eps);
        matmul(m, s->q, qd, s->xb, dim, &L->wq, T, qd, dim);
        matmul(m, s->k, kvd, s->xb, dim, &L->wk, T, kvd, dim);
        matmul(m, s->v, kvd, s->xb, dim, &L->wv, T, kvd, dim);
        if (L->bq) {
            for (int t = 0; t < T; t++) {
                kern_add_f32(s->q + (size_t)t * qd, L->bq, (size_t)qd);
                kern_add_f32(s->k + (size_t)t * kvd, L->bk, (size_t)kvd);
                kern_add_f32(s->v + (size_t)t * kvd, L->bv, (size_t)kvd);
            }
        }
        if (m->rope_inv_freq) {
            kern_rope_table_f32(s->q, s->pos, T, hp->n_heads, hd, hp->rope_dim, m->rope_inv_freq,
                                hp->rope_neox);
            kern_rope_table_f32(s->k, s->pos, T, hp->n_kv_heads, hd, hp->rope_dim,
                                m->rope_inv_freq, hp->rope_neox);
        } else if (hp->rope_neox) {
            kern_rope_neox_f32(s->q, s->pos, T, hp->n_heads, hd, hp->rope_dim, hp->rope_base);
            kern_rope_neox_f32(s->k, s->pos, T, hp->n_kv_heads, hd, hp->rope_dim, hp->rope_base);
        } else {
            kern_rope_f32(s->q, s->pos, T, hp->n_heads, hd, hp->rope_dim, hp->rope_base);
            kern_rope_f32(s->k, s->pos, T, hp->n_kv_heads, hd, hp->rope_dim, hp->rope_base);
        }

        int row = 0;
        for (int i = 0; i < n_seqs; i++) {
            const rt_seq_batch *b = &seqs[i];
            const int n = b->n_tokens;
            const size_t layer_off = (size_t)l * (size_t)b->pool->n_blocks *
                                     (size_t)b->pool->block_size * (size_t)kvd;
            float *kc = b->pool->k + layer_off, *vc = b->pool->v + layer_off;
            for (int t = 0; t < n; t++) {
                const size_t r = slot_row(b, b->n_past + t);
                memcpy(kc + r * kvd, s->k + (size_t)(row + t) * kvd, sizeof(float) * (size_t)kvd);
                memcpy(vc + r * kvd, s->v + (size_t)(row + t) * kvd, sizeof(float) * (size_t)kvd);
            }
            kern_attn_args a = {
                .q = s->q + (size_t)row * qd,
                .k = kc,
                .v = vc,
                .out = s->att + (size_t)row * qd,
                .n_q = n,
                .ctx_len = b->n_past + n,
                .n_heads = hp->n_heads,
                .n_kv_heads = hp->n_kv_heads,
                .head_dim = hd,
                .kv_stride = kvd,
                .blocks = b->blocks,
                .block_size = b->pool->block_size,
            };
            attend(m, b, l, &a);
            row += n;
        }
        matmul(m, s->proj, dim, s->att, qd, &L->wo, T, dim, qd);
        kern_add_f32(s->x, s->proj, (size_t)T * dim);

        kern_rmsnorm_f32(s->xb, s->x, L->ffn_norm, T, dim, hp->norm_eps);
        matmul(m, s->gate, ffn, s->xb, dim, &L->w_gate, T, ffn, dim);
        matmul(m, s->up, ffn, s->xb, dim, &L->w_up, T, ffn, dim);
        kern_swiglu_f32(s->gate, s->gate, s->up, (size_t)T * ffn);
        matmul(m, s->proj, dim, s->gate, ffn, &L->w_down, T, dim, ffn);
        kern_add_f32(s->x, s->proj, (size_t)T * dim);
    }

    /* Logits only for the last token of the sequences that ask for them. */
    int n_out = 0, row = 0;
    for (int i = 0; i < n_seqs; i++) {
        row += seqs[i].n_tokens;
        if (seqs[i].logits)
            kern_rmsnorm_f32(s->last + (size_t)n_out++ * dim, s->x + (size_t)(row - 1) * dim,
                             m->output_norm, 1, dim, hp->norm_eps);
    }
    matmul(m, s->logits, hp->n_vocab, s->last, dim, &m->output, n_out, hp->n_vocab, dim);
    n_out = 0;
    for (int i = 0; i < n_seqs; i++) {
        if (seqs[i].kv)
            seqs[i].kv->len += seqs[i].n_tokens;
        if (seqs[i].logits)
            memcpy(seqs[i].logits, s->logits + (size_t)n_out++ * hp->n_vocab,
                   sizeof(float) * (size_t)hp->n_vocab);
    }
    return 0;
}
