/*
 * kv.c — etcd's KV service: Range, Put, DeleteRange, Txn and Compact, in a
 * blocking form (the public coord_kv_*) and an asynchronous form for the
 * other subsystems (coord__*_async, callbacks on the event thread).
 *
 * Every request is built on the stack or in one heap tree owned by this
 * file, serialized by coord__unary_async before it returns, and freed
 * right after; answers are converted to the public structs (keys without
 * the namespace prefix) and owned by the receiver.  No state is kept here.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- checks */

static int check_key(const char *key, int allow_empty, const char *fn) {
  if (!key)
    return coord__err(COORD_EINVAL, "%s: key is NULL", fn);
  if (!*key && !allow_empty)
    return coord__err(COORD_EINVAL, "%s: key is empty", fn);
  return 0;
}

/* ---------------------------------------------------------------- results */

static int kvs_from_pb(coord_t *c, Mvccpb__KeyValue **pb, size_t n, coord_kv_result_t *r) {
  if (!n)
    return 0;
  r->kvs = calloc(n, sizeof *r->kvs);
  if (!r->kvs)
    return coord__err(COORD_ENOMEM, "out of memory");
  for (size_t i = 0; i < n; i++) {
    if (coord__kv_from_pb(c, pb[i], &r->kvs[i]))
      return coord__err(COORD_ENOMEM, "out of memory");
    r->n++;
  }
  return 0;
}

static int64_t header_rev(const Etcdserverpb__ResponseHeader *h) {
  return h ? h->revision : 0;
}

static int result_from_range(coord_t *c, const Etcdserverpb__RangeResponse *pb, coord_kv_result_t **out) {
  coord_kv_result_t *r = calloc(1, sizeof *r);
  if (!r)
    return coord__err(COORD_ENOMEM, "out of memory");
  r->revision = header_rev(pb->header);
  r->count = pb->count;
  r->more = pb->more;
  int rc = kvs_from_pb(c, pb->kvs, pb->n_kvs, r);
  if (rc) {
    coord_kv_result_free(r);
    return rc;
  }
  *out = r;
  return 0;
}

static int result_from_put(coord_t *c, const Etcdserverpb__PutResponse *pb, coord_kv_result_t **out) {
  coord_kv_result_t *r = calloc(1, sizeof *r);
  if (!r)
    return coord__err(COORD_ENOMEM, "out of memory");
  r->revision = header_rev(pb->header);
  Mvccpb__KeyValue *prev = pb->prev_kv;
  int rc = prev ? kvs_from_pb(c, &prev, 1, r) : 0;
  r->count = r->n;
  if (rc) {
    coord_kv_result_free(r);
    return rc;
  }
  *out = r;
  return 0;
}

static int result_from_delete(coord_t *c, const Etcdserverpb__DeleteRangeResponse *pb,
                              coord_kv_result_t **out) {
  coord_kv_result_t *r = calloc(1, sizeof *r);
  if (!r)
    return coord__err(COORD_ENOMEM, "out of memory");
  r->revision = header_rev(pb->header);
  r->count = pb->deleted;
  int rc = kvs_from_pb(c, pb->prev_kvs, pb->n_prev_kvs, r);
  if (rc) {
    coord_kv_result_free(r);
    return rc;
  }
  *out = r;
  return 0;
}

/* ---------------------------------------------------------------- requests */

/* Key and range end with the namespace; both freed by the caller. */
typedef struct keyrange {
  char *key, *end;
  size_t klen, elen;
} keyrange_t;

static void keyrange_free(keyrange_t *k) {
  free(k->key);
  free(k->end);
}

static int keyrange_make(coord_t *c, const char *key, int prefix, const char *range_end, keyrange_t *k) {
  memset(k, 0, sizeof *k);
  k->key = coord__key(c, key, &k->klen);
  if (!k->key)
    return coord__err(COORD_ENOMEM, "out of memory");
  if (prefix) {
    k->end = coord__prefix_end(k->key, k->klen, &k->elen);
  } else if (range_end) {
    k->end = coord__key(c, range_end, &k->elen);
  }
  if ((prefix || range_end) && !k->end) {
    keyrange_free(k);
    return coord__err(COORD_ENOMEM, "out of memory");
  }
  return 0;
}

