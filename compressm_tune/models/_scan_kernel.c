/*
 * Diagonal complex linear recurrence  x_t = lam * x_{t-1} + v_t  on CPU.
 *
 * Why C: per token the recurrence is O(N) work, but an eager PyTorch scan spends its time
 * allocating and moving (B, L, N) temporaries. A sequential loop over time, vectorized over the
 * state index and parallel over the batch, runs at memory speed and leaves the B/C matmuls as
 * the training step's floor. Plain C with no torch headers: it builds in a second at install
 * time and torch passes raw float pointers (tensor.data_ptr()).
 *
 * Layout (float32, C-contiguous, complex numbers interleaved as re, im):
 *   lam (N, 2)   v (B, L, N, 2)   x (B, L, N, 2)   x0 (B, N, 2) or NULL
 * reverse=1 runs t = L-1 .. 0 (the backward pass is this scan with conj(lam)).
 *
 * The same module holds the fused selective (Mamba S6) scan, selective_fwd / selective_bwd,
 * below the LRU scan.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static void scan_batch(const float *lam, const float *v, float *x, const float *x0,
                       Py_ssize_t L, Py_ssize_t N, int reverse)
{
    const Py_ssize_t row = 2 * N;
    /* carry the state row-by-row so the inner loop over n is contiguous and vectorizes */
    const float *prev = x0;  /* NULL means zero initial state */
    for (Py_ssize_t s = 0; s < L; s++) {
        const Py_ssize_t t = reverse ? L - 1 - s : s;
        const float *vt = v + t * row;
        float *xt = x + t * row;
        if (prev == NULL) {
            for (Py_ssize_t k = 0; k < row; k++) xt[k] = vt[k];
        } else {
            for (Py_ssize_t n = 0; n < N; n++) {
                const float ar = lam[2 * n], ai = lam[2 * n + 1];
                const float pr = prev[2 * n], pi = prev[2 * n + 1];
                xt[2 * n] = ar * pr - ai * pi + vt[2 * n];
                xt[2 * n + 1] = ar * pi + ai * pr + vt[2 * n + 1];
            }
        }
        prev = xt;
    }
}

