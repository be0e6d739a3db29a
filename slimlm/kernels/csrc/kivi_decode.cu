// KIVI decode attention on tensor cores, dequantizing in registers (CUDA C++, sm_80+).
//
// The split kernel of slimlm.kernels.decode_attention for the quantized segment of a KIVI
// cache: one *warp* owns one (batch, KV head, split) and walks its 64-token blocks with a
// private cp.async pipeline (no block-wide barrier anywhere). Why CUDA and not Triton: the
// whole point is to unpack the packed codes straight into the registers an mma.sync
// operand needs. Triton picks its own layouts and routed the unpacked tiles through shared
// memory (21 barriers and ~4,300 instructions per block); here a thread unpacks exactly
// the codes its fragment holds, ~1 instruction per code.
//
// Fragments (mma.m16n8k16, fp16 in, fp32 accumulate; gid = lane / 4, tig = lane % 4).
// The query rows r = j * QPG + g (query head g of the GQA group, value channel group j:
// the value scale of group j is folded into P, as in the Triton kernel) are the N side
// (8 columns) of both products, so no MMA row is padding; a thread holds rows 2tig and
// 2tig + 1 of every accumulator.
//   S^T = K Q'^T: A = codes (16 tokens, 16 channels), B = Q'^T. Logical channel k of a
//     k-step is private to thread tig (k = 2tig, 2tig+1, 2tig+8, 2tig+9), so the channel
//     order is ours to choose per thread: thread tig owns physical channels
//     [32 tig, 32 tig + 32), reads them as one contiguous run of each token's codes and
//     pairs them in the order its unpacking produces (pair_lo below); Q' and the bias
//     vector are paired the same way. Channel permutations leave q.k unchanged.
//   O^T = V^T P'^T: B = P'^T is the transpose of the S^T accumulator (one movmatrix per
//     8 tokens); A = codes^T (16 channels, 16 tokens): thread gid owns channels
//     [16 gid, 16 gid + 16) (m-tile c: rows 16 gid + 2c and + 1) of tokens 2tig, 2tig+1
//     and 2tig+8, 2tig+9; a byte permute pairs one channel of two tokens into an fp16x2.
// Codes become fp16 with the magic-number trick: (x & mask) | 0x6400 is 1024 + code * 2^s,
// one fma.f16x2 turns it into code - CEN exactly (CEN = 2^(bits-1): centred codes keep the
// accumulators at the output's size, see the Triton kernel's note on truncating tensor-core
// accumulation).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

struct KiviParams {
  const void* q; long long sq_b, sq_h;
  const unsigned char* kc; long long skc_b, skc_h;  // token stride = D * bits / 8 bytes
  const unsigned char* vc; long long svc_b, svc_h;
  const __half* ks; const __half* kz; long long sks_b, sks_h, sks_g;  // channel stride 1
  const __half* vs; const __half* vz; long long svs_b, svs_h, svs_j;  // token stride 1
  float* pm; float* pl; float* pz; float* pacc;  // (B*Hkv, n_parts, m_rows[, 128])
  int n_kv_heads, qpg, ng, group_size, n_blocks, blocks_per_split, n_splits, n_parts;
  int m_rows, q_bf16, n_items, gshift;  // gshift = log2(group_size / 64)
  float qk_scale;
};

