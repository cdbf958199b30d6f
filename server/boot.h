/*
 * boot.h - model loading and engine start-up for the server. Private to server/.
 */
#ifndef SIEVE_SERVER_BOOT_H
#define SIEVE_SERVER_BOOT_H

#include <stddef.h>

#include "config/config.h"
#include "runtime/model.h"
#include "scheduler/scheduler.h"

/* Loads cfg->model and starts the engine over it. 0, or -1 with err. Blocks
 * for as long as loading takes: call it off the loop thread. */
int srv_boot_model(const cfg_config *cfg, rt_model **model, sched_engine **engine, char *err,
                   size_t errlen);

#endif
