// Decode GEMV/GEMM for packed integer weights (int8, int4, int2) on tensor cores
// (CUDA C++, sm_80+): y = x @ dequant(W)^T for x with 1 to 16 rows.
//
// Why tensor cores for a GEMV: a decode matmul reads every weight once and does two flops
// with it, so it is bound by memory, and the work per weight is the unpacking. A thread
// unpacks its codes straight into the registers of an mma.sync A operand (16 weight rows x
// 16 input channels) and x is the B operand (its rows are the 8 or 16 columns): the
// tensor core does the multiply-adds, in fp32, for up to 16 rows of x at the cost of one.
//
// Layout (weights (N, K), row-major packed words, the layout of slimlm.kernels.quant_matmul;
// little-endian codes of BITS bits, PER = 32 / BITS per 32-bit word). A thread block owns
// 16 output rows (one MMA M tile) and its warps split K: warp w takes the chunks w, w + W,
// ... A chunk is 16 words of every row: the four threads of a quad (tig = lane % 4) read
// one 16-byte vector each of rows gid and gid + 8 (gid = lane / 4), so a warp load covers
// 16 rows x 64 contiguous bytes. mma.m16n8k16 gives thread tig the k slots 2tig, 2tig+1,
// 2tig+8, 2tig+9 of each k step: which input channel a slot stands for is the thread's own
// choice, provided A and B agree, so thread tig feeds its own codes in the order the
// unpacking makes them: pair i of a word is (code i, code i + PER/2), the two codes the
// magic-number trick yields in one fp16x2/bf16x2 register ((w & mask) | magic). B is built
// from x in its natural order with one byte permute per pair.
//
// Dequantization: A = (q - z) * s in the MMA's type (fp16 for fp16 x, bf16 for bf16 x):
// the magic number gives q exactly (one fma), a second fma gives q * s - z * s. int8 codes
// do not fit bf16's mantissa: they go through fp32 (2^23 + code, exact) and are packed
// into pairs with one cvt. The scales (fp16) are per (row, group); a thread's 16-byte
// vector lies in one group (group sizes that are multiples of 4 * PER codes).
//
// The warps' partial sums meet in shared memory at the end; x rows >= M read as zeros.
// With swiglu the block reads the same rows of two weights (gate, up) and writes
// silu(gate) * up. Several weights (q, k, v) share a launch: each 16-row tile belongs to one.
#include <cuda.h>  // CUtensorMap (types only: the encoder comes from the runtime)
#include <cudaTypedefs.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.cuh"

struct QGemvParams {
  const void* x; long long sx;              // x (M, K), row stride in elements
  void* out; long long so;                  // out (M, N_out), row stride in elements
  const uint32_t* w[3];                     // weights (N_i, K * BITS / 32) words
  const unsigned short* s[3];               // fp16 scales (N_i, groups)
  const unsigned short* z[3];               // fp16 zero points (N_i, groups) or null
  const float* bias;                        // (N_0,) fp32 or null (one weight only)
  int n[3];                                 // rows of each weight (multiples of 16)
  int nw, m, k, groups, gshift, swiglu;     // gshift = log2(group_size)
};

namespace {

template <int BITS> struct G {
  static constexpr int PER = 32 / BITS;    // codes per word
  static constexpr int PAIRS = PER / 2;    // fp16x2 pairs per word
  static constexpr int TC = 4 * PER;       // codes per thread and row in a chunk (16 bytes)
  static constexpr int CHUNK = 4 * TC;     // codes per row in a chunk (a quad's 64 bytes)
  static constexpr int CEN = 1 << (BITS - 1);  // implicit zero point when symmetric
};

constexpr int U = 2;        // chunks per pipeline stage and warp
constexpr int MAX_WARPS = 8;  // 256 threads a block

__device__ __forceinline__ uint32_t lop_or(uint32_t w, uint32_t mask, uint32_t magic) {
  uint32_t r;  // (w & mask) | magic in one instruction (masks in registers)
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(w), "r"(mask), "r"(magic));
  return r;
}

template <bool BF> __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  if constexpr (BF)
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  else
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

template <bool BF> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (BF)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float h2f(unsigned short h) {
  return __half2float(__ushort_as_half(h));
}

// Per (row, group): s and -z*s, both halves of a 32-bit register (fp32 for int8).
template <int BITS, bool BF> struct RowScale {
  uint32_t s2, nzs2;
  float s, nzs;
  __device__ __forceinline__ void set(unsigned short sh, unsigned short zh, bool has_z) {
    s = h2f(sh);
    const float z = has_z ? h2f(zh) : (float)G<BITS>::CEN;
    nzs = -z * s;  // exact in fp32 (two 11-bit significands)
    if constexpr (BITS != 8) {
      s2 = pack2<BF>(s, s);
      nzs2 = pack2<BF>(nzs, nzs);
    }
  }
};

// The PAIRS dequantized pairs of word w: pair i = (code i, code i + PER/2) as
// (q - z) * s in the MMA type.
template <int BITS, bool BF>
__device__ __forceinline__ void unpack(uint32_t w, const RowScale<BITS, BF>& rs,
                                       uint32_t (&a)[G<BITS>::PAIRS]) {
  if constexpr (BITS == 8) {
    const uint32_t hi = 0x4B000000u;  // fp32 2^23: 0x4B0000bb = 2^23 + b, exact
    float f[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float q = __uint_as_float(prmt(w, hi, 0x7440u | j)) - 8388608.0f;
      f[j] = fmaf(q, rs.s, rs.nzs);
    }
    a[0] = pack2<BF>(f[0], f[2]);
    a[1] = pack2<BF>(f[1], f[3]);
  } else if constexpr (!BF) {
    // fp16: 0x6400 = 1024; (w & (m << p)) | 0x6400 = 1024 + q * 2^p, exact for p + BITS <= 10
    const uint32_t magic = 0x64006400u;
    const uint32_t w8 = w >> 8;
#pragma unroll
    for (int i = 0; i < G<BITS>::PAIRS; ++i) {
      constexpr int HALF = G<BITS>::PAIRS / 2;  // pairs per byte of each half
      const int p = BITS * (i % HALF);           // bit position within the byte
      const uint32_t src = i < HALF ? w : w8;
      const uint32_t mask = ((1u << BITS) - 1u) << p;
      const uint32_t v = lop_or(src, mask * 0x00010001u, magic);
      // q = v * 2^-p - 1024 * 2^-p (fp16 bit patterns: 2^-p and -(1024 * 2^-p), exact)
      const uint32_t mul = (0x3C00u - 0x400u * p) * 0x00010001u;
      const uint32_t off = ((0x6400u - 0x400u * p) | 0x8000u) * 0x00010001u;
      const uint32_t q = fma2<false>(v, mul, off);
      a[i] = fma2<false>(q, rs.s2, rs.nzs2);
    }
  } else {
    // bf16: 0x4300 = 128, 7 mantissa bits: fields at bit 0 (int4) or bits 0 and 2 (int2)
    // of each half, after shifts of 4 bits.
    const uint32_t magic = 0x43004300u;
#pragma unroll
    for (int i = 0; i < G<BITS>::PAIRS; ++i) {
      const int per_shift = 4 / BITS;            // pairs per 4-bit shift: int4 1, int2 2
      const int sh = 4 * (i / per_shift);
      const int p = BITS * (i % per_shift);
      const uint32_t mask = ((1u << BITS) - 1u) << p;
      const uint32_t v = lop_or(w >> sh, mask * 0x00010001u, magic);
      // q = v * 2^-p - 128 * 2^-p (bf16 bit patterns, exact)
      const uint32_t mul = (0x3F80u - 0x80u * p) * 0x00010001u;
      const uint32_t off = ((0x4300u - 0x80u * p) | 0x8000u) * 0x00010001u;
      const uint32_t q = fma2<true>(v, mul, off);
      a[i] = fma2<true>(q, rs.s2, rs.nzs2);
    }
  }
}