static PyObject *scan(PyObject *self, PyObject *args)
{
    unsigned long long lam_p, v_p, x_p, x0_p;
    Py_ssize_t B, L, N;
    int reverse, threads;
    if (!PyArg_ParseTuple(args, "KKKKnnnii", &lam_p, &v_p, &x_p, &x0_p, &B, &L, &N, &reverse,
                          &threads))
        return NULL;
    const float *lam = (const float *)(uintptr_t)lam_p;
    const float *v = (const float *)(uintptr_t)v_p;
    float *x = (float *)(uintptr_t)x_p;
    const float *x0 = (const float *)(uintptr_t)x0_p;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (Py_ssize_t b = 0; b < B; b++) {
        scan_batch(lam, v + b * L * 2 * N, x + b * L * 2 * N, x0 ? x0 + b * 2 * N : NULL, L, N,
                   reverse);
    }
    Py_END_ALLOW_THREADS
#ifndef _OPENMP
    (void)threads;
#endif
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ selective (S6) scan
 *
 * Per batch b, channel h and state index n (Mamba's S6, zero-order hold; D*u is added in torch):
 *   a_t = exp(delta_t[h] A[h,n]),  x_t = a_t x_{t-1} + delta_t[h] u_t[h] B_t[n],  x_{-1} = 0,
 *   y_t[h] = sum_n x_t[h,n] C_t[n].
 * Layout (float32, C-contiguous): delta, u, y, gy, gdelta, gu (B, L, H); A (H, N);
 * Bt, Ct, gB, gC (B, L, N). delta > 0 (after softplus) and A < 0, so 0 < a_t < 1.
 *
 * Why fused: the eager torch path materializes four (B, L, H, N) tensors (a, the drive, x and
 * the read-out product) and moves each through memory several times per step. Here the state of
 * one (b, h) is a row of N floats, and only (B, L, H) and (B, L, N) arrays touch memory.
 * The backward does not keep x from the forward: it recomputes the states and decays of one
 * (b, h) into a per-thread buffer of 2 * L * N floats, then runs the reverse recurrence
 *   r_t = dL/dx_t = gy_t[h] C_t[n] + a_{t+1} r_{t+1},
 * from which every gradient is a product summed over n or over h (see selective_bwd_batch).
 * Parallel over the batch: a thread owns b, so gB[b] and gC[b] (sums over h) need no locks;
 * gA (a sum over b) goes to a per-thread accumulator that the caller sums.
 */

/* The two per-sequence loops are compiled twice, for baseline x86-64 (SSE2) and for
 * x86-64-v3 (AVX2 + FMA, 8 floats a vector), and the loader picks the one the CPU runs
 * (GCC's target_clones, an ifunc: GCC >= 11 with glibc). The build does not use -march=native,
 * so the extension stays valid for any x86-64 machine; elsewhere the baseline build is used. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    defined(__GLIBC__)
#define CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CPU_CLONES
#endif

/* exp(x) in float32, written so that loops calling it vectorize (GCC will not vectorize
 * libm's expf without -ffast-math): Cephes' expf, i.e. x = k ln2 + r with |r| <= ln2/2, a
 * degree-6 polynomial for exp(r) and 2^k written into the exponent bits; at most 1.02 ulp from
 * the exact value over [-87, 0] (measured; expf: 0.5). Arguments below -87.3 (results below
 * FLT_MIN) give 0, above 88.3 are clamped. The selects compile to blends only under
 * -fno-trapping-math (setup.py), else the loops stay scalar. The `omp simd` pragmas let GCC
 * vectorize the float sums over n without -ffast-math (they need -fopenmp, as the threads do). */
static inline float exp_approx(float x)
{
    const float lo = -87.3f, hi = 88.3f;
    const float shift = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float xc = x < lo ? lo : (x > hi ? hi : x);
    union { float f; int32_t i; } k, scale;
    k.f = xc * 1.44269504088896341f + shift; /* k = round(x / ln2) sits in the low bits */
    const float kf = k.f - shift;
    float r = xc - kf * 0.693359375f; /* ln2 in two parts: the first product is exact */
    r = r - kf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    scale.i = (k.i - 0x4B400000 + 127) << 23; /* 2^k: 0x4B400000 is the bit pattern of shift */
    const float e = p * scale.f;
    return x < lo ? 0.0f : e;
}

/* Forward of one batch element; x is a scratch row of N floats. */
CPU_CLONES static void selective_fwd_batch(const float *restrict delta, const float *restrict A,
                                const float *restrict Bt, const float *restrict Ct,
                                const float *restrict u, float *restrict y, float *restrict x,
                                Py_ssize_t L, Py_ssize_t H, Py_ssize_t N)
{
    for (Py_ssize_t h = 0; h < H; h++) {
        const float *Ah = A + h * N;
        for (Py_ssize_t n = 0; n < N; n++) x[n] = 0.0f;
        for (Py_ssize_t t = 0; t < L; t++) {
            const float d = delta[t * H + h], du = d * u[t * H + h];
            const float *Bn = Bt + t * N, *Cn = Ct + t * N;
            float acc = 0.0f;
#ifdef _OPENMP
#pragma omp simd reduction(+ : acc)
#endif
            for (Py_ssize_t n = 0; n < N; n++) {
                const float xn = exp_approx(d * Ah[n]) * x[n] + du * Bn[n];
                x[n] = xn;
                acc += xn * Cn[n];
            }
            y[t * H + h] = acc;
        }
    }
}

/* The forward of channel h again, every step kept: xs and as get x_t and a_t, a row of N floats
 * per step (zero: a row of N zeros standing for x_{-1}). Shared by the backward and the
 * importance, which both walk these rows in reverse. */
static inline void channel_states(const float *restrict delta, const float *restrict Ah,
                                  const float *restrict Bt, const float *restrict u,
                                  float *restrict xs, float *restrict as, const float *zero,
                                  Py_ssize_t h, Py_ssize_t L, Py_ssize_t H, Py_ssize_t N)
{
    const float *prev = zero;
    for (Py_ssize_t t = 0; t < L; t++) {
        const float d = delta[t * H + h], du = d * u[t * H + h];
        const float *Bn = Bt + t * N;
        float *xt = xs + t * N, *at = as + t * N;
#ifdef _OPENMP
#pragma omp simd
#endif
        for (Py_ssize_t n = 0; n < N; n++) {
            const float a = exp_approx(d * Ah[n]);
            at[n] = a;
            xt[n] = a * prev[n] + du * Bn[n];
        }
        prev = xt;
    }
}

/* Backward of one batch element. work: 2 * L * N + 2 * N floats (states, decays, the carried
 * a_{t+1} r_{t+1}, a zero row standing for x_{-1}). gB, gC, gA accumulate (zeroed by the
 * caller); gdelta and gu are written. */
CPU_CLONES static void selective_bwd_batch(const float *restrict delta, const float *restrict A,
                                const float *restrict Bt, const float *restrict Ct,
                                const float *restrict u, const float *restrict gy,
                                float *restrict gdelta, float *restrict gA, float *restrict gB,
                                float *restrict gC, float *restrict gu, float *restrict work,
                                Py_ssize_t L, Py_ssize_t H, Py_ssize_t N)
{
    float *xs = work, *as = work + L * N, *carry = work + 2 * L * N, *zero = carry + N;
    for (Py_ssize_t n = 0; n < N; n++) zero[n] = 0.0f;
    for (Py_ssize_t h = 0; h < H; h++) {
        const float *Ah = A + h * N;
        float *gAh = gA + h * N;
        channel_states(delta, Ah, Bt, u, xs, as, zero, h, L, H, N);
        /* reverse: r_t = gy_t C_t + carry, carry = a_t r_t for the step before */
        for (Py_ssize_t n = 0; n < N; n++) carry[n] = 0.0f;
        for (Py_ssize_t t = L - 1; t >= 0; t--) {
            const float d = delta[t * H + h], ut = u[t * H + h], du = d * ut;
            const float g = gy[t * H + h];
            const float *xt = xs + t * N, *at = as + t * N, *xp = t ? xs + (t - 1) * N : zero;
            const float *Bn = Bt + t * N, *Cn = Ct + t * N;
            float *gBn = gB + t * N, *gCn = gC + t * N;
            float s_rb = 0.0f, s_qa = 0.0f; /* sum_n r B,  sum_n r x_{t-1} a A */
#ifdef _OPENMP
#pragma omp simd reduction(+ : s_rb, s_qa)
#endif
            for (Py_ssize_t n = 0; n < N; n++) {
                const float r = g * Cn[n] + carry[n];
                const float q = r * xp[n] * at[n]; /* r_t x_{t-1} a_t = dL/d(delta A) */
                gCn[n] += g * xt[n];
                gBn[n] += r * du;
                s_rb += r * Bn[n];
                s_qa += q * Ah[n];
                gAh[n] += q * d;
                carry[n] = at[n] * r;
            }
            gu[t * H + h] = d * s_rb;
            gdelta[t * H + h] = ut * s_rb + s_qa;
        }
    }
}

/* Data importance of every state of one batch element (compressm_tune.reduction._selective):
 * acc[n] += sum_{h,t} x_t[h,n]^2 q_t[h,n] with q_t = C_t[n]^2 + a_{t+1}^2 q_{t+1}, the diagonal
 * of the time-varying observability Gramian. work: 2 * L * N + 2 * N floats (states, decays,
 * the carried a_{t+1}^2 q_{t+1}, a zero row); acc accumulates in double (B * L * H terms). */
CPU_CLONES static void selective_importance_batch(const float *restrict delta,
                                const float *restrict A, const float *restrict Bt,
                                const float *restrict Ct, const float *restrict u,
                                double *restrict acc, float *restrict work,
                                Py_ssize_t L, Py_ssize_t H, Py_ssize_t N)
{
    float *xs = work, *as = work + L * N, *carry = work + 2 * L * N, *zero = carry + N;
    for (Py_ssize_t n = 0; n < N; n++) zero[n] = 0.0f;
    for (Py_ssize_t h = 0; h < H; h++) {
        const float *Ah = A + h * N;
        channel_states(delta, Ah, Bt, u, xs, as, zero, h, L, H, N);
        for (Py_ssize_t n = 0; n < N; n++) carry[n] = 0.0f;
        for (Py_ssize_t t = L - 1; t >= 0; t--) {
            const float *xt = xs + t * N, *at = as + t * N, *Cn = Ct + t * N;
            for (Py_ssize_t n = 0; n < N; n++) {
                const float q = Cn[n] * Cn[n] + carry[n];
                acc[n] += (double)(xt[n] * xt[n] * q);
                carry[n] = at[n] * at[n] * q;
            }
        }
    }
}

static int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static PyObject *selective_fwd(PyObject *self, PyObject *args)
{
    unsigned long long delta_p, A_p, B_p, C_p, u_p, y_p, work_p;
    Py_ssize_t B, L, H, N;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKnnnni", &delta_p, &A_p, &B_p, &C_p, &u_p, &y_p, &work_p,
                          &B, &L, &H, &N, &threads))
        return NULL;
    const float *delta = (const float *)(uintptr_t)delta_p, *A = (const float *)(uintptr_t)A_p;
    const float *Bt = (const float *)(uintptr_t)B_p, *Ct = (const float *)(uintptr_t)C_p;
    const float *u = (const float *)(uintptr_t)u_p;
    float *y = (float *)(uintptr_t)y_p, *work = (float *)(uintptr_t)work_p;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (Py_ssize_t b = 0; b < B; b++) {
        selective_fwd_batch(delta + b * L * H, A, Bt + b * L * N, Ct + b * L * N, u + b * L * H,
                            y + b * L * H, work + thread_id() * N, L, H, N);
    }
    Py_END_ALLOW_THREADS
#ifndef _OPENMP
    (void)threads;
#endif
    Py_RETURN_NONE;
}

