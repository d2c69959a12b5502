// The native CPU kernels as PyTorch operators: the CPU implementations of the `dsv3::` ops whose
// schemas `dsv3/ops/schemas.py` declares. PyTorch compares each function's C++ signature with the
// declared schema when this library loads, so the two cannot drift apart; every op checks devices,
// dtypes, shapes and strides before it hands raw pointers to the C kernels (decode.c, mla.c,
// step.c), and builds their descriptor structs (`Lin`, `LayerPlan`, `ModelPlan`) itself from the
// tensors it is given -- nothing on the Python side mirrors a C struct.
//
// A linear layer crosses as three optional tensors and two ints: (weight, scale, bias), (kind,
// group) -- kind 0: fp32 [N, K]; 1: int8 [N, K] with an fp32 scale per row; 2: int4 in 32-value
// blocks, uint8 [N, K/2] with fp32 scale and bias per (row, group). Stacked experts add a leading
// [E] dimension; the expert stride is read from the tensor.
#define restrict __restrict
#include "step.h"

#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

using at::Tensor;
using c10::optional;

// The C kernels' GEMM (common.h): the Fortran `sgemm_` of the BLAS this PyTorch build links (MKL on x86 wheels),
// found in libtorch_cpu's dependency tree at first use; without one, at::mm on views of the same memory.
using SgemmFn = void (*)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);

static void *blas_symbol(const char *name) {
  const char *off = getenv("DSV3_BLAS");  // "0": as a build without these symbols (tests the fallbacks)
  if (off && strcmp(off, "0") == 0) return nullptr;
  Dl_info info;
  if (!dladdr((void *)&at::get_num_threads, &info) || !info.dli_fname) return nullptr;
  void *lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  return lib ? dlsym(lib, name) : nullptr;
}

static SgemmFn find_sgemm() { return (SgemmFn)blas_symbol("sgemm_"); }

// MKL's packed GEMM (cblas_sgemm_pack / _compute; CBLAS enums: row-major 101, no-trans 111, trans 112, B 162,
// packed 151): a weight packed once into the kernel's own panel layout is not re-packed by every call, which cost
// the 64-row LM head a third of its time. Other BLAS builds have none of the three: `pack_linear` gives no bytes.
struct PackedGemm {
  size_t (*size)(int, int, int, int) = nullptr;
  void (*pack)(int, int, int, int, int, int, float, const float *, int, float *) = nullptr;
  void (*compute)(int, int, int, int, int, int, const float *, int, const float *, int, float, float *, int) = nullptr;
  bool ok() const { return size && pack && compute; }
};

static const PackedGemm &packed_gemm() {
  static const PackedGemm g = [] {
    PackedGemm p;
    p.size = (decltype(p.size))blas_symbol("cblas_sgemm_pack_get_size");
    p.pack = (decltype(p.pack))blas_symbol("cblas_sgemm_pack");
    p.compute = (decltype(p.compute))blas_symbol("cblas_sgemm_compute");
    return p;
  }();
  return g;
}

constexpr int kPackRows = 64;  // the row count packs are made for (MKL's layout does not depend on it; tests check)

// y[M, N] = x[M, K] · Wᵀ for W packed by `pack_linear` (row-major, as `mm_nt`).
extern "C" void dsv3_sgemm_packed(long M, long N, long K, const float *x, const void *packed, float *y) {
  packed_gemm().compute(101, 111, 151, (int)M, (int)N, (int)K, x, (int)K, (const float *)packed, (int)K, 0.f, y,
                        (int)N);
}

extern "C" void dsv3_sgemm(int ta, int tb, long m, long n, long k, float alpha, const float *a, long lda,
                           const float *b, long ldb, float beta, float *c, long ldc) {
  static const SgemmFn sgemm = find_sgemm();
  if (m <= 0 || n <= 0) return;
  if (sgemm && m < INT32_MAX && n < INT32_MAX && k < INT32_MAX && lda < INT32_MAX && ldb < INT32_MAX && ldc < INT32_MAX) {
    const int M = (int)m, N = (int)n, K = (int)k, LA = (int)lda, LB = (int)ldb, LC = (int)ldc;
    sgemm(ta ? "T" : "N", tb ? "T" : "N", &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
    return;
  }
  const auto f = at::TensorOptions().dtype(at::kFloat);
  Tensor A = ta ? at::from_blob((void *)a, {m, k}, {lda, 1}, f) : at::from_blob((void *)a, {m, k}, {1, lda}, f);
  Tensor B = tb ? at::from_blob((void *)b, {k, n}, {ldb, 1}, f) : at::from_blob((void *)b, {k, n}, {1, ldb}, f);
  Tensor C = at::from_blob(c, {m, n}, {1, ldc}, f);
  Tensor r = at::mm(A, B);
  if (beta == 0.f) C.copy_(r.mul_(alpha));
  else C.mul_(beta).add_(r, alpha);
}

namespace {

constexpr int64_t kMaxExperts = 1024, kMaxGroups = 64;  // route_noaux's stack arrays
constexpr int64_t kGroupedRows = 8;  // `moe` with more tokens sorts them by expert (grouped.c), fewer go token by token

void check_cpu(const Tensor &t, const char *op, const char *what) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got ", t.device());
}

void check_f32(const Tensor &t, const char *op, const char *what) {
  check_cpu(t, op, what);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ", t.scalar_type());
}

void check_contig(const Tensor &t, const char *op, const char *what) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
}

// The i-th linear of `lins` (three entries each) with kinds/groups from `meta` (two entries each).
// `stacked`: a [E, ...] expert stack (each expert's matrix contiguous; experts `stride(0)` apart).
Lin make_lin(const c10::List<optional<Tensor>> &lins, c10::IntArrayRef meta, size_t i, int64_t K, bool stacked,
             const char *op) {
  TORCH_CHECK(lins.size() >= 3 * (i + 1) && meta.size() >= 2 * (i + 1), op, ": linear ", i, " is missing");
  const optional<Tensor> w = lins.get(3 * i), s = lins.get(3 * i + 1), b = lins.get(3 * i + 2);
  const int64_t kind = meta[2 * i], group = meta[2 * i + 1];
  TORCH_CHECK(w.has_value(), op, ": linear ", i, " has no weight");
  const Tensor &W = *w;
  check_cpu(W, op, "a weight");
  const int64_t dims = stacked ? 3 : 2;
  TORCH_CHECK(W.dim() == dims, op, ": linear ", i, " weight must have ", dims, " dims, got ", W.dim());
  TORCH_CHECK(W.stride(-1) == 1 && W.stride(-2) == W.size(-1), op, ": linear ", i, " rows must be contiguous");
  Lin L{};
  L.w = W.data_ptr();
  L.kind = kind;
  L.group = group;
  if (kind == 0 || kind == 1) {
    TORCH_CHECK(W.size(-1) == K, op, ": linear ", i, " takes ", W.size(-1), " inputs, the op has ", K);
    TORCH_CHECK(W.scalar_type() == (kind == 0 ? at::kFloat : at::kChar), op, ": linear ", i, " of kind ", kind,
                " must be ", kind == 0 ? "float32" : "int8", ", got ", W.scalar_type());
    L.ew = stacked ? W.stride(0) * W.element_size() : 0;
    if (kind == 1) {
      TORCH_CHECK(s.has_value(), op, ": int8 linear ", i, " needs a scale");
      check_f32(*s, op, "an int8 scale");
      TORCH_CHECK(s->size(-1) == W.size(-2) && s->stride(-1) == 1, op, ": int8 scale must hold one value per row");
      L.scale = s->data_ptr<float>();
      L.es = stacked ? s->stride(0) : 0;
    }
  } else if (kind == 2) {
    TORCH_CHECK(W.scalar_type() == at::kByte && W.size(-1) * 2 == K, op, ": int4 linear ", i,
                " must be uint8 [..., N, K/2] for K = ", K);
    TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, op, ": int4 group ", group,
                " must be a multiple of 32 dividing ", K);
    TORCH_CHECK(s.has_value() && b.has_value(), op, ": int4 linear ", i, " needs scale and bias");
    for (const Tensor *t : {&*s, &*b}) {
      check_f32(*t, op, "an int4 scale or bias");
      TORCH_CHECK(t->dim() == dims && t->size(-1) == K / group && t->size(-2) == W.size(-2) && t->is_contiguous(), op,
                  ": int4 scale and bias must be contiguous [..., N, K/group]");
    }
    L.scale = s->data_ptr<float>();
    L.bias = b->data_ptr<float>();
    L.ew = stacked ? W.stride(0) : 0;
    L.es = stacked ? s->stride(0) : 0;
  } else {
    TORCH_CHECK(false, op, ": unknown linear kind ", kind);
  }
  return L;
}