// Pairs of x matching unpack's order for one word: x values e = 0 .. PER-1 of the word in
// r (two per register); pair i = (x_i, x_{i + PER/2}).
template <int BITS>
__device__ __forceinline__ void x_pairs(const uint32_t* r, uint32_t (&b)[G<BITS>::PAIRS]) {
  constexpr int Q = G<BITS>::PER / 4;  // registers between x_i and x_{i + PER/2}
#pragma unroll
  for (int i = 0; i < G<BITS>::PAIRS; ++i)
    b[i] = prmt(r[i / 2], r[i / 2 + Q], (i & 1) ? 0x7632u : 0x5410u);
}

template <int BITS, bool SMEM>
__device__ __forceinline__ void load_x_word(const unsigned short* xr, int k0, bool live,
                                            uint32_t (&r)[G<BITS>::PER / 2]) {
  constexpr int NR = G<BITS>::PER / 2;  // 32-bit registers of x per word
  if (!live) {
#pragma unroll
    for (int j = 0; j < NR; ++j) r[j] = 0u;
    return;
  }
  if constexpr (NR == 2) {
    const uint2 v = SMEM ? *reinterpret_cast<const uint2*>(xr + k0)
                         : __ldg(reinterpret_cast<const uint2*>(xr + k0));
    r[0] = v.x; r[1] = v.y;
  } else {
#pragma unroll
    for (int j = 0; j < NR; j += 4) {
      const uint4 v = SMEM ? *reinterpret_cast<const uint4*>(xr + k0 + 2 * j)
                           : __ldg(reinterpret_cast<const uint4*>(xr + k0 + 2 * j));
      r[j] = v.x; r[j + 1] = v.y; r[j + 2] = v.z; r[j + 3] = v.w;
    }
  }
}

// x is staged in shared memory (row stride K + 8 elements: rows 16 bytes apart in the
// banks) when it takes at most this many bytes; larger x is read through L1.
constexpr int XS_MAX = 48 * 1024;
__host__ __device__ inline int x_smem_bytes(int m, int k) {
  const int b = m * (2 * k + 16);
  return b <= XS_MAX ? b : 0;
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(gmem));
}

// Shared memory of a block: each warp's private ring of STAGES stages (per chunk, weight
// and row half: 32 lanes x 16 bytes of codes, then 32 lanes x 2 x 4 bytes holding the
// thread's scale and zero point; a thread reads back only what it copied, so a warp needs
// no barrier), then the partial sums of the epilogue, then x when it fits (XS_MAX).
constexpr int PIECE = 512 + 256;  // bytes per (chunk, weight, row half) in a stage
template <int NWT> __host__ __device__ constexpr int ring_bytes(int stages) {
  return stages * U * NWT * 2 * PIECE;
}
__host__ __device__ inline int smem_bytes(int nwt, int stages, int warps, int nt, int m,
                                          int k) {
  const int ring = stages * U * nwt * 2 * PIECE * warps;
  const int red = warps * nwt * 16 * 8 * nt * 4;
  return ring + red + x_smem_bytes(m, k);
}

// 16-row tiles of a launch (host and device): gate/up share their tiles under swiglu.
__host__ __device__ __forceinline__ int n_tiles(const QGemvParams& p) {
  return p.swiglu ? p.n[0] / 16
                  : (p.n[0] + (p.nw > 1 ? p.n[1] : 0) + (p.nw > 2 ? p.n[2] : 0)) / 16;
}

// tile t of the launch -> its weight wi, first row in that weight, first output column
__device__ __forceinline__ void locate_tile(const QGemvParams& p, int t, int& wi, int& row0,
                                            int& col0) {
  wi = 0; col0 = 0;
  while (wi + 1 < p.nw && t >= p.n[wi] / 16) { t -= p.n[wi] / 16; col0 += p.n[wi]; ++wi; }
  row0 = t * 16;
}

template <bool BF> __device__ __forceinline__ void store_out(const QGemvParams& p, size_t o,
                                                             float v) {
  if constexpr (BF)
    static_cast<__nv_bfloat16*>(p.out)[o] = __float2bfloat16_rn(v);
  else
    static_cast<__half*>(p.out)[o] = __float2half_rn(v);
}

