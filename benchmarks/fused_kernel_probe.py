"""What a fused CPU kernel would buy the MoE layer on CNN feature maps: a probe, forward only (issue 22).

    python benchmarks/fused_kernel_probe.py --threads 1 --repeats 7

Issue 22 asks for the MoE step at most 1.15x its dense twin's on CIFAR-CNN feature maps, where tokens are
8-32 channels wide. The routers alone already cost more than that in most cells (BENCHMARKS.md, "CNN
feature maps": the floor), and the note of that pass named a fused routing kernel as the way left. This
probe measures two such kernels before anyone builds one for real (compiled here with
``torch.utils.cpp_extension.load_inline``, -O3 -march=native), forward only:

- per-token: one scalar C++ pass per token that computes the router logits, the softmax over E, the
  top-2, the capacity positions (choice-major, as :func:`visionmoe.routing.token_choice`), and then each
  kept choice's expert MLP, summed with its gate;
- blocked: the routing vectorised across 8 tokens (one AVX2-wide GCC/Clang vector per expert, with a
  polynomial exp, as libm's ``expf`` is a call per element), then the kept rows gathered into per-expert
  buffers, the experts as two batched GEMMs (ATen, as the layer's ``padded`` backend) and the gated rows
  added back. Its routing alone ("stage 0") and its routing with the gather ("stage 1") are timed too;
  "lane-wise experts" (stage 3) replaces the buffers and GEMMs by each expert run on 8 of its kept rows at
  once, lane-wise FMAs with broadcast weights (and an A&S erf for GELU), no padding.

Both are checked equal (to float rounding) to :class:`visionmoe.MoE` in eval mode (no router noise), then
timed under ``no_grad``, interleaved with the MoE layer itself (``auto``), the per-token kernel with
capacity 0 (its routing only) and the twin's FFN (one MLP of width k·H, the dense FFN of equal active
FLOPs). Not part of the library: a measurement of how far a fused kernel gets, before anyone writes one.
Needs a C++ compiler (and ninja); the build is cached by torch.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from visionmoe import MoE
from visionmoe.allocator import keep_freed_memory
from visionmoe.analysis.speed import benchmark_header, interleaved_times

SOURCE = r"""
#include <torch/extension.h>
#include <cmath>
#include <cstring>
#include <vector>

// x (G, S, D); router weight (E, D); experts w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D).
// Top-2 token choice with capacity C per expert and group, choice-major positions; returns (G, S, D).
torch::Tensor top2_moe(torch::Tensor x, torch::Tensor wr, torch::Tensor w1, torch::Tensor b1,
                       torch::Tensor w2, torch::Tensor b2, int64_t capacity, bool relu) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat, "x must be contiguous float32");
  const int64_t G = x.size(0), S = x.size(1), D = x.size(2), E = wr.size(0), H = w1.size(2);
  TORCH_CHECK(E <= 64 && E >= 2, "2 <= E <= 64");
  auto y = torch::zeros_like(x);
  const float *X = x.data_ptr<float>(), *WR = wr.data_ptr<float>(), *W1 = w1.data_ptr<float>();
  const float *B1 = b1.data_ptr<float>(), *W2 = w2.data_ptr<float>(), *B2 = b2.data_ptr<float>();
  float *Y = y.data_ptr<float>();
  std::vector<int64_t> expert(2 * S), position(2 * S), count(E);
  std::vector<float> gate(2 * S), h(H);
  for (int64_t g = 0; g < G; ++g) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t s = 0; s < S; ++s) {  // router: logits, softmax, top-2, first-choice positions
      const float* xs = X + (g * S + s) * D;
      float p[64], top = -INFINITY, z = 0.f;
      for (int64_t e = 0; e < E; ++e) {
        float a = 0.f;
        for (int64_t d = 0; d < D; ++d) a += WR[e * D + d] * xs[d];
        p[e] = a;
        top = std::max(top, a);
      }
      for (int64_t e = 0; e < E; ++e) { p[e] = std::exp(p[e] - top); z += p[e]; }
      int64_t a = 0;
      for (int64_t e = 1; e < E; ++e) if (p[e] > p[a]) a = e;
      int64_t b = a == 0 ? 1 : 0;
      for (int64_t e = 0; e < E; ++e) if (e != a && p[e] > p[b]) b = e;
      expert[s] = a; expert[S + s] = b; gate[s] = p[a] / z; gate[S + s] = p[b] / z;
      position[s] = count[a]++;
    }
    for (int64_t s = 0; s < S; ++s) position[S + s] = count[expert[S + s]]++;  // second choices after all first
    for (int64_t j = 0; j < 2 * S; ++j) {  // experts: each kept choice's MLP, scaled by its gate
      if (position[j] >= capacity) continue;
      const int64_t s = j % S, e = expert[j];
      const float w = gate[j], *xs = X + (g * S + s) * D, *w1e = W1 + e * D * H, *w2e = W2 + e * H * D;
      float* ys = Y + (g * S + s) * D;
      for (int64_t k = 0; k < H; ++k) h[k] = B1[e * H + k];
      for (int64_t d = 0; d < D; ++d) for (int64_t k = 0; k < H; ++k) h[k] += xs[d] * w1e[d * H + k];
      for (int64_t k = 0; k < H; ++k)
        h[k] = relu ? std::max(h[k], 0.f) : 0.5f * h[k] * (1.f + std::erf(h[k] * 0.70710678118654752f));
      for (int64_t d = 0; d < D; ++d) ys[d] += w * B2[e * D + d];
      for (int64_t k = 0; k < H; ++k) for (int64_t d = 0; d < D; ++d) ys[d] += w * h[k] * w2e[k * D + d];
    }
  }
  return y;
}

