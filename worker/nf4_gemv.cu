// y = W x for one token, W in bitsandbytes' nf4 layout: the batch-1 decode step's matrix-vector products.
//
// A decode step reads every weight once, so this kernel exists to read them at memory bandwidth. nf4's 16
// levels are not evenly spaced: every weight needs a table lookup. One lookup per packed byte (two weights) in a
// 256-entry table of float32 level pairs: the table is replicated per lane and laid out [entry][lane], so the
// 32 lanes of a warp always hit different banks whatever bytes they hold, and one byte permute turns a packed
// byte and the lane into the entry's offset. A byte then costs that permute, an add, one shared-memory load and
// two FMAs. Each warp computes ROWS rows at once, so every activation it loads serves ROWS rows, and keeps
// UNROLL chunks of loads in flight at all times (a ring: a chunk's slot is refilled as soon as it is used, across
// rows too), so memory latency hides behind the arithmetic. A block's scale multiplies its partial sum once; the
// double-quantized scales' codes sit in shared memory beside the table. Sums are float32; inputs and outputs
// bfloat16.
//
// Compiled at run time by NVRTC (no CUDA headers needed) with NAME, ROWS, UNROLL and WARPS defined.

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

// One 16-byte chunk of a row against its 32 activations: the sum before the block scale. `table` is the
// table's address; `lane8` is lane * 8, the lane's copy within an entry (entries are LANES x 8 = 256 bytes).
__device__ __forceinline__ float chunk_dot(const unsigned char* table, u32 lane8, uint4 w, const u32* xs) {
    const u32 ws[4] = {w.x, w.y, w.z, w.w};
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            // byte 4i+b holds weights 8i+2b (high nibble) and 8i+2b+1 (low nibble); xs[4i+b] their activations.
            // The permute's result: byte 0 = lane * 8, byte 1 = the packed byte, bytes 2-3 = 0 (from lane8).
            const u32 offset = __byte_perm(ws[i], lane8, 0x5504u | (b << 4));
            const float2 v = *reinterpret_cast<const float2*>(table + offset);
            const u32 xu = xs[4 * i + b];
            s0 = fmaf(v.x, bf16_lo(xu), s0);
            s1 = fmaf(v.y, bf16_hi(xu), s1);
        }
    }
    return s0 + s1;
}

// One chunk of ROWS rows with its 32 activations and the rows' block scales, loaded together ahead of use.
struct Chunk {
    uint4 w[ROWS];
    uint4 x[4];
    u32 q[ROWS];  // nested: the scale's code; else its float32 bits
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

__device__ __forceinline__ void accumulate(float* acc, const unsigned char* table, u32 lane8, const float* codes,
                                           float shift, int nested, const Chunk& ch) {
    const u32 xs[16] = {ch.x[0].x, ch.x[0].y, ch.x[0].z, ch.x[0].w, ch.x[1].x, ch.x[1].y, ch.x[1].z, ch.x[1].w,
                        ch.x[2].x, ch.x[2].y, ch.x[2].z, ch.x[2].w, ch.x[3].x, ch.x[3].y, ch.x[3].z, ch.x[3].w};
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const float scale = nested ? codes[ch.q[r]] * ch.group[r] + shift : __uint_as_float(ch.q[r]);
        acc[r] = fmaf(chunk_dot(table, lane8, ch.w[r], xs), scale, acc[r]);
    }
}

// A warp's work is a stream of (row group, step) items: step s of a group is chunk lane + s * LANES of its rows.
struct Cursor {
    int group, step;
    __device__ __forceinline__ void next(int steps, int stride) {
        if (++step == steps) {
            step = 0;
            group += stride;
        }
    }
};

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
    float2* lut = reinterpret_cast<float2*>(smem);  // [TABLE][LANES]
    float* codes = reinterpret_cast<float*>(lut + TABLE * LANES);  // the scales' 256 codes
    for (int i = threadIdx.x; i < TABLE * LANES; i += blockDim.x) {
        const int e = i / LANES;
        lut[i].x = nf4[e >> 4];
        lut[i].y = nf4[e & 15];
    }
    if (nested)
        for (int i = threadIdx.x; i < TABLE; i += blockDim.x) codes[i] = code2[i];
    __syncthreads();

    const int lane = threadIdx.x % LANES;
    const u32 lane8 = lane * sizeof(float2);
    const Operands op = {weight, absmax_q, absmax, x, k / 32, nested, group};
    const float shift = nested ? *offset : 0.f;
    const int groups = n / ROWS, stride = gridDim.x * WARPS;
    const int steps = (op.chunks + LANES - 1) / LANES;  // every lane takes as many; a missing chunk adds nothing
    const Cursor first = {(int)(blockIdx.x * WARPS + threadIdx.x / LANES), 0};

    Chunk ring[UNROLL];
    Cursor fill = first;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int c = lane + fill.step * LANES;
        if (fill.group < groups && c < op.chunks) load(ring[u], op, fill.group * ROWS, c);
        fill.next(steps, stride);
    }

    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
    Cursor use = first;
    while (use.group < groups) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (use.group >= groups) break;  // the same for the whole warp
            if (lane + use.step * LANES < op.chunks) accumulate(acc, smem, lane8, codes, shift, nested, ring[u]);
            const int c = lane + fill.step * LANES;
            if (fill.group < groups && c < op.chunks) load(ring[u], op, fill.group * ROWS, c);
            fill.next(steps, stride);
            if (use.step == steps - 1) {  // the group's last step: its rows are done
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                    for (int m = LANES / 2; m > 0; m /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], m);
                }
                if (lane < ROWS) {
                    float out = acc[0];
#pragma unroll
                    for (int r = 1; r < ROWS; ++r) if (lane == r) out = acc[r];
                    y[use.group * ROWS + lane] = to_bf16(out);
                }
#pragma unroll
                for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
            }
            use.next(steps, stride);
        }
    }
}