// Persistent: block b owns the 16-row tiles b, b + gridDim.x, ...; its warps split each
// tile's K. A warp's work is one stream of (tile, chunk block) items that its cp.async
// ring prefetches across tile boundaries; the blocks meet once per tile, to sum.
template <int BITS, bool BF, int NT, bool SWIGLU, int STAGES>
__global__ void __launch_bounds__(32 * MAX_WARPS)
qgemv_kernel(const QGemvParams p) {
  using Geo = G<BITS>;
  constexpr int NWT = SWIGLU ? 2 : 1;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int kw = p.k / Geo::PER;  // words per row
  const int nch = p.k / Geo::CHUNK;
  const int nblk = (nch + U - 1) / U;
  const int tiles = n_tiles(p);
  // items per tile of this warp: chunk blocks warp, warp + nwarps, ...
  const int cnt = warp < nblk ? (nblk - warp + nwarps - 1) / nwarps : 0;
  const bool has_z = p.z[0] != nullptr;

  unsigned char* ring = smem + warp * ring_bytes<NWT>(STAGES);
  float* red = reinterpret_cast<float*>(smem + nwarps * ring_bytes<NWT>(STAGES));
  unsigned short* xsm = reinterpret_cast<unsigned short*>(red + nwarps * NWT * 16 * 8 * NT);
  const bool x_in_smem = x_smem_bytes(p.m, p.k) > 0;

  // tile -> (weight, first row, first output column)
  auto locate = [&](int t, int& wi, int& row0, int& col0) {
    if (SWIGLU) { wi = 0; col0 = 0; row0 = t * 16; } else { locate_tile(p, t, wi, row0, col0); }
  };

  auto issue = [&](int slot, int item) {  // stage `slot` <- the warp's item-th work item
    const int tile = blockIdx.x + (cnt ? item / cnt : 0) * gridDim.x;
    if (cnt && tile < tiles) {
      const int blk = warp + (item % cnt) * nwarps;
      int wi, row0, col0;
      locate(tile, wi, row0, col0);
      unsigned char* st = ring + slot * (U * NWT * 2 * PIECE);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int ch = blk * U + u;
        if (ch < nch) {
          const int grp = (ch * Geo::CHUNK + tig * Geo::TC) >> p.gshift;
#pragma unroll
          for (int j = 0; j < NWT; ++j) {
            const int src = SWIGLU ? j : wi;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int row = row0 + gid + 8 * r;
              unsigned char* piece = st + ((u * NWT + j) * 2 + r) * PIECE;
              cp_async16(piece + 16 * lane, p.w[src] + (size_t)row * kw + 4 * tig + ch * 16);
              const size_t si = (size_t)row * p.groups + grp;
              cp_async4(piece + 512 + 8 * lane, p.s[src] + (si & ~(size_t)1));
              if (has_z) cp_async4(piece + 516 + 8 * lane, p.z[src] + (si & ~(size_t)1));
            }
          }
        }
      }
    }
    cp_async_commit();
  };

  // Prologue: the first STAGES-1 items in flight, x into shared memory.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(s, s);
  const unsigned short* xbase = static_cast<const unsigned short*>(p.x);
  const int xstride = x_in_smem ? p.k + 8 : (int)p.sx;
  if (x_in_smem) {
    const int vecs = p.k / 8;  // 16-byte vectors per row
    for (int i = threadIdx.x; i < p.m * vecs; i += blockDim.x) {
      const int r = i / vecs, v = i % vecs;
      *reinterpret_cast<uint4*>(xsm + (size_t)r * xstride + 8 * v) =
          __ldg(reinterpret_cast<const uint4*>(xbase + (size_t)r * p.sx + 8 * v));
    }
    xbase = xsm;
  }
  __syncthreads();

  const bool live0 = gid < p.m, live1 = gid + 8 < p.m;
  const unsigned short* xr0 = xbase + (size_t)(live0 ? gid : 0) * xstride;
  const unsigned short* xr1 = xbase + (size_t)(live1 ? gid + 8 : 0) * xstride;

  // two accumulator sets (even and odd words) halve the dependent MMA chain
  float acc[NWT][NT][2][4];
  auto zero_acc = [&]() {
#pragma unroll
    for (int j = 0; j < NWT; ++j)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[j][n][h][e] = 0.f;
  };
  zero_acc();

  auto compute = [&](int slot, int blk, int row0) {
    const unsigned char* st = ring + slot * (U * NWT * 2 * PIECE);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int ch = blk * U + u;
      if (ch >= nch) break;
      const int kt = ch * Geo::CHUNK + tig * Geo::TC;  // the thread's first channel
      const int grp = kt >> p.gshift;
      uint4 wv[NWT][2];
      RowScale<BITS, BF> rs[NWT][2];
#pragma unroll
      for (int j = 0; j < NWT; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const unsigned char* piece = st + ((u * NWT + j) * 2 + r) * PIECE;
          wv[j][r] = *reinterpret_cast<const uint4*>(piece + 16 * lane);
          const uint2 sz = *reinterpret_cast<const uint2*>(piece + 512 + 8 * lane);
          const int hi = (int)((((size_t)(row0 + gid + 8 * r)) * p.groups + grp) & 1) * 16;
          rs[j][r].set((unsigned short)(sz.x >> hi), (unsigned short)(sz.y >> hi), has_z);
        }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint32_t xr[Geo::PER / 2], b0[Geo::PAIRS], b1[Geo::PAIRS];
        if (x_in_smem)
          load_x_word<BITS, true>(xr0, kt + q * Geo::PER, live0, xr);
        else
          load_x_word<BITS, false>(xr0, kt + q * Geo::PER, live0, xr);
        x_pairs<BITS>(xr, b0);
        if constexpr (NT == 2) {
          if (x_in_smem)
            load_x_word<BITS, true>(xr1, kt + q * Geo::PER, live1, xr);
          else
            load_x_word<BITS, false>(xr1, kt + q * Geo::PER, live1, xr);
          x_pairs<BITS>(xr, b1);
        }
#pragma unroll
        for (int j = 0; j < NWT; ++j) {
          const uint4& wa = wv[j][0];
          const uint4& wb = wv[j][1];
          const uint32_t wqa = q == 0 ? wa.x : q == 1 ? wa.y : q == 2 ? wa.z : wa.w;
          const uint32_t wqb = q == 0 ? wb.x : q == 1 ? wb.y : q == 2 ? wb.z : wb.w;
          uint32_t aa[Geo::PAIRS], ab[Geo::PAIRS];
          unpack<BITS, BF>(wqa, rs[j][0], aa);
          unpack<BITS, BF>(wqb, rs[j][1], ab);
#pragma unroll
          for (int s = 0; s < Geo::PAIRS / 2; ++s) {
            mma<BF>(acc[j][0][q & 1], aa[2 * s], ab[2 * s], aa[2 * s + 1], ab[2 * s + 1],
                    b0[2 * s], b0[2 * s + 1]);
            if constexpr (NT == 2)
              mma<BF>(acc[j][1][q & 1], aa[2 * s], ab[2 * s], aa[2 * s + 1], ab[2 * s + 1],
                      b1[2 * s], b1[2 * s + 1]);
          }
        }
      }
    }
  };

  constexpr int COLS = 8 * NT;
  int slot = 0, item = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int wi, row0, col0;
    locate(tile, wi, row0, col0);
    for (int b = 0; b < cnt; ++b, ++item) {
      issue((slot + STAGES - 1) % STAGES, item + STAGES - 1);
      cp_async_wait<STAGES - 1>();
      compute(slot, warp + b * nwarps, row0);
      slot = (slot + 1) % STAGES;
    }
    // Partial sums of the warps -> shared memory -> one sum per (row, x row).
#pragma unroll
    for (int j = 0; j < NWT; ++j)
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        float* r = red + ((warp * NWT + j) * 16) * COLS + n * 8 + 2 * tig;
        r[gid * COLS] = acc[j][n][0][0] + acc[j][n][1][0];
        r[gid * COLS + 1] = acc[j][n][0][1] + acc[j][n][1][1];
        r[(gid + 8) * COLS] = acc[j][n][0][2] + acc[j][n][1][2];
        r[(gid + 8) * COLS + 1] = acc[j][n][0][3] + acc[j][n][1][3];
      }
    zero_acc();
    __syncthreads();
    for (int idx = threadIdx.x; idx < 16 * p.m; idx += blockDim.x) {
      const int row = idx & 15, mrow = idx >> 4;
      float y[NWT];
#pragma unroll
      for (int j = 0; j < NWT; ++j) {
        float sum = 0.f;
        for (int w = 0; w < nwarps; ++w) sum += red[((w * NWT + j) * 16 + row) * COLS + mrow];
        y[j] = sum;
      }
      float v = y[0];
      if constexpr (SWIGLU) {
        v = v / (1.f + __expf(-v)) * y[1];
      } else if (p.bias) {
        v += p.bias[col0 + row0 + row];
      }
      store_out<BF>(p, (size_t)mrow * p.so + col0 + row0 + row, v);
    }
    __syncthreads();
  }
  cp_async_wait<0>();
}

template <int BITS, bool BF, int NT, bool SWIGLU>
int launch(const QGemvParams* p, int warps, int stages, int sms, cudaStream_t stream) {
  const int tiles = n_tiles(*p);
  const size_t smem = smem_bytes(SWIGLU ? 2 : 1, stages, warps, NT, p->m, p->k);
#define SLIMLM_QG_STAGES(S)                                                              \
  if (stages == S) {                                                                     \
    auto* k = qgemv_kernel<BITS, BF, NT, SWIGLU, S>;                                     \
    static size_t granted = 48 * 1024; /* raised once per size, never inside a capture */ \
    static int occ[MAX_WARPS + 1][2] = {};  /* (warps) -> (smem, blocks per SM) */       \
    if (smem > granted) {                                                                \
      cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                           (int)smem);                                   \
      if (e != cudaSuccess) { cudaGetLastError(); return (int)e; } /* cleared for later */ \
      granted = smem;                                                                    \
    }                                                                                    \
    if (occ[warps][0] != (int)smem) {                                                    \
      int b = 0;                                                                         \
      cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, k, 32 * warps, smem); \
      if (e != cudaSuccess) return (int)e;                                               \
      occ[warps][0] = (int)smem; occ[warps][1] = b > 0 ? b : 1;                          \
    }                                                                                    \
    const int grid = tiles < occ[warps][1] * sms ? tiles : occ[warps][1] * sms;          \
    k<<<grid, 32 * warps, smem, stream>>>(*p);                                           \
    return (int)cudaGetLastError();                                                      \
  }
  SLIMLM_QG_STAGES(2)
  SLIMLM_QG_STAGES(4)
#undef SLIMLM_QG_STAGES
  return -1;
}

template <int BITS, bool BF>
int dispatch(const QGemvParams* p, int warps, int stages, int sms, cudaStream_t s) {
  const bool two = p->m > 8;
  if (p->swiglu)
    return two ? launch<BITS, BF, 2, true>(p, warps, stages, sms, s)
               : launch<BITS, BF, 1, true>(p, warps, stages, sms, s);
  return two ? launch<BITS, BF, 2, false>(p, warps, stages, sms, s)
             : launch<BITS, BF, 1, false>(p, warps, stages, sms, s);
}


