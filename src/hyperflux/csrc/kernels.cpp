// C++ kernels for hyperflux, compiled on first use by hyperflux.kernels (torch.utils.cpp_extension).
//
// gate: the hard L0 gate W * 1[m >= 0] of method.md section 1 as one pass forward and one backward, its
// autograd in C++: in Python it took two passes over the weight and a Python function call each way. On a
// sampled batch the same backward pass also adds the batch's flux -W * g into the caller's accumulator. On
// CUDA or float64 the same autograd function computes with ATen ops (no Python in its backward either).
//
// sparse_linear: y = x W^T + b for a CSR weight W, the product that torch's sparse CSR matmul computes from a
// transposed copy of x. Here x is laid out a tile of rows at a time, feature-major, in a buffer that stays in
// cache, and each non-zero weight is one broadcast and Tile/kWidth vector FMAs over the tile's rows. Beyond two
// rows y is written feature-major and returned as the transposed view of that: a following sparse layer (after
// an elementwise activation, which keeps the layout) then copies its tiles instead of transposing them.
//
// gate_stats, gate_flux_between: the sparsifier's stats() over one float32 CPU mask in one pass.
// set_flush_denormal: flush-to-zero on every intra-op thread; add_to_grads: an optimiser step's pressure, with it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

namespace {

// One register of floats (16 with AVX-512, 8 with AVX or two SSE registers) as a GCC/Clang vector type: the
// compiler then vectorises across the tile's rows as intended (left to itself, GCC may gather along the
// non-zeros instead, several times slower). AVX-512 was faster than AVX2 on 4096-wide layers here.
#ifdef __AVX512F__
typedef float fvec __attribute__((vector_size(64)));
#else
typedef float fvec __attribute__((vector_size(32)));
#endif
constexpr int64_t kWidth = sizeof(fvec) / sizeof(float);

// xt[k * Tile + r] = x[r * in + k] for a full tile of Tile rows (a multiple of 8).
template <int64_t Tile>
void transpose_tile(const float* x, int64_t in, float* xt) {
  int64_t k = 0;
#ifdef __AVX2__
  // 8x8 blocks in registers: row by row would write one cache line per float, and column by column reads
  // Tile rows that may fall into one L1 set (rows 16 KB apart); this was faster than either here.
  for (; k + 8 <= in; k += 8) {
    for (int64_t rb = 0; rb < Tile; rb += 8) {
      const float* s = x + rb * in + k;
      const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + in), r2 = _mm256_loadu_ps(s + 2 * in),
                   r3 = _mm256_loadu_ps(s + 3 * in), r4 = _mm256_loadu_ps(s + 4 * in),
                   r5 = _mm256_loadu_ps(s + 5 * in), r6 = _mm256_loadu_ps(s + 6 * in),
                   r7 = _mm256_loadu_ps(s + 7 * in);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                   t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                   t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                   u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                   u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                   u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = xt + k * Tile + rb;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + Tile, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * Tile, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * Tile, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * Tile, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * Tile, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * Tile, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * Tile, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
#endif
  for (; k < in; ++k)
    for (int64_t r = 0; r < Tile; ++r) xt[k * Tile + r] = x[r * in + k];
}

// The tile of `rows` batch rows starting at x, feature-major in xt (xt[k * Tile + r]), zero past `rows`. x is
// row-major (x[r * ld + k]) or, with `columns`, feature-major already (x[k * ld + r]); `pad` holds Tile
// row-major rows for a short tile.
template <int64_t Tile>
void load_tile(const float* x, int64_t rows, int64_t in, int64_t ld, bool columns, float* xt, float* pad) {
  if (columns) {
    for (int64_t k = 0; k < in; ++k) {
      std::memcpy(xt + k * Tile, x + k * ld, sizeof(float) * rows);
      if (rows < Tile) std::memset(xt + k * Tile + rows, 0, sizeof(float) * (Tile - rows));
    }
    return;
  }
  if (rows < Tile) {
    std::memcpy(pad, x, sizeof(float) * rows * in);
    std::memset(pad + rows * in, 0, sizeof(float) * (Tile - rows) * in);
    x = pad;
  }
  transpose_tile<Tile>(x, in, xt);
}

// Rows [0, rows) of the tile at x, output features [out_begin, out_end), into feature-major y (y[o * ldy + r]).
template <int64_t Tile>
void tile_rows(const float* x, int64_t rows, int64_t in, int64_t ld, bool columns, const int64_t* crow,
               const int64_t* col, const float* val, const float* bias, int64_t out_begin, int64_t out_end,
               int64_t ldy, float* y, fvec* xt, float* pad) {
  constexpr int64_t Lanes = Tile / kWidth;
  // Independent accumulators for consecutive non-zeros: a single chain would wait on each FMA's latency.
  constexpr int64_t Unroll = Lanes >= 4 ? 2 : 8 / Lanes;
  constexpr int64_t Block = 64;  // output features per write-back
  load_tile<Tile>(x, rows, in, ld, columns, reinterpret_cast<float*>(xt), pad);
  fvec sums[Block * Lanes];
  for (int64_t o0 = out_begin; o0 < out_end; o0 += Block) {
    const int64_t o1 = std::min(out_end, o0 + Block);
    for (int64_t o = o0; o < o1; ++o) {
      fvec acc[Unroll][Lanes] = {};
      int64_t p = crow[o];
      const int64_t end = crow[o + 1];
      for (; p + Unroll <= end; p += Unroll) {
        for (int64_t u = 0; u < Unroll; ++u) {
          const fvec v = fvec{} + val[p + u];
          const fvec* xr = xt + col[p + u] * Lanes;
          for (int64_t l = 0; l < Lanes; ++l) acc[u][l] += v * xr[l];
        }
      }
      for (; p < end; ++p) {
        const fvec v = fvec{} + val[p];
        const fvec* xr = xt + col[p] * Lanes;
        for (int64_t l = 0; l < Lanes; ++l) acc[0][l] += v * xr[l];
      }
      const fvec b = fvec{} + (bias ? bias[o] : 0.0f);
      for (int64_t l = 0; l < Lanes; ++l) {
        fvec total = b;
        for (int64_t u = 0; u < Unroll; ++u) total += acc[u][l];
        sums[(o - o0) * Lanes + l] = total;
      }
    }
    const float* s = reinterpret_cast<const float*>(sums);
    for (int64_t o = o0; o < o1; ++o) std::memcpy(y + o * ldy, s + (o - o0) * Tile, sizeof(float) * rows);
  }
}

// y (feature-major, out_features x batch) from x (row-major, or feature-major with `columns`; ld apart).
template <int64_t Tile>
void tiled(const float* x, int64_t batch, int64_t in, int64_t ld, bool columns, const int64_t* crow,
           const int64_t* col, const float* val, const float* bias, int64_t out_features, float* y) {
  const int64_t tiles = (batch + Tile - 1) / Tile;
  // Few tiles (small batches) would leave threads idle: split the output features too.
  const int64_t threads = at::get_num_threads();
  const int64_t parts = tiles >= threads ? 1 : std::min<int64_t>(out_features, (threads + tiles - 1) / tiles);
  const int64_t part_size = (out_features + parts - 1) / parts;
  at::parallel_for(0, tiles * parts, 1, [&](int64_t begin, int64_t end) {
    // left uninitialised: each tile's transpose writes all of it (a short tile is padded with zeros first)
    std::unique_ptr<fvec[]> xt(new fvec[in * (Tile / kWidth)]);
    std::vector<float> pad;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / parts, part = item % parts;
      const int64_t row0 = tile * Tile, rows = std::min(Tile, batch - row0);
      const int64_t out_begin = part * part_size, out_end = std::min(out_features, out_begin + part_size);
      if (out_begin >= out_end) continue;
      if (rows < Tile && !columns && pad.empty()) pad.resize(Tile * in);
      tile_rows<Tile>(columns ? x + row0 : x + row0 * ld, rows, in, ld, columns, crow, col, val, bias, out_begin,
                      out_end, batch, y + row0, xt.get(), pad.data());
    }
  });
}

// One or two rows: gathers straight from x along each CSR row, no transpose.
void gathered(const float* x, int64_t rows, int64_t in, const int64_t* crow, const int64_t* col, const float* val,
              const float* bias, int64_t out_features, float* y) {
  at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * in;
      for (int64_t o = begin; o < end; ++o) {
        float acc0 = 0.0f, acc1 = 0.0f;
        int64_t p = crow[o];
        const int64_t stop = crow[o + 1];
        for (; p + 1 < stop; p += 2) {
          acc0 += val[p] * xr[col[p]];
          acc1 += val[p + 1] * xr[col[p + 1]];
        }
        if (p < stop) acc0 += val[p] * xr[col[p]];
        y[r * out_features + o] = (bias ? bias[o] : 0.0f) + acc0 + acc1;
      }
    }
  });
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                         const std::optional<at::Tensor>& bias, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "hyperflux::sparse_linear: x must be a 2-D float32 CPU tensor");
  // the column indices are trusted to lie below in_features (they come from a CSR tensor of that width)
  TORCH_CHECK(x.size(1) == in_features, "hyperflux::sparse_linear: x has ", x.size(1), " features, the weight ",
              in_features);
  TORCH_CHECK(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong && val.scalar_type() == at::kFloat &&
                  crow.is_contiguous() && col.is_contiguous() && val.is_contiguous() &&
                  col.numel() == val.numel() && crow.numel() >= 1,
              "hyperflux::sparse_linear: expects a float32 CSR weight with int64 indices");
  const int64_t batch = x.size(0), in = x.size(1), out_features = crow.numel() - 1;
  const int64_t* cp = crow.data_ptr<int64_t>();
  const int64_t* cl = col.data_ptr<int64_t>();
  TORCH_CHECK(cp[out_features] == col.numel(), "hyperflux::sparse_linear: malformed CSR row pointers");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out_features,
                "hyperflux::sparse_linear: bias must be float32 with one value per output feature");
    b = bias->data_ptr<float>();
  }
  const float* v = val.data_ptr<float>();
  if (batch == 0 || out_features == 0) return at::empty({batch, out_features}, x.options());
  if (batch <= 2) {
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({batch, out_features}, x.options());
    gathered(xc.data_ptr<float>(), batch, in, cp, cl, v, b, out_features, y.data_ptr<float>());
    return y;
  }
  // a feature-major input (a sparse layer's output) is read as it is; anything else as a row-major copy
  const bool columns = x.stride(0) == 1 && x.stride(1) >= batch;
  const at::Tensor xc = columns ? x : x.contiguous();
  const int64_t ld = columns ? x.stride(1) : in;
  const float* xp = xc.data_ptr<float>();
  at::Tensor yt = at::empty({out_features, batch}, x.options());
  float* yp = yt.data_ptr<float>();
  if constexpr (kWidth == 8) {
    if (batch <= 8) {
      tiled<8>(xp, batch, in, ld, columns, cp, cl, v, b, out_features, yp);
      return yt.t();
    }
  }
  if (batch <= 16)
    tiled<16>(xp, batch, in, ld, columns, cp, cl, v, b, out_features, yp);
  else
    tiled<32>(xp, batch, in, ld, columns, cp, cl, v, b, out_features, yp);
  return yt.t();
}