// The same layer, blocked: routing vectorised across 8 tokens at a time (one AVX2 register per expert:
// logits, max, exp, sum, top-2 lane-wise, with GCC/Clang vector types), positions by a scalar count,
// the kept rows gathered into per-expert buffers (E, G*C, D), the experts as two batched GEMMs (ATen,
// as the layer's `padded` backend), and the gated rows added back. stage 0: routing only; 1: routing and
// dispatch (the gather); 2: the whole layer; 3: the whole layer with lane-wise experts (expert_block)
// instead of the buffers and GEMMs.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int64_t L = 8, EB = 8;

// exp for x <= 0 in lane-wise arithmetic (libm's expf is a call per element): x = n ln2 + r,
// |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n through the exponent bits; a few ulp, clamped at -87.
static inline v8f exp_nonpositive(v8f x) {
  const v8f lo = v8f{} - 87.0f;
  x = x < lo ? lo : x;
  const v8f t = x * 1.44269504088896341f;
  const v8i n = __builtin_convertvector(t - 0.5f, v8i);  // t <= 0: round half away from zero
  const v8f nf = __builtin_convertvector(n, v8f);
  const v8f r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  v8f p = v8f{} + 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  v8i bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += n << 23;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), lane-wise.
static inline v8f erf_lanes(v8f x) {
  const v8f ax = x < 0 ? -x : x;
  const v8f t = 1.0f / (1.0f + 0.3275911f * ax);
  v8f q = v8f{} + 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  const v8f e = 1.0f - q * t * exp_nonpositive(-ax * ax);
  return x < 0 ? -e : e;
}

// One expert on up to 8 of its kept rows at once (lanes = rows): h = act(x W1 + b1), y += gate (h W2 + b2),
// both GEMMs as lane-wise FMAs with the weights broadcast; no buffers, no padding.
template <int64_t DT>  // DT > 0: the width known at compile time (8, 16, 32); 0: any width up to 256
static void expert_block(const float* X, float* Y, const int32_t* token, const float* gate, int64_t n, int64_t Dr,
                         int64_t H, const float* w1, const float* b1, const float* w2, const float* b2, bool relu) {
  const int64_t D = DT > 0 ? DT : Dr;
  alignas(32) float xt[DT > 0 ? DT : 256][L];
  alignas(32) v8f out[DT > 0 ? DT : 256];
  for (int64_t l = 0; l < L; ++l)
    for (int64_t d = 0; d < D; ++d) xt[d][l] = l < n ? X[token[l] * D + d] : 0.f;
  for (int64_t d = 0; d < D; ++d) out[d] = v8f{} + b2[d];
  for (int64_t k = 0; k < H; ++k) {
    v8f h0 = v8f{} + b1[k], h1 = v8f{};
    int64_t d = 0;
    for (; d + 1 < D; d += 2) {
      v8f x0, x1;
      std::memcpy(&x0, xt[d], sizeof x0);
      std::memcpy(&x1, xt[d + 1], sizeof x1);
      h0 += w1[d * H + k] * x0;
      h1 += w1[(d + 1) * H + k] * x1;
    }
    if (d < D) { v8f x0; std::memcpy(&x0, xt[d], sizeof x0); h0 += w1[d * H + k] * x0; }
    v8f h = h0 + h1;
    h = relu ? (h > 0 ? h : v8f{}) : 0.5f * h * (1.0f + erf_lanes(h * 0.70710678118654752f));
    const float* w2k = w2 + k * D;
    for (int64_t d2 = 0; d2 < D; ++d2) out[d2] += w2k[d2] * h;
  }
  for (int64_t l = 0; l < n; ++l) {
    float* y = Y + token[l] * D;
    for (int64_t d = 0; d < D; ++d) y[d] += gate[l] * out[d][l];
  }
}