int64_t out_rows(const c10::List<optional<Tensor>> &lins, size_t i) { return lins.get(3 * i)->size(-2); }

// Stacked experts' gate and up (linears i, i+1 of `lins`); returns their rows I. Given as the same tensor they are a
// fused [E, 2I, D] stack (gate_up_proj): gate the first I rows of each expert, up the other I.
int64_t experts_gate_up(const c10::List<optional<Tensor>> &lins, c10::IntArrayRef meta, size_t i, int64_t D,
                        const char *op, Lin &gate, Lin &up) {
  gate = make_lin(lins, meta, i, D, true, op);
  up = make_lin(lins, meta, i + 1, D, true, op);
  const optional<Tensor> g = lins.get(3 * i), u = lins.get(3 * (i + 1));
  if (!g->is_same(*u)) {
    TORCH_CHECK(out_rows(lins, i) == out_rows(lins, i + 1), op, ": gate and up must have the same rows");
    return out_rows(lins, i);
  }
  TORCH_CHECK(gate.kind == 0 && g->size(-2) % 2 == 0, op, ": a fused gate_up stack must be fp32 with even rows");
  const int64_t I = g->size(-2) / 2;
  up.w = (const char *)up.w + I * g->size(-1) * g->element_size();
  return I;
}

const float *opt_f32(const optional<Tensor> &t, const char *op, const char *what) {
  if (!t.has_value()) return nullptr;
  check_f32(*t, op, what);
  check_contig(*t, op, what);
  return t->data_ptr<float>();
}

// A reused scratch buffer per thread (the engine steps from one thread; tests may use others).
float *scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if ((int64_t)buf.size() < floats) buf.resize(floats);
  return buf.data();
}

// The keys a step attends to: slot_mapping [M], key_slots [M, S] int64, key_mask [M, S] bool or absent.
struct Keys {
  const int64_t *slot_mapping, *key_slots;
  const uint8_t *key_mask;
  int64_t S;
};

Keys check_keys(const Tensor &slot_mapping, const Tensor &key_slots, const optional<Tensor> &key_mask, int64_t M,
                const char *op) {
  for (const Tensor *t : {&slot_mapping, &key_slots}) {
    check_cpu(*t, op, "slot_mapping and key_slots");
    TORCH_CHECK(t->scalar_type() == at::kLong, op, ": slot_mapping and key_slots must be int64");
    check_contig(*t, op, "slot_mapping and key_slots");
  }
  TORCH_CHECK(slot_mapping.numel() == M, op, ": slot_mapping holds ", slot_mapping.numel(), " slots for ", M, " tokens");
  TORCH_CHECK(key_slots.dim() == 2 && key_slots.size(0) == M, op, ": key_slots must be [", M, ", S]");
  const uint8_t *mask = nullptr;
  if (key_mask.has_value()) {
    check_cpu(*key_mask, op, "key_mask");
    check_contig(*key_mask, op, "key_mask");
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->sizes() == key_slots.sizes(), op,
                ": key_mask must be bool shaped like key_slots");
    mask = reinterpret_cast<const uint8_t *>(key_mask->data_ptr<bool>());
  }
  return {slot_mapping.data_ptr<int64_t>(), key_slots.data_ptr<int64_t>(), mask, key_slots.size(1)};
}

// ---- single kernels ---------------------------------------------------------------------------

Tensor op_rms_norm(const Tensor &x, const Tensor &weight, double eps) {
  check_f32(x, "dsv3::rms_norm", "x");
  check_f32(weight, "dsv3::rms_norm", "weight");
  check_contig(weight, "dsv3::rms_norm", "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "dsv3::rms_norm: weight must be [", x.size(-1), "]");
  Tensor xc = x.contiguous();
  Tensor y = at::empty(xc.sizes(), xc.options());
  const int64_t D = xc.size(-1);
  rms_norm_f32(xc.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), xc.numel() / D, D, (float)eps);
  return y;
}

Tensor op_greedy(const Tensor &logits) {
  const char *op = "dsv3::greedy";
  check_f32(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, op, ": logits must be [rows, vocab]");
  Tensor xc = logits.contiguous();
  Tensor out = at::empty({xc.size(0)}, xc.options().dtype(at::kLong));
  argmax_rows(xc.data_ptr<float>(), xc.size(0), xc.size(1), out.data_ptr<int64_t>(), at::get_num_threads());
  return out;
}

