/*
 * backend.c - chooses the backend of the forward pass at start-up (backend.h).
 *
 * The rules, in order: device "cpu" is the CPU; otherwise GPUs are usable
 * when the build has CUDA, the driver reports a device, the allowed list is
 * not empty, and it names (or, for "auto", the machine has) as many present,
 * distinct devices as there are tensor-parallel ranks: one GPU per rank.
 * "auto" falls back to the CPU with the first rule that failed as its
 * reason; "cuda" turns that reason into an error. Nothing here touches a device beyond counting and
 * querying it.
 */
#include "runtime/backend.h"

#include <stdio.h>
#include <string.h>

#ifdef SIEVE_HAVE_CUDA
#include "kernels/cuda.h"
#endif

const char *rt_backend_name(rt_backend b)
{
    return b == RT_BACKEND_CUDA ? "cuda" : "cpu";
}

bool rt_backend_cuda_built(void)
{
#ifdef SIEVE_HAVE_CUDA
    return true;
#else
    return false;
#endif
}

int rt_backend_cuda_device_count(void)
{
#ifdef SIEVE_HAVE_CUDA
    return kern_cuda_device_count();
#else
    return 0;
#endif
}

/* The CUDA devices req allows, one per rank, into devs: their count, or -1
 * with the reason there are not enough. */
static int pick_devices(const rt_device_request *req, int *devs, char *why, size_t whylen)
{
    if (!rt_backend_cuda_built()) {
        snprintf(why, whylen, "built without CUDA");
        return -1;
    }
    if (req->n_devices == 0) {
        snprintf(why, whylen, "the devices list is empty");
        return -1;
    }
    const int present = rt_backend_cuda_device_count();
    if (present == 0) {
        snprintf(why, whylen, "no CUDA device is present, or no driver");
        return -1;
    }
    const int need = req->tp > 1 ? req->tp : 1;
    if (need > RT_BACKEND_MAX_DEVICES) {
        snprintf(why, whylen, "tensor_parallel_size %d: at most %d GPUs", need,
                 RT_BACKEND_MAX_DEVICES);
        return -1;
    }
    int n = 0;
    if (req->n_devices < 0) {
        for (; n < need && n < present; n++)
            devs[n] = n;
    } else {
        for (int i = 0; i < req->n_devices && n < need; i++) {
            const int d = req->devices[i];
            bool dup = false;
            for (int j = 0; j < n; j++)
                dup |= devs[j] == d;
            if (d >= 0 && d < present && !dup)
                devs[n++] = d;
        }
    }
    if (n == need)
        return n;
    if (need == 1) {
        snprintf(why, whylen, "device %d is not present (%d CUDA device%s: 0..%d)", req->devices[0],
                 present, present == 1 ? "" : "s", present - 1);
        return -1;
    }
    snprintf(why, whylen,
             "tensor_parallel_size %d needs %d GPUs (one per rank), %d usable (%d CUDA device%s "
             "present%s)",
             need, need, n, present, present == 1 ? "" : "s",
             req->n_devices < 0 ? "" : " and listed in devices");
    return -1;
}

int rt_backend_select(const rt_device_request *req, rt_backend_choice *out, char *err,
                      size_t errlen)
{
    memset(out, 0, sizeof(*out));
    out->backend = RT_BACKEND_CPU;
    out->device = -1;
    if (req->pref == RT_DEVICE_CPU) {
        snprintf(out->why, sizeof(out->why), "cpu (device \"cpu\" in the configuration)");
        return 0;
    }
    char why[200];
    int devs[RT_BACKEND_MAX_DEVICES];
    const int n = pick_devices(req, devs, why, sizeof(why));
    if (n < 0) {
        if (req->pref == RT_DEVICE_CUDA) {
            snprintf(err, errlen, "device \"cuda\" was requested but no GPU can be used: %s", why);
            return -1;
        }
        snprintf(out->why, sizeof(out->why), "cpu (%s)", why);
        return 0;
    }
#ifdef SIEVE_HAVE_CUDA
    kern_cuda_device_info info;
    char inner[192];
    for (int i = n - 1; i >= 0; i--) /* info ends up rank 0's */
        if (kern_cuda_device_query(devs[i], &info, inner, sizeof(inner)) != 0) {
            if (req->pref == RT_DEVICE_CUDA) {
                snprintf(err, errlen, "device \"cuda\": CUDA device %d cannot be queried: %s",
                         devs[i], inner);
                return -1;
            }
            snprintf(out->why, sizeof(out->why), "cpu (CUDA device %d cannot be queried: %.120s)",
                     devs[i], inner);
            return 0;
        }
    out->backend = RT_BACKEND_CUDA;
    out->device = devs[0];
    out->n_devices = n;
    memcpy(out->devices, devs, sizeof(int) * (size_t)n);
    snprintf(out->device_name, sizeof(out->device_name), "%s", info.name);
    out->device_mem = info.total_mem;
    char where[64] = "";
    if (n > 1) {
        size_t len = (size_t)snprintf(where, sizeof(where), "tp %d on devices ", n);
        for (int i = 0; i < n && len < sizeof(where); i++)
            len +=
                (size_t)snprintf(where + len, sizeof(where) - len, "%s%d", i ? "," : "", devs[i]);
    } else {
        snprintf(where, sizeof(where), "device %d", devs[0]);
    }
    snprintf(out->why, sizeof(out->why), "cuda (%s: %.100s, %.1f GiB, sm_%d%d; device \"%s\")",
             where, info.name, (double)info.total_mem / 1073741824.0, info.cc_major, info.cc_minor,
             req->pref == RT_DEVICE_CUDA ? "cuda" : "auto");
    return 0;
#else
    snprintf(err, errlen, "internal: a CUDA device was picked in a build without CUDA");
    return -1;
#endif
}
