/* confedge.proxy._h1native: the ordinary HTTP/1.1 head in one pass, for proxy/h1engine.py.
 *
 * Why: the proxy's HTTP/1.1 work per request is about 7 us of CPU (bench/proxy/hotpath.py), and a
 * third of it is httptools: llhttp's callbacks, each a Python call that makes its own bytes
 * objects, for a request line, a dozen header lines and a status line that are nearly always
 * plain. This module reads such a head in one C pass and hands the proxy the same values
 * httptools would have (the same bytes, in the same order), so the adapters feed the exchange
 * core the same events and the core cannot tell the difference.
 *
 * It is a fast path, not a second parser of record: it accepts a strict subset of what llhttp
 * accepts and returns None for everything else, and the caller then parses the same bytes with
 * httptools exactly as before (so every refusal, limit and error message stays llhttp's and the
 * proxy's). What it takes, both ways, is a whole head in one read, in RFC 9112's own grammar:
 *
 *   request   method SP origin-form SP "HTTP/1.1" CRLF *( field-line CRLF ) CRLF
 *             with no body (no Content-Length, Transfer-Encoding, Upgrade or Expect), one Host,
 *             Connection (if any) naming only keep-alive, and nothing after the head in the read
 *   response  "HTTP/1.1" SP 3DIGIT SP reason CRLF *( field-line CRLF ) CRLF body
 *             for a status in 200-599 but 204 and 304, exactly one Content-Length of digits, no
 *             Transfer-Encoding, Connection (if any) "keep-alive" or "close", and the read
 *             ending exactly where the body does
 *   field-line  token ":" OWS value, value bytes HTAB / SP / VCHAR / obs-text; the value given
 *             is what llhttp gives: leading OWS dropped, trailing OWS kept (RFC 9112 section
 *             5: the proxy passes values through as received). No obs-fold, no bare LF.
 *
 * tests/unit/test_proxy_h1native.py holds it to that: on generated heads and a million mutated
 * ones, whatever this accepts, httptools accepts with the same method, target, fields, status
 * and keep-alive.
 *
 * Threading: called with the GIL held; it keeps no state between calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* RFC 9110 section 5.6.2 tchar; VCHAR / obs-text / HTAB / SP for field values. */
static unsigned char TCHAR[256];
static unsigned char VALUE[256];

static void init_tables(void) {
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = '0'; c <= '9'; c++) TCHAR[c] = 1;
    for (int c = 'a'; c <= 'z'; c++) TCHAR[c] = 1;
    for (int c = 'A'; c <= 'Z'; c++) TCHAR[c] = 1;
    for (const char *p = extra; *p; p++) TCHAR[(unsigned char)*p] = 1;
    VALUE['\t'] = 1;
    for (int c = 0x20; c <= 0x7e; c++) VALUE[c] = 1;
    for (int c = 0x80; c <= 0xff; c++) VALUE[c] = 1;
}

/* A new bytes object holding p[0:n] in lower case. Never PyBytes_FromStringAndSize(p, n) and
 * then lower-casing it in place: for one byte that returns CPython's shared single-character
 * object, and writing into it changes b"X" for the whole interpreter. */
static PyObject *lower_copy(const unsigned char *p, Py_ssize_t n) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, n); /* (always a new object) */
    if (out == NULL) return NULL;
    unsigned char *b = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) b[i] = (p[i] >= 'A' && p[i] <= 'Z') ? (p[i] | 0x20) : p[i];
    return out;
}

/* The header names the proxy reads (request side: server.py _STEER; response side: framing). */
enum {
    F_OTHER = 0,
    F_HOST,
    F_CONTENT_LENGTH,
    F_TRANSFER_ENCODING,
    F_CONNECTION,
    F_XFF,
    F_UPGRADE,
    F_EXPECT,
    F_USER_AGENT,
    F_REFERER,
    F_PIN,
    F_TOKEN,
    F_AUTHORIZATION,
};