// Greedy tokens of hidden [M, K] under the fp32 head weight [V, K] without the fp32 GEMM (screen.c says why):
// approx = bf16(hidden) · weight_bf16ᵀ, then only columns within 2 eps of a row's largest approx are recomputed in
// fp32. eps bounds |approx - h · w| for every column: with unit roundoff u = 2^-8 of bf16 and g = K u32/(1 - K u32)
// the fp32 accumulation bound (u32 = 2^-24), rounding h and w costs <= (2u + u^2) sum|h||w|, the sums g (1 + u)^2
// sum|h||w| in any order (the GEMM's and the fp32 reference's), the GEMM's bf16 output u |approx|;
// sum|h||w| <= |h| |w| <= |h| weight_norm (Cauchy-Schwarz). So eps = (3u + 4u^2 + 4g) |h| weight_norm, rounded up, plus
// 1e-30 for values bf16 or the GEMM flush below 2^-126. `weight_norm`: the largest row norm of `weight` (or more).
Tensor op_screened_greedy(const Tensor &hidden, const Tensor &weight, const Tensor &weight_bf16, double weight_norm) {
  const char *op = "dsv3::screened_greedy";
  check_f32(hidden, op, "hidden");
  check_f32(weight, op, "weight");
  check_contig(weight, op, "weight");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) && weight.size(0) > 0 &&
                  weight.size(1) > 0, op, ": hidden [M, K], weight [V, K]");
  TORCH_CHECK(weight_bf16.device().is_cpu() && weight_bf16.scalar_type() == at::kBFloat16 &&
                  weight_bf16.is_contiguous() && weight_bf16.sizes() == weight.sizes(),
              op, ": weight_bf16 must be a contiguous bf16 CPU copy of weight");
  TORCH_CHECK(!(weight_norm < 0) && weight_norm == weight_norm, op, ": weight_norm must be >= 0");
  const int64_t M = hidden.size(0), K = hidden.size(1), V = weight.size(0);
  Tensor h = hidden.contiguous();
  Tensor out = at::empty({M}, h.options().dtype(at::kLong));
  if (M == 0) return out;
  Tensor hb = h.to(at::kBFloat16);
  // oneDNN's bf16 GEMM (AMX here): ~20 % faster than MKL's cblas_gemm_bf16bf16f32 with the head from memory; its
  // bf16 output is the "u |approx|" term of eps
  Tensor approx = at::mm(hb, weight_bf16.t());
  const double u = std::ldexp(1.0, -8), u32 = std::ldexp(1.0, -24), g = K * u32 / (1.0 - K * u32);
  const double c = K * u32 < 0.5 ? (3 * u + 4 * u * u + 4 * g) * (1 + 1e-6) : INFINITY;
  Tensor eps = at::empty({M}, h.options());
  const float *x = h.data_ptr<float>();
  for (int64_t m = 0; m < M; m++) {
    double ss = 0;
    for (int64_t k = 0; k < K; k++) ss += (double)x[m * K + k] * x[m * K + k];
    eps.data_ptr<float>()[m] = (float)(c * std::sqrt(ss) * weight_norm * (1 + 1e-6) + 1e-30);
  }
  screened_argmax(x, M, K, weight.data_ptr<float>(), V, (const uint16_t *)approx.data_ptr(), eps.data_ptr<float>(),
                  out.data_ptr<int64_t>(), at::get_num_threads());
  return out;
}

std::tuple<Tensor, Tensor, Tensor> op_route_noaux(const Tensor &x, const Tensor &weight, const optional<Tensor> &bias,
                                               int64_t n_group, int64_t topk_group, int64_t top_k, bool norm,
                                               double scale) {
  const char *op = "dsv3::route_noaux";
  check_f32(x, op, "x");
  check_f32(weight, op, "weight");
  check_contig(weight, op, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1), op, ": x [N, D], weight [E, D]");
  const int64_t N = x.size(0), D = x.size(1), E = weight.size(0);
  TORCH_CHECK(E <= kMaxExperts && n_group <= kMaxGroups && n_group > 0 && E % n_group == 0, op,
              ": at most ", kMaxExperts, " experts in at most ", kMaxGroups, " equal groups");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group && top_k >= 1 && top_k <= topk_group * (E / n_group), op,
              ": top_k and topk_group do not fit the groups");
  const float *b = opt_f32(bias, op, "bias");
  if (b) TORCH_CHECK(bias->numel() == E, op, ": bias must be [E]");
  Tensor xc = x.contiguous();
  Tensor idx = at::empty({N, top_k}, x.options().dtype(at::kLong));
  Tensor wt = at::empty({N, top_k}, x.options());
  Tensor scores = at::empty({N, E}, x.options());
  ::route_noaux(xc.data_ptr<float>(), weight.data_ptr<float>(), b, N, D, E, n_group, topk_group, top_k, (int)norm,
                (float)scale, idx.data_ptr<int64_t>(), wt.data_ptr<float>(), scores.data_ptr<float>());
  return {wt, idx, scores};
}

Tensor op_linear(const Tensor &x, const Tensor &w, const optional<Tensor> &scale, const optional<Tensor> &bias,
              int64_t kind, int64_t group) {
  const char *op = "dsv3::linear";
  check_f32(x, op, "x");
  const int64_t K = x.size(-1);
  c10::List<optional<Tensor>> lins;
  lins.push_back(w);
  lins.push_back(scale);
  lins.push_back(bias);
  const int64_t meta[2] = {kind, group};
  Lin L = make_lin(lins, meta, 0, K, false, op);
  const int64_t N = out_rows(lins, 0);
  Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  Tensor y = at::empty(shape, x.options());
  linear_lin(&L, xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel() / K, N, K, at::get_num_threads());
  return y;
}

Tensor op_mlp(const Tensor &x, const c10::List<optional<Tensor>> &lins, c10::IntArrayRef meta) {
  const char *op = "dsv3::mlp";
  check_f32(x, op, "x");
  const int64_t D = x.size(-1);
  Lin gate = make_lin(lins, meta, 0, D, false, op), up = make_lin(lins, meta, 1, D, false, op);
  const int64_t I = out_rows(lins, 0);
  TORCH_CHECK(out_rows(lins, 1) == I, op, ": gate and up must have the same rows");
  Lin down = make_lin(lins, meta, 2, I, false, op);
  TORCH_CHECK(out_rows(lins, 2) == D, op, ": down must give ", D, " outputs");
  Tensor xc = x.contiguous();
  const int64_t M = xc.numel() / D;
  Tensor y = at::empty(xc.sizes(), x.options());
  mlp_decode(&gate, &up, &down, xc.data_ptr<float>(), scratch(M * I), y.data_ptr<float>(), M, D, I,
             at::get_num_threads());
  return y;
}

Tensor op_moe(const Tensor &x, const Tensor &idx, const Tensor &weights, const c10::List<optional<Tensor>> &lins,
           c10::IntArrayRef meta) {
  const char *op = "dsv3::moe";
  check_f32(x, op, "x");
  TORCH_CHECK(x.dim() == 2 && idx.dim() == 2 && idx.sizes() == weights.sizes() && idx.size(0) == x.size(0), op,
              ": x [M, D], idx and weights [M, K]");
  const int64_t M = x.size(0), D = x.size(1), K = idx.size(1);
  Lin gate, up;
  const int64_t I = experts_gate_up(lins, meta, 0, D, op, gate, up), E = lins.get(0)->size(0);
  Lin down = make_lin(lins, meta, 2, I, true, op);
  TORCH_CHECK(out_rows(lins, 2) == D && lins.get(3)->size(0) == E && lins.get(6)->size(0) == E, op,
              ": gate/up [E, I, D] and down [E, D, I] stacks of the same experts");
  TORCH_CHECK(idx.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat, op,
              ": idx must be int64 and weights float32");
  Tensor ic = idx.contiguous(), wc = weights.contiguous(), xc = x.contiguous();
  const int64_t *ids = ic.data_ptr<int64_t>();
  for (int64_t j = 0; j < M * K; j++) TORCH_CHECK(ids[j] >= 0 && ids[j] < E, op, ": expert ids must be in [0, ", E, ")");
  Tensor y = at::empty({M, D}, x.options());
  if (M > kGroupedRows && gate.kind == 0 && up.kind == 0 && down.kind == 0) {  // many tokens: expert by expert
    ::moe_grouped(xc.data_ptr<float>(), ids, wc.data_ptr<float>(), (const float *)gate.w, (const float *)up.w,
                  gate.ew / 4, (const float *)down.w, down.ew / 4, y.data_ptr<float>(), M, K, D, I, E,
                  scratch(moe_grouped_scratch(M, K, D, I, E)), at::get_num_threads());
    return y;
  }
  moe_lin(xc.data_ptr<float>(), ids, wc.data_ptr<float>(), &gate, &up, &down, scratch(M * K * I),
          y.data_ptr<float>(), M, K, D, I, at::get_num_threads());
  return y;
}