static void fill_range(Etcdserverpb__RangeRequest *r, const keyrange_t *k, const coord_range_opts_t *o) {
  r->key.data = (uint8_t *)k->key;
  r->key.len = k->klen;
  if (k->end) {
    r->range_end.data = (uint8_t *)k->end;
    r->range_end.len = k->elen;
  }
  if (!o)
    return;
  r->limit = o->limit;
  r->revision = o->revision;
  r->sort_order = (Etcdserverpb__RangeRequest__SortOrder)o->sort_order;
  r->sort_target = (Etcdserverpb__RangeRequest__SortTarget)o->sort_target;
  r->serializable = o->serializable;
  r->keys_only = o->keys_only;
  r->count_only = o->count_only;
}

static int check_range_opts(const coord_range_opts_t *o, const char *fn) {
  if (!o)
    return 0;
  if (o->limit < 0 || o->revision < 0)
    return coord__err(COORD_EINVAL, "%s: limit and revision must not be negative", fn);
  if ((unsigned)o->sort_order > COORD_SORT_DESCEND || (unsigned)o->sort_target > COORD_SORT_VALUE)
    return coord__err(COORD_EINVAL, "%s: bad sort order or target", fn);
  return 0;
}

/* ---------------------------------------------------------------- async */

typedef struct kv_ctx {
  int kind; /* 0 range, 1 put, 2 delete */
  coord__kv_cb cb;
  void *arg;
} kv_ctx_t;

static void kv_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  kv_ctx_t *k = arg;
  coord_kv_result_t *r = NULL;
  if (!status) {
    if (k->kind == 0)
      status = result_from_range(c, (Etcdserverpb__RangeResponse *)resp, &r);
    else if (k->kind == 1)
      status = result_from_put(c, (Etcdserverpb__PutResponse *)resp, &r);
    else
      status = result_from_delete(c, (Etcdserverpb__DeleteRangeResponse *)resp, &r);
  }
  k->cb(c, status, r, k->arg);
  free(k);
}

static int start_kv(coord_t *c, int kind, const coord__method_t *m, const ProtobufCMessage *req,
                    int timeout_ms, coord__kv_cb cb, void *arg) {
  kv_ctx_t *k = malloc(sizeof *k);
  if (!k)
    return coord__err(COORD_ENOMEM, "out of memory");
  k->kind = kind;
  k->cb = cb;
  k->arg = arg;
  int rc = coord__unary_async(c, m, req, timeout_ms, kv_done, k);
  if (rc)
    free(k);
  return rc;
}

/* Request builders shared by the blocking and the asynchronous forms: each
 * checks its arguments, fills req (pointing into k, which the caller frees
 * with keyrange_free once the request is serialized) and returns 0 or the
 * error. */
static int range_build(coord_t *c, const char *key, const coord_range_opts_t *o, const char *fn,
                       Etcdserverpb__RangeRequest *req, keyrange_t *k) {
  int rc = check_key(key, o && (o->prefix || o->range_end), fn);
  if (rc || (rc = check_range_opts(o, fn)) ||
      (rc = keyrange_make(c, key, o && o->prefix, o ? o->range_end : NULL, k)))
    return rc;
  etcdserverpb__range_request__init(req);
  fill_range(req, k, o);
  return 0;
}

static int put_build(coord_t *c, const char *key, const void *value, size_t len, const coord_put_opts_t *o,
                     const char *fn, Etcdserverpb__PutRequest *req, keyrange_t *k) {
  int rc = check_key(key, 0, fn);
  if (rc)
    return rc;
  if (!value && len)
    return coord__err(COORD_EINVAL, "%s: value is NULL", fn);
  if ((rc = keyrange_make(c, key, 0, NULL, k)))
    return rc;
  etcdserverpb__put_request__init(req);
  req->key.data = (uint8_t *)k->key;
  req->key.len = k->klen;
  req->value.data = (uint8_t *)value; /* borrowed: serialized before return */
  req->value.len = len;
  if (o) {
    req->lease = o->lease;
    req->prev_kv = o->prev_kv;
  }
  return 0;
}