// The loops below read their operands as flat arrays: a float32 CPU tensor in one dense layout (contiguous,
// channels-last or any other), and beside it operands of that layout, each undefined or of its given dtype.
bool flat_float_cpu(const at::Tensor& base) {
  return base.device().is_cpu() && base.scalar_type() == at::kFloat && base.is_non_overlapping_and_dense();
}
bool same_layout(const at::Tensor& base, const at::Tensor& other, at::ScalarType dtype) {
  return !other.defined() || (other.scalar_type() == dtype && other.strides() == base.strides());
}

// Whether the gate runs as this file's loops, with the result and gradients made in the weight's layout.
// Anything else (CUDA, float64, layouts that differ) takes ATen ops: the same arithmetic, autograd still in C++.
bool gate_loops(const at::Tensor& weight, const at::Tensor& logits, const at::Tensor& flux) {
  return flat_float_cpu(weight) && same_layout(weight, logits, at::kFloat) && same_layout(weight, flux, at::kFloat);
}

// The gate's backward over n elements: dL/dW = H(m) * g, dL/dm = c * W * g (straight through) and the flux
// -W * g, each only where asked; `InPlace` writes dL/dW over g itself. Restrict-qualified parameters, so that
// GCC vectorises all three outputs at once (with pointers captured in a lambda it gave up on three and
// versioned the loop for aliasing).
template <bool Weight, bool InPlace, bool Logits, bool Flux>
void gate_grads(const float* __restrict__ w, const float* __restrict__ m, float* __restrict__ g,
                float* __restrict__ gw, float* __restrict__ gm, float* __restrict__ f, float scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    if constexpr (Logits) gm[i] = 0.0f + scale * w[i] * gi;  // + 0: a zero as the Python gate's addcmul signs it
    if constexpr (Flux) f[i] -= w[i] * gi;
    if constexpr (Weight) (InPlace ? g : gw)[i] = gi * (m[i] >= 0.0f ? 1.0f : 0.0f);
  }
}