// dims: D, H, dn, dr, dv, C, Rq; fdims: q_eps, kv_eps, scale.
MLADims make_dims(c10::IntArrayRef dims, c10::ArrayRef<double> fdims, const char *op) {
  TORCH_CHECK(dims.size() == 7 && fdims.size() == 3, op, ": dims are D, H, dn, dr, dv, C, Rq and q_eps, kv_eps, scale");
  MLADims d{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], (float)fdims[0], (float)fdims[1],
            (float)fdims[2]};
  TORCH_CHECK(d.dr % 2 == 0, op, ": the rotary dim must be even");
  return d;
}

Tensor op_mla_decode(const Tensor &x, const c10::List<optional<Tensor>> &lins, c10::IntArrayRef meta,
                  const optional<Tensor> &q_norm, const Tensor &kv_norm, const Tensor &w_kvb, const Tensor &cos,
                  const Tensor &sin, Tensor &cache, const Tensor &slot_mapping, const Tensor &key_slots,
                  const optional<Tensor> &key_mask, c10::IntArrayRef dims, c10::ArrayRef<double> fdims) {
  const char *op = "dsv3::mla_decode";
  MLADims d = make_dims(dims, fdims, op);
  check_f32(x, op, "x");
  TORCH_CHECK(x.size(-1) == d.D, op, ": x must have ", d.D, " features");
  const int64_t M = x.numel() / d.D, W = d.C + d.dr;
  Lin q_a{}, q_b{};
  if (d.Rq) {
    q_a = make_lin(lins, meta, 0, d.D, false, op);
    q_b = make_lin(lins, meta, 1, d.Rq, false, op);
  } else {
    q_b = make_lin(lins, meta, 1, d.D, false, op);
  }
  Lin kv_a = make_lin(lins, meta, 2, d.D, false, op), o = make_lin(lins, meta, 3, d.H * d.dv, false, op);
  const float *qn = opt_f32(q_norm, op, "q_norm");
  TORCH_CHECK(!d.Rq || qn, op, ": a low-rank query needs q_norm");
  check_f32(kv_norm, op, "kv_norm");
  check_f32(w_kvb, op, "w_kvb");
  check_contig(w_kvb, op, "w_kvb");
  TORCH_CHECK(w_kvb.numel() == d.H * (d.dn + d.dv) * d.C, op, ": w_kvb must be [H, dn+dv, C]");
  check_f32(cache, op, "cache");
  TORCH_CHECK(cache.size(-1) == W && cache.stride(-1) == 1 && cache.is_contiguous(), op, ": cache must be a contiguous [slots, ", W, "]");
  Keys k = check_keys(slot_mapping, key_slots, key_mask, M, op);
  Tensor xc = x.contiguous(), c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.numel() == M * d.dr / 2 && s.numel() == M * d.dr / 2, op, ": cos and sin must be [M, dr/2]");
  const int64_t H = d.H, C = d.C, floats =
      M * (d.Rq + H * (d.dn + d.dr) + C + d.dr + H * (2 * C + d.dr + k.S) + H * d.dv);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  Tensor y = at::empty(shape, x.options());
  ::mla_decode(&d, xc.data_ptr<float>(), M, &q_a, qn, &q_b, &kv_a, kv_norm.data_ptr<float>(), w_kvb.data_ptr<float>(), &o,
               c.data_ptr<float>(), s.data_ptr<float>(), cache.data_ptr<float>(), k.slot_mapping, k.key_slots, k.key_mask,
               k.S, scratch(floats), y.data_ptr<float>(), at::get_num_threads());
  return y;
}

Tensor op_mla_attend(const Tensor &q, const Tensor &cache, const Tensor &key_slots, const optional<Tensor> &key_lens,
                     int64_t kv_lora_rank, double scale) {
  const char *op = "dsv3::mla_attend";
  check_f32(q, op, "q");
  check_f32(cache, op, "cache");
  check_contig(q, op, "q");
  check_contig(cache, op, "cache");
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 2 && q.size(2) == cache.size(1) && kv_lora_rank > 0 &&
                  kv_lora_rank <= cache.size(1),
              op, ": q must be [M, H, C + dr] and cache [slots, C + dr]");
  const int64_t M = q.size(0), H = q.size(1), W = q.size(2);
  TORCH_CHECK(H <= 256, op, ": at most 256 heads");
  check_cpu(key_slots, op, "key_slots");
  TORCH_CHECK((key_slots.scalar_type() == at::kLong || key_slots.scalar_type() == at::kInt) && key_slots.dim() == 2 &&
                  key_slots.size(0) == M,
              op, ": key_slots must be int64 or int32 [M, S]");
  const Tensor slots = key_slots.to(at::kLong).contiguous();  // a no-op for contiguous int64
  const int64_t S = slots.size(1);
  const int64_t *lens = nullptr;
  Tensor lens_t;
  if (key_lens.has_value()) {
    check_cpu(*key_lens, op, "key_lens");
    TORCH_CHECK((key_lens->scalar_type() == at::kLong || key_lens->scalar_type() == at::kInt) && key_lens->numel() == M,
                op, ": key_lens must be int64 or int32 [M]");
    lens_t = key_lens->to(at::kLong).contiguous();
    lens = lens_t.data_ptr<int64_t>();
  }
  if (slots.numel()) {
    const auto [lo, hi] = at::aminmax(slots);
    TORCH_CHECK(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < cache.size(0), op,
                ": key_slots must be -1 or slots of the cache");
  }
  Tensor out = at::empty({M, H, kv_lora_rank}, q.options());
  ::mla_attend(q.data_ptr<float>(), M, H, W, kv_lora_rank, cache.data_ptr<float>(), slots.data_ptr<int64_t>(), S,
               lens, (float)scale, out.data_ptr<float>(), at::get_num_threads());
  return out;
}

// ---- whole steps -----------------------------------------------------------------------------
//
// A plan crosses as `weights` (Tensor?[]) and `meta` (int64) / `fmeta` (float64) tensors, built once
// by dsv3/ops/plan.py in the order below; a whole-model plan puts the model's part first.
//
// Layer weights (44): q_a q_b kv_a o (3 each), q_norm kv_norm w_kvb in_norm post_norm,
//                     gate up down (3 each; the dense MLP or the shared experts), router router_bias,
//                     egate eup edown (3 each; stacked routed experts),
//                     q_a q_b kv_a o gate up down packed (`pack_linear`'s bytes of the fp32 weight, or None)
// Layer ints (33):    D H dn dr dv C Rq | kind, group of q_a q_b kv_a o | inter | E n_group topk_group top_k
//                     norm_topk | kind, group of gate up down | kind, group of egate eup edown
// Layer floats (5):   q_eps kv_eps scale eps route_scale
// Model weights (7):  embed inv_freq final_norm head (3) head_packed (`pack_linear`'s bytes, or None)
// Model ints (4):     head kind, head group, vocab, dr/2;   model floats (2): attn_factor final_eps
constexpr size_t kLayerWeights = 44, kLayerInts = 33, kLayerFloats = 5;
constexpr size_t kModelWeights = 7, kModelInts = 4, kModelFloats = 2;

