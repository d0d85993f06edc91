// Fused CNTK kernel (docs/math.md eqs. (1)-(6); tiles as in eq. (21)): every layer of many (pair, tile) work
// items in one launch.
//
// Offsets D = p - q never mix under A(.), so the 4-D recursion of a pair splits into 2-D slabs, one per D. The
// (2H-1)(2W-1) slabs of a pair pack exactly into H*W full "tiles" of H x W entries: tile (b, a), b < H, a < W,
// indexed by q = (i, j), holds the entry (p, q) with p = ((i + b) mod H, (j + a) mod W). It is made of up to four
// slabs D in {b, b-H} x {a, a-W}, separated by cuts at row H-b and column W-a; A(.) is a 3x3 box filter on each
// piece with zero outside it. Every slab entry of the pair lies in exactly one tile: no padding, no waste.
//
// Work decomposition: one work item = (pair, tile). A group of WW lanes of one warp owns an item (32 / WW items
// per warp; the 32 mod WW lanes left over run along idle); lane j holds column j of the tile in registers (S[i],
// T[i], i < HH). The vertical box filter runs in registers, the horizontal one by two warp shuffles; V is
// elementwise. Only the two images and their scale maps are read from global memory (through L1: the warps of a
// block work on consecutive tiles of the same pair); nothing else touches memory until the item's float64 sum,
// written once per item (no atomics; the host sums the items of each pair).
//
// Arithmetic is float32; each item's sum is float64. acos by A&S 4.4.46; rho within RHO_SNAP of 1 is 1, as in
// the numba backend (cntk_cpu.RHO_SNAP32): the float32 rounding of identical patches would otherwise become
// theta ~ 1e-3. The 1/(9 pi) of every V step is folded into a running scale: before V step h (h = 1..depth-1) the
// state (S, T) and o = l_x l_z are kappa_h = (9 pi)^((h-1) mod RENORM) times their true values (the host scales
// l(h) by sqrt(kappa_h)), so S' = o f(rho) and T' = T (pi - theta) + S' need no multiply; after every RENORM-th
// step but the last the state is multiplied by (9 pi)^-RENORM; the host divides each sum by the final scale.
// Compile with -DHH=<rows> -DWW=<cols> (WW <= 32) [-DMIN_BLOCKS=<blocks per SM>]; no headers (NVRTC-ready).
// The same text is compiled on the CPU by the emulation harness in tests/support/cuda_emu/harness.cpp.

#ifndef HH
#error "compile with -DHH=<image rows>"
#endif
#ifndef WW
#error "compile with -DWW=<image columns, at most 32>"
#endif
#if WW > 32 || WW < 1 || HH < 1
#error "need 1 <= WW <= 32 and HH >= 1"
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1                        // __launch_bounds__' minimum resident blocks per SM (caps registers)
#endif

#define FULL_MASK 0xffffffffu
#define TPW (32 / WW)                       // tiles (work items) per warp
#define BLOCK_THREADS 128                   // the host launches blocks of this size
#define PI_F 3.14159265358979323846f
#define RENORM 8                            // = cntk_cupy.RENORM
#define INV_9PI_POW_RENORM 2.44827920e-12f  // (9 pi)^-8 (9 pi: ReLU's c_sigma = 2 and the next layer's 1/9)
#define TINY_F 1e-30f                       // |S| <= o, so rho = S / max(o, TINY) = 0 where o = 0
#define RHO_SNAP_F 4e-6f                    // = cntk_cpu.RHO_SNAP32

// A(.) on one tile column: vertical 3-sum in registers within the row pieces [0, cut) and [cut, HH), then the
// horizontal 3-sum by shuffles, a neighbour counting only in the same column piece (m_l, m_r: 1 or 0).
__device__ __forceinline__ void box3(float (&v)[HH], int cut, float m_l, float m_r)
{
    float prev = 0.f;
#pragma unroll
    for (int i = 0; i < HH; ++i) {
        const float cur = v[i];
        float acc = cur;
        if (i > 0 && i != cut) acc += prev;
        if (i + 1 < HH && i + 1 != cut) acc += v[i + 1];
        prev = cur;
        const float left = __shfl_up_sync(FULL_MASK, acc, 1);
        const float right = __shfl_down_sync(FULL_MASK, acc, 1);
        v[i] = fmaf(m_r, right, fmaf(m_l, left, acc));
    }
}

