/*
 * backend.c - chooses the backend of the forward pass at start-up (backend.h).
 *
 * The rules, in order: device "cpu" is the CPU; otherwise a GPU is usable
 * when the build has CUDA, the driver reports a device, the allowed list is
 * not empty and names a present device, and the tensor-parallel size is 1
 * (the CUDA backend drives one GPU). "auto" falls back to the CPU with the
 * first rule that failed as its reason; "cuda" turns that reason into an
 * error. Nothing here touches a device beyond counting and querying it.
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

/* The CUDA device req allows, or -1 with the reason there is none. */
static int pick_device(const rt_device_request *req, char *why, size_t whylen)
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
    if (req->tp > 1) {
        snprintf(why, whylen,
                 "tensor_parallel_size %d: the CUDA backend runs one GPU, tensor parallelism "
                 "runs on the CPU",
                 req->tp);
        return -1;
    }
    if (req->n_devices < 0)
        return 0;
    for (int i = 0; i < req->n_devices; i++)
        if (req->devices[i] >= 0 && req->devices[i] < present)
            return req->devices[i];
    snprintf(why, whylen, "device %d is not present (%d CUDA device%s: 0..%d)", req->devices[0],
             present, present == 1 ? "" : "s", present - 1);
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
    const int dev = pick_device(req, why, sizeof(why));
    if (dev < 0) {
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
    if (kern_cuda_device_query(dev, &info, inner, sizeof(inner)) != 0) {
        if (req->pref == RT_DEVICE_CUDA) {
            snprintf(err, errlen, "device \"cuda\": CUDA device %d cannot be queried: %s", dev,
                     inner);
            return -1;
        }
        snprintf(out->why, sizeof(out->why), "cpu (CUDA device %d cannot be queried: %.120s)", dev,
                 inner);
        return 0;
    }
    out->backend = RT_BACKEND_CUDA;
    out->device = dev;
    snprintf(out->device_name, sizeof(out->device_name), "%s", info.name);
    out->device_mem = info.total_mem;
    snprintf(out->why, sizeof(out->why),
             "cuda (device %d: %.100s, %.1f GiB, sm_%d%d; device \"%s\")", dev, info.name,
             (double)info.total_mem / 1073741824.0, info.cc_major, info.cc_minor,
             req->pref == RT_DEVICE_CUDA ? "cuda" : "auto");
    return 0;
#else
    snprintf(err, errlen, "internal: a CUDA device was picked in a build without CUDA");
    return -1;
#endif
}
