// Row-sparse decoding on the GPU: the two CUDA kernels behind rowsparse.py's CuPy path.
//
// For one token x (D,) and the input-major weight Wt (D, O), float32:
//
//     idx = topk_nonzero(x, K)                  topk_select: the ascending positions that top-K of |x|
//     vals = x[idx]                             keeps, less the zeros; ties at the threshold keep the
//                                               lower positions first (as topk.topk_mask does)
//     y = sum_k vals[k] * Wt[idx[k], :]         rows_matvec: reads only the selected rows of Wt
//
// Both run on the device, one after the other in the stream: the index list never travels to the
// host and nothing waits for it. rows_matvec is launched for K rows and reads the true count
// (<= K, since zeros are dropped) from device memory. rowsparse.radix_select is topk_select's
// algorithm in NumPy, tested on any machine. Loaded by rowsparse.py with cupy.RawModule;
// `nvcc -arch=sm_90 -cubin rowsparse.cu` compiles it alone.

#ifndef ROWS_UNROLL
#define ROWS_UNROLL 8             // selected rows whose loads are in flight together per thread
#endif
#define SELECT_THREADS 1024       // topk_select runs as one block of this many threads,
#ifndef SELECT_PER_THREAD
#define SELECT_PER_THREAD 16      // each holding this many entries: D <= 16384 (rowsparse.py picks the
#endif                            // smallest power of 2 that holds D, so the loops below are short)

// The exclusive prefix sum of v over the block (1024 threads), and in *total the sum of all v.
// Counters packed into one unsigned (16 bits each) are summed lane-wise, as no sum exceeds 65535.
__device__ __forceinline__ unsigned block_exclusive_scan(unsigned v, unsigned* scratch, unsigned* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned incl = v;                                        // inclusive scan inside the warp
    for (int off = 1; off < 32; off <<= 1) {
        unsigned u = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += u;
    }
    if (lane == 31) scratch[warp] = incl;                     // each warp's sum
    __syncthreads();
    if (warp == 0) {                                          // scan the warp sums
        unsigned w = scratch[lane], wincl = w;                // 1024 threads: 32 warps
        for (int off = 1; off < 32; off <<= 1) {
            unsigned u = __shfl_up_sync(0xffffffffu, wincl, off);
            if (lane >= off) wincl += u;
        }
        scratch[lane] = wincl - w;                            // warps before this one
        if (lane == 31) scratch[32] = wincl;
    }
    __syncthreads();
    *total = scratch[32];
    return scratch[warp] + incl - v;
}

// One block of 1024 threads; thread i holds positions i*P .. i*P+P-1 (P = SELECT_PER_THREAD,
// 1024 P >= D), in registers: every loop over them is unrolled at compile time.
// Writes idx[0:count], vals[0:count], *count, and zeroes y (which rows_matvec adds into).
// (__launch_bounds__: at most 64 registers a thread, so that 1024 threads fit on one SM.)
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
topk_select(const float* __restrict__ x, int D, int K, long long* __restrict__ idx, float* __restrict__ vals,
            int* __restrict__ count, float* __restrict__ y, int O) {
    __shared__ unsigned hist[2][256];                         // two: one is zeroed while the other counts
    __shared__ unsigned scratch[33];
    __shared__ unsigned found_byte, found_rest, found_all;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int i0 = tid * SELECT_PER_THREAD;

    // bits = x's float bits, held in registers; key = bits & 0x7fffffff = the bits of |x|: for floats
    // >= 0 the order of the bit patterns is the order of the values
    unsigned bits[SELECT_PER_THREAD];
#pragma unroll
    for (int j = 0; j < SELECT_PER_THREAD; ++j)
        bits[j] = i0 + j < D ? __float_as_uint(x[i0 + j]) : 0u;
    for (int o = tid; o < O; o += SELECT_THREADS) y[o] = 0.f;
    if (tid < 256) hist[0][tid] = 0u;
    __syncthreads();

    // t = the K-th largest key; rest = how many keys equal to t are kept (the first, by position).
    // K >= D keeps every nonzero (t = 0); K <= 0 keeps nothing (no key exceeds t = 0xffffffff).
    unsigned t = K <= 0 ? 0xffffffffu : 0u, rest = 0u;
    if (K > 0 && K < D) {
        // radix select, a byte at a time from the top: among the keys that start with the bytes
        // found so far (prefix), count each value of the next byte, and take the byte at which the
        // count from the top reaches rest
        unsigned prefix = 0u, high = 0u;
        rest = (unsigned)K;
        for (int shift = 24, pass = 0; shift >= 0; shift -= 8, ++pass) {
            unsigned* h = hist[pass & 1];
            if (tid < 256) hist[(pass + 1) & 1][tid] = 0u;    // for the next pass
#pragma unroll
            for (int j = 0; j < SELECT_PER_THREAD; ++j) {
                unsigned key = bits[j] & 0x7fffffffu;
                bool mine = i0 + j < D && (key & high) == prefix;
                unsigned byte = (key >> shift) & 255u;
                // one shared-memory atomic per distinct byte in the warp, not per thread: most
                // keys share their top byte (the exponent), and equal-address atomics serialize
                unsigned active = __ballot_sync(0xffffffffu, mine);
                if (mine) {
                    unsigned peers = __match_any_sync(active, byte);
                    if (lane == __ffs(peers) - 1) atomicAdd(&h[byte], (unsigned)__popc(peers));
                }
            }
            __syncthreads();
            if (warp == 0) {                                  // lane l looks at bytes 8l .. 8l+7
                unsigned c[8], s = 0u;
#pragma unroll
                for (int b = 0; b < 8; ++b) { c[b] = h[lane * 8 + b]; s += c[b]; }
                unsigned suffix = s;                          // -> the count of bytes >= 8 lane
                for (int off = 1; off < 32; off <<= 1) {
                    unsigned u = __shfl_down_sync(0xffffffffu, suffix, off);
                    if (lane + off < 32) suffix += u;
                }
                unsigned above = suffix - s;                  // keys in higher bytes than this lane's
                if (above < rest && rest <= suffix) {         // true for exactly one lane
#pragma unroll
                    for (int b = 7; b >= 0; --b) {
                        if (above + c[b] >= rest) {
                            found_byte = lane * 8 + b;
                            found_rest = rest - above;
                            found_all = rest - above == c[b];     // the whole byte's keys are kept
                            break;
                        }
                        above += c[b];
                    }
                }
            }
            __syncthreads();
            prefix |= found_byte << shift;
            high |= 255u << shift;
            rest = found_rest;
            if (found_all) {                 // keep every key >= prefix (zeros are never kept): done
                t = prefix > 0u ? prefix - 1u : 0u;
                rest = 0u;
                break;
            }
            t = prefix;
        }
    }

    // keep key > t, and the first `rest` keys equal to t > 0 by position. One block-wide scan of
    // (greater, tied) counts gives both where this thread writes and how many ties come before it.
    unsigned gt = 0u, eq = 0u;
#pragma unroll
    for (int j = 0; j < SELECT_PER_THREAD; ++j) {
        unsigned key = bits[j] & 0x7fffffffu;
        if (i0 + j < D) { gt += key > t; eq += (t > 0u && key == t); }
    }
    unsigned total;
    unsigned before = block_exclusive_scan(gt | (eq << 16), scratch, &total);
    unsigned ties_before = before >> 16;
    unsigned pos = (before & 0xffffu) + min(ties_before, rest);
#pragma unroll
    for (int j = 0; j < SELECT_PER_THREAD; ++j) {
        unsigned key = bits[j] & 0x7fffffffu;
        if (i0 + j < D) {
            bool keep = key > t;
            if (t > 0u && key == t) keep = ties_before++ < rest;
            if (keep) { idx[pos] = i0 + j; vals[pos] = __uint_as_float(bits[j]); ++pos; }
        }
    }
    if (tid == 0) *count = (int)((total & 0xffffu) + min(total >> 16, rest));
}