using GateGrads = void (*)(const float*, const float*, float*, float*, float*, float*, float, int64_t);

// gate_grads for each combination of outputs, indexed by Weight << 3 | InPlace << 2 | Logits << 1 | Flux.
template <int64_t... I>
constexpr std::array<GateGrads, sizeof...(I)> gate_grads_table(std::integer_sequence<int64_t, I...>) {
  return {&gate_grads<(I & 8) != 0, (I & 4) != 0, (I & 2) != 0, (I & 1) != 0>...};
}
constexpr auto kGateGrads = gate_grads_table(std::make_integer_sequence<int64_t, 16>{});

// Whether the backward may write dL/dW over the incoming gradient: nothing else holds it or its memory, which
// it covers in the weight's layout. It saves the pass that reads fresh memory in for dL/dW, and that memory.
// The engine hands each gradient to one node (one handed to two, or kept by a hook, has more owners). A
// Linear's weight gradient comes as a view whose base only the view holds.
bool writable_in_place(const at::Tensor& grad, const at::Tensor& weight) {
  if (grad.use_count() != 1 || grad.scalar_type() != at::kFloat || grad.strides() != weight.strides() ||
      grad.storage_offset() != 0 ||
      static_cast<int64_t>(grad.storage().nbytes()) != grad.numel() * static_cast<int64_t>(sizeof(float))) {
    return false;
  }
  if (!grad.is_view()) return grad.storage().use_count() == 1;
  return grad._base().use_count() == 1 && grad.storage().use_count() == 2;  // the base, held by the view only
}

