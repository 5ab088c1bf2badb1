/* confedge.proxy._h2native: an HTTP/2 server session on libnghttp2, for proxy/h2engine.py.
 *
 * Why: hyper-h2 (pure Python) costs about 60 us of CPU per request on this project's benchmark
 * machine before any of the proxy's own work (bench/proxy/h2floor.py), four to five times what
 * nginx spends on a whole HTTP/2 request. libnghttp2 is the HTTP/2 library curl, Apache httpd and
 * h2load use (Debian's libnghttp2-14); this file only adapts its callback API to the shape the
 * adapter wants: bytes in, a list of event tuples out, bytes to send pulled out in one piece.
 *
 * Events (tuples, kinds are module constants):
 *   (REQUEST, sid, headers, ended)   a request head: headers a list of (name, value) bytes, as
 *                                    received (pseudo-headers first); ended: END_STREAM was on it
 *   (DATA, sid, data, flow)          request body bytes; flow: bytes to give back with consume()
 *   (END, sid, None, None)           the client ended its side of the stream (DATA or trailers)
 *   (RESET, sid, remote, code)       the stream was reset (remote: by the client's RST_STREAM)
 *   (CLOSED, 0, last_sid, code)      the client sent GOAWAY
 *   (WINDOW, 0, None, None)          the client opened flow-control windows or changed settings
 *
 * Flow control (RFC 9113 section 5.2): the receive side is manual
 * (nghttp2_option_set_no_auto_window_update): a request body's window is returned by consume()
 * only once the proxy has passed the bytes on, so a fast uploader cannot outrun a slow node. The
 * send side is nghttp2's: response bytes are queued per stream (send()) and a data provider hands
 * them to the library as the stream's and the connection's windows allow; buffered() says how
 * much still waits (the adapter pauses the node above a limit).
 *
 * Limits: SETTINGS_MAX_CONCURRENT_STREAMS and ENABLE_PUSH = 0 are sent and enforced by the
 * library; SETTINGS_MAX_HEADER_LIST_SIZE is sent and enforced here (RFC 9113 section 6.5.2:
 * name + value + 32 per field), as a connection error like hyper-h2's, so a header block can
 * never grow without bound. libnghttp2 (1.52 with Debian's CVE-2024-28182 fix) bounds
 * CONTINUATION frames per block.
 *
 * Threading: every entry point runs with the GIL held; the library's callbacks run inside
 * nghttp2_session_mem_recv/mem_send called from here, so they may touch Python objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <nghttp2/nghttp2.h>
#include <string.h>

enum { EV_REQUEST = 0, EV_DATA = 1, EV_END = 2, EV_RESET = 3, EV_CLOSED = 4, EV_WINDOW = 5 };

static PyObject *H2Error;        /* a connection error: GOAWAY queued, close after output() */
static PyObject *StreamClosed;   /* (subclass) the stream is gone: nothing more can be sent */

/* One request stream (nghttp2 stream user data), freed in on_stream_close; the session keeps
 * the open ones in a list so that its deallocation frees them (the library does not call
 * on_stream_close from nghttp2_session_del). */
typedef struct stream {
    struct stream *prev, *next;
    int32_t sid;
    PyObject *headers;  /* list of (name, value) while the head is being received */
    size_t header_size; /* RFC 9113 section 6.5.2 accounting of the block so far */
    PyObject *chunks;   /* list of bytes waiting to be sent (response body) */
    Py_ssize_t offset;  /* bytes of chunks[0] already handed to the library */
    size_t buffered;    /* bytes in chunks not yet handed to the library */
    int eof;            /* the response ends after what is buffered */
    int providing;      /* a data provider is attached (the head went out without END_STREAM) */
    int remote_reset;   /* the client's RST_STREAM was seen (no second RESET event) */
    int reset_after;    /* RST_STREAM NO_ERROR once the response's END_STREAM has gone out */
    int ended;          /* the response's END_STREAM has gone out */
} stream_t;

typedef struct {
    PyObject_HEAD
    nghttp2_session *session;
    stream_t *streams;       /* open streams (their stream user data) */
    PyObject *events;        /* list being filled by receive(), else NULL */
    size_t max_header_list;  /* SETTINGS_MAX_HEADER_LIST_SIZE */
    uint32_t max_streams;    /* SETTINGS_MAX_CONCURRENT_STREAMS */
    const char *fatal;       /* why the connection is being closed (set by a callback) */
    int window_event;        /* one WINDOW event per receive() at most */
    size_t buffered;         /* response bytes queued on every stream, not yet handed over */
    int pyerr;               /* a Python error happened inside a callback */
} Session;