// y[j:j+4] += sum over this block's rows k of vals[k] * Wt[idx[k], j:j+4]. One thread per 4
// outputs (a 16-byte load from each row), 256 threads: 1024 outputs per block. blockIdx.y takes
// selected rows k0 .. k0+rows_per_block-1, and the blocks of a column add their partial sums
// into y with atomicAdd. n = *count if have_count, else K. Each weight is read once, streaming.
extern "C" __global__ void rows_matvec(const float* __restrict__ vals, const long long* __restrict__ idx,
                                       const int* __restrict__ count, int have_count, int K,
                                       const float* __restrict__ Wt, float* __restrict__ y, int O,
                                       int rows_per_block) {
    const int n = have_count ? min(*count, K) : K;
    const int k0 = blockIdx.y * rows_per_block;
    const int j = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (k0 >= n || j >= O) return;
    const int k1 = min(n, k0 + rows_per_block);
    if ((O & 3) == 0) {                                       // rows 16-byte aligned: float4 loads
        const float* col = Wt + j;
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        int k = k0;
        for (; k + ROWS_UNROLL <= k1; k += ROWS_UNROLL) {     // ROWS_UNROLL loads issued before any use
            float4 w[ROWS_UNROLL];
            float v[ROWS_UNROLL];
#pragma unroll
            for (int u = 0; u < ROWS_UNROLL; ++u) {
                v[u] = vals[k + u];
                w[u] = __ldcs(reinterpret_cast<const float4*>(col + idx[k + u] * (long long)O));
            }
#pragma unroll
            for (int u = 0; u < ROWS_UNROLL; ++u) {
                a.x = fmaf(v[u], w[u].x, a.x); a.y = fmaf(v[u], w[u].y, a.y);
                a.z = fmaf(v[u], w[u].z, a.z); a.w = fmaf(v[u], w[u].w, a.w);
            }
        }
        for (; k < k1; ++k) {
            float v = vals[k];
            float4 w = __ldcs(reinterpret_cast<const float4*>(col + idx[k] * (long long)O));
            a.x = fmaf(v, w.x, a.x); a.y = fmaf(v, w.y, a.y); a.z = fmaf(v, w.z, a.z); a.w = fmaf(v, w.w, a.w);
        }
#if __CUDA_ARCH__ >= 900
        atomicAdd(reinterpret_cast<float4*>(y + j), a);       // one vector atomic (sm_90 and later)
#else
        atomicAdd(y + j, a.x); atomicAdd(y + j + 1, a.y); atomicAdd(y + j + 2, a.z); atomicAdd(y + j + 3, a.w);
#endif
    } else {                                                  // any O: one float at a time
        for (int c = j; c < j + 4 && c < O; ++c) {
            float a = 0.f;
            for (int k = k0; k < k1; ++k) a = fmaf(vals[k], Wt[idx[k] * (long long)O + c], a);
            atomicAdd(y + c, a);
        }
    }
}