// A tensor of `like`'s sizes, strides and dtype in the memory `slot` holds when nothing else holds that memory
// (this gate's gradient of the step before, released since), else in new memory; `slot` takes the new memory
// only when it held none of that shape. Both gradients allocated afresh page-faulted at most steps: with two
// such blocks alive at once, glibc's malloc handed the freed memory back to the system between steps. Memory
// that something else still holds (a kept gradient, a retained graph) is never written, and a slot keeps
// memory alive only between a step's zero_grad and its backward pass, which hold as much at their peak anyway.
at::Tensor in_slot(at::Tensor& slot, const at::Tensor& like) {
  const bool fits = slot.defined() && slot.scalar_type() == like.scalar_type() && slot.device() == like.device() &&
                    slot.sizes() == like.sizes() && slot.strides() == like.strides();
  if (fits && slot.storage().use_count() == 1) {
    return at::empty({0}, like.options()).set_(slot.storage(), slot.storage_offset(), slot.sizes(), slot.strides());
  }
  at::Tensor fresh = at::empty_like(like);
  if (slot.defined() && !fits) slot.set_(fresh);
  return fresh;
}

class GateFunction : public torch::autograd::Function<GateFunction> {
 public:
  // `flux`, when defined (a sampled batch), receives -W * g in the backward pass, in the same loop: a float32
  // tensor of the weight's layout that the caller owns and that is not differentiated. `slots`, when given, are
  // two CPU tensors the caller keeps for the memory of the two gradients (`in_slot`).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                            const at::Tensor& logits, double scale, const std::optional<at::Tensor>& sampled,
                            const std::optional<std::vector<at::Tensor>>& given_slots) {
    const at::Tensor flux = sampled.value_or(at::Tensor());
    TORCH_CHECK(weight.sizes() == logits.sizes() && weight.device() == logits.device() &&
                    weight.scalar_type() == logits.scalar_type() && at::isFloatingType(weight.scalar_type()),
                "hyperflux::gate: weight and logits must be floating tensors of one shape, dtype and device");
    TORCH_CHECK(!flux.defined() || (flux.scalar_type() == at::kFloat && flux.device() == weight.device() &&
                                    flux.sizes() == weight.sizes() && !flux.requires_grad()),
                "hyperflux::gate: flux must be a float32 tensor of the weight's shape and device");
    const bool loops = gate_loops(weight, logits, flux);
    const std::vector<at::Tensor> slots = given_slots.value_or(std::vector<at::Tensor>(2));
    TORCH_CHECK(slots.size() == 2, "hyperflux::gate: slots must be two tensors");
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["flux"] = flux;
    ctx->saved_data["loops"] = loops;
    ctx->saved_data["weight_slot"] = slots[0];
    ctx->saved_data["logits_slot"] = slots[1];
    if (!loops) {  // a 0/1 gate in the weight's dtype, saved for the backward, as the Python gate does
      at::Tensor open = at::empty_like(weight);
      at::ge_out(open, logits, 0);
      ctx->save_for_backward({weight, open});
      return weight * open;
    }
    ctx->save_for_backward({weight, logits});
    at::Tensor out = at::empty_like(weight);
    const float* __restrict__ w = weight.data_ptr<float>();
    const float* __restrict__ m = logits.data_ptr<float>();
    float* __restrict__ o = out.data_ptr<float>();
    // W * H(m) as a product, as the Python gate computes it (same zeros' signs and NaNs), and branch-free
    at::parallel_for(0, weight.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = w[i] * (m[i] >= 0.0f ? 1.0f : 0.0f);
    });
    return out;
  }

  // `grads` by reference: torch passes the list it owns, which this clears, so that an unshared gradient has
  // one owner here and its memory can take dL/dW
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const at::Tensor& logits = saved[1];  // the 0/1 gate itself where the forward took ATen ops
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool loops = ctx->saved_data["loops"].toBool();
    at::Tensor flux = ctx->saved_data["flux"].toTensor();
    at::Tensor grad = grads[0];
    const bool want_weight = ctx->needs_input_grad(0), want_logits = ctx->needs_input_grad(1);
    // ATen ops: on other devices and dtypes, and under create_graph, whose gradients must be differentiable in
    // turn; dL/dm as the Python gate's addcmul computes it (for half types in float, rounded once)
    if (!loops || at::GradMode::is_enabled()) {
      if (flux.defined()) {
        at::NoGradGuard no_grad;
        flux.addcmul_(weight, grad, -1);
      }
      const at::Tensor open = loops ? logits.ge(0).to(grad.scalar_type()) : logits;
      const at::Tensor grad_logits =
          want_logits ? at::addcmul(at::zeros({}, grad.options()), weight, grad, scale) : at::Tensor();
      return {want_weight ? grad * open : at::Tensor(), grad_logits, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // an upstream gradient of another layout (an expanded scalar, say) is copied into the weight's
    if (grad.strides() != weight.strides()) grad = at::empty_like(weight).copy_(grad);
    grads.clear();
    const bool in_place = want_weight && writable_in_place(grad, weight);
    at::Tensor weight_slot = ctx->saved_data["weight_slot"].toTensor();
    at::Tensor logits_slot = ctx->saved_data["logits_slot"].toTensor();
    // in place: a tensor of its own on the gradient's memory, for a view's base would otherwise show in W.grad
    at::Tensor grad_weight =
        in_place     ? at::empty({0}, grad.options()).set_(grad.storage(), 0, grad.sizes(), grad.strides())
        : want_weight ? in_slot(weight_slot, weight)
                      : at::Tensor();
    at::Tensor grad_logits = want_logits ? in_slot(logits_slot, weight) : at::Tensor();
    const float* w = weight.data_ptr<float>();
    const float* m = logits.data_ptr<float>();
    float* g = grad.data_ptr<float>();  // written only in place
    float* gw = want_weight && !in_place ? grad_weight.data_ptr<float>() : nullptr;
    float* gm = want_logits ? grad_logits.data_ptr<float>() : nullptr;
    float* f = flux.defined() ? flux.data_ptr<float>() : nullptr;
    const GateGrads grads_of = kGateGrads[(want_weight ? 8 : 0) | (in_place ? 4 : 0) | (gm ? 2 : 0) | (f ? 1 : 0)];
    const float c = static_cast<float>(scale);
    at::parallel_for(0, weight.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      grads_of(w + begin, m + begin, g + begin, gw ? gw + begin : nullptr, gm ? gm + begin : nullptr,
               f ? f + begin : nullptr, c, end - begin);
    });
    return {grad_weight, grad_logits, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor gate(const at::Tensor& weight, const at::Tensor& logits, double scale,
                const std::optional<at::Tensor>& flux, const std::optional<std::vector<at::Tensor>>& slots) {
  return GateFunction::apply(weight, logits, scale, flux, slots);
}

// The sparsifier's stats() over one masked tensor, in one pass where torch ops took some fifteen (a bucketize
// the slowest): the tensor's weights kept, pruned and regrown since the snapshot `before`, and, when `flux_sum`
// is given, each weight's flux (flux_sum / batches * units, as the Python computes it, float32 throughout):
// the survivors' minimum and sum, the pruned weights' sum, and the histogram of survivors then of pruned
// weights over `edges` (bin i: edges[i - 1] <= flux < edges[i], NaN in the last, as torch.bucketize(right=True)).
// Returned as float64: [kept, pruned, regrown] and, with flux, [min, survivors' sum, pruned sum, 2 * 40 counts];
// None for tensors these loops do not read (other devices, dtypes or layouts).
constexpr int64_t kHistEdges = 39;
constexpr int64_t kHistBins = kHistEdges + 1;

// A weight's flux in pressure units from its accumulator: flux_sum / batches * units, rounded as the Python's
// `mean_flux() * units` is (float32 throughout), so that both paths bin every value alike.
struct PressureUnits {
  float divisor, scale;
  PressureUnits(int64_t batches, double units)
      : divisor(static_cast<float>(std::max<int64_t>(batches, 1))), scale(static_cast<float>(units)) {}
  float operator()(float flux_sum) const { return flux_sum / divisor * scale; }
};

// The smaller of two floats, NaN if either is (as torch's amin has it).
inline float nan_min(float a, float b) {
  return std::isnan(a) || std::isnan(b) ? std::numeric_limits<float>::quiet_NaN() : std::min(a, b);
}

struct StatsPart {
  int64_t kept = 0, pruned = 0, regrown = 0;
  float alive_min = std::numeric_limits<float>::infinity();
  double alive_sum = 0.0, dead_sum = 0.0;
  int64_t hist[2 * kHistBins] = {};
};

std::optional<at::Tensor> gate_stats(const at::Tensor& logits, const at::Tensor& before,
                                     const std::optional<at::Tensor>& flux_sum, int64_t batches, double units,
                                     const std::vector<double>& edges) {
  const at::Tensor flux = flux_sum.value_or(at::Tensor());
  TORCH_CHECK(logits.sizes() == before.sizes() && (!flux.defined() || flux.sizes() == logits.sizes()),
              "hyperflux::gate_stats: logits, snapshot and flux must have one shape");
  if (!(flat_float_cpu(logits) && same_layout(logits, before, at::kBool) && same_layout(logits, flux, at::kFloat))) {
    return std::nullopt;  // the caller computes with torch ops
  }
  TORCH_CHECK(static_cast<int64_t>(edges.size()) == kHistEdges, "hyperflux::gate_stats: expected ", kHistEdges,
              " histogram edges");
  float edge[kHistEdges];
  for (int64_t e = 0; e < kHistEdges; ++e) edge[e] = static_cast<float>(edges[e]);
  const float* m = logits.data_ptr<float>();
  const bool* b = before.data_ptr<bool>();
  const bool with_flux = flux.defined();  // an empty tensor's data pointer may be null: not a test of this
  const float* f = with_flux ? flux.data_ptr<float>() : nullptr;
  const PressureUnits to_units(batches, units);
  std::vector<StatsPart> parts(at::get_num_threads());
  at::parallel_for(0, logits.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    StatsPart& part = parts[at::get_thread_num()];
    constexpr int64_t kBlock = 256;
    float value[kBlock];
    int32_t index[kBlock];
    for (int64_t start = begin; start < end; start += kBlock) {
      const int64_t len = std::min(kBlock, end - start);
      const float* mb = m + start;
      const bool* bb = b + start;
      for (int64_t i = 0; i < len; ++i) {
        const bool alive = mb[i] >= 0.0f, was = bb[i];
        part.kept += alive;
        part.pruned += was && !alive;
        part.regrown += !was && alive;
      }
      if (!with_flux) continue;
      for (int64_t i = 0; i < len; ++i) value[i] = to_units(f[start + i]);
      for (int64_t i = 0; i < len; ++i) {  // branch-free: the edges at or below the value, vectorised
        int32_t count = 0;
        for (int64_t e = 0; e < kHistEdges; ++e) count += value[i] >= edge[e];
        index[i] = count;
      }
      for (int64_t i = 0; i < len; ++i) {
        const float v = value[i];
        const bool alive = mb[i] >= 0.0f;
        part.hist[(std::isnan(v) ? kHistEdges : index[i]) + (alive ? 0 : kHistBins)] += 1;
        if (alive) {
          part.alive_min = nan_min(part.alive_min, v);
          part.alive_sum += v;
        } else {
          part.dead_sum += v;
        }
      }
    }
  });
  StatsPart total;
  for (const StatsPart& part : parts) {
    total.kept += part.kept;
    total.pruned += part.pruned;
    total.regrown += part.regrown;
    total.alive_min = nan_min(total.alive_min, part.alive_min);
    total.alive_sum += part.alive_sum;
    total.dead_sum += part.dead_sum;
    for (int64_t i = 0; i < 2 * kHistBins; ++i) total.hist[i] += part.hist[i];
  }
  at::Tensor out = at::empty({with_flux ? 6 + 2 * kHistBins : 3}, at::kDouble);
  double* o = out.data_ptr<double>();
  o[0] = total.kept, o[1] = total.pruned, o[2] = total.regrown;
  if (with_flux) {
    o[3] = total.alive_min, o[4] = total.alive_sum, o[5] = total.dead_sum;
    for (int64_t i = 0; i < 2 * kHistBins; ++i) o[6 + i] = static_cast<double>(total.hist[i]);
  }
  return out;
}

// The survivors' flux (as gate_stats computes it) with lo <= flux < hi, either bound left out when NaN is
// given for it: the values of one histogram bin, from which stats() ranks its quantile.
at::Tensor gate_flux_between(const at::Tensor& logits, const at::Tensor& flux_sum, int64_t batches, double units,
                             double lo, double hi) {
  TORCH_CHECK(flux_sum.defined() && logits.sizes() == flux_sum.sizes() && flat_float_cpu(logits) &&
                  same_layout(logits, flux_sum, at::kFloat),
              "hyperflux::gate_flux_between: float32 CPU logits and flux of one shape and layout");
  const float* m = logits.data_ptr<float>();
  const float* f = flux_sum.data_ptr<float>();
  const PressureUnits to_units(batches, units);
  const float low = static_cast<float>(lo), high = static_cast<float>(hi);
  const bool has_low = !std::isnan(lo), has_high = !std::isnan(hi);
  std::vector<float> values;
  for (int64_t i = 0, n = logits.numel(); i < n; ++i) {
    const float v = to_units(f[i]);
    if (m[i] >= 0.0f && !(has_low && v < low) && (!has_high || v < high)) values.push_back(v);
  }
  return at::tensor(values, at::kFloat);
}

// Flush-to-zero and denormals-are-zero: x86's FTZ (MXCSR bit 15) and DAZ (bit 6), AArch64's FZ (FPCR bit 24).
bool flush_bits(bool on) {
#if defined(__x86_64__) || defined(__i386__)
  constexpr unsigned kBits = (1u << 15) | (1u << 6);
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(on ? csr | kBits : csr & ~kBits);
  return (csr & kBits) == kBits;
#elif defined(__aarch64__)
  constexpr uint64_t kBit = 1ull << 24;
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  const uint64_t next = on ? fpcr | kBit : fpcr & ~kBit;
  __asm__ __volatile__("msr fpcr, %0" : : "r"(next));
  return (fpcr & kBit) != 0;
#else
  (void)on;
  return false;
#endif
}

// work(t, threads) once for each t in [0, threads), each on its own intra-op thread (all inline when called
// from one): the flag below is per thread.
template <typename Work>
void on_each_thread(const Work& work) {
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {  // one index per thread
    for (int64_t t = begin; t < end; ++t) work(t, threads);
  });
}