// ---------------------------------------------------------------------------------------
// Fold kernel (int4, groups of 128 codes: one chunk, the quad's four 16-byte vectors of a
// row, is one group): the group's scale and zero point leave the inner loop. The A
// operand is the magic-number value itself, v = MAGIC + q (one lop3 per pair, plus a
// shift per field), so the tensor core sums v * x over the group:
//   sum (q - z) x = sum v x - (MAGIC + z) sum x,   y += s * (that)   (fp32, per group)
// sum x over the group comes from a second MMA with an all-ones A on the same B fragment
// (computing it per block in shared memory measured slower). No shared-memory ring: each
// warp keeps FOLD_P chunks of loads in flight in registers, pointers advance by a fixed
// stride, and a block's warps are (tiles per block) x ksplit: ksplit warps split one
// 16-row tile's K and meet once, at the end, to sum.
#ifndef SLIMLM_FOLD_P
#define SLIMLM_FOLD_P 4
#endif
constexpr int FOLD_P = SLIMLM_FOLD_P;
#ifndef SLIMLM_FOLD_SETS
#define SLIMLM_FOLD_SETS 1
#endif
constexpr int FOLD_SETS = SLIMLM_FOLD_SETS;

__device__ __forceinline__ uint4 ldg_stream(const uint32_t* ptr) {  // read once: no L1
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  return v;
}

// d = A B (C = 0): the first MMA of a group starts its sum without zeroing registers.
template <bool BF>
__device__ __forceinline__ void mma_z(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                      uint32_t a3, uint32_t b0, uint32_t b1) {
  const float z = 0.f;
  if constexpr (BF)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%10,%10,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(z));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%10,%10,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(z));
}

// Pair i of an int4 word as MAGIC + code: (code i, code i + 4), field moved to bit 0.
template <bool BF> __device__ __forceinline__ void unpack_raw4(uint32_t w, uint32_t (&a)[4]) {
  const uint32_t magic = BF ? 0x43004300u : 0x64006400u;
  const uint32_t mask = 0x000F000Fu;
#pragma unroll
  for (int i = 0; i < 4; ++i) a[i] = lop_or(w >> (4 * i), mask, magic);
}

// x goes through shared memory, in the pair order of x_pairs (one 16-byte read per word
// and x row), when it takes at most this many bytes; larger x is read through L1.
constexpr int FOLD_XS_MAX = 16 * 1024;  // larger staging cost more than it saved (M=4)
__host__ __device__ inline int fold_x_bytes(int m, int k) {
  const int b = m * (2 * k + 16);
  return b <= FOLD_XS_MAX ? b : 0;
}

// Blocks of MAX_WARPS warps per SM that the register allocation must allow.
#ifndef SLIMLM_FOLD_MIN_BLOCKS
#define SLIMLM_FOLD_MIN_BLOCKS 1
#endif

template <bool BF, int NT, bool XS>
__global__ void __launch_bounds__(32 * MAX_WARPS, SLIMLM_FOLD_MIN_BLOCKS)
qgemv_fold_kernel(const QGemvParams p, const int ksplit) {
  using Geo = G<4>;
  constexpr int P = FOLD_P;
  constexpr float MAGIC = BF ? 128.f : 1024.f;
  constexpr uint32_t ONE = BF ? 0x3F803F80u : 0x3C003C00u;
  __shared__ float red[MAX_WARPS * 16 * 8 * NT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  // warp w works on tile w / ksplit of the block and on the K slice w % ksplit: chunks
  // (= groups) ks, ks + ksplit, ...
  const int tpb = nwarps / ksplit, ks = warp % ksplit;
  const int tile = blockIdx.x * tpb + warp / ksplit;
  const int tiles = n_tiles(p);  // no swiglu here
  const int kw = p.k / Geo::PER;
  const int nch = p.k / Geo::CHUNK;
  const int items = (tile < tiles && ks < nch) ? (nch - ks + ksplit - 1) / ksplit : 0;
  const bool has_z = p.z[0] != nullptr;

  int wi, row0, col0;
  locate_tile(p, tile < tiles ? tile : 0, wi, row0, col0);
  // load pointers (row gid; row gid + 8 is 8 rows further), advanced per load
  const uint32_t* lw = p.w[wi] + (size_t)(row0 + gid) * kw + 4 * tig + ks * 16;
  const size_t w8 = (size_t)8 * kw;
  const unsigned short* ls = p.s[wi] + (size_t)(row0 + gid) * p.groups + ks;
  const unsigned short* lz = has_z ? p.z[wi] + (size_t)(row0 + gid) * p.groups + ks : nullptr;
  const size_t g8 = (size_t)8 * p.groups;
  const int wstep = ksplit * 16;  // words per item

  uint4 ba[P], bb[P];
  unsigned short sa[P], sb[P], za[P], zb[P];
  auto load = [&](int s, int i) {
    if (i < items) {
      ba[s] = ldg_stream(lw);
      bb[s] = ldg_stream(lw + w8);
      sa[s] = __ldg(ls);
      sb[s] = __ldg(ls + g8);
      if (has_z) { za[s] = __ldg(lz); zb[s] = __ldg(lz + g8); lz += ksplit; }
      lw += wstep;
      ls += ksplit;
    }
  };
#pragma unroll
  for (int s = 0; s < P; ++s) load(s, s);

  // XS: x into shared memory in pair order while the first weight loads are in flight.
  extern __shared__ __align__(16) unsigned char fold_smem[];
  uint32_t* xs = reinterpret_cast<uint32_t*>(fold_smem);
  const int xstride = (2 * p.k + 16) / 4;  // 32-bit words per x row
  const unsigned short* xb = static_cast<const unsigned short*>(p.x);
  if constexpr (XS) {
    for (int i = threadIdx.x; i < p.m * kw; i += blockDim.x) {
      const int r = i / kw, wd = i % kw;
      uint32_t xr[4], b[4];
      load_x_word<4, false>(xb + (size_t)r * p.sx, wd * Geo::PER, true, xr);
      x_pairs<4>(xr, b);
      *reinterpret_cast<uint4*>(xs + r * xstride + wd * 4) = make_uint4(b[0], b[1], b[2], b[3]);
    }
    __syncthreads();
  }
  const bool live0 = gid < p.m, live1 = gid + 8 < p.m;
  // compute pointers to x of this thread's first word: shared (pair order, 4 words of
  // 32 bits per weight word) or global (natural order, 8 elements per weight word)
  const int wd0 = ks * 16 + 4 * tig;
  const uint32_t* xsp0 = xs + (live0 ? gid : 0) * xstride + wd0 * 4;
  const uint32_t* xsp1 = xs + (live1 ? gid + 8 : 0) * xstride + wd0 * 4;
  const unsigned short* xgp0 = xb + (size_t)(live0 ? gid : 0) * p.sx + wd0 * 8;
  const unsigned short* xgp1 = xb + (size_t)(live1 ? gid + 8 : 0) * p.sx + wd0 * 8;
  auto x_frag = [&](const unsigned short* xg, const uint32_t* xsp, bool live, int q,
                    uint32_t (&b)[4]) {
    if constexpr (XS) {
      const uint4 v = live ? *reinterpret_cast<const uint4*>(xsp + 4 * q)
                           : make_uint4(0u, 0u, 0u, 0u);
      b[0] = v.x; b[1] = v.y; b[2] = v.z; b[3] = v.w;
    } else {
      uint32_t xr[4];
      load_x_word<4, false>(xg, 8 * q, live, xr);
      x_pairs<4>(xr, b);
    }
  };

  // FOLD_SETS accumulator sets (words q % FOLD_SETS): 2 halves the dependent MMA chains
  float acc[NT][4], cr[FOLD_SETS][NT][4], co[FOLD_SETS][NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

#pragma unroll 1
  for (int i0 = 0; i0 < items; i0 += P) {
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int i = i0 + s;
      if (i < items) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          uint32_t b0[4], b1[4];
          x_frag(xgp0, xsp0, live0, q, b0);
          if constexpr (NT == 2) x_frag(xgp1, xsp1, live1, q, b1);
          const uint32_t wqa = q == 0 ? ba[s].x : q == 1 ? ba[s].y : q == 2 ? ba[s].z : ba[s].w;
          const uint32_t wqb = q == 0 ? bb[s].x : q == 1 ? bb[s].y : q == 2 ? bb[s].z : bb[s].w;
          uint32_t aa[4], ab[4];
          unpack_raw4<BF>(wqa, aa);
          unpack_raw4<BF>(wqb, ab);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
#pragma unroll
            for (int n = 0; n < NT; ++n) {
              const uint32_t* bn = n == 0 ? b0 : b1;
              constexpr int S = FOLD_SETS;
              if (q < S && j == 0) {  // the set's first MMA of the group
                mma_z<BF>(cr[q % S][n], aa[0], ab[0], aa[1], ab[1], bn[0], bn[1]);
                mma_z<BF>(co[q % S][n], ONE, ONE, ONE, ONE, bn[0], bn[1]);
              } else {
                mma<BF>(cr[q % S][n], aa[2 * j], ab[2 * j], aa[2 * j + 1], ab[2 * j + 1],
                        bn[2 * j], bn[2 * j + 1]);
                mma<BF>(co[q % S][n], ONE, ONE, ONE, ONE, bn[2 * j], bn[2 * j + 1]);
              }
            }
          }
        }
        // the group ends with this chunk
        const float s_a = h2f(sa[s]), s_b = h2f(sb[s]);
        const float off_a = MAGIC + (has_z ? h2f(za[s]) : (float)Geo::CEN);
        const float off_b = MAGIC + (has_z ? h2f(zb[s]) : (float)Geo::CEN);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          float r[4], x0 = co[0][n][0], x1 = co[0][n][1];
#pragma unroll
          for (int e = 0; e < 4; ++e) r[e] = cr[0][n][e];
          if constexpr (FOLD_SETS == 2) {
#pragma unroll
            for (int e = 0; e < 4; ++e) r[e] += cr[1][n][e];
            x0 += co[1][n][0];
            x1 += co[1][n][1];
          }
          acc[n][0] = fmaf(s_a, fmaf(-off_a, x0, r[0]), acc[n][0]);
          acc[n][1] = fmaf(s_a, fmaf(-off_a, x1, r[1]), acc[n][1]);
          acc[n][2] = fmaf(s_b, fmaf(-off_b, x0, r[2]), acc[n][2]);
          acc[n][3] = fmaf(s_b, fmaf(-off_b, x1, r[3]), acc[n][3]);
        }
        xsp0 += ksplit * 64; xsp1 += ksplit * 64;
        xgp0 += ksplit * 128; xgp1 += ksplit * 128;
        load(s, i + P);  // after the compute: the slot's registers are free again
      }
    }
  }

  constexpr int COLS = 8 * NT;
  if (ksplit == 1) {  // the warp holds whole sums: straight out
    if (tile < tiles) {
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int mrow = 8 * n + 2 * tig + (e & 1), row = gid + 8 * (e >> 1);
          if (mrow < p.m) {
            float v = acc[n][e];
            if (p.bias) v += p.bias[col0 + row0 + row];
            store_out<BF>(p, (size_t)mrow * p.so + col0 + row0 + row, v);
          }
        }
    }
    return;
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    float* r = red + (warp * 16) * COLS + n * 8 + 2 * tig;
    r[gid * COLS] = acc[n][0];
    r[gid * COLS + 1] = acc[n][1];
    r[(gid + 8) * COLS] = acc[n][2];
    r[(gid + 8) * COLS + 1] = acc[n][3];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < tpb * 16 * p.m; idx += blockDim.x) {
    const int row = idx & 15, mrow = (idx >> 4) % p.m, tb = (idx >> 4) / p.m;
    const int tl = blockIdx.x * tpb + tb;
    if (tl >= tiles) continue;
    float v = 0.f;
    for (int w = 0; w < ksplit; ++w) v += red[((tb * ksplit + w) * 16 + row) * COLS + mrow];
    int wj, r0, c0;
    locate_tile(p, tl, wj, r0, c0);
    if (p.bias) v += p.bias[c0 + r0 + row];
    store_out<BF>(p, (size_t)mrow * p.so + c0 + r0 + row, v);
  }
}