static int delete_build(coord_t *c, const char *key, const coord_range_opts_t *o, const char *fn,
                        Etcdserverpb__DeleteRangeRequest *req, keyrange_t *k) {
  int rc = check_key(key, o && (o->prefix || o->range_end), fn);
  if (rc || (rc = keyrange_make(c, key, o && o->prefix, o ? o->range_end : NULL, k)))
    return rc;
  etcdserverpb__delete_range_request__init(req);
  req->key.data = (uint8_t *)k->key;
  req->key.len = k->klen;
  if (k->end) {
    req->range_end.data = (uint8_t *)k->end;
    req->range_end.len = k->elen;
  }
  req->prev_kv = o ? o->prev_kv : 0;
  return 0;
}

int coord__get_async(coord_t *c, const char *key, const coord_range_opts_t *o, coord__kv_cb cb, void *arg) {
  Etcdserverpb__RangeRequest req;
  keyrange_t k;
  int rc = range_build(c, key, o, "get", &req, &k);
  if (rc)
    return rc;
  rc = start_kv(c, 0, &coord__m_range, &req.base, o ? o->timeout_ms : 0, cb, arg);
  keyrange_free(&k);
  return rc;
}

int coord__put_async(coord_t *c, const char *key, const void *value, size_t len, const coord_put_opts_t *o,
                     coord__kv_cb cb, void *arg) {
  Etcdserverpb__PutRequest req;
  keyrange_t k;
  int rc = put_build(c, key, value, len, o, "put", &req, &k);
  if (rc)
    return rc;
  rc = start_kv(c, 1, &coord__m_put, &req.base, o ? o->timeout_ms : 0, cb, arg);
  keyrange_free(&k);
  return rc;
}

int coord__delete_async(coord_t *c, const char *key, const coord_range_opts_t *o, coord__kv_cb cb,
                        void *arg) {
  Etcdserverpb__DeleteRangeRequest req;
  keyrange_t k;
  int rc = delete_build(c, key, o, "delete", &req, &k);
  if (rc)
    return rc;
  rc = start_kv(c, 2, &coord__m_delete, &req.base, o ? o->timeout_ms : 0, cb, arg);
  keyrange_free(&k);
  return rc;
}

/* ---------------------------------------------------------------- txn */

/* The txn request is one heap tree: every Compare, RequestOp and inner
 * request is calloc'd and every key buffer malloc'd; coord__txn_request_free
 * walks it back. */
static void op_free(Etcdserverpb__RequestOp *op) {
  if (!op)
    return;
  switch (op->request_case) {
  case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE:
    free(op->request_range->key.data);
    free(op->request_range->range_end.data);
    free(op->request_range);
    break;
  case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT:
    free(op->request_put->key.data);
    free(op->request_put);
    break;
  case ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE:
    free(op->request_delete_range->key.data);
    free(op->request_delete_range->range_end.data);
    free(op->request_delete_range);
    break;
  default:
    break;
  }
  free(op);
}

void coord__txn_request_free(Etcdserverpb__TxnRequest *r) {
  if (!r)
    return;
  for (size_t i = 0; i < r->n_compare; i++) {
    if (r->compare[i])
      free(r->compare[i]->key.data);
    free(r->compare[i]);
  }
  for (size_t i = 0; i < r->n_success; i++)
    op_free(r->success[i]);
  for (size_t i = 0; i < r->n_failure; i++)
    op_free(r->failure[i]);
  free(r->compare);
  free(r->success);
  free(r->failure);
  free(r);
}