c10::List<optional<Tensor>> slice(const c10::List<optional<Tensor>> &ws, size_t from, size_t n) {
  c10::List<optional<Tensor>> out;
  out.reserve(n);
  for (size_t j = 0; j < n; j++) out.push_back(ws.get(from + j));
  return out;
}

// A linear's packed copy (slot `p` of the plan, None or empty: none): the bytes `pack_linear` made of its fp32
// [N, K] weight, which batched steps multiply by instead of the weight.
void attach_packed(Lin &L, const optional<Tensor> &p, int64_t N, int64_t K, const char *op, const char *what) {
  if (!p.has_value() || !p->numel()) return;
  TORCH_CHECK(L.kind == 0 && p->scalar_type() == at::kByte && p->is_contiguous() && p->device().is_cpu() &&
                  packed_gemm().ok() && (size_t)p->numel() == packed_gemm().size(162, kPackRows, (int)N, (int)K),
              op, ": ", what, "_packed must be `pack_linear` of the fp32 ", what, " weight");
  L.packed = p->data_ptr();
}

std::vector<LayerPlan> make_layers(const c10::List<optional<Tensor>> &ws, size_t w0, const int64_t *mi,
                                   const double *mf, int64_t L, const char *op) {
  std::vector<LayerPlan> out(L);
  for (int64_t i = 0; i < L; i++) {
    const size_t wb = w0 + i * kLayerWeights;
    const int64_t *m = mi + i * kLayerInts;
    const double *f = mf + i * kLayerFloats;
    LayerPlan &lp = out[i];
    lp.mla = MLADims{m[0], m[1], m[2], m[3], m[4], m[5], m[6], (float)f[0], (float)f[1], (float)f[2]};
    const MLADims &d = lp.mla;
    TORCH_CHECK(i == 0 || d.D == out[0].mla.D, op, ": every layer must have the same hidden size");
    TORCH_CHECK(d.H >= 1 && d.H <= 256, op, ": 1 to 256 heads (the attention kernels' per-head arrays)");
    const auto attn = slice(ws, wb, 12);
    const c10::IntArrayRef am(m + 7, 8);
    if (d.Rq) {
      lp.q_a = make_lin(attn, am, 0, d.D, false, op);
      lp.q_b = make_lin(attn, am, 1, d.Rq, false, op);
    } else {
      lp.q_b = make_lin(attn, am, 1, d.D, false, op);
    }
    TORCH_CHECK(out_rows(attn, 1) == d.H * (d.dn + d.dr), op, ": q_b must give H*(dn+dr) outputs");
    lp.kv_a = make_lin(attn, am, 2, d.D, false, op);
    TORCH_CHECK(out_rows(attn, 2) == d.C + d.dr, op, ": kv_a must give C+dr outputs");
    lp.o = make_lin(attn, am, 3, d.H * d.dv, false, op);
    TORCH_CHECK(out_rows(attn, 3) == d.D, op, ": o must give D outputs");
    if (d.Rq) attach_packed(lp.q_a, ws.get(wb + 37), d.Rq, d.D, op, "q_a");
    attach_packed(lp.q_b, ws.get(wb + 38), d.H * (d.dn + d.dr), d.Rq ? d.Rq : d.D, op, "q_b");
    attach_packed(lp.kv_a, ws.get(wb + 39), d.C + d.dr, d.D, op, "kv_a");
    attach_packed(lp.o, ws.get(wb + 40), d.D, d.H * d.dv, op, "o");
    const optional<Tensor> q_norm = ws.get(wb + 12), kv_norm = ws.get(wb + 13), w_kvb = ws.get(wb + 14),
                           in_norm = ws.get(wb + 15), post_norm = ws.get(wb + 16);
    lp.q_norm = opt_f32(q_norm, op, "q_norm");
    TORCH_CHECK(!d.Rq || (lp.q_norm && q_norm->numel() == d.Rq), op, ": a low-rank query needs q_norm [Rq]");
    TORCH_CHECK(kv_norm && w_kvb && in_norm && post_norm, op, ": layer ", i, " lacks a norm or w_kvb");
    lp.kv_norm = opt_f32(kv_norm, op, "kv_norm");
    lp.w_kvb = opt_f32(w_kvb, op, "w_kvb");
    lp.in_norm = opt_f32(in_norm, op, "in_norm");
    lp.post_norm = opt_f32(post_norm, op, "post_norm");
    TORCH_CHECK(kv_norm->numel() == d.C && in_norm->numel() == d.D && post_norm->numel() == d.D, op, ": norm sizes");
    TORCH_CHECK(w_kvb->numel() == d.H * (d.dn + d.dv) * d.C, op, ": w_kvb must be [H, dn+dv, C]");
    lp.eps = (float)f[3];
    lp.inter = m[15];
    lp.E = m[16];
    if (lp.inter) {
      const auto mlp = slice(ws, wb + 17, 9);
      const c10::IntArrayRef mm(m + 21, 6);
      lp.gate = make_lin(mlp, mm, 0, d.D, false, op);
      lp.up = make_lin(mlp, mm, 1, d.D, false, op);
      lp.down = make_lin(mlp, mm, 2, lp.inter, false, op);
      TORCH_CHECK(out_rows(mlp, 0) == lp.inter && out_rows(mlp, 1) == lp.inter && out_rows(mlp, 2) == d.D, op,
                  ": MLP shapes do not match inter");
      attach_packed(lp.gate, ws.get(wb + 41), lp.inter, d.D, op, "gate");
      attach_packed(lp.up, ws.get(wb + 42), lp.inter, d.D, op, "up");
      attach_packed(lp.down, ws.get(wb + 43), d.D, lp.inter, op, "down");
    } else {
      TORCH_CHECK(lp.E, op, ": layer ", i, " has neither an MLP nor experts");
    }
    if (lp.E) {
      lp.n_group = m[17];
      lp.topk_group = m[18];
      lp.top_k = m[19];
      lp.norm_topk = m[20];
      lp.route_scale = (float)f[4];
      TORCH_CHECK(lp.E <= kMaxExperts && lp.n_group <= kMaxGroups && lp.n_group > 0 && lp.E % lp.n_group == 0 &&
                      lp.topk_group >= 1 && lp.topk_group <= lp.n_group && lp.top_k >= 1 &&
                      lp.top_k <= lp.topk_group * (lp.E / lp.n_group),
                  op, ": router sizes");
      const optional<Tensor> router = ws.get(wb + 26), rbias = ws.get(wb + 27);
      TORCH_CHECK(router.has_value() && router->numel() == lp.E * d.D, op, ": router must be [E, D]");
      lp.router = opt_f32(router, op, "router");
      lp.router_bias = opt_f32(rbias, op, "router_bias");
      TORCH_CHECK(!lp.router_bias || rbias->numel() == lp.E, op, ": router_bias must be [E]");
      const auto ex = slice(ws, wb + 28, 9);
      const c10::IntArrayRef em(m + 27, 6);
      lp.einter = experts_gate_up(ex, em, 0, d.D, op, lp.egate, lp.eup);
      lp.edown = make_lin(ex, em, 2, lp.einter, true, op);
      TORCH_CHECK(ex.get(0)->size(0) == lp.E && ex.get(3)->size(0) == lp.E && ex.get(6)->size(0) == lp.E &&
                      out_rows(ex, 2) == d.D,
                  op, ": experts must be [E, I, D] (or a fused [E, 2I, D]) / [E, D, I]");
    }
  }
  return out;
}

