/*
 * fuzz_endpoints.c — libFuzzer target for the endpoint list parser
 * (--endpoints, COORD_ENDPOINTS, coord_config_t.endpoints): rejected with
 * COORD_EINVAL, or every endpoint is "host:port" with a port 1..65535 and
 * no scheme, space or path left in it.
 */
#include "internal.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s = malloc(size + 1);
  if (!s)
    return 0;
  memcpy(s, data, size);
  s[size] = '\0';
  char **ep = NULL;
  size_t n = 0;
  int tls = 0;
  int rc = coord__parse_endpoints(s, &ep, &n, &tls);
  if (rc == 0) {
    assert(n > 0 && ep[n] == NULL);
    for (size_t i = 0; i < n; i++) {
      const char *colon = strrchr(ep[i], ':');
      assert(colon && colon != ep[i]);
      long port = strtol(colon + 1, NULL, 10);
      assert(port >= 1 && port <= 65535);
      assert(!strstr(ep[i], "://") && !strchr(ep[i], ' ') && !strchr(ep[i], '/'));
    }
    coord__endpoints_free(ep);
  } else {
    assert(rc == COORD_EINVAL && ep == NULL);
  }
  free(s);
  return 0;
}