// The flag is per thread: torch.set_flush_denormal sets only the calling thread's, so the intra-op threads
// that run most of a large op kept computing denormals at a fraction of the speed. Returns the caller's
// previous setting.
bool set_flush_denormal(bool on) {
  const bool previous = flush_bits(on);
  on_each_thread([on](int64_t, int64_t) { flush_bits(on); });
  return previous;
}

// grads[k] += values[k] in place, as torch's add_ rounds it (the value to float, then one float add), for an
// optimiser step's pressure; with `flush`, flush-to-zero is set on every intra-op thread in the same parallel
// pass (set_flush_denormal). In a LeNet-300-100 training step the foreach add and the flag's own pass over the
// threads cost more than the add's memory traffic. CPU gradients that are not float32 take ATen's add_ (the
// caller sends other devices' to torch's foreach add, one launch for all). Returns whether the calling thread
// flushed before (true when `flush` is false: nothing to undo).
bool add_to_grads(const std::vector<at::Tensor>& grads, const std::vector<double>& values, bool flush) {
  TORCH_CHECK(grads.size() == values.size(), "hyperflux::add_to_grads: one value per gradient");
  std::vector<std::pair<float*, int64_t>> spans;
  std::vector<float> adds;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (flat_float_cpu(grads[k])) {
      spans.emplace_back(grads[k].data_ptr<float>(), grads[k].numel());
      adds.push_back(static_cast<float>(values[k]));
      grads[k].unsafeGetTensorImpl()->bump_version();
    } else {
      grads[k].add_(values[k]);
    }
  }
  if (spans.empty() && !flush) return true;
  const bool previous = flush ? flush_bits(true) : true;
  on_each_thread([&](int64_t t, int64_t threads) {
    if (flush) flush_bits(true);
    for (size_t k = 0; k < spans.size(); ++k) {
      float* __restrict__ g = spans[k].first;
      const float v = adds[k];
      const int64_t n = spans[k].second;
      for (int64_t i = n * t / threads; i < n * (t + 1) / threads; ++i) g[i] += v;
    }
  });
  return previous;
}

}  // namespace