/* -- helpers ------------------------------------------------------------------------------- */

static int emit(Session *self, int kind, int32_t sid, PyObject *a, PyObject *b)
{
    /* steals references to a and b (either may be NULL for None) */
    if ((a == NULL || b == NULL) && PyErr_Occurred()) { /* making an argument failed */
        Py_XDECREF(a);
        Py_XDECREF(b);
        self->pyerr = 1;
        return -1;
    }
    if (self->events == NULL) { /* (outside receive(): e.g. a close while sending) */
        Py_XDECREF(a);
        Py_XDECREF(b);
        return 0;
    }
    if (a == NULL) {
        a = Py_None;
        Py_INCREF(a);
    }
    if (b == NULL) {
        b = Py_None;
        Py_INCREF(b);
    }
    PyObject *t = Py_BuildValue("(iiNN)", kind, (int)sid, a, b);
    if (t == NULL) {
        self->pyerr = 1;
        return -1;
    }
    int rc = PyList_Append(self->events, t);
    Py_DECREF(t);
    if (rc != 0) {
        self->pyerr = 1;
        return -1;
    }
    return 0;
}

static void stream_unlink(Session *self, stream_t *st)
{
    if (st->prev != NULL)
        st->prev->next = st->next;
    else
        self->streams = st->next;
    if (st->next != NULL)
        st->next->prev = st->prev;
    st->prev = st->next = NULL;
}

static void stream_free(stream_t *st)
{
    Py_XDECREF(st->headers);
    Py_XDECREF(st->chunks);
    PyMem_Free(st);
}

static stream_t *stream_of(Session *self, int32_t sid)
{
    return (stream_t *)nghttp2_session_get_stream_user_data(self->session, sid);
}

