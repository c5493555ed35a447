/*
 * coord-xds.c — the standalone discovery endpoint: an xDS (ADS v3) server
 * fed by coord's registry, for gRPC clients in any language.
 *
 *   coord-xds [--listen HOST:PORT] [--endpoints E] [--prefix P]
 *             [--bootstrap-file PATH] [-v]
 *   coord-xds --print-bootstrap [--listen HOST:PORT]
 *
 * A gRPC client (C++, Go, Java, Python, ...) that is given the bootstrap
 * (file named by GRPC_XDS_BOOTSTRAP, or the text itself in
 * GRPC_XDS_BOOTSTRAP_CONFIG) and a channel to xds:///<service> gets the
 * registered instances of <service>, round robin, and every change as it
 * happens.  xds:///pick_first/<service> gives pick_first (gRPC 1.51 also
 * needs GRPC_EXPERIMENTAL_XDS_CUSTOM_LB_CONFIG=true in the client).
 *
 * --listen defaults to 127.0.0.1:18000 (port 0: a free one).  Etcd
 * endpoints: --endpoints, else $COORD_ENDPOINTS, else localhost:2379.
 * Once serving it prints "LISTENING <port>" on stdout and, with
 * --bootstrap-file, writes the bootstrap for the port actually bound.
 * --print-bootstrap prints the bootstrap for --listen and exits.  It runs
 * until SIGTERM or SIGINT.  -v logs every response (COORD_XDS_VERBOSE).
 *
 * Threads: main waits for a signal; the server has its own threads.
 */
#include <coord.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(void) {
  fprintf(stderr,
          "usage: coord-xds [--listen HOST:PORT] [--endpoints E] [--prefix P] [--bootstrap-file PATH] [-v]\n"
          "       coord-xds --print-bootstrap [--listen HOST:PORT]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *listen = "127.0.0.1:18000", *endpoints = NULL, *prefix = NULL, *bootfile = NULL;
  int print_only = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--print-bootstrap"))
      print_only = 1;
    else if (!strcmp(argv[i], "-v"))
      setenv("COORD_XDS_VERBOSE", "1", 1);
    else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help"))
      usage();
    else if (i + 1 >= argc)
      usage();
    else if (!strcmp(argv[i], "--listen"))
      listen = argv[++i];
    else if (!strcmp(argv[i], "--endpoints"))
      endpoints = argv[++i];
    else if (!strcmp(argv[i], "--prefix"))
      prefix = argv[++i];
    else if (!strcmp(argv[i], "--bootstrap-file"))
      bootfile = argv[++i];
    else
      usage();
  }
  if (print_only) {
    char *b = coord_xds_bootstrap_json(listen);
    if (!b)
      return 1;
    printf("%s\n", b);
    free(b);
    return 0;
  }

  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* every thread inherits the mask */

  coord_config_t cfg = coord_default_config();
  cfg.endpoints = endpoints;
  if (prefix)
    cfg.prefix = prefix;
  coord_t *c = NULL;
  int rc = coord_new(&cfg, &c);
  if (rc < 0) {
    fprintf(stderr, "coord-xds: %s: %s\n", coord_strerror(rc), coord_last_error());
    return 1;
  }
  coord_xds_server_t *srv = NULL;
  rc = coord_xds_server_start(c, listen, &srv);
  if (rc < 0) {
    fprintf(stderr, "coord-xds: %s: %s\n", coord_strerror(rc), coord_last_error());
    coord_close(c);
    return 1;
  }
  int port = coord_xds_server_port(srv);
  if (bootfile) {
    char uri[300];
    const char *colon = strrchr(listen, ':');
    int hl = colon ? (int)(colon - listen) : (int)strlen(listen);
    snprintf(uri, sizeof uri, "%.*s:%d", hl, listen, port);
    char *b = coord_xds_bootstrap_json(uri);
    FILE *f = b ? fopen(bootfile, "w") : NULL;
    if (!f || fprintf(f, "%s\n", b) < 0 || fclose(f) != 0) {
      fprintf(stderr, "coord-xds: cannot write %s\n", bootfile);
      free(b);
      coord_xds_server_stop(srv);
      coord_close(c);
      return 1;
    }
    free(b);
  }
  printf("LISTENING %d\n", port);
  fflush(stdout);
  int sig = 0;
  sigwait(&sigs, &sig);
  coord_xds_server_stop(srv);
  coord_close(c);
  return 0;
}