namespace {

constexpr int D = 128;
constexpr int BLOCK = 64;  // tokens per pipeline stage (a divisor of the key group)

template <int BITS> struct Geo {
  static constexpr int KB = D * BITS / 8;      // code bytes per token
  static constexpr int KT = KB / 4;            // K bytes per thread per token (32 channels)
  static constexpr int VT = KB / 8;            // V bytes per thread per token (16 channels)
  static constexpr int PER = 32 / BITS;        // channels per 32-bit word
  static constexpr int HALF = PER / 2;         // a pair = channels (r, r + HALF) of a word
  static constexpr int CEN = 1 << (BITS - 1);
  static constexpr int K_OFF = 0;
  static constexpr int V_OFF = BLOCK * KB;
  static constexpr int SK_OFF = 2 * BLOCK * KB;       // 128 fp16 key scales
  static constexpr int ZK_OFF = SK_OFF + 2 * D;       // 128 fp16 key zeros
  static constexpr int SV_OFF = ZK_OFF + 2 * D;       // NG groups x 64 fp16 value scales
  // then NG x 64 fp16 value zeros at zv_off(NG); a stage is stage(NG) bytes (sized to NG:
  // at int4 the 512 bytes a 4-group layout would waste cost a third thread block per SM)
  __host__ __device__ static constexpr int zv_off(int ng) { return SV_OFF + ng * 2 * BLOCK; }
  __host__ __device__ static constexpr int stage(int ng) { return zv_off(ng) + ng * 2 * BLOCK; }
};

// Channel offsets (within the thread's 32) of K pair i, in the order unpack_k makes them.
template <int BITS> __device__ __forceinline__ constexpr int pair_lo(int i) {
  return Geo<BITS>::PER * (i / Geo<BITS>::HALF) + i % Geo<BITS>::HALF;
}

// The transpose of an 8x8 fp16 matrix held as mma fragments (one fp16x2 per thread).
__device__ __forceinline__ uint32_t movtrans(uint32_t x) {
  uint32_t r;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

// (x & mask) | 0x64006400 in one LOP3 (the compiler splits it in two: one immediate each).
__device__ __forceinline__ uint32_t lop(uint32_t x, uint32_t mask) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(x), "r"(mask), "r"(0x64006400u));
  return r;
}
__device__ __forceinline__ uint32_t hfma2(uint32_t x, uint32_t m, uint32_t a) {
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(x), "r"(m), "r"(a));
  return r;
}
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ float2 unpack_h2(uint32_t x) {
  return __half22float2(*reinterpret_cast<__half2*>(&x));
}

// fp16x2 constants: 2^-s in both halves, and -(1024 * 2^-s + CEN) in both halves.
__host__ __device__ constexpr uint32_t h2_pow2(int s) {  // 2^-s, s in [0, 14]
  return ((uint32_t)(15 - s) << 10) * 0x10001u;
}
__host__ __device__ constexpr uint32_t h_neg_int(int n) {  // -n as fp16 bits, 0 < n < 2048
  int e = 0;
  while ((2 << e) <= n) ++e;
  return 0x8000u | ((uint32_t)(e + 15) << 10) | ((uint32_t)(n - (1 << e)) << (10 - e));
}
template <int BITS> __host__ __device__ constexpr uint32_t h2_off(int s) {
  return h_neg_int((1024 >> s) + Geo<BITS>::CEN) * 0x10001u;
}

// CEN in both halves of an fp16x2.
template <int BITS> __host__ __device__ constexpr uint32_t kCen2() {
  return ((uint32_t)(15 + BITS - 1) << 10) * 0x10001u;
}

// (x & (field << s)) | 0x6400 -> code - CEN, for a field at bit s of both halves.
template <int BITS> __device__ __forceinline__ uint32_t field(uint32_t x, int s) {
  const uint32_t mask = (((1u << BITS) - 1u) << s) * 0x10001u;
  return hfma2(lop(x, mask), h2_pow2(s), h2_off<BITS>(s));
}

// K: the thread's BITS words (32 channels) -> 16 fp16x2 pairs, pair i = channels
// (pair_lo(i), pair_lo(i) + HALF).
template <int BITS> __device__ __forceinline__ void unpack_k(const uint32_t* w, uint32_t* out) {
  if constexpr (BITS == 8) {
#pragma unroll
    for (int wi = 0; wi < 8; ++wi) {
      out[2 * wi + 0] = hfma2(prmt(w[wi], 0x64646464u, 0x4240u), h2_pow2(0), h2_off<8>(0));
      out[2 * wi + 1] = hfma2(prmt(w[wi], 0x64646464u, 0x4341u), h2_pow2(0), h2_off<8>(0));
    }
  } else {
    constexpr int HALF = Geo<BITS>::HALF;
    constexpr int NF = 8 / BITS;  // fields per byte
#pragma unroll
    for (int wi = 0; wi < BITS; ++wi) {
      const uint32_t y = w[wi] >> 8;
#pragma unroll
      for (int r = 0; r < HALF; ++r)
        out[HALF * wi + r] = field<BITS>(r < NF ? w[wi] : y, (r % NF) * BITS);
    }
  }
}