/* Case-insensitive equality of name[0:n] with the lower-case `lower` of length n. */
static int name_is(const unsigned char *name, Py_ssize_t n, const char *lower) {
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = name[i];
        if (c >= 'A' && c <= 'Z') c |= 0x20;
        if (c != (unsigned char)lower[i]) return 0;
    }
    return 1;
}

static int field_kind(const unsigned char *name, Py_ssize_t n) {
    switch (n) {
    case 3:
        return name_is(name, n, "pin") ? F_PIN : F_OTHER;
    case 4:
        return name_is(name, n, "host") ? F_HOST : F_OTHER;
    case 5:
        return name_is(name, n, "token") ? F_TOKEN : F_OTHER;
    case 6:
        return name_is(name, n, "expect") ? F_EXPECT : F_OTHER;
    case 7:
        if (name_is(name, n, "referer")) return F_REFERER;
        return name_is(name, n, "upgrade") ? F_UPGRADE : F_OTHER;
    case 10:
        if (name_is(name, n, "user-agent")) return F_USER_AGENT;
        return name_is(name, n, "connection") ? F_CONNECTION : F_OTHER;
    case 13:
        return name_is(name, n, "authorization") ? F_AUTHORIZATION : F_OTHER;
    case 14:
        return name_is(name, n, "content-length") ? F_CONTENT_LENGTH : F_OTHER;
    case 15:
        return name_is(name, n, "x-forwarded-for") ? F_XFF : F_OTHER;
    case 17:
        return name_is(name, n, "transfer-encoding") ? F_TRANSFER_ENCODING : F_OTHER;
    default:
        return F_OTHER;
    }
}

/* One field line at p (< end): its name [*name, *name + *nlen) and value [*val, *val + *vlen);
 * returns the position after its CRLF, or NULL when the line is not in the grammar above (or
 * runs past end). */
static const unsigned char *field_line(const unsigned char *p, const unsigned char *end,
                                       const unsigned char **name, Py_ssize_t *nlen,
                                       const unsigned char **val, Py_ssize_t *vlen) {
    const unsigned char *s = p;
    while (p < end && TCHAR[*p]) p++;
    if (p == s || p >= end || *p != ':') return NULL;
    *name = s;
    *nlen = p - s;
    p++;
    while (p < end && (*p == ' ' || *p == '\t')) p++;
    s = p;
    while (p < end && VALUE[*p]) p++;
    if (p + 1 >= end || p[0] != '\r' || p[1] != '\n') return NULL;
    *val = s;
    *vlen = p - s;
    return p + 2;
}

/* The next line of a head at *p: 1 a field line (its name and value set, *p moved past it), 0
 * the empty line that ends the head (*p moved past it), -1 neither (the fast path declines). */
static int next_line(const unsigned char **p, const unsigned char *end,
                     const unsigned char **name, Py_ssize_t *nlen, const unsigned char **val,
                     Py_ssize_t *vlen) {
    const unsigned char *q = *p;
    if (q + 1 < end && q[0] == '\r' && q[1] == '\n') {
        *p = q + 2;
        return 0;
    }
    q = field_line(q, end, name, nlen, val, vlen);
    if (q == NULL) return -1;
    *p = q;
    return 1;
}

/* b", ".join-like accumulation of repeated fields, as server.py does for X-Forwarded-For and
 * pin (sep ", ") and Connection (sep ","). Steals nothing; returns 0 on error. */
static int join_into(PyObject **acc, const unsigned char *v, Py_ssize_t n, const char *sep,
                     int lower) {
    PyObject *value = lower ? lower_copy(v, n) : PyBytes_FromStringAndSize((const char *)v, n);
    if (value == NULL) return 0;
    if (*acc == NULL) {
        *acc = value;
        return 1;
    }
    Py_ssize_t a = PyBytes_GET_SIZE(*acc), s = (Py_ssize_t)strlen(sep);
    PyObject *joined = PyBytes_FromStringAndSize(NULL, a + s + n);
    if (joined == NULL) {
        Py_DECREF(value);
        return 0;
    }
    char *out = PyBytes_AS_STRING(joined);
    memcpy(out, PyBytes_AS_STRING(*acc), a);
    memcpy(out + a, sep, s);
    memcpy(out + a + s, PyBytes_AS_STRING(value), n);
    Py_DECREF(value);
    Py_SETREF(*acc, joined);
    return 1;
}

