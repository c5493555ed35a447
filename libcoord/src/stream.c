/*
 * stream.c — one bidirectional gRPC stream on the client's completion
 * queue: a send queue (gRPC allows one outstanding send), a receive loop
 * that decodes each message and hands it to its owner, and one end
 * notification.  lease.c (LeaseKeepAlive) and watch.c (Watch) are built on
 * it.
 *
 * Life cycle: coord__stream_open starts three batches (initial metadata
 * send, first receive, status).  Each batch holds a reference; when the last
 * one completes, ops->on_end(status) is called once on the event thread
 * and the stream is freed right after it returns.  The owner may call
 * coord__stream_send / coord__stream_cancel from any thread until its
 * on_end runs; it must serialise those calls with its own on_end (the
 * owner's mutex does this: on_end clears the owner's pointer under it).
 *
 * s->mu guards the send queue, `sending`, `refs` and the end flags; it is
 * never held while an owner callback runs.
 */
#include "stream.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

typedef struct qmsg {
  grpc_byte_buffer *bb;
  struct qmsg *next;
} qmsg_t;

struct coord__stream {
  coord_t *c;
  grpc_call *call;
  int ep;
  const ProtobufCMessageDescriptor *resp;
  const coord__stream_ops_t *ops;
  void *arg;
  pthread_mutex_t mu;
  qmsg_t *qhead, *qtail;
  int sending;
  int md_sent;
  int broken;
  int refs;
  coord__tag_t send_tag, recv_tag, status_tag;
  grpc_byte_buffer *send_bb, *recv_bb;
  grpc_metadata md[2];
  size_t nmd;
  grpc_metadata_array md_init, md_trail;
  grpc_status_code status;
  grpc_slice details;
};

#define FROM_TAG(t, field) ((coord__stream_t *)((char *)(t)-offsetof(coord__stream_t, field)))

static void stream_free(coord__stream_t *s) {
  while (s->qhead) {
    qmsg_t *q = s->qhead;
    s->qhead = q->next;
    grpc_byte_buffer_destroy(q->bb);
    free(q);
  }
  for (size_t i = 0; i < s->nmd; i++) {
    grpc_slice_unref(s->md[i].key);
    grpc_slice_unref(s->md[i].value);
  }
  grpc_metadata_array_destroy(&s->md_init);
  grpc_metadata_array_destroy(&s->md_trail);
  grpc_slice_unref(s->details);
  grpc_call_unref(s->call);
  pthread_mutex_destroy(&s->mu);
  free(s);
}

/* Called with s->mu held; releases it. */
static void unref_unlock(coord__stream_t *s) {
  assert(s->refs > 0);
  int last = --s->refs == 0;
  pthread_mutex_unlock(&s->mu);
  if (!last)
    return;
  int code = coord__status_err(s->status, s->details, s->ops->what);
  s->ops->on_end(s, code, s->arg);
  stream_free(s);
}

static void start_send_locked(coord__stream_t *s) {
  assert(!s->sending);
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  size_t n = 0;
  if (!s->md_sent) {
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].data.send_initial_metadata.count = s->nmd;
    ops[n].data.send_initial_metadata.metadata = s->nmd ? s->md : NULL;
    n++;
    s->md_sent = 1;
  }
  if (s->qhead) {
    qmsg_t *q = s->qhead;
    s->qhead = q->next;
    if (!s->qhead)
      s->qtail = NULL;
    s->send_bb = q->bb;
    free(q);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = s->send_bb;
    n++;
  }
  if (!n)
    return;
  s->sending = 1;
  s->refs++;
  if (grpc_call_start_batch(s->call, ops, n, &s->send_tag, NULL) != GRPC_CALL_OK) {
    /* only on misuse; treat the stream as broken */
    s->sending = 0;
    s->refs--;
    s->broken = 1;
    grpc_call_cancel(s->call, NULL);
  }
}

static void send_done(coord__tag_t *t, int ok) {
  coord__stream_t *s = FROM_TAG(t, send_tag);
  pthread_mutex_lock(&s->mu);
  if (s->send_bb)
    grpc_byte_buffer_destroy(s->send_bb);
  s->send_bb = NULL;
  s->sending = 0;
  if (!ok)
    s->broken = 1;
  if (!s->broken && s->qhead)
    start_send_locked(s);
  unref_unlock(s);
}