template <bool BF, int NT>
int launch_fold(const QGemvParams* p, int warps, int ksplit, cudaStream_t stream) {
  const int tiles = n_tiles(*p);
  const int tpb = warps / ksplit;
  const int grid = (tiles + tpb - 1) / tpb;
  const int xs = fold_x_bytes(p->m, p->k);
  if (xs)
    qgemv_fold_kernel<BF, NT, true><<<grid, 32 * warps, xs, stream>>>(*p, ksplit);
  else
    qgemv_fold_kernel<BF, NT, false><<<grid, 32 * warps, 0, stream>>>(*p, ksplit);
  return (int)cudaGetLastError();
}


// ---------------------------------------------------------------------------------------
// TMA kernel (sm_90, x with 1 to 8 rows): the weights stream into shared memory through
// the tensor memory accelerator (one cp.async.bulk.tensor per box of 16 rows x up to 1 KB
// of codes, completion counted on an mbarrier) instead of through the threads' registers,
// so a block keeps ~200 KB of loads in flight at no cost in registers or instructions.
// Per-row 1-D bulk copies measured far slower: the copy instruction takes uniform
// operands, so 16 rows x 3 copies a stage went out one lane at a time and the producer
// became the bottleneck (1.2 TB/s with no compute at all). Streamed weights carry an L2
// evict-first hint.
//
// A block is one producer warp (one lane issues every copy) and `consumers` warps. Local
// tile k (16 rows) belongs to consumer k % consumers, which keeps the tile's sums in
// registers across its slices of K and writes them out itself: no barrier or atomic
// between consumers. A stage is one tile x `ks` chunks of every row (64 bytes of codes
// per row and chunk) as boxes of 16 rows x bc chunks, then the slice's scales and zero
// points (16 rows x sg groups each). Every consumer has its own ring of stages/consumers
// slots (a ring shared by warps that consume different stages lets a warp wait on a slot
// a whole phase ahead: mbarrier parity tells only two phases apart); the producer fills
// them in the order slice j of each tile of a group of `consumers` tiles, then slice j+1,
// so consecutive stages feed different consumers. Rows of a box lie bc * 64 bytes apart:
// the reads of rows gid and gid + 1 hit the same banks (2 wavefronts a quarter warp;
// shared memory is not the limit). x sits in shared memory in the pair order of x_pairs.
// The compute per chunk is the ring kernel's (dequantize, then MMA) or, for int4 with
// groups of 128 (FOLD), the fold kernel's with sum x per group taken once per block; two
// chunks at a time, two MMA chains each.
//
// Measured (H200; benchmarks/probes/qgemv_tma_probe-h200.json): 1.55-1.6x faster than the
// ring kernel and Triton for int2 at 4-8 rows of x on 28672x4096, but at one row no faster
// than Triton (int4 28672x4096: 30 us against 31-32), and slower where a block has few
// tiles (4096x14336: 2 tiles a block, so 2 busy consumers). At one row the consumers'
// compute is latency-bound (an earlier layout, consumers splitting each stage, took 28 us
// there with no copies at all, 12 us with neither copies nor compute).
constexpr int TMA_MAX_CONSUMERS = 8;  // 16 measured no faster (and caps registers at 96)
// Chunks a consumer works on at once and MMA accumulator chains per chunk (compile-time
// experiments, scripts/qgemv_tma_variants.py; 2 and 2 are what was measured).
#ifndef SLIMLM_TMA_ILP
#define SLIMLM_TMA_ILP 2
#endif
#ifndef SLIMLM_TMA_CHAINS
#define SLIMLM_TMA_CHAINS 2
#endif
constexpr int TMA_ILP = SLIMLM_TMA_ILP;
constexpr int TMA_CHAINS = SLIMLM_TMA_CHAINS;
static_assert(TMA_CHAINS == 1 || TMA_CHAINS == 2 || TMA_CHAINS == 4, "chains: 1, 2 or 4");
constexpr int TMA_MAX_M = 8;
constexpr int TMA_MAX_STAGES = 32;