std::vector<float *> layer_caches(Tensor &cache, c10::IntArrayRef layers, int64_t W, const char *op) {
  check_f32(cache, op, "cache");
  TORCH_CHECK(cache.is_contiguous() && cache.size(-1) == W, op, ": cache must be a contiguous [layers, ..., ", W, "]");
  std::vector<float *> out;
  for (int64_t l : layers) {
    TORCH_CHECK(l >= 0 && l < cache.size(0), op, ": cache layer ", l, " out of range");
    out.push_back(cache.data_ptr<float>() + l * cache.stride(0));
  }
  return out;
}

void check_plan(const c10::List<optional<Tensor>> &weights, const Tensor &meta, const Tensor &fmeta, size_t w0,
                size_t i0, size_t f0, int64_t L, const char *op) {
  TORCH_CHECK(meta.scalar_type() == at::kLong && fmeta.scalar_type() == at::kDouble && meta.is_contiguous() &&
                  fmeta.is_contiguous() && meta.device().is_cpu() && fmeta.device().is_cpu(),
              op, ": meta must be int64 and fmeta float64 CPU tensors");
  TORCH_CHECK(L >= 1 && weights.size() == w0 + L * kLayerWeights && (size_t)meta.numel() == i0 + L * kLayerInts &&
                  (size_t)fmeta.numel() == f0 + L * kLayerFloats,
              op, ": the plan's tensors do not describe ", L, " layers");
}

void op_decode_layers(const c10::List<optional<Tensor>> &weights, const Tensor &meta, const Tensor &fmeta, Tensor &cache,
                   c10::IntArrayRef layers, Tensor &x, const Tensor &cos, const Tensor &sin, const Tensor &slot_mapping,
                   const Tensor &key_slots, const optional<Tensor> &key_mask) {
  const char *op = "dsv3::decode_layers";
  const int64_t L = (int64_t)layers.size();
  check_plan(weights, meta, fmeta, 0, 0, 0, L, op);
  std::vector<LayerPlan> lp = make_layers(weights, 0, meta.data_ptr<int64_t>(), fmeta.data_ptr<double>(), L, op);
  const MLADims &d = lp[0].mla;
  check_f32(x, op, "x");
  check_contig(x, op, "x");
  TORCH_CHECK(x.size(-1) == d.D, op, ": x must have ", d.D, " features");
  const int64_t M = x.numel() / d.D;
  Keys k = check_keys(slot_mapping, key_slots, key_mask, M, op);
  Tensor c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.numel() == M * d.dr / 2 && s.numel() == M * d.dr / 2, op, ": cos and sin must be [M, dr/2]");
  std::vector<float *> caches = layer_caches(cache, layers, d.C + d.dr, op);
  float *buf = scratch(decode_layers_scratch(lp.data(), L, M, k.S));
  ::decode_layers(lp.data(), L, caches.data(), x.data_ptr<float>(), M, c.data_ptr<float>(), s.data_ptr<float>(),
                  k.slot_mapping, k.key_slots, k.key_mask, k.S, buf, at::get_num_threads());
}

// The model's part of a whole-model plan (the embedding, rotary, final norm and, with `head`, the LM head).
ModelPlan make_model(const c10::List<optional<Tensor>> &weights, const int64_t *mi, const double *mf, const MLADims &d,
                     bool head, const char *op) {
  ModelPlan mp{};
  const optional<Tensor> embed = weights.get(0), inv_freq = weights.get(1), final_norm = weights.get(2);
  TORCH_CHECK(embed && inv_freq && final_norm, op, ": the plan lacks the embedding, rotary or final norm");
  mp.embed = opt_f32(embed, op, "embed");
  mp.inv_freq = opt_f32(inv_freq, op, "inv_freq");
  mp.final_norm = opt_f32(final_norm, op, "final_norm");
  mp.vocab = mi[2];
  mp.half = mi[3];
  mp.attn_factor = (float)mf[0];
  mp.final_eps = (float)mf[1];
  TORCH_CHECK(embed->dim() == 2 && embed->size(0) == mp.vocab && embed->size(1) == d.D, op, ": embed must be [vocab, D]");
  TORCH_CHECK(inv_freq->numel() == mp.half && 2 * mp.half == d.dr, op, ": inv_freq must be [dr/2]");
  if (head) {
    const auto hw = slice(weights, 3, 3);
    const int64_t hm[2] = {mi[0], mi[1]};
    mp.head = make_lin(hw, hm, 0, d.D, false, op);
    TORCH_CHECK(out_rows(hw, 0) == mp.vocab, op, ": the head must give vocab logits");
    const optional<Tensor> packed = weights.get(6);
    if (packed.has_value() && packed->numel()) {
      TORCH_CHECK(mp.head.kind == 0 && packed->scalar_type() == at::kByte && packed->is_contiguous() &&
                      packed->device().is_cpu() && packed_gemm().ok() &&
                      (size_t)packed->numel() == packed_gemm().size(162, kPackRows, (int)mp.vocab, (int)d.D),
                  op, ": head_packed must be `pack_linear` of the fp32 head");
      mp.head_packed = packed->data_ptr();
    }
  }
  return mp;
}

const int64_t *opt_positions(const optional<Tensor> &positions, int64_t M, const char *op) {
  if (!positions.has_value()) return nullptr;
  TORCH_CHECK(positions->scalar_type() == at::kLong && positions->is_contiguous() && positions->numel() == M &&
                  positions->device().is_cpu(),
              op, ": positions must be contiguous int64 like ids");
  return positions->data_ptr<int64_t>();
}

float *out_f32(const Tensor &t, int64_t numel, const char *op, const char *what) {
  check_f32(t, op, what);
  check_contig(t, op, what);
  TORCH_CHECK(t.numel() == numel, op, ": ", what, " must hold ", numel, " values, got ", t.numel());
  return t.data_ptr<float>();
}

int64_t op_decode_step(const c10::List<optional<Tensor>> &weights, const Tensor &meta, const Tensor &fmeta, Tensor &cache,
                    c10::IntArrayRef layers, const Tensor &ids, const optional<Tensor> &positions, int64_t start,
                    int64_t T, const Tensor &slot_mapping, const Tensor &key_slots, const optional<Tensor> &key_mask,
                    Tensor &hidden, const optional<Tensor> &logits) {
  const char *op = "dsv3::decode_step";
  const int64_t L = (int64_t)layers.size();
  check_plan(weights, meta, fmeta, kModelWeights, kModelInts, kModelFloats, L, op);
  const int64_t *mi = meta.data_ptr<int64_t>();
  const double *mf = fmeta.data_ptr<double>();
  std::vector<LayerPlan> lp = make_layers(weights, kModelWeights, mi + kModelInts, mf + kModelFloats, L, op);
  const MLADims &d = lp[0].mla;
  ModelPlan mp = make_model(weights, mi, mf, d, logits.has_value(), op);
  check_cpu(ids, op, "ids");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), op, ": ids must be contiguous int64");
  const int64_t M = ids.numel();
  TORCH_CHECK(T >= 1 && M % T == 0, op, ": ids must hold whole rows of T tokens");
  const int64_t *pos = opt_positions(positions, M, op);
  Keys k = check_keys(slot_mapping, key_slots, key_mask, M, op);
  float *h = out_f32(hidden, M * d.D, op, "hidden");
  float *out = logits.has_value() ? out_f32(*logits, M * mp.vocab, op, "logits") : nullptr;
  std::vector<float *> caches = layer_caches(cache, layers, d.C + d.dr, op);
  float *buf = scratch(decode_step_scratch(&mp, lp.data(), L, M, k.S));
  return ::decode_step(&mp, lp.data(), L, caches.data(), ids.data_ptr<int64_t>(), pos, start, T, M, k.slot_mapping,
                       k.key_slots, k.key_mask, k.S, h, out, buf, at::get_num_threads());
}

