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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(lam_ptr, v_ptr, x_ptr, x0_ptr, B, L, N, reverse, threads): x_t = lam*x_{t-1} + v_t"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan_kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scan_kernel(void) { return PyModule_Create(&module); }