/* Every comma-separated token of a Connection value is keep-alive (RFC 9110 section 7.6.1);
 * anything else (close, upgrade, a field name) is left to httptools and the Python path. */
static int only_keep_alive(const unsigned char *v, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (;;) {
        while (i < n && (v[i] == ' ' || v[i] == '\t')) i++;
        Py_ssize_t s = i;
        while (i < n && v[i] != ',') i++;
        Py_ssize_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        if (e - s != 10 || !name_is(v + s, 10, "keep-alive")) return 0;
        if (i >= n) return 1;
        i++; /* the comma */
    }
}

static int method_ok(const unsigned char *m, Py_ssize_t n) {
    /* The methods llhttp knows that a bodiless request may use and the proxy may pass on (the
     * proxy's own list, request.ALLOWED_METHODS, is applied after, as for httptools). */
    switch (n) {
    case 3:
        return !memcmp(m, "GET", 3) || !memcmp(m, "PUT", 3);
    case 4:
        return !memcmp(m, "HEAD", 4) || !memcmp(m, "POST", 4);
    case 5:
        return !memcmp(m, "PATCH", 5);
    case 6:
        return !memcmp(m, "DELETE", 6);
    case 7:
        return !memcmp(m, "OPTIONS", 7);
    default:
        return 0;
    }
}

/* Header names as clients and nodes spell them, memoised: the same dozen names come in the same
 * spelling on every request and answer, so a hit costs a hash and a memcmp instead of two new
 * bytes objects (the name as sent, and its lower-case spelling). A direct-mapped table; a slot
 * is overwritten on a miss, so a peer inventing names only loses the shortcut. Safe without a
 * lock: every call holds the GIL. */
#define NAME_SLOTS 128
#define NAME_MAX_CACHED 40
static struct {
    PyObject *name;  /* bytes, as sent */
    PyObject *lower; /* bytes, lower-case (the same object when name has no capitals) */
} names[NAME_SLOTS];

static unsigned name_hash(const unsigned char *p, Py_ssize_t n) {
    /* (length and three bytes: enough to tell the usual names apart; a collision only costs a
     * miss, since a hit is confirmed by memcmp) */
    unsigned h = (unsigned)n * 2654435761u;
    h ^= (unsigned)p[0] * 40503u + (unsigned)p[n - 1] * 9973u + (unsigned)p[n >> 1] * 131u;
    return h ^ (h >> 7);
}

static PyObject *lower_of(PyObject *name) {
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(name);
    Py_ssize_t n = PyBytes_GET_SIZE(name), i = 0;
    while (i < n && !(p[i] >= 'A' && p[i] <= 'Z')) i++;
    if (i == n) return Py_NewRef(name);
    return lower_copy(p, n);
}

/* New references to the name as sent and (when `lower` is not NULL) its lower-case spelling. */
static int name_pair(const unsigned char *p, Py_ssize_t n, PyObject **as_sent, PyObject **lower) {
    unsigned slot = 0;
    if (n <= NAME_MAX_CACHED) {
        slot = name_hash(p, n) & (NAME_SLOTS - 1);
        PyObject *hit = names[slot].name;
        if (hit != NULL && PyBytes_GET_SIZE(hit) == n && !memcmp(PyBytes_AS_STRING(hit), p, n)) {
            *as_sent = Py_NewRef(hit);
            if (lower != NULL) *lower = Py_NewRef(names[slot].lower);
            return 1;
        }
    }
    PyObject *name = PyBytes_FromStringAndSize((const char *)p, n);
    if (name == NULL) return 0;
    PyObject *low = lower_of(name);
    if (low == NULL) {
        Py_DECREF(name);
        return 0;
    }
    if (n <= NAME_MAX_CACHED) {
        Py_XSETREF(names[slot].name, Py_NewRef(name));
        Py_XSETREF(names[slot].lower, Py_NewRef(low));
    }
    *as_sent = name;
    if (lower != NULL)
        *lower = low;
    else
        Py_DECREF(low);
    return 1;
}