struct TmaMaps { CUtensorMap w[3], s[3], z[3]; };

__host__ __device__ constexpr int tma_unit_chunks(int bits, int gshift) {  // see tma_reason
  return 8 * (((1 << gshift) > 4 * 4 * (32 / bits)) ? (1 << gshift) / (4 * 4 * (32 / bits)) : 1);
}
__host__ __device__ inline int tma_slice_groups(int bits, int ks, int gshift) {
  return (ks * 4 * 4 * (32 / bits)) >> gshift;
}
__host__ __device__ inline int tma_scale_bytes(int bits, int ks, int gshift) {
  return (16 * tma_slice_groups(bits, ks, gshift) * 2 + 127) / 128 * 128;
}
__host__ __device__ inline int tma_stage_bytes(int bits, int ks, int gshift) {
  return ks * 1024 + 2 * tma_scale_bytes(bits, ks, gshift);
}
__host__ __device__ inline int tma_fixed_bytes(int stages, int m, int k, int groups) {
  const int bars = (2 * stages * 8 + 127) / 128 * 128;
  const int xsum = (m * groups * 4 + 15) / 16 * 16;
  return bars + xsum + m * (2 * k + 16);
}

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
               ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  } while (!done);
}
// A box of a 2-D tensor map (inner coordinate c0, row c1) -> shared memory; its bytes count
// towards the mbarrier's transaction count (the whole box, parts outside the tensor zeros).
__device__ __forceinline__ void tma_box(void* dst, const CUtensorMap* map, int c0, int c1,
                                        uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".L2::cache_hint [%0], [%1, {%2, %3}], [%4], %5;\n"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1),
        "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}

// Sums of one chunk (16 rows x CHUNK codes of the stage) into d: the fold kernel's
// raw-value MMAs (FOLD; d is then the group's sum v * x, folded by the caller) or the
// dequantized MMAs of the ring kernel (added to d).
template <int BITS, bool BF, bool FOLD>
__device__ __forceinline__ void tma_chunk(const unsigned char* wrow, int rstride,
                                          const uint32_t* xw, bool live,
                                          const RowScale<BITS, BF>& ra,
                                          const RowScale<BITS, BF>& rb,
                                          float (&d)[TMA_CHAINS][4]) {
  using Geo = G<BITS>;
  const uint4 wa = *reinterpret_cast<const uint4*>(wrow);
  const uint4 wb = *reinterpret_cast<const uint4*>(wrow + 8 * rstride);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t b[Geo::PAIRS];
    if (live) {
#pragma unroll
      for (int h = 0; h < Geo::PAIRS; h += 2) {
        const uint2 v = *reinterpret_cast<const uint2*>(xw + q * Geo::PAIRS + h);
        b[h] = v.x; b[h + 1] = v.y;
      }
    } else {
#pragma unroll
      for (int h = 0; h < Geo::PAIRS; ++h) b[h] = 0u;
    }
    const uint32_t wqa = q == 0 ? wa.x : q == 1 ? wa.y : q == 2 ? wa.z : wa.w;
    const uint32_t wqb = q == 0 ? wb.x : q == 1 ? wb.y : q == 2 ? wb.z : wb.w;
    uint32_t aa[Geo::PAIRS], ab[Geo::PAIRS];
    if constexpr (FOLD) {
      unpack_raw4<BF>(wqa, aa);
      unpack_raw4<BF>(wqb, ab);
    } else {
      unpack<BITS, BF>(wqa, ra, aa);
      unpack<BITS, BF>(wqb, rb, ab);
    }
#pragma unroll
    for (int s = 0; s < Geo::PAIRS / 2; ++s) {
      if (FOLD && q < TMA_CHAINS && s == 0)  // word q feeds chain q % TMA_CHAINS
        mma_z<BF>(d[q % TMA_CHAINS], aa[0], ab[0], aa[1], ab[1], b[0], b[1]);
      else
        mma<BF>(d[q % TMA_CHAINS], aa[2 * s], ab[2 * s], aa[2 * s + 1], ab[2 * s + 1],
                b[2 * s], b[2 * s + 1]);
    }
  }
}

