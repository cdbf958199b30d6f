/*
 * server.h - the HTTP front end: libmicrohttpd driven by the libuv loop on
 * the calling thread, routing of the OpenAI endpoints, and hand-off of
 * requests to the engine.
 */
#ifndef SIEVE_SERVER_H
#define SIEVE_SERVER_H

#include "config/config.h"
#include "runtime/model.h"
#include "scheduler/scheduler.h"

typedef struct srv_server srv_server;

/* Binds the listening socket. 0, or -1 with err. */
int srv_create(srv_server **out, const cfg_config *cfg, char *err, size_t errlen);

/* Runs the loop: loads the model in the background (GET /health answers 503
 * "loading" until it is ready, /live answers 200 throughout), serves until
 * SIGINT/SIGTERM, then stops accepting, lets the requests in flight finish
 * (up to drain_timeout_s) and returns 0; 1 when the model could not load. */
int srv_run(srv_server *s);

/* Stops the engine and frees the model and the server. Accepts NULL. */
void srv_destroy(srv_server *s);

/* The port actually bound (useful with port 0). */
int srv_port(const srv_server *s);

#endif
