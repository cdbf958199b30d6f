/*
 * backend.h - where the forward pass runs: the CPU backend (kernels/cpu,
 * OpenBLAS, tensor-parallel rank threads) or the CUDA backend (kernels/cuda,
 * cuBLAS, one GPU per tensor-parallel rank, each driven by one host thread
 * of the model), and how a process chooses between them at start-up.
 *
 * The choice is made once, before the model loads: rt_backend_select turns
 * the operator's request (device "auto" | "cpu" | "cuda", the allowed GPU
 * indices, the tensor-parallel size) into a backend and its devices, with
 * one line that says what was chosen and why. The model is then loaded with
 * rt_model_opts.backend / .device / .devices set from it (runtime/model.h).
 *
 * A build without CUDA (SIEVE_HAVE_CUDA undefined) links and selects the CPU
 * with the reason "built without CUDA"; asking for "cuda" is then an error.
 */
#ifndef SIEVE_RUNTIME_BACKEND_H
#define SIEVE_RUNTIME_BACKEND_H

#include <stdbool.h>
#include <stddef.h>

typedef enum { RT_BACKEND_CPU = 0, RT_BACKEND_CUDA = 1 } rt_backend;

/* What the configuration asks for (config key 'device'). */
typedef enum { RT_DEVICE_AUTO = 0, RT_DEVICE_CPU, RT_DEVICE_CUDA } rt_device_pref;

typedef struct {
    rt_device_pref pref;
    /* GPU indices the process may use; n_devices < 0: any (the first ones
     * present), 0: none (the CPU). */
    const int *devices;
    int n_devices;
    int tp; /* tensor-parallel ranks; <= 1: none */
} rt_device_request;

/* GPUs one choice can hold (the most tensor-parallel ranks). */
#define RT_BACKEND_MAX_DEVICES 8

typedef struct {
    rt_backend backend;
    int device;                          /* the CUDA device index (rank 0's), or -1 on the CPU */
    int devices[RT_BACKEND_MAX_DEVICES]; /* CUDA: the device of each tensor-parallel rank */
    int n_devices;                       /* CUDA: max(tp, 1); 0 on the CPU */
    char device_name[128];               /* the GPU's name, or "" */
    size_t device_mem;                   /* its memory in bytes, or 0 */
    char why[256];                       /* one line: the choice and its reason */
} rt_backend_choice;

/* "cpu" or "cuda". */
const char *rt_backend_name(rt_backend b);

/* Whether this build has the CUDA backend. */
bool rt_backend_cuda_built(void);

/* CUDA devices usable now (0 without CUDA, a driver or a device). */
int rt_backend_cuda_device_count(void);

/* Chooses the backend for req. 0 with *out filled (out->why says what and
 * why, e.g. "cpu (no CUDA device present)"), or -1 with err when the request
 * cannot be met: device "cuda" without a usable GPU, a listed index that is
 * not present, or a tensor-parallel size larger than the usable GPUs (each
 * rank needs one: the first tp listed and present, or the first tp present
 * for "any"). */
int rt_backend_select(const rt_device_request *req, rt_backend_choice *out, char *err,
                      size_t errlen);

#endif