// An MTP drafter plan (`mtp_step`): weights enorm hnorm eh_proj (3) final_norm head (3) draft_ids, then the block's
// 44; ints: eh kind, eh group, head kind, head group, then the block's 33; floats: e_eps h_eps final_eps, then 5.
constexpr size_t kMtpWeights = 10, kMtpInts = 4, kMtpFloats = 3;

int64_t op_mtp_step(const c10::List<optional<Tensor>> &weights, const Tensor &meta, const Tensor &fmeta,
                    const c10::List<optional<Tensor>> &mtp_weights, const Tensor &mtp_meta, const Tensor &mtp_fmeta,
                    Tensor &cache, c10::IntArrayRef layers, int64_t mtp_layer, const Tensor &ids, const Tensor &starts,
                    const Tensor &block_tables, int64_t block_size, int64_t K, Tensor &hidden, Tensor &logits,
                    Tensor &tokens, Tensor &drafts) {
  const char *op = "dsv3::mtp_step";
  const int64_t L = (int64_t)layers.size();
  check_plan(weights, meta, fmeta, kModelWeights, kModelInts, kModelFloats, L, op);
  check_plan(mtp_weights, mtp_meta, mtp_fmeta, kMtpWeights, kMtpInts, kMtpFloats, 1, op);
  const int64_t *mi = meta.data_ptr<int64_t>(), *ti = mtp_meta.data_ptr<int64_t>();
  const double *mf = fmeta.data_ptr<double>(), *tf = mtp_fmeta.data_ptr<double>();
  std::vector<LayerPlan> lp = make_layers(weights, kModelWeights, mi + kModelInts, mf + kModelFloats, L, op);
  const MLADims &d = lp[0].mla;
  ModelPlan mp = make_model(weights, mi, mf, d, true, op);
  MTPPlan tp{};
  tp.block = make_layers(mtp_weights, kMtpWeights, ti + kMtpInts, tf + kMtpFloats, 1, op)[0];
  TORCH_CHECK(tp.block.mla.D == d.D && tp.block.mla.C == d.C && tp.block.mla.dr == d.dr, op,
              ": the MTP block must have the model's hidden size and latent width");
  const optional<Tensor> enorm = mtp_weights.get(0), hnorm = mtp_weights.get(1), fnorm = mtp_weights.get(5),
                         draft_ids = mtp_weights.get(9);
  TORCH_CHECK(enorm && hnorm && fnorm && enorm->numel() == d.D && hnorm->numel() == d.D && fnorm->numel() == d.D, op,
              ": the MTP module needs enorm, hnorm and its output norm, [D] each");
  tp.enorm = opt_f32(enorm, op, "enorm");
  tp.hnorm = opt_f32(hnorm, op, "hnorm");
  tp.final_norm = opt_f32(fnorm, op, "the MTP output norm");
  tp.e_eps = (float)tf[0];
  tp.h_eps = (float)tf[1];
  tp.final_eps = (float)tf[2];
  const auto eh = slice(mtp_weights, 2, 3), head = slice(mtp_weights, 6, 3);
  const int64_t ehm[2] = {ti[0], ti[1]}, hdm[2] = {ti[2], ti[3]};
  tp.eh = make_lin(eh, ehm, 0, 2 * d.D, false, op);
  TORCH_CHECK(out_rows(eh, 0) == d.D, op, ": eh_proj must be [D, 2D]");
  tp.head = make_lin(head, hdm, 0, d.D, false, op);
  tp.vocab = out_rows(head, 0);
  if (draft_ids.has_value()) {
    check_cpu(*draft_ids, op, "draft_ids");
    TORCH_CHECK(draft_ids->scalar_type() == at::kLong && draft_ids->is_contiguous() && draft_ids->numel() == tp.vocab,
                op, ": draft_ids must be int64 [the draft head's rows]");
    tp.draft_ids = draft_ids->data_ptr<int64_t>();
    const auto [lo, hi] = at::aminmax(*draft_ids);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < mp.vocab, op, ": draft_ids must be token ids");
  } else {
    TORCH_CHECK(tp.vocab == mp.vocab, op, ": a draft head without draft_ids must cover the vocabulary");
  }
  TORCH_CHECK(K >= 1, op, ": K (drafts per sequence) must be at least 1");
  check_cpu(ids, op, "ids");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 2 && ids.size(1) == 2 * K, op,
              ": ids must be contiguous int64 [B, 2K]");
  const int64_t B = ids.size(0), M1 = B * (K + 1);
  for (const Tensor *t : {&starts, &block_tables, (const Tensor *)&tokens, (const Tensor *)&drafts}) {
    check_cpu(*t, op, "starts, block_tables, tokens and drafts");
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), op,
                ": starts, block_tables, tokens and drafts must be contiguous int64");
  }
  TORCH_CHECK(starts.numel() == B && block_tables.dim() == 2 && block_tables.size(0) == B, op,
              ": starts must be [B] and block_tables [B, W]");
  TORCH_CHECK(block_size >= 1, op, ": block_size must be positive");
  const int64_t W = block_tables.size(1), S = W * block_size, W_cache = d.C + d.dr;
  std::vector<float *> caches = layer_caches(cache, layers, W_cache, op);
  std::vector<float *> mcache = layer_caches(cache, {mtp_layer}, W_cache, op);
  const int64_t blocks = cache.numel() / cache.size(0) / W_cache / block_size;
  const int64_t *st = starts.data_ptr<int64_t>(), *bt = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++)
    TORCH_CHECK(st[b] >= 0 && st[b] + 2 * K <= S, op, ": sequence ", b, " starts at ", st[b],
                ": its block table must hold positions up to start + 2K");
  for (int64_t i = 0; i < B * W; i++)
    TORCH_CHECK(bt[i] >= 0 && bt[i] < blocks, op, ": block ", bt[i], " is outside the cache's ", blocks, " blocks");
  float *h = out_f32(hidden, M1 * d.D, op, "hidden");
  float *out = out_f32(logits, M1 * mp.vocab, op, "logits");
  TORCH_CHECK(tokens.numel() == M1 && drafts.numel() == B * K, op, ": tokens must be [B, K+1] and drafts [B, K]");
  float *buf = scratch(mtp_step_scratch(&mp, lp.data(), L, &tp, B, K, S));
  const int64_t r = ::mtp_step(&mp, lp.data(), L, caches.data(), &tp, mcache[0], ids.data_ptr<int64_t>(), st, bt, W,
                               block_size, B, K, h, out, tokens.data_ptr<int64_t>(), drafts.data_ptr<int64_t>(), buf,
                               at::get_num_threads());
  TORCH_CHECK(r >= 0, op, ": out of memory");
  return r;
}