// V: the same 16 channels of tokens a and b (VT bytes each) -> 16 fp16x2 (a, b) pairs.
template <int BITS> __device__ __forceinline__ void unpack_v(const uint32_t* a, const uint32_t* b,
                                                             uint32_t* out) {
  if constexpr (BITS == 8) {
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t x = prmt(a[w], b[w], 0x5140u);  // a0 b0 a1 b1
      const uint32_t z = prmt(a[w], b[w], 0x7362u);  // a2 b2 a3 b3
      out[4 * w + 0] = hfma2(prmt(x, 0x64646464u, 0x4140u), h2_pow2(0), h2_off<8>(0));
      out[4 * w + 1] = hfma2(prmt(x, 0x64646464u, 0x4342u), h2_pow2(0), h2_off<8>(0));
      out[4 * w + 2] = hfma2(prmt(z, 0x64646464u, 0x4140u), h2_pow2(0), h2_off<8>(0));
      out[4 * w + 3] = hfma2(prmt(z, 0x64646464u, 0x4342u), h2_pow2(0), h2_off<8>(0));
    }
  } else {
    constexpr int NW = Geo<BITS>::VT / 4;  // words per token: 1 (int2), 2 (int4)
    constexpr int NF = 8 / BITS;           // fields per byte
#pragma unroll
    for (int w = 0; w < NW; ++w) {
#pragma unroll
      for (int k = 0; k < 4; k += 2) {
        // bytes k, k+1 of a in the low half, of b in the high half
        const uint32_t x = prmt(a[w], b[w], k == 0 ? 0x5410u : 0x7632u);
        const uint32_t y = x >> 8;
        const int base = Geo<BITS>::PER * w + NF * k;  // channel of field 0 of byte k
#pragma unroll
        for (int r = 0; r < 2 * NF; ++r)
          out[base + r] = field<BITS>(r < NF ? x : y, (r % NF) * BITS);
      }
    }
  }
}