template <int BITS, bool BF, bool FOLD>
__global__ void __launch_bounds__(32 * (TMA_MAX_CONSUMERS + 1), 1)
qgemv_tma_kernel(const QGemvParams p, const __grid_constant__ TmaMaps maps, const int ks,
                 const int bshift, const int stages, const int experiment) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Geo = G<BITS>;
  constexpr float MAGIC = BF ? 128.f : 1024.f;
  extern __shared__ __align__(128) unsigned char tsm[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nc_warps = (blockDim.x >> 5) - 1;  // consumers; the last warp produces
  const int gid = lane >> 2, tig = lane & 3;
  const int kw = p.k / Geo::PER, nch = p.k / Geo::CHUNK;
  const int nsl = (nch + ks - 1) / ks;  // slices per tile
  const int sg = tma_slice_groups(BITS, ks, p.gshift);
  const int bc = 1 << bshift;           // chunks per box (of 16 rows)
  const int box_bytes = bc * 64 * 16;
  const int sc_bytes = tma_scale_bytes(BITS, ks, p.gshift);
  const int sbytes = ks * 1024 + 2 * sc_bytes;
  const int tiles = n_tiles(p);
  const int my_tiles = ((int)blockIdx.x < tiles) ? (tiles - 1 - (int)blockIdx.x) / (int)gridDim.x + 1 : 0;
  const bool has_z = p.z[0] != nullptr;
  const int spw = stages / nc_warps;  // slots per consumer (the host makes stages a multiple)

  uint64_t* full = reinterpret_cast<uint64_t*>(tsm);
  uint64_t* empty = full + stages;
  unsigned char* ring = tsm + (2 * stages * 8 + 127) / 128 * 128;
  float* xsum = reinterpret_cast<float*>(ring + stages * sbytes);
  uint32_t* xs = reinterpret_cast<uint32_t*>(
      reinterpret_cast<unsigned char*>(xsum) + (p.m * p.groups * 4 + 15) / 16 * 16);
  const int xstride = (2 * p.k + 16) / 4;  // 32-bit words per x row

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) { mbar_init(full + s, 1); mbar_init(empty + s, 1); }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp == nc_warps) {  // producer: one lane issues every copy
    if (lane == 0) {
      uint64_t policy;
      asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
      // tile groups of nc_warps tiles (local tile k goes to consumer k % nc_warps); within
      // a group slice j of every tile, then slice j + 1: consecutive stages feed different
      // consumers
      for (int k0 = 0; k0 < my_tiles; k0 += nc_warps) {
        const int ng = my_tiles - k0 < nc_warps ? my_tiles - k0 : nc_warps;
        for (int j = 0; j < nsl; ++j) {
          const int ch0 = j * ks;
          const int nc = nch - ch0 < ks ? nch - ch0 : ks;
          const int nbox = (nc + bc - 1) >> bshift;
          const int g0 = (ch0 * Geo::CHUNK) >> p.gshift;
          // every consumer has its own ring of spw slots: its i-th stage goes to slot
          // i % spw of it (a shared ring would let a warp run a whole phase ahead)
          const int i = (k0 / nc_warps) * nsl + j;
          const int phase = (i / spw) & 1;
          for (int w = 0; w < ng; ++w) {
            int wi, row0, col0;
            locate_tile(p, (int)blockIdx.x + (k0 + w) * (int)gridDim.x, wi, row0, col0);
            const int slot = w * spw + i % spw;
            mbar_wait(empty + slot, phase ^ 1);  // the slot is free (first use: at once)
            if (experiment & 8) {  // no copies: what the rest costs
              mbar_arrive(full + slot);
            } else {
              mbar_expect_tx(full + slot, nbox * box_bytes + (has_z ? 2 : 1) * 16 * sg * 2);
              unsigned char* st = ring + slot * sbytes;
              for (int b = 0; b < nbox; ++b)
                tma_box(st + b * box_bytes, &maps.w[wi], ch0 * 16 + b * bc * 16, row0,
                        full + slot, policy);
              tma_box(st + ks * 1024, &maps.s[wi], g0, row0, full + slot, policy);
              if (has_z)
                tma_box(st + ks * 1024 + sc_bytes, &maps.z[wi], g0, row0, full + slot, policy);
            }
          }
        }
      }
    }
    return;
  }

  // consumers: x into shared memory in pair order (and sum x per group for FOLD)
  const int nthr = nc_warps * 32;
  const unsigned short* xb = static_cast<const unsigned short*>(p.x);
  for (int i = threadIdx.x; i < p.m * kw; i += nthr) {
    const int r = i / kw, wd = i % kw;
    uint32_t xr[Geo::PER / 2], b[Geo::PAIRS];
    load_x_word<BITS, false>(xb + (size_t)r * p.sx, wd * Geo::PER, true, xr);
    x_pairs<BITS>(xr, b);
#pragma unroll
    for (int j = 0; j < Geo::PAIRS; ++j) xs[r * xstride + wd * Geo::PAIRS + j] = b[j];
  }
  asm volatile("bar.sync 1, %0;\n" ::"r"(nthr) : "memory");
  if constexpr (FOLD) {
    for (int i = threadIdx.x; i < p.m * p.groups; i += nthr) {
      const int r = i / p.groups, g = i % p.groups;
      const uint4* v = reinterpret_cast<const uint4*>(xs + r * xstride + g * 64);
      float sum = 0.f;
#pragma unroll 4
      for (int j = 0; j < 16; ++j) {
        const uint4 q = v[j];
        const uint32_t e[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          if constexpr (BF) {
            sum += __uint_as_float(e[h] << 16) + __uint_as_float(e[h] & 0xFFFF0000u);
          } else {
            sum += h2f((unsigned short)(e[h] & 0xFFFFu)) + h2f((unsigned short)(e[h] >> 16));
          }
        }
      }
      xsum[r * p.groups + g] = sum;
    }
    asm volatile("bar.sync 1, %0;\n" ::"r"(nthr) : "memory");
  }

  const bool live = gid < p.m;
  const uint32_t* xrow = xs + (live ? gid : 0) * xstride;
  const int rstride = bc * 64;  // bytes between rows of a box
  const int c0 = 2 * tig, c1 = 2 * tig + 1;  // x rows of this thread's sums (FOLD)
  // this warp's tiles: local tiles k = warp, warp + nc_warps, ...; its stage for slice j of
  // tile k is number k0 * nsl + j * ng + (k - k0) of the producer's order (k0 = the
  // group's first tile, ng = tiles in the group)
  for (int k = warp; k < my_tiles; k += nc_warps) {
    const int k0 = k - warp;
    const int t = (int)blockIdx.x + k * (int)gridDim.x;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < nsl; ++j) {
      const int i = (k0 / nc_warps) * nsl + j;  // the warp's i-th stage (as the producer)
      const int slot = warp * spw + i % spw;
      const int ch0 = j * ks;
      const int nc = nch - ch0 < ks ? nch - ch0 : ks;
      mbar_wait(full + slot, (i / spw) & 1);
      const unsigned char* st = ring + slot * sbytes;
      const unsigned short* sc = reinterpret_cast<const unsigned short*>(st + ks * 1024);
      const unsigned short* zc = reinterpret_cast<const unsigned short*>(st + ks * 1024 + sc_bytes);
      // TMA_ILP chunks at a time (independent MMA chains); a missing chunk repeats the
      // first and is dropped
      for (int c = (experiment & 4) ? nc : 0; c < nc; c += TMA_ILP) {  // experiment 4: none
        int cs[TMA_ILP];
        bool ok[TMA_ILP];
#pragma unroll
        for (int h = 0; h < TMA_ILP; ++h) { ok[h] = c + h < nc; cs[h] = ok[h] ? c + h : c; }
        float d[TMA_ILP][TMA_CHAINS][4] = {};
        RowScale<BITS, BF> ra[TMA_ILP], rb[TMA_ILP];
        if constexpr (!FOLD) {
#pragma unroll
          for (int h = 0; h < TMA_ILP; ++h) {
            const int gl = (cs[h] * Geo::CHUNK + tig * Geo::TC) >> p.gshift;
            ra[h].set(sc[gid * sg + gl], has_z ? zc[gid * sg + gl] : (unsigned short)0, has_z);
            rb[h].set(sc[(gid + 8) * sg + gl],
                      has_z ? zc[(gid + 8) * sg + gl] : (unsigned short)0, has_z);
          }
        }
#pragma unroll
        for (int h = 0; h < TMA_ILP; ++h) {
          const int cc = cs[h];
          const unsigned char* wrow = st + ((cc >> bshift) * 16 + gid) * rstride +
                                      (cc & (bc - 1)) * 64 + tig * 16;
          tma_chunk<BITS, BF, FOLD>(wrow, rstride, xrow + ((ch0 + cc) * 16 + 4 * tig) * Geo::PAIRS,
                                    live, ra[h], rb[h], d[h]);
        }
#pragma unroll
        for (int h = 0; h < TMA_ILP; ++h) {
          if (!ok[h]) continue;
          float r[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            r[e] = d[h][0][e];
#pragma unroll
            for (int q = 1; q < TMA_CHAINS; ++q) r[e] += d[h][q][e];
          }
          if constexpr (FOLD) {
            const int cc = cs[h], g = ch0 + cc;  // one chunk = one group
            const float s_a = h2f(sc[gid * sg + cc]), s_b = h2f(sc[(gid + 8) * sg + cc]);
            const float off_a = MAGIC + (has_z ? h2f(zc[gid * sg + cc]) : (float)Geo::CEN);
            const float off_b = MAGIC + (has_z ? h2f(zc[(gid + 8) * sg + cc]) : (float)Geo::CEN);
            const float x0 = c0 < p.m ? xsum[c0 * p.groups + g] : 0.f;
            const float x1 = c1 < p.m ? xsum[c1 * p.groups + g] : 0.f;
            acc[0] = fmaf(s_a, fmaf(-off_a, x0, r[0]), acc[0]);
            acc[1] = fmaf(s_a, fmaf(-off_a, x1, r[1]), acc[1]);
            acc[2] = fmaf(s_b, fmaf(-off_b, x0, r[2]), acc[2]);
            acc[3] = fmaf(s_b, fmaf(-off_b, x1, r[3]), acc[3]);
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[e] += r[e];
          }
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + slot);
    }
    // the warp holds the tile's whole sums: straight out
    int wi, row0, col0;
    locate_tile(p, t, wi, row0, col0);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int mrow = 2 * tig + (e & 1), row = gid + 8 * (e >> 1);
      if (mrow < p.m) {
        float v = acc[e];
        if (p.bias) v += p.bias[col0 + row0 + row];
        store_out<BF>(p, (size_t)mrow * p.so + col0 + row0 + row, v);
      }
    }
  }
#else
  __trap();  // sm_90 only: the host refuses other devices
#endif
}

// cuTensorMapEncodeTiled from the driver, found once through the runtime (no -lcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static bool tried = false;
  if (!tried) {
    tried = true;
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess && q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }
  return fn;
}

