// y = W x for one token, W in bitsandbytes' nf4 layout: the batch-1 decode step's matrix-vector products.
//
// A decode step reads every weight once, so this kernel exists to read them at memory bandwidth. nf4's 16
// levels are not evenly spaced: every weight needs a table lookup. A lookup per packed byte (two weights) in a
// 256-entry table of level pairs costs a byte extract, an address and one shared-memory load; the table is
// replicated per lane and laid out [entry][lane], so the 32 lanes of a warp always hit 32 different banks
// whatever bytes they hold. Each warp computes ROWS rows at once, so every activation it loads serves ROWS
// rows, and issues UNROLL x ROWS 16-byte weight loads before using the first, to keep enough bytes in flight.
// A block's scale multiplies its partial sum once. Sums are float32; inputs and outputs bfloat16.
//
// The scales' codes sit in shared memory beside the table, so decoding a block's scale costs no global load.
// Compiled at run time by NVRTC (no CUDA headers needed) with NAME, ROWS, UNROLL, WARPS and LUT_HALF defined.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define LANES 32
#define TABLE 256

__device__ __forceinline__ float bf16_lo(u32 u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(u32 u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ u16 to_bf16(float f) {  // round to nearest even, as torch does
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) {  // weights are read once: keep them out of L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

#if LUT_HALF
typedef u32 entry_t;  // two fp16 levels
__device__ __forceinline__ float2 levels(entry_t e) {
    float2 f;
    asm("{.reg .b16 lo, hi; mov.b32 {lo, hi}, %2; cvt.f32.f16 %0, lo; cvt.f32.f16 %1, hi;}"
        : "=f"(f.x), "=f"(f.y) : "r"(e));
    return f;
}
__device__ __forceinline__ entry_t make_entry(float hi_nibble, float lo_nibble) {
    u16 a, b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(a) : "f"(hi_nibble));
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(lo_nibble));
    return (u32)a | ((u32)b << 16);
}
#else
typedef float2 entry_t;  // two fp32 levels
__device__ __forceinline__ float2 levels(entry_t e) { return e; }
__device__ __forceinline__ entry_t make_entry(float hi_nibble, float lo_nibble) {
    float2 e;
    e.x = hi_nibble;
    e.y = lo_nibble;
    return e;
}
#endif

// One 16-byte chunk (32 weights) of a row against its 32 activations: the sum before the block scale.
__device__ __forceinline__ float chunk_dot(const entry_t* table, uint4 w, const u32* xs) {
    const u32 ws[4] = {w.x, w.y, w.z, w.w};
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            // byte 4i+b holds weights 8i+2b (high nibble) and 8i+2b+1 (low nibble); xs[4i+b] their activations
            const float2 v = levels(table[((ws[i] >> (8 * b)) & 0xffu) * LANES]);
            const u32 xu = xs[4 * i + b];
            s0 = fmaf(v.x, bf16_lo(xu), s0);
            s1 = fmaf(v.y, bf16_hi(xu), s1);
        }
    }
    return s0 + s1;
}

// One 16-byte chunk of ROWS rows with its 32 activations and the rows' block scales, all loaded before any is
// used: the scales' codes and the activations are then no latency chain inside the loop.
struct Chunk {
    uint4 w[ROWS];
    uint4 x[4];
    u32 q[ROWS];      // nested: the scale's code; else its float32 bits
    float group[ROWS];
};

struct Operands {
    const uint4* weight;
    const u8* absmax_q;
    const float* absmax;
    const uint4* x;
    int chunks, nested, group;
};

__device__ __forceinline__ void load(Chunk& ch, const Operands& op, int row0, int c) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) ch.w[r] = load_stream(op.weight + (u64)(row0 + r) * op.chunks + c);
#pragma unroll
    for (int j = 0; j < 4; ++j) ch.x[j] = op.x[c * 4 + j];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const u64 block = ((u64)(row0 + r) * op.chunks + c) / 2;  // 64 weights = 2 chunks
        if (op.nested) {
            ch.q[r] = op.absmax_q[block];
            ch.group[r] = op.absmax[block / op.group];
        } else {
            ch.q[r] = __float_as_uint(op.absmax[block]);
        }
    }
}

__device__ __forceinline__ void accumulate(float* acc, const entry_t* table, const float* code2, float shift,
                                           int nested, const Chunk& ch) {
    const u32 xs[16] = {ch.x[0].x, ch.x[0].y, ch.x[0].z, ch.x[0].w, ch.x[1].x, ch.x[1].y, ch.x[1].z, ch.x[1].w,
                        ch.x[2].x, ch.x[2].y, ch.x[2].z, ch.x[2].w, ch.x[3].x, ch.x[3].y, ch.x[3].z, ch.x[3].w};
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const float scale = nested ? code2[ch.q[r]] * ch.group[r] + shift : __uint_as_float(ch.q[r]);
        acc[r] = fmaf(chunk_dot(table, ch.w[r], xs), scale, acc[r]);
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * LANES) NAME(
    const uint4* __restrict__ weight,     // [n, k / 32] chunks of 32 codes, two a byte, high nibble first
    const u8* __restrict__ absmax_q,      // nested scales: a uint8 code per 64-weight block (else unused)
    const float* __restrict__ absmax,     // nested: a float per `group` blocks; else a float per block
    const float* __restrict__ code2,      // nested: the 256 values of the scales' codes
    const float* __restrict__ offset,     // nested: added to every decoded scale
    const float* __restrict__ nf4,        // the 16 levels
    const uint4* __restrict__ x,          // k bfloat16 activations
    u16* __restrict__ y,                  // n bfloat16 outputs
    int n, int k, int nested, int group)
{
    extern __shared__ __align__(16) unsigned char smem[];
    entry_t* lut = reinterpret_cast<entry_t*>(smem);  // [TABLE][LANES]
    float* codes = reinterpret_cast<float*>(lut + TABLE * LANES);  // the scales' 256 codes
    for (int i = threadIdx.x; i < TABLE * LANES; i += blockDim.x) {
        const int e = i / LANES;
        lut[i] = make_entry(nf4[e >> 4], nf4[e & 15]);
    }
    if (nested)
        for (int i = threadIdx.x; i < TABLE; i += blockDim.x) codes[i] = code2[i];
    __syncthreads();

    const int lane = threadIdx.x % LANES;
    const entry_t* table = lut + lane;
    const Operands op = {weight, absmax_q, absmax, x, k / 32, nested, group};
    const float shift = nested ? *offset : 0.f;
    for (int g = blockIdx.x * WARPS + threadIdx.x / LANES; g < n / ROWS; g += gridDim.x * WARPS) {
        const int row0 = g * ROWS;
        float acc[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;

        int c = lane;
        for (; c + LANES * (UNROLL - 1) < op.chunks; c += LANES * UNROLL) {
            Chunk ch[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) load(ch[u], op, row0, c + u * LANES);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) accumulate(acc, table, codes, shift, nested, ch[u]);
        }
        for (; c < op.chunks; c += LANES) {  // the rest of a row whose chunks are no multiple of LANES x UNROLL
            Chunk ch;
            load(ch, op, row0, c);
            accumulate(acc, table, codes, shift, nested, ch);
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int m = LANES / 2; m > 0; m /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], m);
        }
        if (lane < ROWS) {
            float out = acc[0];
#pragma unroll
            for (int r = 1; r < ROWS; ++r) if (lane == r) out = acc[r];
            y[row0 + lane] = to_bf16(out);
        }
    }
}