static PyObject *bytes_of(const unsigned char *p, Py_ssize_t n) {
    return PyBytes_FromStringAndSize((const char *)p, n);
}

/* Append one field line to `headers`: (lower-case name, name, value) when `with_lower`, else
   (name, value), as httptools' adapters build them. Returns the value's bytes, a reference the
   list holds (borrowed), or NULL with an exception set. */
static PyObject *append_field(PyObject *headers, const unsigned char *name, Py_ssize_t nlen,
                              const unsigned char *val, Py_ssize_t vlen, int with_lower) {
    PyObject *nb, *lb = NULL;
    if (!name_pair(name, nlen, &nb, with_lower ? &lb : NULL)) return NULL;
    PyObject *vb = bytes_of(val, vlen);
    PyObject *entry = vb != NULL ? PyTuple_New(with_lower ? 3 : 2) : NULL;
    if (entry == NULL) {
        Py_DECREF(nb);
        Py_XDECREF(lb);
        Py_XDECREF(vb);
        return NULL;
    }
    Py_ssize_t i = 0;
    if (with_lower) PyTuple_SET_ITEM(entry, i++, lb);
    PyTuple_SET_ITEM(entry, i++, nb);
    PyTuple_SET_ITEM(entry, i, vb);
    int rc = PyList_Append(headers, entry);
    Py_DECREF(entry);
    return rc < 0 ? NULL : vb;
}

PyDoc_STRVAR(parse_request_doc,
             "parse_request(buf, n, max_url, max_header_bytes, max_headers)\n"
             "--\n\n"
             "The request head that fills buf[:n] exactly, as the tuple (method, url, headers, "
             "host, user_agent, referer, x_forwarded_for, connection_tokens, pin, token, "
             "authorization, header_bytes), headers a list of (lower-case name, name, value); "
             "or None: not an ordinary head (parse it with httptools), or over a limit.");