static void start_recv(coord__stream_t *s, int first) {
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  size_t n = 0;
  if (first) {
    ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[n].data.recv_initial_metadata.recv_initial_metadata = &s->md_init;
    n++;
  }
  ops[n].op = GRPC_OP_RECV_MESSAGE;
  ops[n].data.recv_message.recv_message = &s->recv_bb;
  n++;
  s->refs++;
  if (grpc_call_start_batch(s->call, ops, n, &s->recv_tag, NULL) != GRPC_CALL_OK) {
    s->refs--;
    s->broken = 1;
    grpc_call_cancel(s->call, NULL);
  }
}

static void recv_done(coord__tag_t *t, int ok) {
  coord__stream_t *s = FROM_TAG(t, recv_tag);
  ProtobufCMessage *msg = NULL;
  if (ok && s->recv_bb) {
    msg = coord__unpack(s->resp, s->recv_bb);
    grpc_byte_buffer_destroy(s->recv_bb);
    s->recv_bb = NULL;
    if (!msg)
      grpc_call_cancel_with_status(s->call, GRPC_STATUS_INTERNAL, "undecodable message", NULL);
  }
  if (msg) {
    s->ops->on_message(s, msg, s->arg);
    protobuf_c_message_free_unpacked(msg, NULL);
    pthread_mutex_lock(&s->mu);
    start_recv(s, 0);
  } else {
    pthread_mutex_lock(&s->mu);
    s->broken = 1;
  }
  unref_unlock(s);
}

static void status_done(coord__tag_t *t, int ok) {
  coord__stream_t *s = FROM_TAG(t, status_tag);
  COORD_UNUSED(ok);
  pthread_mutex_lock(&s->mu);
  s->broken = 1;
  unref_unlock(s);
}

coord__stream_t *coord__stream_open(coord_t *c, int ep, const char *path,
                                    const ProtobufCMessageDescriptor *resp, int hasleader,
                                    const coord__stream_ops_t *ops, void *arg) {
  coord__stream_t *s = calloc(1, sizeof *s);
  if (!s)
    return NULL;
  s->c = c;
  s->ep = ep;
  s->resp = resp;
  s->ops = ops;
  s->arg = arg;
  s->details = grpc_empty_slice();
  s->send_tag.fn = send_done;
  s->recv_tag.fn = recv_done;
  s->status_tag.fn = status_done;
  pthread_mutex_init(&s->mu, NULL);
  grpc_metadata_array_init(&s->md_init);
  grpc_metadata_array_init(&s->md_trail);
  s->call = coord__stream_call(c, ep, path);
  if (!s->call) {
    pthread_mutex_destroy(&s->mu);
    free(s);
    return NULL;
  }
  s->nmd = coord__call_metadata(c, s->md, hasleader);
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op.data.recv_status_on_client.trailing_metadata = &s->md_trail;
  op.data.recv_status_on_client.status = &s->status;
  op.data.recv_status_on_client.status_details = &s->details;
  pthread_mutex_lock(&s->mu);
  s->refs = 1; /* the status batch */
  grpc_call_error e = grpc_call_start_batch(s->call, &op, 1, &s->status_tag, NULL);
  assert(e == GRPC_CALL_OK);
  COORD_UNUSED(e);
  start_recv(s, 1);
  start_send_locked(s);
  pthread_mutex_unlock(&s->mu);
  return s;
}

int coord__stream_send(coord__stream_t *s, const ProtobufCMessage *m) {
  qmsg_t *q = malloc(sizeof *q);
  if (!q)
    return coord__err(COORD_ENOMEM, "out of memory");
  q->bb = coord__pack(m);
  q->next = NULL;
  pthread_mutex_lock(&s->mu);
  if (s->broken) {
    pthread_mutex_unlock(&s->mu);
    grpc_byte_buffer_destroy(q->bb);
    free(q);
    return coord__err(COORD_EUNAVAILABLE, "%s: stream is down", s->ops->what);
  }
  if (s->qtail)
    s->qtail->next = q;
  else
    s->qhead = q;
  s->qtail = q;
  if (!s->sending)
    start_send_locked(s);
  pthread_mutex_unlock(&s->mu);
  return 0;
}

void coord__stream_cancel(coord__stream_t *s) {
  pthread_mutex_lock(&s->mu);
  s->broken = 1;
  pthread_mutex_unlock(&s->mu);
  grpc_call_cancel(s->call, NULL);
}

int coord__stream_endpoint(coord__stream_t *s) {
  return s->ep;
}