static Etcdserverpb__RequestOp *op_build(coord_t *c, const coord_op_t *o) {
  if (!o->key || (!*o->key && !o->prefix)) {
    coord__err(COORD_EINVAL, "txn: op key is NULL or empty");
    return NULL;
  }
  Etcdserverpb__RequestOp *op = calloc(1, sizeof *op);
  if (!op)
    return NULL;
  etcdserverpb__request_op__init(op);
  keyrange_t k;
  if (keyrange_make(c, o->key, o->prefix && o->type != COORD_OP_PUT, NULL, &k)) {
    free(op);
    return NULL;
  }
  if (o->type == COORD_OP_RANGE) {
    Etcdserverpb__RangeRequest *r = calloc(1, sizeof *r);
    if (!r)
      goto fail;
    etcdserverpb__range_request__init(r);
    coord_range_opts_t ro = {0};
    ro.limit = o->limit;
    ro.sort_order = o->sort_order;
    ro.sort_target = o->sort_target;
    fill_range(r, &k, &ro);
    op->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE;
    op->request_range = r;
  } else if (o->type == COORD_OP_PUT) {
    Etcdserverpb__PutRequest *p = calloc(1, sizeof *p);
    if (!p)
      goto fail;
    etcdserverpb__put_request__init(p);
    p->key.data = (uint8_t *)k.key;
    p->key.len = k.klen;
    p->value.data = (uint8_t *)o->value; /* borrowed: packed before return */
    p->value.len = o->value_len;
    p->lease = o->lease;
    p->prev_kv = o->prev_kv;
    op->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
    op->request_put = p;
  } else if (o->type == COORD_OP_DELETE) {
    Etcdserverpb__DeleteRangeRequest *d = calloc(1, sizeof *d);
    if (!d)
      goto fail;
    etcdserverpb__delete_range_request__init(d);
    d->key.data = (uint8_t *)k.key;
    d->key.len = k.klen;
    if (k.end) {
      d->range_end.data = (uint8_t *)k.end;
      d->range_end.len = k.elen;
    }
    d->prev_kv = o->prev_kv;
    op->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE;
    op->request_delete_range = d;
  } else {
    coord__err(COORD_EINVAL, "txn: unknown op type %d", (int)o->type);
    goto fail;
  }
  if (o->type == COORD_OP_PUT)
    free(k.end);
  return op;
fail:
  keyrange_free(&k);
  free(op);
  return NULL;
}

static Etcdserverpb__Compare *cmp_build(coord_t *c, const coord_cmp_t *x) {
  if (!x->key || !*x->key) {
    coord__err(COORD_EINVAL, "txn: compare key is NULL or empty");
    return NULL;
  }
  if ((unsigned)x->target > COORD_CMP_LEASE || (unsigned)x->result > COORD_CMP_NOT_EQUAL) {
    coord__err(COORD_EINVAL, "txn: bad compare target or result");
    return NULL;
  }
  Etcdserverpb__Compare *m = calloc(1, sizeof *m);
  if (!m)
    return NULL;
  etcdserverpb__compare__init(m);
  size_t kl;
  m->key.data = (uint8_t *)coord__key(c, x->key, &kl);
  m->key.len = kl;
  if (!m->key.data) {
    free(m);
    return NULL;
  }
  m->result = (Etcdserverpb__Compare__CompareResult)x->result;
  m->target = (Etcdserverpb__Compare__CompareTarget)x->target;
  switch (x->target) {
  case COORD_CMP_VERSION:
    m->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_VERSION;
    m->version = x->number;
    break;
  case COORD_CMP_CREATE:
    m->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_CREATE_REVISION;
    m->create_revision = x->number;
    break;
  case COORD_CMP_MOD:
    m->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_MOD_REVISION;
    m->mod_revision = x->number;
    break;
  case COORD_CMP_VALUE:
    m->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_VALUE;
    m->value.data = (uint8_t *)x->value; /* borrowed */
    m->value.len = x->value_len;
    break;
  case COORD_CMP_LEASE:
    m->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_LEASE;
    m->lease = x->number;
    break;
  }
  return m;
}

