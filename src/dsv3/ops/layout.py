"""How a decode plan is laid out in the tensors `dsv3::decode_step` / `dsv3::decode_layers` take.

A plan is `weights` (a list of optional tensors) plus `meta` (int64) and `fmeta` (float64) tensors,
per layer in this order (a whole-model plan puts the model's part first). The native library
reports its own copy of these counts (`dsv3::plan_layout`); tests check the two agree.

Layer weights (44): q_a q_b kv_a o (weight, scale, bias each), q_norm kv_norm w_kvb in_norm post_norm,
                    gate up down (3 each: the dense MLP or the shared experts), router router_bias,
                    egate eup edown (3 each: stacked routed experts),
                    q_a q_b kv_a o gate up down packed (fp32 weights packed for the BLAS, `dsv3::pack_linear`,
                    which steps of many rows use; or None)
Layer ints (33):    D H dn dr dv C Rq | kind, group of q_a q_b kv_a o | inter | E n_group topk_group top_k
                    norm_topk | kind, group of gate up down | kind, group of egate eup edown
Layer floats (5):   q_eps kv_eps scale eps route_scale
Model weights (7):  embed inv_freq final_norm head (3) head_packed (the head packed for the BLAS, `dsv3::pack_linear`,
                    which steps of many rows use; or None);  ints (4): head kind, head group, vocab, dr/2;
Model floats (2):   attn_factor final_eps
MTP drafter weights (10): enorm hnorm eh_proj (3) final_norm head (3) draft_ids;  ints (4): eh kind, eh group,
                    head kind, head group;  floats (3): e_eps h_eps final_eps  (then one block, `dsv3::mtp_step`)
"""

LAYER_WEIGHTS, LAYER_INTS, LAYER_FLOATS = 44, 33, 5
MODEL_WEIGHTS, MODEL_INTS, MODEL_FLOATS = 7, 4, 2
MTP_WEIGHTS, MTP_INTS, MTP_FLOATS = 10, 4, 3
LAYOUT = (LAYER_WEIGHTS, LAYER_INTS, LAYER_FLOATS, MODEL_WEIGHTS, MODEL_INTS, MODEL_FLOATS, MTP_WEIGHTS, MTP_INTS,
          MTP_FLOATS)