// An fp32 weight [N, K] packed for y = x Wᵀ by the BLAS (uint8 bytes), or an empty tensor when it has no packed GEMM.
Tensor op_pack_linear(const Tensor &weight) {
  const char *op = "dsv3::pack_linear";
  check_f32(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, K]");
  const PackedGemm &g = packed_gemm();
  const int64_t N = weight.size(0), K = weight.size(1);
  if (!g.ok() || N >= INT32_MAX || K >= INT32_MAX || N == 0 || K == 0) return at::empty({0}, weight.options().dtype(at::kByte));
  Tensor w = weight.contiguous();
  Tensor out = at::empty({(int64_t)g.size(162, kPackRows, (int)N, (int)K)}, weight.options().dtype(at::kByte));
  g.pack(101, 162, 112, kPackRows, (int)N, (int)K, 1.f, w.data_ptr<float>(), (int)K, (float *)out.data_ptr());
  return out;
}

std::vector<int64_t> plan_layout() {
  return {(int64_t)kLayerWeights, (int64_t)kLayerInts, (int64_t)kLayerFloats,
          (int64_t)kModelWeights, (int64_t)kModelInts,  (int64_t)kModelFloats,
          (int64_t)kMtpWeights,   (int64_t)kMtpInts,    (int64_t)kMtpFloats};
}

}  // namespace

// `plan_layout` takes no tensor, so the dispatcher cannot pick a backend kernel for it: CatchAll.
TORCH_LIBRARY_FRAGMENT(dsv3_native, m) { m.def("plan_layout() -> int[]", &plan_layout); }

// DSA's indexer and top-k fused (index.c says why): q [B, T, H, D], w [B, T, H], keys [B, S, D] (any float dtype,
// scored in fp32), n_visible [B, T] (query t sees entries 0 .. n_visible - 1) -> (idx int64, ok bool) [B, T, min(k, S)].
std::tuple<Tensor, Tensor> op_index_topk(const Tensor &q, const Tensor &w, const Tensor &keys, const Tensor &n_visible,
                                         int64_t k) {
  const char *op = "dsv3::index_topk";
  check_cpu(q, op, "q");
  check_cpu(w, op, "w");
  check_cpu(keys, op, "keys");
  check_cpu(n_visible, op, "n_visible");
  TORCH_CHECK(q.is_floating_point() && w.is_floating_point() && keys.is_floating_point(), op,
              ": q, w and keys must be floating point");
  TORCH_CHECK(q.dim() == 4 && w.dim() == 3 && keys.dim() == 3, op, ": q [B, T, H, D], w [B, T, H], keys [B, S, D]");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), S = keys.size(1);
  TORCH_CHECK(w.size(0) == B && w.size(1) == T && w.size(2) == H && keys.size(0) == B && keys.size(2) == D, op,
              ": q [B, T, H, D], w [B, T, H], keys [B, S, D] disagree: q ", q.sizes(), ", w ", w.sizes(), ", keys ",
              keys.sizes());
  TORCH_CHECK((n_visible.scalar_type() == at::kLong || n_visible.scalar_type() == at::kInt) && n_visible.dim() == 2 &&
                  n_visible.size(0) == B && n_visible.size(1) == T,
              op, ": n_visible must be int64 or int32 [B, T]");
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
  TORCH_CHECK(H >= 1 && D >= 1, op, ": q needs at least one head of at least one value");
  const int64_t kk = k < S ? k : S;
  Tensor idx = at::empty({B, T, kk}, q.options().dtype(at::kLong));
  Tensor ok = at::empty({B, T, kk}, q.options().dtype(at::kBool));
  if (B * T * kk == 0) return {idx, ok};
  const Tensor vis = n_visible.to(at::kLong).contiguous();
  const auto [lo, hi] = at::aminmax(vis);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= S, op, ": n_visible must lie in [0, ", S, "]");
  const Tensor qc = q.to(at::kFloat).contiguous(), wc = w.to(at::kFloat).contiguous(),
               kc = keys.to(at::kFloat).contiguous();
  index_topk_f32(qc.data_ptr<float>(), wc.data_ptr<float>(), kc.data_ptr<float>(), vis.data_ptr<int64_t>(), B, T, H, D,
                 S, kk, idx.data_ptr<int64_t>(), (uint8_t *)ok.data_ptr<bool>(), at::get_num_threads());
  return {idx, ok};
}

// mHC's split and Sinkhorn for every row (hyper.c): mixes [..., (2 + n) n] fp32, scale [3], base [(2 + n) n]
// -> (pre [..., n], post [..., n], comb [..., n, n]), fp32.
std::tuple<Tensor, Tensor, Tensor> op_hc_sinkhorn(const Tensor &mixes, const Tensor &scale, const Tensor &base,
                                                  int64_t n, int64_t iters, double eps) {
  const char *op = "dsv3::hc_sinkhorn";
  check_f32(mixes, op, "mixes");
  check_cpu(scale, op, "scale");
  check_cpu(base, op, "base");
  TORCH_CHECK(n >= 1 && n <= 16, op, ": n must be in [1, 16], got ", n);
  TORCH_CHECK(iters >= 1, op, ": iters must be >= 1, got ", iters);
  TORCH_CHECK(mixes.dim() >= 1 && mixes.size(-1) == (2 + n) * n, op, ": mixes must be [..., (2 + n) n] = [..., ",
              (2 + n) * n, "], got ", mixes.sizes());
  TORCH_CHECK(scale.numel() == 3 && base.numel() == (2 + n) * n && scale.is_floating_point() && base.is_floating_point(),
              op, ": scale must hold 3 values and base (2 + n) n");
  const Tensor x = mixes.contiguous(), sc = scale.to(at::kFloat).contiguous(), b = base.to(at::kFloat).contiguous();
  const int64_t M = x.numel() / ((2 + n) * n);
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> sp = lead, sc_ = lead;
  sp.push_back(n);
  sc_.push_back(n);
  sc_.push_back(n);
  Tensor pre = at::empty(sp, x.options()), post = at::empty(sp, x.options()), comb = at::empty(sc_, x.options());
  if (M)
    hc_sinkhorn_f32(x.data_ptr<float>(), sc.data_ptr<float>(), b.data_ptr<float>(), M, n, iters, (float)eps,
                    pre.data_ptr<float>(), post.data_ptr<float>(), comb.data_ptr<float>(), at::get_num_threads());
  return {pre, post, comb};
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("rms_norm", &op_rms_norm);
  m.impl("greedy", &op_greedy);
  m.impl("screened_greedy", &op_screened_greedy);
  m.impl("route_noaux", &op_route_noaux);
  m.impl("linear", &op_linear);
  m.impl("mlp", &op_mlp);
  m.impl("moe", &op_moe);
  m.impl("mla_decode", &op_mla_decode);
  m.impl("mla_attend", &op_mla_attend);
  m.impl("decode_layers", &op_decode_layers);
  m.impl("decode_step", &op_decode_step);
  m.impl("pack_linear", &op_pack_linear);
  m.impl("mtp_step", &op_mtp_step);
  m.impl("index_topk", &op_index_topk);
  m.impl("hc_sinkhorn", &op_hc_sinkhorn);
}