template <int NBYTES> __device__ __forceinline__ void lds(const unsigned char* p, uint32_t* w) {
  if constexpr (NBYTES == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (NBYTES == 8) {
    uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x; w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < NBYTES / 16; ++i) {
      uint4 v = *reinterpret_cast<const uint4*>(p + 16 * i);
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  }
}

// Where this lane's cp.async chunks of the scales come from and go to, fixed for the whole
// loop (only the block's token offset and key group change): lanes 0-15 copy the key
// scales, 16-31 the key zeros; the value scales/zeros are 16 * NG chunks of 16 bytes.
struct LaneCopies {
  const __half* kz_src; int kz_dst;
  const __half* v_src[2]; int v_dst[2];
};

template <int BITS>
__device__ __forceinline__ void issue_block(const KiviParams& p, unsigned char* st, int lane,
                                            const unsigned char* kg, const unsigned char* vg,
                                            const LaneCopies& lc, int blk) {
  using G = Geo<BITS>;
  constexpr int CH = BLOCK * G::KB / 16;  // 16-byte chunks of one block's codes
  const long long t0 = (long long)blk * BLOCK;
  const unsigned char* kb = kg + t0 * G::KB + 16 * lane;
  const unsigned char* vb = vg + t0 * G::KB + 16 * lane;
#pragma unroll
  for (int c = 0; c < CH / 32; ++c) {
    cp_async16(st + G::K_OFF + 16 * lane + 512 * c, kb + 512 * c);
    cp_async16(st + G::V_OFF + 16 * lane + 512 * c, vb + 512 * c);
  }
  cp_async16(st + lc.kz_dst, lc.kz_src + (long long)(blk >> p.gshift) * p.sks_g);
#pragma unroll
  for (int q = 0; q < 2; ++q)
    if (lc.v_dst[q] >= 0) cp_async16(st + lc.v_dst[q], lc.v_src[q] + t0);
}

// Thread blocks of 128 threads per multiprocessor the register allocation must allow (3:
// at most 168 registers, no spills; 4 forces 128 and spills 128-240 bytes, and measured
// 5-18% slower on an H200 although int2 then runs 16 warps per SM instead of 12).
#ifndef SLIMLM_KIVI_MIN_BLOCKS
#define SLIMLM_KIVI_MIN_BLOCKS 3
#endif

template <int BITS, int STAGES>
__global__ void __launch_bounds__(128, SLIMLM_KIVI_MIN_BLOCKS) kivi_decode_split(const KiviParams p) {
  using G = Geo<BITS>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int item = blockIdx.x * (blockDim.x >> 5) + warp;
  if (item >= p.n_items) return;
  const int stage_bytes = G::stage(p.ng), zv_off = G::zv_off(p.ng);
  unsigned char* wsm = smem + (size_t)warp * STAGES * stage_bytes;
  const int bh = item / p.n_splits, split = item % p.n_splits;
  const int b = bh / p.n_kv_heads, h = bh % p.n_kv_heads;
  const int gid = lane >> 2, tig = lane & 3;
  const int rows = p.qpg * p.ng;
  const bool real = gid < rows;

  // Row gid's query over the thread's 32 channels, softmax scale and log2(e) folded in, as
  // fp16 pairs in unpack_k's order: the B operand of both S^T = K Q'^T and the bias MMA.
  uint32_t qh[16];
  {
    float qf[32];
    const long long off = b * p.sq_b + (long long)(h * p.qpg + gid % p.qpg) * p.sq_h + 32 * tig;
#pragma unroll
    for (int c = 0; c < 32; c += 8) {
      uint4 v = real ? *reinterpret_cast<const uint4*>(
                           static_cast<const unsigned short*>(p.q) + off + c)
                     : make_uint4(0, 0, 0, 0);
      const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float2 f;
        if (p.q_bf16) f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u[e]));
        else f = unpack_h2(u[e]);
        qf[c + 2 * e] = f.x * p.qk_scale;
        qf[c + 2 * e + 1] = f.y * p.qk_scale;
      }
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int lo = pair_lo<BITS>(i);
      qh[i] = pack_h2(qf[lo], qf[lo + G::HALF]);
    }
  }

  const int start = split * p.blocks_per_split;
  const int end = min(start + p.blocks_per_split, p.n_blocks);
  const unsigned char* kg = p.kc + b * p.skc_b + h * p.skc_h;
  const unsigned char* vg = p.vc + b * p.svc_b + h * p.svc_h;
  const __half* ksg = p.ks + b * p.sks_b + h * p.sks_h;
  const __half* kzg = p.kz + b * p.sks_b + h * p.sks_h;
  const __half* vsg = p.vs + b * p.svs_b + h * p.svs_h;
  const __half* vzg = p.vz + b * p.svs_b + h * p.svs_h;

  LaneCopies lc;
  lc.kz_src = lane < 16 ? ksg + 8 * lane : kzg + 8 * (lane - 16);
  lc.kz_dst = lane < 16 ? G::SK_OFF + 16 * lane : G::ZK_OFF + 16 * (lane - 16);
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int i = lane + 32 * q, per = 8 * p.ng;  // per: chunks of the scales (or zeros)
    const int which = i >= per, rem = i - which * per, j = rem >> 3, c = rem & 7;
    lc.v_src[q] = (which ? vzg : vsg) + j * p.svs_j + 8 * c;
    lc.v_dst[q] = i < 2 * per ? (which ? zv_off : G::SV_OFF) + j * 2 * BLOCK + 16 * c : -1;
  }

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (start + s < end) issue_block<BITS>(p, wsm + s * stage_bytes, lane, kg, vg, lc, start + s);
    cp_async_commit();
  }
  int load_stage = STAGES - 1, use_stage = 0;  // ring positions (no % in the loop)

  // Thread (gid, tig) holds query rows r0 = 2 tig and r1 = 2 tig + 1 in every accumulator.
  const int r0 = 2 * tig, r1 = r0 + 1;
  const int j0 = r0 < rows ? r0 / p.qpg : 0, j1 = r1 < rows ? r1 / p.qpg : 0;
  float m0 = -1.0e30f, m1 = -1.0e30f, l0 = 0.f, l1 = 0.f, z0 = 0.f, z1 = 0.f;
  float acc[8][4];  // O^T: m-tile c = channels 16 gid + 2c (+1 in c2/c3), rows r0/r1