static PyObject *selective_bwd(PyObject *self, PyObject *args)
{
    unsigned long long delta_p, A_p, B_p, C_p, u_p, gy_p, gd_p, gA_p, gB_p, gC_p, gu_p, work_p;
    Py_ssize_t B, L, H, N;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKKKnnnni", &delta_p, &A_p, &B_p, &C_p, &u_p, &gy_p,
                          &gd_p, &gA_p, &gB_p, &gC_p, &gu_p, &work_p, &B, &L, &H, &N, &threads))
        return NULL;
    const float *delta = (const float *)(uintptr_t)delta_p, *A = (const float *)(uintptr_t)A_p;
    const float *Bt = (const float *)(uintptr_t)B_p, *Ct = (const float *)(uintptr_t)C_p;
    const float *u = (const float *)(uintptr_t)u_p, *gy = (const float *)(uintptr_t)gy_p;
    float *gdelta = (float *)(uintptr_t)gd_p, *gA = (float *)(uintptr_t)gA_p;
    float *gB = (float *)(uintptr_t)gB_p, *gC = (float *)(uintptr_t)gC_p;
    float *gu = (float *)(uintptr_t)gu_p, *work = (float *)(uintptr_t)work_p;
    const Py_ssize_t work_row = 2 * L * N + 2 * N;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (Py_ssize_t b = 0; b < B; b++) {
        const int id = thread_id();
        selective_bwd_batch(delta + b * L * H, A, Bt + b * L * N, Ct + b * L * N, u + b * L * H,
                            gy + b * L * H, gdelta + b * L * H, gA + id * H * N,
                            gB + b * L * N, gC + b * L * N, gu + b * L * H, work + id * work_row,
                            L, H, N);
    }
    Py_END_ALLOW_THREADS
