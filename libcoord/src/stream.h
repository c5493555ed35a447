/*
 * stream.h — a bidirectional gRPC stream on the client's completion queue
 * (see stream.c for the life cycle and locking rules).
 */
#ifndef COORD_STREAM_H
#define COORD_STREAM_H

#include "internal.h"

typedef struct coord__stream coord__stream_t;

typedef struct coord__stream_ops {
  const char *what; /* name used in error details */
  /* each decoded message, on the event thread; msg freed after return */
  void (*on_message)(coord__stream_t *s, ProtobufCMessage *msg, void *arg);
  /* once, on the event thread, when the stream is over; s is freed after */
  void (*on_end)(coord__stream_t *s, int status, void *arg);
} coord__stream_ops_t;

coord__stream_t *coord__stream_open(coord_t *c, int ep, const char *path,
                                    const ProtobufCMessageDescriptor *resp, int hasleader,
                                    const coord__stream_ops_t *ops, void *arg);
/* Queues a message (thread-safe); COORD_EUNAVAILABLE once the stream broke. */
int coord__stream_send(coord__stream_t *s, const ProtobufCMessage *m);
void coord__stream_cancel(coord__stream_t *s);
int coord__stream_endpoint(coord__stream_t *s);

#endif