#pragma unroll
  for (int c = 0; c < 8; ++c) acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.f;

  for (int blk = start; blk < end; ++blk) {
    const int nxt = blk + STAGES - 1;
    if (nxt < end) issue_block<BITS>(p, wsm + load_stage * stage_bytes, lane, kg, vg, lc, nxt);
    cp_async_commit();
    load_stage = load_stage + 1 == STAGES ? 0 : load_stage + 1;
    cp_async_wait<STAGES - 1>();
    __syncwarp();
    const unsigned char* st = wsm + use_stage * stage_bytes;
    use_stage = use_stage + 1 == STAGES ? 0 : use_stage + 1;

    // Q' = q * key scale (fp16 pairs in unpack_k's order, row gid) and the zero-point bias
    // of rows r0, r1: bias[r] = sum_c q[r, c] (z_c + CEN s_c), one more MMA with that vector
    // in every A row (fp32 accumulation; the fragment lands where the scores are).
    uint32_t qb[16];
    float bias0, bias1;
    {
      const uint32_t* skw = reinterpret_cast<const uint32_t*>(st + G::SK_OFF) + 16 * tig;
      const uint32_t* zkw = reinterpret_cast<const uint32_t*>(st + G::ZK_OFF) + 16 * tig;
      uint32_t sk[16], tk[16];
#pragma unroll
      for (int c = 0; c < 16; c += 4) {
        const uint4 sv = *reinterpret_cast<const uint4*>(skw + c);
        const uint4 zv = *reinterpret_cast<const uint4*>(zkw + c);
        sk[c] = sv.x; sk[c + 1] = sv.y; sk[c + 2] = sv.z; sk[c + 3] = sv.w;
        tk[c] = hfma2(sv.x, kCen2<BITS>(), zv.x);
        tk[c + 1] = hfma2(sv.y, kCen2<BITS>(), zv.y);
        tk[c + 2] = hfma2(sv.z, kCen2<BITS>(), zv.z);
        tk[c + 3] = hfma2(sv.w, kCen2<BITS>(), zv.w);
      }
      float bc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        uint32_t tp[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 2 * k + e, lo = pair_lo<BITS>(i), hi = lo + G::HALF;
          // channels lo and hi sit in words lo/2 and hi/2, in the same half (HALF is even)
          const uint32_t sel = (lo & 1) ? 0x7632u : 0x5410u;
          qb[i] = hmul2(qh[i], prmt(sk[lo >> 1], sk[hi >> 1], sel));
          tp[e] = prmt(tk[lo >> 1], tk[hi >> 1], sel);
        }
        mma(bc, tp[0], tp[0], tp[1], tp[1], qh[2 * k], qh[2 * k + 1]);
      }
      bias0 = bc[0];
      bias1 = bc[1];
    }

    // S^T = K Q'^T: 4 m-tiles of 16 tokens; s[t][0..3] = (token 16t + gid, rows r0, r1),
    // (token 16t + gid + 8, rows r0, r1).
    float s[4][4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      uint32_t w0[G::KT / 4], w1[G::KT / 4], ka[16], kb[16];
      const unsigned char* kr = st + G::K_OFF + (16 * t + gid) * G::KB + G::KT * tig;
      lds<G::KT>(kr, w0);
      lds<G::KT>(kr + 8 * G::KB, w1);
      unpack_k<BITS>(w0, ka);
      unpack_k<BITS>(w1, kb);
      s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k)
        mma(s[t], ka[2 * k], kb[2 * k], ka[2 * k + 1], kb[2 * k + 1], qb[2 * k], qb[2 * k + 1]);
      s[t][0] += bias0; s[t][2] += bias0;
      s[t][1] += bias1; s[t][3] += bias1;
    }

    // Online softmax (exp2 domain) of rows r0, r1 over the 8 lanes that share tig. The
    // running max moves only when a row's block max exceeds it by more than 8: p <= 2^8
    // stays well inside fp16, and the result is exact either way (p, l, z and acc share
    // the stored max), while the rescale of 32 accumulators is skipped in most blocks.
    float bm0 = -1.0e30f, bm1 = -1.0e30f;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      bm0 = fmaxf(bm0, fmaxf(s[t][0], s[t][2]));
      bm1 = fmaxf(bm1, fmaxf(s[t][1], s[t][3]));
    }
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, o));
      bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, o));
    }
    if (__any_sync(0xffffffffu, bm0 > m0 + 8.f || bm1 > m1 + 8.f)) {
      const float n0 = fmaxf(m0, bm0), n1 = fmaxf(m1, bm1);
      const float a0 = exp2f(m0 - n0), a1 = exp2f(m1 - n1);
      m0 = n0; m1 = n1;
      l0 *= a0; z0 *= a0; l1 *= a1; z1 *= a1;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        acc[c][0] *= a0; acc[c][2] *= a0;
        acc[c][1] *= a1; acc[c][3] *= a1;
      }
    }
    const float mx0 = m0, mx1 = m1;

    // P' = p * value scale of the row's channel group; P'^T as the B operand of
    // O^T = V^T P'^T is the transpose of the S^T fragment: one movmatrix per 8 tokens.
    const __half* svb = reinterpret_cast<const __half*>(st + G::SV_OFF);
    const __half* zvb = reinterpret_cast<const __half*>(st + zv_off);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      uint32_t pb[2];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int tok = 16 * t + gid + 8 * hh;
        // rows r0, r1 share their value group unless QPG is odd
        const float sv0 = __half2float(svb[j0 * BLOCK + tok]);
        const float zv0 = __half2float(zvb[j0 * BLOCK + tok]);
        const float sv1 = j1 == j0 ? sv0 : __half2float(svb[j1 * BLOCK + tok]);
        const float zv1 = j1 == j0 ? zv0 : __half2float(zvb[j1 * BLOCK + tok]);
        const float p0 = exp2f(s[t][2 * hh] - mx0), p1 = exp2f(s[t][2 * hh + 1] - mx1);
        l0 += p0; l1 += p1;
        z0 = fmaf(p0, fmaf(G::CEN, sv0, zv0), z0);
        z1 = fmaf(p1, fmaf(G::CEN, sv1, zv1), z1);
        pb[hh] = movtrans(pack_h2(p0 * sv0, p1 * sv1));
      }
      // V^T codes: thread gid owns channels [16 gid, 16 gid + 16) of tokens
      // 16t + 2tig (+1, +8, +9); m-tile c row gid = channel 16 gid + 2c, row gid + 8 = +1.
      const unsigned char* vr = st + G::V_OFF + (16 * t + 2 * tig) * G::KB + G::VT * gid;
      uint32_t wa[G::VT / 4], wb[G::VT / 4], wc[G::VT / 4], wd[G::VT / 4], ab[16], cd[16];
      lds<G::VT>(vr, wa);
      lds<G::VT>(vr + G::KB, wb);
      lds<G::VT>(vr + 8 * G::KB, wc);
      lds<G::VT>(vr + 9 * G::KB, wd);
      unpack_v<BITS>(wa, wb, ab);
      unpack_v<BITS>(wc, wd, cd);