torch::Tensor top2_moe_blocked(torch::Tensor x, torch::Tensor wr, torch::Tensor w1, torch::Tensor b1,
                               torch::Tensor w2, torch::Tensor b2, int64_t capacity, bool relu, int64_t stage) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat, "x must be contiguous float32");
  const int64_t G = x.size(0), S = x.size(1), D = x.size(2), E = wr.size(0);
  TORCH_CHECK(E == EB && D <= 256 && S % L == 0, "the probe's blocked kernel needs E = 8, D <= 256, S % 8 == 0");
  const float *X = x.data_ptr<float>(), *WR = wr.data_ptr<float>();
  std::vector<int32_t> expert(2 * S), position(2 * S), count(E);
  std::vector<float> gate(2 * S);
  const int64_t C = capacity, H = w1.size(2);
  const bool padded = stage == 1 || stage == 2;  // the per-expert buffers and their slot maps
  auto buf = padded ? torch::zeros({E, G * C, D}, x.options()) : torch::Tensor();
  std::vector<int32_t> slot_token(padded ? E * G * C : 0, -1);
  std::vector<float> slot_gate(padded ? E * G * C : 0, 0.f);
  auto y3 = stage == 3 ? torch::zeros_like(x) : torch::Tensor();
  std::vector<int32_t> rows(stage == 3 ? E * C : 0);
  std::vector<float> gates(stage == 3 ? E * C : 0);
  const auto block = D == 8    ? expert_block<8>
                     : D == 16 ? expert_block<16>
                     : D == 32 ? expert_block<32>
                               : expert_block<0>;
  alignas(32) float xt[256][L];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t s0 = 0; s0 < S; s0 += L) {
      for (int64_t l = 0; l < L; ++l)
        for (int64_t d = 0; d < D; ++d) xt[d][l] = X[(g * S + s0 + l) * D + d];
      v8f p[EB];
      for (int64_t e = 0; e < EB; ++e) p[e] = v8f{};
      for (int64_t d = 0; d < D; ++d) {
        v8f xd;
        std::memcpy(&xd, xt[d], sizeof xd);
        for (int64_t e = 0; e < EB; ++e) p[e] += WR[e * D + d] * xd;
      }
      v8f top = p[0], z = v8f{};
      for (int64_t e = 1; e < EB; ++e) top = p[e] > top ? p[e] : top;
      for (int64_t e = 0; e < EB; ++e) { p[e] = exp_nonpositive(p[e] - top); z += p[e]; }
      v8f pa = p[0], pb = v8f{} - INFINITY;
      v8i a = v8i{}, b = v8i{} + 1;
      for (int64_t e = 1; e < EB; ++e) {  // first maximum, then the first maximum of the rest
        const v8f v = p[e];
        const v8i first = v > pa, second = ~first & (v > pb);
        pb = first ? pa : (second ? v : pb);
        b = first ? a : (second ? v8i{} + static_cast<int32_t>(e) : b);
        pa = first ? v : pa;
        a = first ? v8i{} + static_cast<int32_t>(e) : a;
      }
      const v8f r = 1.0f / z;
      pa *= r;
      pb *= r;
      for (int64_t l = 0; l < L; ++l) {
        expert[s0 + l] = a[l]; expert[S + s0 + l] = b[l];
        gate[s0 + l] = pa[l]; gate[S + s0 + l] = pb[l];
      }
    }
    if (stage == 0) continue;
    std::fill(count.begin(), count.end(), 0);
    for (int64_t j = 0; j < 2 * S; ++j) position[j] = count[expert[j]]++;  // choice-major: all first choices first
    if (stage == 3) {  // each expert's kept rows, in position order, 8 at a time
      for (int64_t j = 0; j < 2 * S; ++j)
        if (position[j] < C) {
          rows[expert[j] * C + position[j]] = g * S + j % S;
          gates[expert[j] * C + position[j]] = gate[j];
        }
      for (int64_t e = 0; e < E; ++e) {
        const int64_t kept = std::min<int64_t>(count[e], C);
        for (int64_t r0 = 0; r0 < kept; r0 += L)
          block(X, y3.data_ptr<float>(), rows.data() + e * C + r0, gates.data() + e * C + r0,
                std::min<int64_t>(L, kept - r0), D, H, w1.data_ptr<float>() + e * D * H, b1.data_ptr<float>() + e * H,
                w2.data_ptr<float>() + e * H * D, b2.data_ptr<float>() + e * D, relu);
      }
      continue;
    }
    for (int64_t j = 0; j < 2 * S; ++j) {
      if (position[j] >= C) continue;
      const int64_t s = j % S, slot = expert[j] * G * C + g * C + position[j];
      std::copy(X + (g * S + s) * D, X + (g * S + s + 1) * D, buf.data_ptr<float>() + slot * D);
      slot_token[slot] = g * S + s;
      slot_gate[slot] = gate[j];
    }
  }
  if (stage == 3) return y3;
  if (stage == 0) return torch::empty({0}, x.options());  // routing only: nothing gathered
  if (stage == 1) return buf;
  auto h = torch::baddbmm(b1.unsqueeze(1), buf, w1);
  h = relu ? h.relu_() : torch::gelu(h);
  auto out = torch::baddbmm(b2.unsqueeze(1), h, w2).contiguous();
  auto y = torch::zeros_like(x);
  float* Y = y.data_ptr<float>();
  const float* O = out.data_ptr<float>();
  for (int64_t slot = 0; slot < E * G * C; ++slot) {
    const int32_t t = slot_token[slot];
    if (t < 0) continue;
    const float w = slot_gate[slot];
    for (int64_t d = 0; d < D; ++d) Y[t * D + d] += w * O[slot * D + d];
  }
  return y;
}
"""


ROUTING, DISPATCH, PADDED, LANEWISE = 0, 1, 2, 3  # stages of top2_moe_blocked


def build():
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        "visionmoe_fused_probe",
        cpp_sources=[SOURCE],
        functions=["top2_moe", "top2_moe_blocked"],
        extra_cflags=["-O3", "-march=native"],
    )


def cell(ext, images: int, tokens: int, dim: int, ratio: int, relu: bool, args) -> dict:
    torch.manual_seed(0)
    hidden = dim * ratio
    act = nn.ReLU if relu else nn.GELU
    moe = MoE(dim, 8, hidden, k=2, capacity_factor=1.25, activation=act).eval()
    twin = nn.Sequential(nn.Linear(dim, 2 * hidden), act(), nn.Linear(2 * hidden, dim))
    x = torch.randn(images, tokens, dim)
    capacity = moe.router.group_capacity(tokens)
    w = [moe.router.weight, moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2]
    with torch.no_grad():
        w = [t.detach().contiguous() for t in w]
        expected = moe(x)
        torch.testing.assert_close(ext.top2_moe(x, *w, capacity, relu), expected, rtol=1e-4, atol=1e-5)
        for stage in (PADDED, LANEWISE):
            got = ext.top2_moe_blocked(x, *w, capacity, relu, stage)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        fns = {
            "moe": lambda: moe(x),
            "fused": lambda: ext.top2_moe(x, *w, capacity, relu),
            "routing": lambda: ext.top2_moe(x, *w, 0, relu),
            "blocked": lambda: ext.top2_moe_blocked(x, *w, capacity, relu, PADDED),
            "vectorised": lambda: ext.top2_moe_blocked(x, *w, capacity, relu, LANEWISE),
            "blocked_routing": lambda: ext.top2_moe_blocked(x, *w, capacity, relu, ROUTING),
            "blocked_dispatch": lambda: ext.top2_moe_blocked(x, *w, capacity, relu, DISPATCH),
            "twin": lambda: twin(x),
        }
        times = interleaved_times(fns, threads=args.threads, repeats=args.repeats)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"dim": dim, "ratio": ratio, "act": act.__name__, **ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per image (32×32 map: 1024)")
    parser.add_argument("--widths", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--ratios", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="glibc keeps freed memory, as training does (header says)"
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    ext = build()
    print(benchmark_header("Fused kernel probe (per-token, blocked, lane-wise): forward, E = 8, top-2", args.threads))
    print(f"\n{args.images} images × {args.tokens} tokens; ms per forward (median of {args.repeats} interleaved)\n")
    print(
        "| width | hidden ratio | experts | twin FFN ms | MoE layer ms | per-token kernel ms | its routing ms | "
        "blocked kernel ms | its routing ms | its routing + dispatch ms | lane-wise experts ms | MoE / twin | "
        "per-token / twin | blocked / twin | blocked routing / twin | lane-wise / twin |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for relu in (False, True):
        for dim in args.widths:
            for ratio in args.ratios:
                r = cell(ext, args.images, args.tokens, dim, ratio, relu, args)
                t = r["twin"]
                print(
                    f"| {dim} | {ratio} | {r['act']} | {t:.2f} | {r['moe']:.2f} | {r['fused']:.2f} | "
                    f"{r['routing']:.2f} | {r['blocked']:.2f} | {r['blocked_routing']:.2f} | "
                    f"{r['blocked_dispatch']:.2f} | {r['vectorised']:.2f} | {r['moe'] / t:.1f} | "
                    f"{r['fused'] / t:.1f} | {r['blocked'] / t:.1f} | {r['blocked_routing'] / t:.2f} | "
                    f"{r['vectorised'] / t:.1f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