// Called from Python through pybind, which converts the arguments directly: a few microseconds a call less
// than a torch.ops registration's boxed call (much of a small layer's time).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", &sparse_linear, pybind11::arg("x"), pybind11::arg("crow"), pybind11::arg("col"),
        pybind11::arg("val"), pybind11::arg("bias"), pybind11::arg("in_features"));
  m.def("gate", &gate, pybind11::arg("weight"), pybind11::arg("logits"), pybind11::arg("scale"),
        pybind11::arg("flux") = pybind11::none(), pybind11::arg("slots") = pybind11::none());
  m.def("set_flush_denormal", &set_flush_denormal, pybind11::arg("on"));
  m.def("add_to_grads", &add_to_grads, pybind11::arg("grads"), pybind11::arg("values"), pybind11::arg("flush"));
  m.def("gate_stats", &gate_stats, pybind11::arg("logits"), pybind11::arg("before"), pybind11::arg("flux_sum"),
        pybind11::arg("batches"), pybind11::arg("units"), pybind11::arg("edges"));
  m.def("gate_flux_between", &gate_flux_between, pybind11::arg("logits"), pybind11::arg("flux_sum"),
        pybind11::arg("batches"), pybind11::arg("units"), pybind11::arg("lo"), pybind11::arg("hi"));
}