#pragma unroll
      for (int c = 0; c < 8; ++c)
        mma(acc[c], ab[2 * c], ab[2 * c + 1], cd[2 * c], cd[2 * c + 1], pb[0], pb[1]);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();

#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o);
    z0 += __shfl_xor_sync(0xffffffffu, z0, o);
    z1 += __shfl_xor_sync(0xffffffffu, z1, o);
  }
  const long long part = (long long)bh * p.n_parts + split;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = r0 + e;
    if (r >= rows) break;
    const long long row = part * p.m_rows + r;
    if (gid == 0) {
      p.pm[row] = e ? m1 : m0;
      p.pl[row] = e ? l1 : l0;
      p.pz[row] = e ? z1 : z0;
    }
    float* dst = p.pacc + row * D + 16 * gid;  // channels 16 gid + 2c (+1)
#pragma unroll
    for (int c = 0; c < 8; c += 2)
      *reinterpret_cast<float4*>(dst + 2 * c) =
          make_float4(acc[c][e], acc[c][2 + e], acc[c + 1][e], acc[c + 1][2 + e]);
  }
}

template <int BITS, int STAGES>
cudaError_t grant_smem(size_t smem) {
  // Raise the dynamic shared-memory limit once per size (not per launch: launches may be
  // captured into a CUDA graph, where only stream work belongs).
  static size_t granted = 0;
  if (smem > granted) {
    cudaError_t e = cudaFuncSetAttribute(kivi_decode_split<BITS, STAGES>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) { cudaGetLastError(); return e; }  // cleared for later calls
    granted = smem;
  }
  return cudaSuccess;
}