Etcdserverpb__TxnRequest *coord__txn_build(coord_t *c, const coord_txn_t *t) {
  Etcdserverpb__TxnRequest *r = calloc(1, sizeof *r);
  if (!r)
    return NULL;
  etcdserverpb__txn_request__init(r);
  r->compare = calloc(t->ncmp + 1, sizeof *r->compare);
  r->success = calloc(t->nsuccess + 1, sizeof *r->success);
  r->failure = calloc(t->nfailure + 1, sizeof *r->failure);
  if (!r->compare || !r->success || !r->failure)
    goto fail;
  for (; r->n_compare < t->ncmp; r->n_compare++)
    if (!(r->compare[r->n_compare] = cmp_build(c, &t->cmp[r->n_compare])))
      goto fail;
  for (; r->n_success < t->nsuccess; r->n_success++)
    if (!(r->success[r->n_success] = op_build(c, &t->success[r->n_success])))
      goto fail;
  for (; r->n_failure < t->nfailure; r->n_failure++)
    if (!(r->failure[r->n_failure] = op_build(c, &t->failure[r->n_failure])))
      goto fail;
  return r;
fail:
  coord__txn_request_free(r);
  return NULL;
}

int coord__txn_result_from_pb(coord_t *c, const Etcdserverpb__TxnResponse *pb, coord_txn_result_t **out) {
  coord_txn_result_t *r = calloc(1, sizeof *r);
  if (!r)
    return coord__err(COORD_ENOMEM, "out of memory");
  r->revision = header_rev(pb->header);
  r->succeeded = pb->succeeded;
  r->responses = calloc(pb->n_responses + 1, sizeof *r->responses);
  if (!r->responses) {
    free(r);
    return coord__err(COORD_ENOMEM, "out of memory");
  }
  int rc = 0;
  for (size_t i = 0; i < pb->n_responses && !rc; i++) {
    const Etcdserverpb__ResponseOp *op = pb->responses[i];
    coord_kv_result_t *kr = NULL;
    switch (op->response_case) {
    case ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_RANGE:
      rc = result_from_range(c, op->response_range, &kr);
      break;
    case ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_PUT:
      rc = result_from_put(c, op->response_put, &kr);
      break;
    case ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_DELETE_RANGE:
      rc = result_from_delete(c, op->response_delete_range, &kr);
      break;
    default:
      kr = calloc(1, sizeof *kr);
      break;
    }
    if (!rc && !kr)
      rc = coord__err(COORD_ENOMEM, "out of memory");
    if (!rc)
      r->responses[r->n++] = kr;
  }
  if (rc) {
    coord_txn_result_free(r);
    return rc;
  }
  *out = r;
  return 0;
}

typedef struct txn_ctx {
  coord__txn_cb cb;
  void *arg;
} txn_ctx_t;

static void txn_done(coord_t *c, int status, ProtobufCMessage *resp, void *arg) {
  txn_ctx_t *t = arg;
  coord_txn_result_t *r = NULL;
  if (!status)
    status = coord__txn_result_from_pb(c, (Etcdserverpb__TxnResponse *)resp, &r);
  t->cb(c, status, r, t->arg);
  free(t);
}

static int check_txn(const coord_txn_t *t) {
  if (!t)
    return coord__err(COORD_EINVAL, "txn: NULL");
  if ((t->ncmp && !t->cmp) || (t->nsuccess && !t->success) || (t->nfailure && !t->failure))
    return coord__err(COORD_EINVAL, "txn: count given without array");
  return 0;
}

int coord__txn_async(coord_t *c, const coord_txn_t *t, coord__txn_cb cb, void *arg) {
  int rc = check_txn(t);
  if (rc)
    return rc;
  coord__err_clear();
  Etcdserverpb__TxnRequest *req = coord__txn_build(c, t);
  if (!req)
    return coord_last_error()[0] ? COORD_EINVAL : coord__err(COORD_ENOMEM, "out of memory");
  txn_ctx_t *x = malloc(sizeof *x);
  if (!x) {
    coord__txn_request_free(req);
    return coord__err(COORD_ENOMEM, "out of memory");
  }
  x->cb = cb;
  x->arg = arg;
  rc = coord__unary_async(c, &coord__m_txn, &req->base, t->timeout_ms, txn_done, x);
  if (rc)
    free(x);
  coord__txn_request_free(req);
  return rc;
}

/* ---------------------------------------------------------------- public */