static PyObject *parse_request(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "parse_request takes 5 arguments");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    Py_ssize_t max_url = PyLong_AsSsize_t(args[2]);
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[3]);
    Py_ssize_t max_headers = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    if (n < 0 || n > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "n is outside the buffer");
        return NULL;
    }
    const unsigned char *p = view.buf, *end = p + n;
    PyObject *result = NULL, *headers = NULL, *method = NULL, *url = NULL;
    PyObject *host = NULL, *ua = NULL, *referer = NULL, *xff = NULL, *conn = NULL, *pin = NULL;
    PyObject *auth = NULL;
    int token = 0;
    Py_ssize_t header_bytes = 0;

    /* request-line (RFC 9112 section 3) */
    const unsigned char *s = p;
    while (p < end && *p >= 'A' && *p <= 'Z') p++;
    if (p >= end || *p != ' ' || !method_ok(s, p - s)) goto fallback;
    const unsigned char *m = s;
    Py_ssize_t mlen = p - s;
    s = ++p;
    if (p >= end || *p != '/') goto fallback; /* origin-form only */
    while (p < end && *p >= 0x21 && *p <= 0x7e) p++;
    Py_ssize_t ulen = p - s;
    if (ulen > max_url) goto fallback;
    if (end - p < 11 || memcmp(p, " HTTP/1.1\r\n", 11) != 0) goto fallback;
    const unsigned char *u = s;
    p += 11;

    headers = PyList_New(0);
    if (headers == NULL) goto error;
    for (;;) {
        const unsigned char *name, *val;
        Py_ssize_t nlen, vlen;
        int line = next_line(&p, end, &name, &nlen, &val, &vlen);
        if (line < 0) goto fallback;
        if (line == 0) break;
        header_bytes += nlen + vlen + 4;
        if (header_bytes > max_bytes || PyList_GET_SIZE(headers) >= max_headers) goto fallback;
        int kind = field_kind(name, nlen);
        switch (kind) {
        case F_CONTENT_LENGTH:
        case F_TRANSFER_ENCODING:
        case F_UPGRADE:
        case F_EXPECT:
            goto fallback;
        case F_HOST:
            if (host != NULL) goto fallback;
            break;
        case F_CONNECTION:
            if (!only_keep_alive(val, vlen)) goto fallback;
            break;
        default:
            break;
        }
        PyObject *vb = append_field(headers, name, nlen, val, vlen, 1);
        if (vb == NULL) goto error;
        switch (kind) {
        case F_HOST:
            Py_INCREF(vb);
            host = vb;
            break;
        case F_USER_AGENT:
            Py_INCREF(vb);
            Py_XSETREF(ua, vb);
            break;
        case F_REFERER:
            Py_INCREF(vb);
            Py_XSETREF(referer, vb);
            break;
        case F_XFF:
            if (!join_into(&xff, val, vlen, ", ", 0)) goto error;
            break;
        case F_CONNECTION:
            if (!join_into(&conn, val, vlen, ",", 1)) goto error;
            break;
        case F_PIN:
            if (!join_into(&pin, val, vlen, ", ", 0)) goto error;
            break;
        case F_TOKEN:
            token = 1;
            break;
        case F_AUTHORIZATION:
            if (auth == NULL) {
                Py_INCREF(vb);
                auth = vb;
            }
            break;
        default:
            break;
        }
    }
    if (p != end) goto fallback; /* pipelined bytes after the head: httptools takes the read */
    method = bytes_of(m, mlen);
    url = bytes_of(u, ulen);
    PyObject *size = PyLong_FromSsize_t(header_bytes);
    result = PyTuple_New(12);
    if (method == NULL || url == NULL || size == NULL || result == NULL) {
        Py_XDECREF(size);
        Py_XDECREF(result);
        goto error;
    }
#define OR_NONE(o) ((o) != NULL ? (o) : Py_NewRef(Py_None))
    /* (the tuple takes every reference) */
    PyTuple_SET_ITEM(result, 0, method);
    PyTuple_SET_ITEM(result, 1, url);
    PyTuple_SET_ITEM(result, 2, headers);
    PyTuple_SET_ITEM(result, 3, OR_NONE(host));
    PyTuple_SET_ITEM(result, 4, OR_NONE(ua));
    PyTuple_SET_ITEM(result, 5, OR_NONE(referer));
    PyTuple_SET_ITEM(result, 6, OR_NONE(xff));
    PyTuple_SET_ITEM(result, 7, OR_NONE(conn));
    PyTuple_SET_ITEM(result, 8, OR_NONE(pin));
    PyTuple_SET_ITEM(result, 9, Py_NewRef(token ? Py_True : Py_False));
    PyTuple_SET_ITEM(result, 10, OR_NONE(auth));
    PyTuple_SET_ITEM(result, 11, size);
#undef OR_NONE
    PyBuffer_Release(&view);
    return result;

fallback:
    Py_XDECREF(headers);
    Py_XDECREF(host);
    Py_XDECREF(ua);
    Py_XDECREF(referer);
    Py_XDECREF(xff);
    Py_XDECREF(conn);
    Py_XDECREF(pin);
    Py_XDECREF(auth);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;

error:
    Py_XDECREF(headers);
    Py_XDECREF(method);
    Py_XDECREF(url);
    Py_XDECREF(host);
    Py_XDECREF(ua);
    Py_XDECREF(referer);
    Py_XDECREF(xff);
    Py_XDECREF(conn);
    Py_XDECREF(pin);
    Py_XDECREF(auth);
    PyBuffer_Release(&view);
    return NULL;
}