/* -- nghttp2 callbacks ---------------------------------------------------------------------- */

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *ud)
{
    Session *self = (Session *)ud;
    if (frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    if (frame->headers.cat != NGHTTP2_HCAT_REQUEST) {
        /* trailers: the stream exists; their fields are dropped, but counted (on_header) */
        stream_t *st = stream_of(self, frame->hd.stream_id);
        if (st != NULL)
            st->header_size = 0;
        return 0;
    }
    stream_t *st = PyMem_Calloc(1, sizeof *st);
    if (st == NULL) {
        self->pyerr = 1;
        PyErr_NoMemory();
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    st->sid = frame->hd.stream_id;
    st->headers = PyList_New(0);
    st->chunks = PyList_New(0);
    if (st->headers == NULL || st->chunks == NULL) {
        stream_free(st);
        self->pyerr = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    if (nghttp2_session_set_stream_user_data(session, st->sid, st) != 0) {
        stream_free(st);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    st->next = self->streams;
    if (st->next != NULL)
        st->next->prev = st;
    self->streams = st;
    return 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *ud)
{
    (void)flags;
    Session *self = (Session *)ud;
    if (frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    stream_t *st = stream_of(self, frame->hd.stream_id);
    if (st == NULL)
        return 0;
    st->header_size += namelen + valuelen + 32;
    if (st->header_size > self->max_header_list) {
        /* As hyper-h2 does with an oversized block: a connection error (GOAWAY), nothing of
         * the request reaches a node. */
        self->fatal = "header list larger than SETTINGS_MAX_HEADER_LIST_SIZE";
        nghttp2_session_terminate_session(session, NGHTTP2_PROTOCOL_ERROR);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    if (frame->headers.cat != NGHTTP2_HCAT_REQUEST || st->headers == NULL)
        return 0; /* trailers: bounded above, not passed on */
    PyObject *t = Py_BuildValue("(y#y#)", (const char *)name, (Py_ssize_t)namelen,
                                (const char *)value, (Py_ssize_t)valuelen);
    if (t == NULL || PyList_Append(st->headers, t) != 0) {
        Py_XDECREF(t);
        self->pyerr = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    Py_DECREF(t);
    return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *ud)
{
    (void)session;
    Session *self = (Session *)ud;
    int32_t sid = frame->hd.stream_id;
    int ended = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    switch (frame->hd.type) {
    case NGHTTP2_HEADERS: {
        stream_t *st = stream_of(self, sid);
        if (st == NULL)
            return 0;
        if (frame->headers.cat == NGHTTP2_HCAT_REQUEST && st->headers != NULL) {
            PyObject *headers = st->headers; /* handed over: the head is complete */
            st->headers = NULL;
            if (emit(self, EV_REQUEST, sid, headers, PyBool_FromLong(ended)) != 0)
                return NGHTTP2_ERR_CALLBACK_FAILURE;
        } else if (ended) {
            if (emit(self, EV_END, sid, NULL, NULL) != 0)
                return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
        return 0;
    }
    case NGHTTP2_DATA:
        if (ended && stream_of(self, sid) != NULL && emit(self, EV_END, sid, NULL, NULL) != 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        return 0;
    case NGHTTP2_RST_STREAM: {
        stream_t *st = stream_of(self, sid);
        if (st != NULL)
            st->remote_reset = 1;
        if (emit(self, EV_RESET, sid, Py_NewRef(Py_True),
                 PyLong_FromUnsignedLong(frame->rst_stream.error_code)) != 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        return 0;
    }
    case NGHTTP2_GOAWAY:
        if (emit(self, EV_CLOSED, 0, PyLong_FromLong(frame->goaway.last_stream_id),
                 PyLong_FromUnsignedLong(frame->goaway.error_code)) != 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        return 0;
    case NGHTTP2_WINDOW_UPDATE:
    case NGHTTP2_SETTINGS:
        if (!self->window_event) {
            self->window_event = 1;
            if (emit(self, EV_WINDOW, 0, NULL, NULL) != 0)
                return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
        return 0;
    default:
        return 0;
    }
}

static int on_data_chunk_recv(nghttp2_session *session, uint8_t flags, int32_t sid,
                              const uint8_t *data, size_t len, void *ud)
{
    (void)flags;
    Session *self = (Session *)ud;
    if (stream_of(self, sid) == NULL) {
        /* a stream the adapter no longer has: give the window back at once */
        nghttp2_session_consume(session, sid, len);
        return 0;
    }
    if (emit(self, EV_DATA, sid, PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len),
             PyLong_FromSize_t(len)) != 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t sid, uint32_t code, void *ud)
{
    Session *self = (Session *)ud;
    stream_t *st = stream_of(self, sid);
    if (st == NULL)
        return 0;
    nghttp2_session_set_stream_user_data(session, sid, NULL);
    stream_unlink(self, st);
    self->buffered -= st->buffered;
    if (code != NGHTTP2_NO_ERROR && !st->remote_reset)
        emit(self, EV_RESET, sid, Py_NewRef(Py_False), PyLong_FromUnsignedLong(code));
    stream_free(st);
    return 0;
}

/* A frame went out: a response that ended while the request body was still coming is followed
 * by RST_STREAM NO_ERROR (RFC 9113 section 8.1), which must not overtake the response (the
 * library sends RST_STREAM ahead of queued HEADERS and DATA). */
static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *ud)
{
    Session *self = (Session *)ud;
    if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
        !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
        return 0;
    stream_t *st = stream_of(self, frame->hd.stream_id);
    if (st == NULL)
        return 0;
    st->ended = 1;
    if (st->reset_after) {
        st->reset_after = 0;
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, st->sid, NGHTTP2_NO_ERROR);
    }
    return 0;
}

/* The data provider of a response body: hand over what is buffered, as much as the library
 * asks for (its windows and frame size decide `length`). */
static ssize_t read_body(nghttp2_session *session, int32_t sid, uint8_t *buf, size_t length,
                         uint32_t *data_flags, nghttp2_data_source *source, void *ud)
{
    (void)session;
    (void)sid;
    Session *self = (Session *)ud;
    stream_t *st = (stream_t *)source->ptr;
    size_t done = 0;
    while (done < length && PyList_GET_SIZE(st->chunks) > 0) {
        PyObject *chunk = PyList_GET_ITEM(st->chunks, 0);
        Py_ssize_t size = PyBytes_GET_SIZE(chunk);
        size_t left = (size_t)(size - st->offset);
        size_t n = left < length - done ? left : length - done;
        memcpy(buf + done, PyBytes_AS_STRING(chunk) + st->offset, n);
        done += n;
        st->offset += (Py_ssize_t)n;
        if (st->offset == size) {
            st->offset = 0;
            if (PySequence_DelItem(st->chunks, 0) != 0)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
    }
    st->buffered -= done;
    self->buffered -= done;
    if (st->buffered == 0 && st->eof)
        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
    else if (done == 0)
        return NGHTTP2_ERR_DEFERRED; /* resumed by send()/end() */
    return (ssize_t)done;
}

/* -- the Session type ----------------------------------------------------------------------- */

static void Session_dealloc(Session *self)
{
    if (self->session != NULL) {
        nghttp2_session *s = self->session;
        self->session = NULL;
        nghttp2_session_del(s); /* (calls no stream-close callback) */
    }
    while (self->streams != NULL) { /* streams still open: their state is ours to free */
        stream_t *st = self->streams;
        stream_unlink(self, st);
        stream_free(st);
    }
    Py_XDECREF(self->events);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Session_init(Session *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_streams", "max_header_list", "http_messaging", NULL};
    unsigned int max_streams = 100;
    Py_ssize_t max_header_list = 65536;
    int messaging = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|Inp", kwlist, &max_streams, &max_header_list,
                                     &messaging))
        return -1;
    if (max_streams < 1 || max_header_list < 1) {
        PyErr_SetString(PyExc_ValueError, "max_streams and max_header_list must be positive");
        return -1;
    }
    if (self->session != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Session already initialised");
        return -1;
    }
    self->max_streams = max_streams;
    self->max_header_list = (size_t)max_header_list;
    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
    if (nghttp2_session_callbacks_new(&cbs) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cbs);
        PyErr_NoMemory();
        return -1;
    }
    nghttp2_option_set_no_auto_window_update(opt, 1);
    /* Off: the adapter checks request fields itself (request.h2_fields_problem, RFC 9113
     * sections 8.2 and 8.3) so that both engines answer a malformed request the same way. */
    nghttp2_option_set_no_http_messaging(opt, messaging ? 0 : 1);
    int rv = nghttp2_session_server_new2(&self->session, cbs, self, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cbs);
    if (rv != 0) {
        self->session = NULL;
        PyErr_Format(H2Error, "nghttp2_session_server_new2: %s", nghttp2_strerror(rv));
        return -1;
    }
    return 0;
}

static int ready(Session *self)
{
    if (self->session == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Session not initialised");
        return 0;
    }
    return 1;
}

static PyObject *Session_initiate(Session *self, PyObject *unused)
{
    (void)unused;
    if (!ready(self))
        return NULL;
    nghttp2_settings_entry iv[3] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, self->max_streams},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, (uint32_t)self->max_header_list},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    int rv = nghttp2_submit_settings(self->session, NGHTTP2_FLAG_NONE, iv, 3);
    if (rv != 0)
        return PyErr_Format(H2Error, "SETTINGS: %s", nghttp2_strerror(rv));
    Py_RETURN_NONE;
}

static PyObject *Session_receive(Session *self, PyObject *arg)
{
    if (!ready(self))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0)
        return NULL;
    PyObject *events = PyList_New(0);
    if (events == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    self->events = events;
    self->window_event = 0;
    self->pyerr = 0;
    ssize_t rv = nghttp2_session_mem_recv(self->session, view.buf, (size_t)view.len);
    self->events = NULL;
    PyBuffer_Release(&view);
    if (self->pyerr) {
        Py_DECREF(events);
        if (!PyErr_Occurred())
            PyErr_SetString(H2Error, "internal error in an HTTP/2 callback");
        return NULL;
    }
    if (rv < 0) {
        Py_DECREF(events);
        /* a fatal error the library could not answer itself (e.g. a bad connection preface):
         * queue GOAWAY PROTOCOL_ERROR for output() where it still can be sent */
        if (!self->fatal)
            nghttp2_session_terminate_session(self->session, NGHTTP2_PROTOCOL_ERROR);
        return PyErr_Format(H2Error, "%s", self->fatal ? self->fatal : nghttp2_strerror((int)rv));
    }
    if (self->fatal) {
        Py_DECREF(events);
        return PyErr_Format(H2Error, "%s", self->fatal);
    }
    return events;
}

static PyObject *Session_output(Session *self, PyObject *unused)
{
    (void)unused;
    if (!ready(self))
        return NULL;
    const uint8_t *data;
    ssize_t n = nghttp2_session_mem_send(self->session, &data);
    if (n < 0)
        return PyErr_Format(H2Error, "%s", nghttp2_strerror((int)n));
    if (n == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    /* usually one piece (the library returns one frame, or a run of small ones, at a time) */
    PyObject *first = PyBytes_FromStringAndSize((const char *)data, n);
    if (first == NULL)
        return NULL;
    n = nghttp2_session_mem_send(self->session, &data);
    if (n <= 0) {
        if (n < 0) {
            Py_DECREF(first);
            return PyErr_Format(H2Error, "%s", nghttp2_strerror((int)n));
        }
        return first;
    }
    PyObject *parts = PyList_New(0);
    if (parts == NULL || PyList_Append(parts, first) != 0) {
        Py_XDECREF(parts);
        Py_DECREF(first);
        return NULL;
    }
    Py_DECREF(first);
    while (n > 0) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)data, n);
        if (b == NULL || PyList_Append(parts, b) != 0) {
            Py_XDECREF(b);
            Py_DECREF(parts);
            return NULL;
        }
        Py_DECREF(b);
        n = nghttp2_session_mem_send(self->session, &data);
    }
    if (n < 0) {
        Py_DECREF(parts);
        return PyErr_Format(H2Error, "%s", nghttp2_strerror((int)n));
    }
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    if (empty == NULL) {
        Py_DECREF(parts);
        return NULL;
    }
    PyObject *joined = _PyBytes_Join(empty, parts);
    Py_DECREF(empty);
    Py_DECREF(parts);
    return joined;
}

/* headers: a sequence of (bytes, bytes) -> nva (pointers into the bytes objects, which the
 * caller keeps alive until the submit call has copied them) */
static nghttp2_nv *make_nva(PyObject *headers, Py_ssize_t *count, PyObject **fast)
{
    *fast = PySequence_Fast(headers, "headers must be a sequence of (name, value) pairs");
    if (*fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(*fast);
    nghttp2_nv *nva = PyMem_Calloc((size_t)(n ? n : 1), sizeof *nva);
    if (nva == NULL) {
        Py_CLEAR(*fast);
        PyErr_NoMemory();
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(*fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = items[i];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyMem_Free(nva);
            Py_CLEAR(*fast);
            PyErr_SetString(PyExc_TypeError, "each header must be a (bytes, bytes) tuple");
            return NULL;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        nva[i].name = (uint8_t *)PyBytes_AS_STRING(name);
        nva[i].namelen = (size_t)PyBytes_GET_SIZE(name);
        nva[i].value = (uint8_t *)PyBytes_AS_STRING(value);
        nva[i].valuelen = (size_t)PyBytes_GET_SIZE(value);
        nva[i].flags = NGHTTP2_NV_FLAG_NONE; /* copied by the library */
    }
    *count = n;
    return nva;
}

static stream_t *open_stream(Session *self, int sid)
{
    stream_t *st = stream_of(self, (int32_t)sid);
    if (st == NULL)
        PyErr_Format(StreamClosed, "stream %d is closed", sid);
    return st;
}

static PyObject *Session_respond(Session *self, PyObject *args)
{
    int sid, end_stream;
    PyObject *headers;
    if (!ready(self) || !PyArg_ParseTuple(args, "iOp", &sid, &headers, &end_stream))
        return NULL;
    stream_t *st = open_stream(self, sid);
    if (st == NULL)
        return NULL;
    if (st->providing) {
        PyErr_Format(H2Error, "stream %d already has its response head", sid);
        return NULL;
    }
    Py_ssize_t n;
    PyObject *fast;
    nghttp2_nv *nva = make_nva(headers, &n, &fast);
    if (nva == NULL)
        return NULL;
    nghttp2_data_provider prd;
    prd.source.ptr = st;
    prd.read_callback = read_body;
    int rv = nghttp2_submit_response(self->session, sid, nva, (size_t)n,
                                     end_stream ? NULL : &prd);
    PyMem_Free(nva);
    Py_DECREF(fast);
    if (rv != 0)
        return PyErr_Format(rv == NGHTTP2_ERR_INVALID_ARGUMENT ? (PyObject *)StreamClosed : H2Error,
                            "response on stream %d: %s", sid, nghttp2_strerror(rv));
    st->providing = end_stream ? -1 : 1; /* -1: the response is complete */
    Py_RETURN_NONE;
}

static PyObject *Session_send(Session *self, PyObject *args)
{
    int sid, end_stream;
    PyObject *data;
    if (!ready(self) || !PyArg_ParseTuple(args, "iSp", &sid, &data, &end_stream))
        return NULL;
    stream_t *st = open_stream(self, sid);
    if (st == NULL)
        return NULL;
    if (st->providing != 1 || st->eof) {
        PyErr_Format(H2Error, "stream %d: no response body can follow", sid);
        return NULL;
    }
    if (PyBytes_GET_SIZE(data) > 0) {
        if (PyList_Append(st->chunks, data) != 0)
            return NULL;
        st->buffered += (size_t)PyBytes_GET_SIZE(data);
        self->buffered += (size_t)PyBytes_GET_SIZE(data);
    }
    if (end_stream)
        st->eof = 1;
    nghttp2_session_resume_data(self->session, sid); /* (an error: it was not deferred) */
    Py_RETURN_NONE;
}

static PyObject *Session_end(Session *self, PyObject *args)
{
    int sid;
    if (!ready(self) || !PyArg_ParseTuple(args, "i", &sid))
        return NULL;
    stream_t *st = open_stream(self, sid);
    if (st == NULL)
        return NULL;
    if (st->providing != 1) {
        PyErr_Format(H2Error, "stream %d: no response body to end", sid);
        return NULL;
    }
    st->eof = 1;
    nghttp2_session_resume_data(self->session, sid);
    Py_RETURN_NONE;
}

static PyObject *Session_buffered(Session *self, PyObject *args)
{
    int sid;
    if (!ready(self) || !PyArg_ParseTuple(args, "i", &sid))
        return NULL;
    if (sid == 0)
        return PyLong_FromSize_t(self->buffered);
    stream_t *st = stream_of(self, sid);
    return PyLong_FromSize_t(st == NULL ? 0 : st->buffered);
}

/* What more the stream may be given now: its send window and the connection's (RFC 9113
 * section 5.2), less what is queued and not yet handed to the library; 0 for a closed stream. */
static PyObject *Session_window(Session *self, PyObject *args)
{
    int sid;
    if (!ready(self) || !PyArg_ParseTuple(args, "i", &sid))
        return NULL;
    stream_t *st = stream_of(self, sid);
    if (st == NULL)
        return PyLong_FromLong(0);
    long long sw = nghttp2_session_get_stream_remote_window_size(self->session, sid);
    long long cw = nghttp2_session_get_remote_window_size(self->session);
    sw -= (long long)st->buffered;
    cw -= (long long)self->buffered;
    long long w = sw < cw ? sw : cw;
    return PyLong_FromLongLong(w > 0 ? w : 0);
}

static PyObject *Session_max_frame(Session *self, PyObject *unused)
{
    (void)unused;
    if (!ready(self))
        return NULL;
    return PyLong_FromUnsignedLong(
        nghttp2_session_get_remote_settings(self->session, NGHTTP2_SETTINGS_MAX_FRAME_SIZE));
}

static PyObject *Session_reset(Session *self, PyObject *args)
{
    int sid;
    unsigned int code;
    if (!ready(self) || !PyArg_ParseTuple(args, "iI", &sid, &code))
        return NULL;
    stream_t *st = stream_of(self, sid);
    if (code == NGHTTP2_NO_ERROR && st != NULL && st->providing != 0 && !st->ended) {
        st->reset_after = 1; /* after the response (on_frame_send) */
        Py_RETURN_NONE;
    }
    int rv = nghttp2_submit_rst_stream(self->session, NGHTTP2_FLAG_NONE, sid, code);
    if (rv != 0)
        return PyErr_Format(H2Error, "RST_STREAM %d: %s", sid, nghttp2_strerror(rv));
    Py_RETURN_NONE;
}

static PyObject *Session_goaway(Session *self, PyObject *args)
{
    unsigned int code;
    if (!ready(self) || !PyArg_ParseTuple(args, "I", &code))
        return NULL;
    int rv = nghttp2_submit_goaway(self->session, NGHTTP2_FLAG_NONE,
                                   nghttp2_session_get_last_proc_stream_id(self->session), code,
                                   NULL, 0);
    if (rv != 0)
        return PyErr_Format(H2Error, "GOAWAY: %s", nghttp2_strerror(rv));
    Py_RETURN_NONE;
}

static PyObject *Session_consume(Session *self, PyObject *args)
{
    int sid;
    Py_ssize_t n;
    if (!ready(self) || !PyArg_ParseTuple(args, "in", &sid, &n))
        return NULL;
    if (n <= 0)
        Py_RETURN_NONE;
    /* RFC 9113 section 6.9: the connection's window always; the stream's while it is open */
    int rv = stream_of(self, sid) != NULL
                 ? nghttp2_session_consume(self->session, sid, (size_t)n)
                 : nghttp2_session_consume_connection(self->session, (size_t)n);
    if (rv != 0 && rv != NGHTTP2_ERR_INVALID_ARGUMENT)
        return PyErr_Format(H2Error, "WINDOW_UPDATE: %s", nghttp2_strerror(rv));
    Py_RETURN_NONE;
}

static PyObject *Session_want_io(Session *self, PyObject *unused)
{
    (void)unused;
    if (!ready(self))
        return NULL;
    return PyBool_FromLong(nghttp2_session_want_read(self->session) ||
                           nghttp2_session_want_write(self->session));
}

static PyMethodDef Session_methods[] = {
    {"initiate", (PyCFunction)Session_initiate, METH_NOARGS,
     "Queue the server's SETTINGS (the connection preface's server part)."},
    {"receive", (PyCFunction)Session_receive, METH_O,
     "Feed bytes from the client; returns the list of event tuples they caused."},
    {"output", (PyCFunction)Session_output, METH_NOARGS, "Everything to send now (b'' if none)."},
    {"respond", (PyCFunction)Session_respond, METH_VARARGS,
     "respond(sid, headers, end_stream): queue the response HEADERS."},
    {"send", (PyCFunction)Session_send, METH_VARARGS,
     "send(sid, data, end_stream): queue response body bytes (sent as windows allow)."},
    {"end", (PyCFunction)Session_end, METH_VARARGS,
     "end(sid): the response ends after what is queued."},
    {"buffered", (PyCFunction)Session_buffered, METH_VARARGS,
     "buffered(sid): response bytes queued and not yet sent (sid 0: all streams')."},
    {"window", (PyCFunction)Session_window, METH_VARARGS,
     "window(sid): response bytes the flow-control windows take now, less what is queued."},
    {"max_frame", (PyCFunction)Session_max_frame, METH_NOARGS,
     "The client's SETTINGS_MAX_FRAME_SIZE."},
    {"reset", (PyCFunction)Session_reset, METH_VARARGS, "reset(sid, code): RST_STREAM."},
    {"goaway", (PyCFunction)Session_goaway, METH_VARARGS, "goaway(code): GOAWAY."},
    {"consume", (PyCFunction)Session_consume, METH_VARARGS,
     "consume(sid, n): give n bytes of receive window back (WINDOW_UPDATE)."},
    {"want_io", (PyCFunction)Session_want_io, METH_NOARGS,
     "False once the session is finished (GOAWAY sent after an error, or both sides done)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "confedge.proxy._h2native.Session",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An HTTP/2 server connection (libnghttp2), sans I/O.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Session_init,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_methods = Session_methods,
};

static PyObject *library_version(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    nghttp2_info *info = nghttp2_version(0);
    return PyUnicode_FromString(info->version_str);
}

static PyMethodDef module_methods[] = {
    {"library_version", library_version, METH_NOARGS, "The libnghttp2 version in use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "confedge.proxy._h2native",
    "HTTP/2 server sessions on libnghttp2 (see proxy/h2engine.py).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__h2native(void)
{
    if (PyType_Ready(&SessionType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    H2Error = PyErr_NewException("confedge.proxy._h2native.H2Error", NULL, NULL);
    StreamClosed = PyErr_NewException("confedge.proxy._h2native.StreamClosed", H2Error, NULL);
    if (H2Error == NULL || StreamClosed == NULL || PyModule_AddObjectRef(m, "H2Error", H2Error) < 0 ||
        PyModule_AddObjectRef(m, "StreamClosed", StreamClosed) < 0 ||
        PyModule_AddObjectRef(m, "Session", (PyObject *)&SessionType) < 0 ||
        PyModule_AddIntConstant(m, "REQUEST", EV_REQUEST) < 0 ||
        PyModule_AddIntConstant(m, "DATA", EV_DATA) < 0 ||
        PyModule_AddIntConstant(m, "END", EV_END) < 0 ||
        PyModule_AddIntConstant(m, "RESET", EV_RESET) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", EV_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "WINDOW", EV_WINDOW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
