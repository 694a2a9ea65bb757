// y = W x for one token, W in bitsandbytes' nf4 layout, with the multiply-adds on tensor cores.
//
// A decode step reads every weight once, so this kernel exists to read them at memory bandwidth; what stands in
// the way is the instructions each packed byte (two weights) costs. Here a byte costs a byte permute, an address
// and one 4-byte shared-memory load: a 256-entry table of bfloat16 level pairs, replicated per lane and laid out
// [entry][lane] so the 32 lanes always hit 32 different banks. The level pair is already one bfloat16x2 register
// of an m16n8k16 tensor-core product's A operand, so the multiply-adds cost a quarter instruction a byte and the
// activations need no conversion.
//
// A warp computes a tile of 16 rows; lane (g, q) = (lane / 4, lane % 4) reads 16 contiguous bytes of rows g and
// g + 8 per slot, and the product's k order is permuted to match what each lane holds. Only one output column is
// needed, so the 8 columns of B are put to use: column n carries the activations of scale block n of a step (and
// zero elsewhere), so each column of the result is one block's sum before its scale, and a block's scale
// multiplies it once, in float32. A step is UNROLL slots of 4 chunks (32 weights each) per row, 2 x UNROLL blocks.
// The WARPS warps of a thread block split a tile's steps between them and add their sums in shared memory.
//
// Compiled at run time by NVRTC (no CUDA headers needed) with NAME, UNROLL (1 to 4) and WARPS defined. Rows come in
// whole tiles and whole scale blocks (n % 16 == 0, k % 64 == 0); worker/nf4_gemv.py sends other shapes elsewhere.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define LANES 32
#define TABLE 256
#define TILE 16
#define STEP_CHUNKS (4 * UNROLL)
#define STEP_BLOCKS (2 * UNROLL)

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

// The level pair of byte `b` of `w`: entries are LANES x 4 = 128 bytes apart, `table` is this lane's copy.
__device__ __forceinline__ u32 pair(const unsigned char* table, u32 w, int b) {
    return *reinterpret_cast<const u32*>(table + (__byte_perm(w, 0u, 0x4440u | b) << 7));
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// A block's scale: nested, a code into the scales' 256 values times its group's float, plus the offset.
__device__ __forceinline__ float scale(const float* codes, int nested, float shift, u32 q, float group) {
    return nested ? codes[q] * group + shift : __uint_as_float(q);
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
    uint4* lut = reinterpret_cast<uint4*>(smem);                             // [TABLE][LANES] u32, 4 per uint4
    float* codes = reinterpret_cast<float*>(smem + TABLE * LANES * 4);       // the scales' 256 codes
    float* partial = codes + TABLE;                                          // [WARPS][TILE] sums of a tile
    for (int i = threadIdx.x; i < TABLE * LANES / 4; i += blockDim.x) {
        const int e = i / (LANES / 4);
        const u32 v = (u32)to_bf16(nf4[e >> 4]) | ((u32)to_bf16(nf4[e & 15]) << 16);
        lut[i] = make_uint4(v, v, v, v);
    }
    if (nested)
        for (int i = threadIdx.x; i < TABLE; i += blockDim.x) codes[i] = code2[i];
    __syncthreads();

    const int lane = threadIdx.x % LANES, warp = threadIdx.x / LANES;
    const int g = lane >> 2, q = lane & 3;
    const unsigned char* table = smem + lane * 4;
    const int chunks = k / 32, blocks = k / 64, steps = (chunks + STEP_CHUNKS - 1) / STEP_CHUNKS;
    const float shift = nested ? *offset : 0.f;
    // The slot whose activations this lane puts in B's column g: chunk 4u + q belongs to block 2u + q / 2.
    const int d = g - (q >> 1);
    const int xslot = (d >= 0 && !(d & 1) && d / 2 < UNROLL) ? d / 2 : -1;
    const bool scaled = q < UNROLL;  // this lane's result columns 2q, 2q + 1 are blocks of the step

    u32 xr[UNROLL][16];  // activations of this lane's slot; every other slot stays zero
    uint4 wa[UNROLL], wb[UNROLL];  // rows g and g + 8; a missing chunk's keep old (finite) levels
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        wa[u] = wb[u] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int i = 0; i < 16; ++i) xr[u][i] = 0u;
    }

    for (int tile = blockIdx.x; tile < n / TILE; tile += gridDim.x) {
        const int row_a = tile * TILE + g, row_b = row_a + 8;
        const uint4* wa_row = weight + (u64)row_a * chunks;
        const uint4* wb_row = weight + (u64)row_b * chunks;
        float acc_a = 0.f, acc_b = 0.f;
        for (int s = warp; s < steps; s += WARPS) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int c = s * STEP_CHUNKS + 4 * u + q;
                if (c < chunks) {  // a missing chunk's stale registers meet zero activations or a zero scale
                    wa[u] = load_stream(wa_row + c);
                    wb[u] = load_stream(wb_row + c);
                }
                if (u == xslot && c < chunks) {
                    const uint4* xc = x + (u64)c * 4;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const uint4 v = xc[j];
                        xr[u][4 * j] = v.x; xr[u][4 * j + 1] = v.y; xr[u][4 * j + 2] = v.z; xr[u][4 * j + 3] = v.w;
                    }
                }
            }
            const int b0 = s * STEP_BLOCKS + 2 * q;  // this lane's two result columns' blocks
            u32 sq[4] = {0u, 0u, 0u, 0u};
            float sg[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int row = j < 2 ? row_a : row_b, b = b0 + (j & 1);
                if (scaled && b < blocks) {
                    const u64 block = (u64)row * blocks + b;
                    if (nested) {
                        sq[j] = absmax_q[block];
                        sg[j] = absmax[block / group];
                    } else {
                        sq[j] = __float_as_uint(absmax[block]);
                    }
                }
            }

            float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
                for (int m = 0; m < 8; ++m) {  // bytes 2m, 2m + 1 of the chunk: weights 4m .. 4m + 3
                    const u32 wa_w = word(wa[u], m >> 1), wb_w = word(wb[u], m >> 1);
                    const int lo = (2 * m) & 3, hi = (2 * m + 1) & 3;
                    mma(c, pair(table, wa_w, lo), pair(table, wb_w, lo), pair(table, wa_w, hi),
                        pair(table, wb_w, hi), xr[u][2 * m], xr[u][2 * m + 1]);
                }
            }
            float sc[4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
                sc[j] = (scaled && b0 + (j & 1) < blocks) ? scale(codes, nested, shift, sq[j], sg[j]) : 0.f;
            acc_a = fmaf(c[0], sc[0], fmaf(c[1], sc[1], acc_a));
            acc_b = fmaf(c[2], sc[2], fmaf(c[3], sc[3], acc_b));
        }
#pragma unroll
        for (int m = 1; m < 4; m *= 2) {
            acc_a += __shfl_xor_sync(0xffffffffu, acc_a, m);
            acc_b += __shfl_xor_sync(0xffffffffu, acc_b, m);
        }
        if (q == 0) {
            partial[warp * TILE + g] = acc_a;
            partial[warp * TILE + g + 8] = acc_b;
        }
        __syncthreads();
        if (threadIdx.x < TILE) {
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) sum += partial[w * TILE + threadIdx.x];
            y[tile * TILE + threadIdx.x] = to_bf16(sum);
        }
        __syncthreads();
    }
}