// A 2-D map of a row-major (rows, inner) tensor with boxes of box_rows x box_inner.
bool encode_2d(CUtensorMap* map, CUtensorMapDataType type, int esize, const void* ptr,
               int inner, int rows, int box_inner, int box_rows) {
  auto fn = tensor_map_encoder();
  if (!fn) return false;
  const cuuint64_t dims[2] = {(cuuint64_t)inner, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)inner * esize};
  const cuuint32_t box[2] = {(cuuint32_t)box_inner, (cuuint32_t)box_rows};
  const cuuint32_t estr[2] = {1, 1};
  return fn(map, type, 2, const_cast<void*>(ptr), dims, strides, box, estr,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int BITS, bool BF, bool FOLD>
int launch_tma(const QGemvParams* p, int consumers, int ks, int stages, int sms,
               cudaStream_t stream) {
  using Geo = G<BITS>;
  const int kw = p->k / Geo::PER, nch = p->k / Geo::CHUNK;
  if (ks > nch) ks = nch;
  const int bc = ks % 16 ? 8 : 16;  // chunks per box (1 KB of codes per row at most)
  const int bshift = bc == 16 ? 4 : 3;
  const int sg = tma_slice_groups(BITS, ks, p->gshift);
  TmaMaps maps;
  for (int i = 0; i < p->nw; ++i) {
    if (!encode_2d(&maps.w[i], CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, p->w[i], kw, p->n[i], bc * 16, 16) ||
        !encode_2d(&maps.s[i], CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, p->s[i], p->groups, p->n[i], sg, 16) ||
        (p->z[0] && !encode_2d(&maps.z[i], CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, p->z[i], p->groups,
                               p->n[i], sg, 16)))
      return -3;
  }
  auto* kern = qgemv_tma_kernel<BITS, BF, FOLD>;
  const size_t smem = tma_fixed_bytes(stages, p->m, p->k, p->groups) +
                      (size_t)stages * tma_stage_bytes(BITS, ks, p->gshift);
  static size_t granted = 48 * 1024;  // raised once per size, never inside a capture
  if (smem > granted) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
    // cleared: left set, the next launch of any kernel would report it as its own
    if (e != cudaSuccess) { cudaGetLastError(); return (int)e; }
    granted = smem;
  }
  const int tiles = n_tiles(*p);
  const int grid = tiles < sms ? tiles : sms;
  // SLIMLM_QGEMV_TMA_EXPERIMENT (read once): 4 skips the compute, 8 the copies (timing
  // experiments only: the results are then wrong)
  static const int experiment = [] {
    const char* e = getenv("SLIMLM_QGEMV_TMA_EXPERIMENT");
    return e ? atoi(e) : 0;
  }();
  kern<<<grid, 32 * (consumers + 1), smem, stream>>>(*p, maps, ks, bshift, stages, experiment);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

int slimlm_qgemv_params_size() { return (int)sizeof(QGemvParams); }

// Bytes of dynamic shared memory one launch needs.
int slimlm_qgemv_smem(int swiglu, int stages, int warps, int m, int k) {
  return smem_bytes(swiglu ? 2 : 1, stages, warps, m > 8 ? 2 : 1, m, k);
}

// Launch on CUDA device `device`; returns a cudaError_t (0 = success), -1 for unsupported
// arguments, -2 when the device cannot be selected.
int slimlm_qgemv(const QGemvParams* p, int bits, int bf16, int warps, int stages,
                 void* stream, int device) {
  if (warps < 1 || warps > MAX_WARPS || p->m < 1 || p->m > 16) return -1;
  if (use_device(device) != 0) return -2;
  static int sms_of[64] = {};
  if (device < 0 || device >= 64) return -1;
  if (sms_of[device] == 0 &&
      cudaDeviceGetAttribute(&sms_of[device], cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return -2;
  const int sms = sms_of[device];
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (bits == 4) return bf16 ? dispatch<4, true>(p, warps, stages, sms, s)
                   : dispatch<4, false>(p, warps, stages, sms, s);
  if (bits == 2) return bf16 ? dispatch<2, true>(p, warps, stages, sms, s)
                   : dispatch<2, false>(p, warps, stages, sms, s);
  if (bits == 8) return bf16 ? dispatch<8, true>(p, warps, stages, sms, s)
                   : dispatch<8, false>(p, warps, stages, sms, s);
  return -1;
}

// The fold kernel (int4, groups of 128 codes; no swiglu). warps per block = (16-row tiles
// per block) x ksplit (warps splitting one tile's K).
int slimlm_qgemv_fold(const QGemvParams* p, int bits, int bf16, int warps, int ksplit,
                      void* stream, int device) {
  if (warps < 1 || warps > MAX_WARPS || p->m < 1 || p->m > 16 || p->swiglu) return -1;
  if (ksplit < 1 || warps % ksplit || bits != 4 || p->gshift != 7) return -1;
  if (use_device(device) != 0) return -2;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool two = p->m > 8;
  if (bf16) return two ? launch_fold<true, 2>(p, warps, ksplit, s)
                       : launch_fold<true, 1>(p, warps, ksplit, s);
  return two ? launch_fold<false, 2>(p, warps, ksplit, s) : launch_fold<false, 1>(p, warps, ksplit, s);
}

// Bytes of dynamic shared memory of a TMA-kernel launch (quant_cuda.plan_tma mirrors it).
int slimlm_qgemv_tma_smem(int bits, int ks, int gshift, int stages, int m, int k,
                          int groups) {
  return tma_fixed_bytes(stages, m, k, groups) +
         stages * tma_stage_bytes(bits, ks, gshift);
}

// The TMA kernel (sm_90; int2/int4/int8, x with 1 to TMA_MAX_M rows; no swiglu): blocks of
// `consumers` compute warps and one copy warp, stages of 16 rows x `ks` chunks (at most the
// row's chunks). FOLD (int4, groups of 128) when fold != 0. -1 for arguments it does not
// take, -3 when the tensor maps cannot be made (no driver entry point, misaligned tensors).
int slimlm_qgemv_tma(const QGemvParams* p, int bits, int bf16, int fold, int consumers,
                     int ks, int stages, void* stream, int device) {
  if (p->m < 1 || p->m > TMA_MAX_M || p->swiglu || consumers < 1 ||
      consumers > TMA_MAX_CONSUMERS || stages < 2 || stages > TMA_MAX_STAGES ||
      stages % consumers)
    return -1;
  if (bits != 2 && bits != 4 && bits != 8) return -1;
  const int chunk = 4 * 4 * (32 / bits);
  const int unit = tma_unit_chunks(bits, p->gshift);
  if (ks < unit || ks % unit || (p->k / chunk) % unit || p->k % chunk) return -1;
  if ((1 << p->gshift) < 4 * (32 / bits)) return -1;  // a thread's 16 bytes in one group
  if (fold && (bits != 4 || p->gshift != 7)) return -1;
  if (use_device(device) != 0) return -2;
  static int sms_of[64] = {}, major_of[64] = {};
  if (device < 0 || device >= 64) return -1;
  if (sms_of[device] == 0) {
    if (cudaDeviceGetAttribute(&sms_of[device], cudaDevAttrMultiProcessorCount, device) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&major_of[device], cudaDevAttrComputeCapabilityMajor, device) !=
            cudaSuccess)
      return -2;
  }
  if (major_of[device] < 9) return -1;
  const int sms = sms_of[device];
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (fold) return bf16 ? launch_tma<4, true, true>(p, consumers, ks, stages, sms, s)
                        : launch_tma<4, false, true>(p, consumers, ks, stages, sms, s);
  if (bits == 4) return bf16 ? launch_tma<4, true, false>(p, consumers, ks, stages, sms, s)
                             : launch_tma<4, false, false>(p, consumers, ks, stages, sms, s);
  if (bits == 2) return bf16 ? launch_tma<2, true, false>(p, consumers, ks, stages, sms, s)
                             : launch_tma<2, false, false>(p, consumers, ks, stages, sms, s);
  return bf16 ? launch_tma<8, true, false>(p, consumers, ks, stages, sms, s)
              : launch_tma<8, false, false>(p, consumers, ks, stages, sms, s);
}

}  // extern "C"