int coord_kv_get(coord_t *c, const char *key, const coord_range_opts_t *o, coord_kv_result_t **out) {
  if (!c || !out)
    return coord__err(COORD_EINVAL, "coord_kv_get: NULL argument");
  *out = NULL;
  Etcdserverpb__RangeRequest req;
  keyrange_t k;
  int rc = range_build(c, key, o, "coord_kv_get", &req, &k);
  if (rc)
    return rc;
  ProtobufCMessage *resp = NULL;
  rc = coord__unary(c, &coord__m_range, &req.base, o ? o->timeout_ms : 0, &resp);
  keyrange_free(&k);
  if (rc)
    return rc;
  rc = result_from_range(c, (Etcdserverpb__RangeResponse *)resp, out);
  protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}

int coord_kv_put(coord_t *c, const char *key, const void *value, size_t len, const coord_put_opts_t *o,
                 coord_kv_result_t **out) {
  if (!c)
    return coord__err(COORD_EINVAL, "coord_kv_put: NULL client");
  if (out)
    *out = NULL;
  Etcdserverpb__PutRequest req;
  keyrange_t k;
  int rc = put_build(c, key, value, len, o, "coord_kv_put", &req, &k);
  if (rc)
    return rc;
  ProtobufCMessage *resp = NULL;
  rc = coord__unary(c, &coord__m_put, &req.base, o ? o->timeout_ms : 0, &resp);
  keyrange_free(&k);
  if (rc)
    return rc;
  if (out)
    rc = result_from_put(c, (Etcdserverpb__PutResponse *)resp, out);
  protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}

int coord_kv_delete(coord_t *c, const char *key, const coord_range_opts_t *o, coord_kv_result_t **out) {
  if (!c)
    return coord__err(COORD_EINVAL, "coord_kv_delete: NULL client");
  if (out)
    *out = NULL;
  Etcdserverpb__DeleteRangeRequest req;
  keyrange_t k;
  int rc = delete_build(c, key, o, "coord_kv_delete", &req, &k);
  if (rc)
    return rc;
  ProtobufCMessage *resp = NULL;
  rc = coord__unary(c, &coord__m_delete, &req.base, o ? o->timeout_ms : 0, &resp);
  keyrange_free(&k);
  if (rc)
    return rc;
  if (out)
    rc = result_from_delete(c, (Etcdserverpb__DeleteRangeResponse *)resp, out);
  protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}

int coord_kv_txn(coord_t *c, const coord_txn_t *t, coord_txn_result_t **out) {
  if (!c)
    return coord__err(COORD_EINVAL, "coord_kv_txn: NULL client");
  if (out)
    *out = NULL;
  int rc = check_txn(t);
  if (rc)
    return rc;
  coord__err_clear();
  Etcdserverpb__TxnRequest *req = coord__txn_build(c, t);
  if (!req)
    return coord_last_error()[0] ? COORD_EINVAL : coord__err(COORD_ENOMEM, "out of memory");
  ProtobufCMessage *resp = NULL;
  rc = coord__unary(c, &coord__m_txn, &req->base, t->timeout_ms, &resp);
  coord__txn_request_free(req);
  if (rc)
    return rc;
  coord_txn_result_t *r = NULL;
  rc = coord__txn_result_from_pb(c, (Etcdserverpb__TxnResponse *)resp, &r);
  protobuf_c_message_free_unpacked(resp, NULL);
  if (!rc && out)
    *out = r;
  else
    coord_txn_result_free(r);
  return rc;
}

int coord_kv_compact(coord_t *c, int64_t rev, int timeout_ms) {
  if (!c || rev <= 0)
    return coord__err(COORD_EINVAL, "coord_kv_compact: NULL client or revision <= 0");
  Etcdserverpb__CompactionRequest req = ETCDSERVERPB__COMPACTION_REQUEST__INIT;
  req.revision = rev;
  req.physical = 1;
  ProtobufCMessage *resp = NULL;
  int rc = coord__unary(c, &coord__m_compact, &req.base, timeout_ms, &resp);
  if (resp)
    protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}