PyDoc_STRVAR(parse_response_doc,
             "parse_response(data, max_head)\n"
             "--\n\n"
             "The response that is exactly data (head and Content-Length body), as the tuple "
             "(status, headers, body_start, keep_alive), headers a list of (name, value); or "
             "None: not an ordinary response in one read (parse it with httptools), or a head "
             "over max_head bytes.");

static PyObject *parse_response(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_response takes 2 arguments");
        return NULL;
    }
    Py_ssize_t max_head = PyLong_AsSsize_t(args[1]);
    if (max_head == -1 && PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *base = view.buf, *p = base;
    Py_ssize_t n = view.len;
    const unsigned char *end = p + (n < max_head ? n : max_head);
    PyObject *headers = NULL;
    int keep_alive = 1, have_length = 0;
    unsigned long long length = 0;

    /* status-line (RFC 9112 section 4) */
    if (end - p < 13 || memcmp(p, "HTTP/1.1 ", 9) != 0) goto fallback;
    p += 9;
    if (p[0] < '2' || p[0] > '5' || p[1] < '0' || p[1] > '9' || p[2] < '0' || p[2] > '9' ||
        p[3] != ' ')
        goto fallback;
    int status = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
    if (status == 204 || status == 304) goto fallback; /* no body whatever the fields say */
    p += 4;
    while (p < end && VALUE[*p]) p++;
    if (p + 1 >= end || p[0] != '\r' || p[1] != '\n') goto fallback;
    p += 2;

    headers = PyList_New(0);
    if (headers == NULL) goto error;
    for (;;) {
        const unsigned char *name, *val;
        Py_ssize_t nlen, vlen;
        int line = next_line(&p, end, &name, &nlen, &val, &vlen);
        if (line < 0) goto fallback;
        if (line == 0) break;
        switch (field_kind(name, nlen)) {
        case F_CONTENT_LENGTH:
            if (have_length || vlen < 1 || vlen > 18) goto fallback;
            for (Py_ssize_t i = 0; i < vlen; i++) {
                if (val[i] < '0' || val[i] > '9') goto fallback;
                length = length * 10 + (unsigned)(val[i] - '0');
            }
            have_length = 1;
            break;
        case F_TRANSFER_ENCODING:
            goto fallback;
        case F_CONNECTION:
            if (vlen == 5 && name_is(val, 5, "close"))
                keep_alive = 0;
            else if (!(vlen == 10 && name_is(val, 10, "keep-alive")))
                goto fallback;
            break;
        default:
            break;
        }
        if (append_field(headers, name, nlen, val, vlen, 0) == NULL) goto error;
    }
    Py_ssize_t head = p - base;
    if (!have_length || (unsigned long long)(n - head) != length) goto fallback;
    PyBuffer_Release(&view);
    PyObject *result = PyTuple_New(4), *code = PyLong_FromLong(status);
    PyObject *at = PyLong_FromSsize_t(head);
    if (result == NULL || code == NULL || at == NULL) {
        Py_XDECREF(result);
        Py_XDECREF(code);
        Py_XDECREF(at);
        Py_DECREF(headers);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, code);
    PyTuple_SET_ITEM(result, 1, headers);
    PyTuple_SET_ITEM(result, 2, at);
    PyTuple_SET_ITEM(result, 3, Py_NewRef(keep_alive ? Py_True : Py_False));
    return result;

fallback:
    Py_XDECREF(headers);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;

error:
    Py_XDECREF(headers);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"parse_request", (PyCFunction)(void (*)(void))parse_request, METH_FASTCALL,
     parse_request_doc},
    {"parse_response", (PyCFunction)(void (*)(void))parse_response, METH_FASTCALL,
     parse_response_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "confedge.proxy._h1native",
    "The ordinary HTTP/1.1 request and response head in one C pass (see proxy/h1engine.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__h1native(void) {
    init_tables();
    return PyModule_Create(&module);
}
