/*
 * main.c - sieve's entry point: configuration, then the server, which loads
 * the model in the background and serves until SIGINT/SIGTERM.
 */
#include <stdio.h>

#include "config/config.h"
#include "server/server.h"

int main(int argc, char **argv)
{
    cfg_config cfg;
    cfg_defaults(&cfg);
    char err[1024];
    int rc = cfg_parse_args(&cfg, argc, argv, err, sizeof(err));
    if (rc == 1)
        return 0;
    if (rc != 0) {
        fprintf(stderr, "sieve: %s\n", err);
        return 2;
    }
    srv_server *srv = NULL;
    if (srv_create(&srv, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "sieve: %s\n", err);
        return 1;
    }
    rc = srv_run(srv);
    srv_destroy(srv);
    fprintf(stderr, "sieve: stopped\n");
    return rc;
}
