/* The plan a whole decode step reads: one LayerPlan per transformer block, one ModelPlan around them.
 * Built per call from tensors by ops.cpp (the registered `dsv3::decode_step` / `dsv3::decode_layers`). */
#pragma once
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif

/* One transformer block: pre-norm MLA, then a dense SwiGLU MLP or routed + shared experts. */
typedef struct {
    MLADims mla;
    Lin q_a, q_b, kv_a, o;
    const float *q_norm, *kv_norm, *w_kvb;
    const float *in_norm, *post_norm;
    float eps;
    Lin gate, up, down;                   /* the dense MLP, or the shared experts */
    long inter;                           /* their intermediate size (0: no shared experts) */
    const float *router, *router_bias;    /* E > 0: a MoE layer with the noaux_tc router */
    long E, n_group, topk_group, top_k, norm_topk;
    float route_scale;
    Lin egate, eup, edown;                /* routed experts, with expert strides */
    long einter;
} LayerPlan;

/* What a whole step needs besides the blocks: the embedding, the rotary frequencies, the final norm, the head. */
typedef struct {
    const float *embed;                /* [vocab, D] fp32 */
    const float *inv_freq;             /* [dr/2]: cos/sin(position * inv_freq) * attn_factor, as RotaryEmbedding */
    float attn_factor, final_eps;
    const float *final_norm;
    Lin head;                          /* the LM head (any kind) */
    const void *head_packed;           /* fp32 head packed for the BLAS (batched steps), or NULL */
    long vocab, half;
} ModelPlan;

#define BATCH_ROWS 8 /* steps of more rows (fp32 weights) run batch.c: every projection a BLAS GEMM */
int batch_ok(const LayerPlan *layers, long L, const Lin *head);
long batch_layers_scratch(const LayerPlan *layers, long L, long M);
void batch_layers(const LayerPlan *layers, long L, float *const *caches, float *x, long M, const float *cos,
                  const float *sin, const int64_t *slot_mapping, const int64_t *key_slots, const uint8_t *key_mask,
                  long S, float *scratch, int threads);
long decode_layers_scratch(const LayerPlan *layers, long L, long M, long S);
void decode_layers(const LayerPlan *layers, long L, float *const *caches, float *x, long M, const float *cos,
                   const float *sin, const int64_t *slot_mapping, const int64_t *key_slots, const uint8_t *key_mask,
                   long S, float *scratch, int threads);
long decode_step_scratch(const ModelPlan *mp, const LayerPlan *layers, long L, long M, long S);
long decode_step(const ModelPlan *mp, const LayerPlan *layers, long L, float *const *caches, const int64_t *ids,
                 const int64_t *positions, long start, long T, long M, const int64_t *slot_mapping,
                 const int64_t *key_slots, const uint8_t *key_mask, long S, float *hidden, float *logits,
                 float *scratch, int threads);

/* The MTP module as a greedy drafter (spec.c): enorm/hnorm, eh_proj, one block, its output norm, a draft head. */
typedef struct {
    LayerPlan block;
    const float *enorm, *hnorm, *final_norm;
    float e_eps, h_eps, final_eps;
    Lin eh;                     /* eh_proj [D, 2D] */
    Lin head;                   /* the draft head [vocab, D]: the LM head, or its rows for a reduced vocabulary */
    const int64_t *draft_ids;   /* token id of each head row (NULL: row r is token r) */
    long vocab;                 /* the draft head's rows */
} MTPPlan;

long mtp_step_scratch(const ModelPlan *mp, const LayerPlan *layers, long L, const MTPPlan *tp, long B, long K, long S);
long mtp_step(const ModelPlan *mp, const LayerPlan *layers, long L, float *const *caches, const MTPPlan *tp,
              float *mcache, const int64_t *ids, const int64_t *starts, const int64_t *block_tables, long W, long bs,
              long B, long K, float *hidden, float *logits, int64_t *tokens, int64_t *drafts, float *scratch,
              int threads);
#ifdef __cplusplus
}
#endif