// V (scaled): o = l_x[p] l_z[q], rho = clip(S/o, -1, 1), theta = acos(rho), S' = o (rho (pi - theta) +
// sqrt(1 - rho^2)), T' = T (pi - theta) + S'. lx, lz point at this lane's row 0; rows are WW floats apart.
__device__ __forceinline__ void relu_step(float (&S)[HH], float (&T)[HH],
                                          const float* __restrict__ lx, const float* __restrict__ lz)
{
#pragma unroll
    for (int i = 0; i < HH; ++i) {
        const float o = __ldg(lx + i * WW) * __ldg(lz + i * WW);
        float rho = S[i] / fmaxf(o, TINY_F);
        rho = rho > 1.f - RHO_SNAP_F ? 1.f : fmaxf(rho, -1.f);
        const float t = fabsf(rho);
        const float u = sqrtf(fmaf(t, -1.f, 1.f));            // sqrt(1 - |rho|); 1 - |rho| is exact near 1
        float poly = -0.0012624911f;                          // acos(t) = sqrt(1 - t) sum_k a_k t^k, |err| <= 2e-8
        poly = fmaf(poly, t, 0.0066700901f);
        poly = fmaf(poly, t, -0.0170881256f);
        poly = fmaf(poly, t, 0.0308918810f);
        poly = fmaf(poly, t, -0.0501743046f);
        poly = fmaf(poly, t, 0.0889789874f);
        poly = fmaf(poly, t, -0.2145988016f);
        poly = fmaf(poly, t, 1.5707963050f);
        const float acos_t = u * poly;
        const float pi_theta = rho >= 0.f ? PI_F - acos_t : acos_t;   // pi - acos(rho)
        const float sin_theta = u * sqrtf(1.f + t);                  // sqrt((1 - rho)(1 + rho))
        const float s_new = o * fmaf(rho, pi_theta, sin_theta);
        T[i] = fmaf(T[i], pi_theta, s_new);
        S[i] = s_new;
    }
}

// out[k] = sum over tile k's entries of T (T - S if fix), times the final scale (9 pi)^((depth-2) mod RENORM + 1);
// k = pair * ntiles + tile, tile = b * WW + a. X2: (N, C, 2*HH, WW) images with their rows stored twice (row
// r + HH = row r), so the cyclic row shift of the p image is a plain offset; L2: (N, depth-1, 2*HH, WW) scaled
// maps l(h) sqrt(kappa_h), rows stored twice likewise. pidx/qidx: the images of each pair (p plays x, q plays z).
// ntiles = HH*WW (gap) or 1 (vanilla: the D = 0 slab only).
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, MIN_BLOCKS)
cntk_fused(const float* __restrict__ X2, const float* __restrict__ L2,
           const int* __restrict__ pidx, const int* __restrict__ qidx,
           long long nitems, int ntiles, int C, int depth, int fix, double* __restrict__ out)
{
    const int lane = threadIdx.x & 31;
    const int sub = lane / WW;                 // which tile of this warp; sub == TPW: idle lanes
    const int j = lane - sub * WW;             // this lane's tile column
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long item = warp * TPW + sub;
    const bool active = sub < TPW && item < nitems;
    if (!active) item = 0;                     // idle lanes compute item 0 and write nothing

    const long long pair = item / ntiles;
    const int tile = (int)(item - pair * ntiles);
    const int b = tile / WW;                   // D = (b, a) mod (HH, WW)
    const int a = tile - b * WW;
    const long long pimg = pidx[pair], qimg = qidx[pair];
    const int jp = j + a < WW ? j + a : j + a - WW;    // column of p
    const int cut_r = HH - b, cut_c = WW - a;          // where the slab changes (none when b = 0, a = 0)
    const float m_l = j > 0 && j != cut_c ? 1.f : 0.f;
    const float m_r = j + 1 < WW && j + 1 != cut_c ? 1.f : 0.f;
    const long long plane = 2LL * HH * WW;
    const int nl = depth - 1;

    // G[p, q] = sum_c x_c[p] z_c[q], then S = A(G), T = S (0 if fix).
    float S[HH], T[HH];
#pragma unroll
    for (int i = 0; i < HH; ++i) S[i] = 0.f;
    for (int c = 0; c < C; ++c) {
        const float* xp = X2 + (pimg * C + c) * plane + b * WW + jp;
        const float* zq = X2 + (qimg * C + c) * plane + j;
#pragma unroll
        for (int i = 0; i < HH; ++i) S[i] = fmaf(__ldg(xp + i * WW), __ldg(zq + i * WW), S[i]);
    }
    box3(S, cut_r, m_l, m_r);
#pragma unroll
    for (int i = 0; i < HH; ++i) T[i] = fix ? 0.f : S[i];

    // h = 1 .. depth-2: (S, T) = V(S, T; l(h)); S = A(S); T = A(T). Then V with l(depth-1).
    const float* lx = L2 + pimg * nl * plane + b * WW + jp;
    const float* lz = L2 + qimg * nl * plane + j;
    for (int h = 1; h < nl; ++h) {
        relu_step(S, T, lx, lz);
        if (h % RENORM == 0) {
#pragma unroll
            for (int i = 0; i < HH; ++i) {
                S[i] *= INV_9PI_POW_RENORM;
                T[i] *= INV_9PI_POW_RENORM;
            }
        }
        box3(S, cut_r, m_l, m_r);
        box3(T, cut_r, m_l, m_r);
        lx += plane;
        lz += plane;
    }
    relu_step(S, T, lx, lz);

    double acc = 0.0;
#pragma unroll
    for (int i = 0; i < HH; ++i) acc += (double)(fix ? T[i] - S[i] : T[i]);
    // Sum over the WW lanes of this tile (suffix scan inside the lane group): lane j = 0 ends with the total.
#pragma unroll
    for (int off = 1; off < WW; off <<= 1) {
        const double other = __shfl_down_sync(FULL_MASK, acc, off);
        if (j + off < WW) acc += other;
    }
    if (active && j == 0) out[item] = acc;
}