#ifndef _OPENMP
    (void)threads;
#endif
    Py_RETURN_NONE;
}

static PyObject *selective_importance(PyObject *self, PyObject *args)
{
    unsigned long long delta_p, A_p, B_p, C_p, u_p, acc_p, work_p;
    Py_ssize_t B, L, H, N;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKnnnni", &delta_p, &A_p, &B_p, &C_p, &u_p, &acc_p,
                          &work_p, &B, &L, &H, &N, &threads))
        return NULL;
    const float *delta = (const float *)(uintptr_t)delta_p, *A = (const float *)(uintptr_t)A_p;
    const float *Bt = (const float *)(uintptr_t)B_p, *Ct = (const float *)(uintptr_t)C_p;
    const float *u = (const float *)(uintptr_t)u_p;
    double *acc = (double *)(uintptr_t)acc_p;
    float *work = (float *)(uintptr_t)work_p;
    const Py_ssize_t work_row = 2 * L * N + 2 * N;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (Py_ssize_t b = 0; b < B; b++) {
        const int id = thread_id();
        selective_importance_batch(delta + b * L * H, A, Bt + b * L * N, Ct + b * L * N,
                                   u + b * L * H, acc + id * N, work + id * work_row, L, H, N);
    }
    Py_END_ALLOW_THREADS
#ifndef _OPENMP
    (void)threads;
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(lam_ptr, v_ptr, x_ptr, x0_ptr, B, L, N, reverse, threads): x_t = lam*x_{t-1} + v_t"},
    {"selective_fwd", selective_fwd, METH_VARARGS,
     "selective_fwd(delta, A, Bt, Ct, u, y, work, B, L, H, N, threads): the S6 scan's read-out"
     " y; work holds threads * N floats"},
    {"selective_bwd", selective_bwd, METH_VARARGS,
     "selective_bwd(delta, A, Bt, Ct, u, gy, gdelta, gA_parts, gB, gC, gu, work, B, L, H, N,"
     " threads): its gradients; gA_parts (threads * H * N), gB and gC zeroed by the caller,"
     " work threads * (2 * L * N + 2 * N) floats"},
    {"selective_importance", selective_importance, METH_VARARGS,
     "selective_importance(delta, A, Bt, Ct, u, acc_parts, work, B, L, H, N, threads): "
     "acc_parts (threads * N doubles, zeroed) += sum_{h,t} x^2 q per state; work threads * "
     "(2 * L * N + 2 * N) floats"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan_kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scan_kernel(void) { return PyModule_Create(&module); }