template <int BITS, int STAGES>
int launch(const KiviParams* p, int warps, cudaStream_t stream) {
  const size_t smem = (size_t)warps * STAGES * Geo<BITS>::stage(p->ng);
  cudaError_t e = grant_smem<BITS, STAGES>(smem);
  if (e != cudaSuccess) return (int)e;
  const int grid = (p->n_items + warps - 1) / warps;
  kivi_decode_split<BITS, STAGES><<<grid, 32 * warps, smem, stream>>>(*p);
  return (int)cudaGetLastError();
}

template <int BITS, int STAGES>
int occupancy(int warps, int ng) {
  const size_t smem = (size_t)warps * STAGES * Geo<BITS>::stage(ng);
  if (grant_smem<BITS, STAGES>(smem) != cudaSuccess) return -1;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kivi_decode_split<BITS, STAGES>,
                                                    32 * warps, smem) != cudaSuccess)
    return -1;
  return blocks;
}

}  // namespace

extern "C" {

// Size of KiviParams, so the caller can check its mirror of the struct.
int slimlm_kivi_params_size() { return (int)sizeof(KiviParams); }

// Shared memory one warp needs per pipeline stage.
int slimlm_kivi_stage_bytes(int bits, int ng) {
  return bits == 2 ? Geo<2>::stage(ng) : bits == 4 ? Geo<4>::stage(ng)
                   : bits == 8 ? Geo<8>::stage(ng) : -1;
}

#define SLIMLM_KIVI_CASES(F)                                            \
  F(2, 2) F(2, 3) F(2, 4) F(4, 2) F(4, 3) F(4, 4) F(8, 2) F(8, 3)

// Launch the split kernel on CUDA device `device`; returns a cudaError_t (0 = success),
// -1 for an unbuilt (bits, stages) pair, -2 when the device cannot be selected.
int slimlm_kivi_decode(const KiviParams* p, int bits, int warps, int stages, void* stream,
                       int device) {
  if (use_device(device) != 0) return -2;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define SLIMLM_KIVI_CASE(B, S) \
  if (bits == B && stages == S) return launch<B, S>(p, warps, s);
  SLIMLM_KIVI_CASES(SLIMLM_KIVI_CASE)
#undef SLIMLM_KIVI_CASE
  return -1;
}

// Thread blocks of `warps` warps resident per multiprocessor of `device` (registers and
// shared memory permitting), or a negative number when the query fails.
int slimlm_kivi_occupancy(int bits, int warps, int stages, int ng, int device) {
  if (use_device(device) != 0) return -2;
#define SLIMLM_KIVI_CASE(B, S) \
  if (bits == B && stages == S) return occupancy<B, S>(warps, ng);
  SLIMLM_KIVI_CASES(SLIMLM_KIVI_CASE)
#undef SLIMLM_KIVI_CASE
  return -1;
}

}  // extern "C"
