/* _fastio: the per-piece loops of planning and reading, in C (optional: crit_pageread/native.py).
 *
 * The reader plans and the strategies move bytes, as in the Python code; these functions only do
 * the loops that would otherwise cost Python bytecode per piece of a fragmented dump or a chain:
 *
 *   plan()          a read of [vaddr, end) over a MemoryMap's run columns (typed arrays) ->
 *                   pieces (int64 quadruples: file, offset, dest_offset, length), joined where
 *                   contiguous both in one pages file and in memory, and the holes to zero;
 *   pack()          plan()'s pieces for many ranges laid one after another in one buffer, a gap of
 *                   zero bytes after each (a scan's pack of short runs);
 *   parse_pagemap() a pagemap image's entries as CRIU writes them -> the index's columns (bytes);
 *   resolve()       a chain level's pagemap columns over its parent's map -> the level's map
 *                   (resolve_count() its length, then its runs written into the map's own columns);
 *   runs()          a map's readable runs over a range, clipped and joined (memory.py's _map_runs);
 *   queue_scatter() preadv's queue of plain requests: records (fd, offset, address, length) in a
 *                   bytearray (plans are queued as they are);
 *   preadv_queue()  the queue read with CRIU's batching (one run per file range, bridging gaps
 *                   up to max_gap, IOV_MAX iovecs per call), without the GIL, in bounded memory;
 *   pread_plan()    one pread per piece, without the GIL;
 *   copy_plan()     memcpy of pieces from mapped windows of the pages files, without the GIL;
 *   plan_copies()   copies of many ranges of memory to offsets of an output file -> pieces;
 *   write_pieces()  those pieces written to the file with kernel copies (kernel.py's write_to),
 *                   without the GIL;
 *   encode_entries() pagemap entries from columns, as CRIU writes them (squash's output).
 *
 * Errors the reader reports with file names (holes, lazy pages, short files) come back as status
 * codes; bad arguments raise ValueError/TypeError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* reader.py's run kinds and holes modes */
enum { K_PRESENT = 0, K_LAZY = 1, K_BROKEN = 2 };
enum { H_ERROR = 0, H_ZERO = 1, H_SKIP = 2 };
/* plan() status */
enum { P_OK = 0, P_HOLE = 1, P_LAZY = 2, P_BROKEN = 3 };
/* I/O status */
enum { IO_OK = 0, IO_SHORT = 1, IO_ERRNO = 2, IO_WINDOW = 3, IO_BOUNDS = 4 };

typedef struct { int64_t file, offset, dest, length; } piece_t;
typedef struct { int64_t fd, offset, addr, length; } rec_t;

/* --- a growable array ------------------------------------------------------------------- */

typedef struct { char *data; size_t len, cap; } vec_t;

static void *vec_add(vec_t *v, size_t size)
{
    if (v->len + size > v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 4096;
        while (cap < v->len + size)
            cap *= 2;
        char *data = PyMem_Realloc(v->data, cap);
        if (data == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        v->data = data;
        v->cap = cap;
    }
    void *at = v->data + v->len;
    v->len += size;
    return at;
}

static PyObject *vec_bytes(vec_t *v)
{
    return PyBytes_FromStringAndSize(v->data ? v->data : "", (Py_ssize_t)v->len);
}

/* A bytes object of room for `n` items of `size` bytes, written in place and cut to what was written by
 * out_finish: one buffer instead of a growing one copied into a bytes object at the end (a process's
 * first use of memory costs a page fault per page: the fewer bytes touched, the fewer faults). Pages of
 * the room never written are never touched. */
typedef struct { PyObject *bytes; char *data; } out_t;

static int out_open(out_t *o, Py_ssize_t n, size_t size)
{
    o->bytes = PyBytes_FromStringAndSize(NULL, n > 0 ? n * (Py_ssize_t)size : 0);
    o->data = o->bytes ? PyBytes_AS_STRING(o->bytes) : NULL;
    return o->bytes ? 0 : -1;
}

/* The bytes cut to `used` bytes (a new reference: the out_t gives its own up), or NULL. */
static PyObject *out_finish(out_t *o, Py_ssize_t used)
{
    PyObject *b = o->bytes;
    o->bytes = NULL;
    if (b != NULL && PyBytes_GET_SIZE(b) != used && _PyBytes_Resize(&b, used) < 0)
        return NULL;
    return b;
}

static void out_close(out_t *o)
{
    Py_CLEAR(o->bytes);
}

/* --- reading columns: typed arrays (array.array, memoryview) and Python lists of ints ---------- */

_Static_assert(sizeof(long) == sizeof(int64_t), "a C long holds an int64 (LP64)");

/* An int of a list: on CPython 3.11 an int of at most two digits (below 2**60: addresses, offsets, sizes)
 * is read in place; else PyLong_AsLong (PyLong_AsLongLong goes through a byte array past 2**30). */
static inline int item(PyObject *list, Py_ssize_t i, int64_t *out)
{
    PyObject *obj = PyList_GET_ITEM(list, i);
#if PY_VERSION_HEX < 0x030C0000 && !defined(Py_LIMITED_API)
    if (PyLong_CheckExact(obj)) {
        const digit *d = ((PyLongObject *)obj)->ob_digit;
        switch (Py_SIZE(obj)) {
        case 0:
            *out = 0;
            return 0;
        case 1:
            *out = (int64_t)d[0];
            return 0;
        case -1:
            *out = -(int64_t)d[0];
            return 0;
        case 2:
            *out = (int64_t)d[0] | (int64_t)d[1] << PyLong_SHIFT;
            return 0;
        }
    }
#endif
    long value = PyLong_AsLong(obj);
    if (value == -1 && PyErr_Occurred())
        return -1;
    *out = value;
    return 0;
}

/* A typed column: a C-contiguous buffer of `itemsize`-byte integers with one of the formats `formats`
 * (array('q'), array('B'), array('H'), or a memoryview cast so). */
static int column(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, const char *formats, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=')
        f++;
    if (view->itemsize != itemsize || f[0] == '\0' || f[1] != '\0' || strchr(formats, f[0]) == NULL) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s must be a typed column of format %s", what, formats);
        return -1;
    }
    return 0;
}

/* ranges: a list of ints, or an int64 column */
typedef struct { PyObject *list; const int64_t *data; Py_ssize_t len; Py_buffer view; int has_view; } seq_t;

static int seq_open(PyObject *obj, seq_t *s, const char *what)
{
    memset(s, 0, sizeof(*s));
    if (PyList_Check(obj)) {
        s->list = obj;
        s->len = PyList_GET_SIZE(obj);
        return 0;
    }
    if (column(obj, &s->view, 8, "qlQL", what) < 0)
        return -1;
    s->has_view = 1;
    s->data = s->view.buf;
    s->len = s->view.len / 8;
    return 0;
}

static inline int seq_get(const seq_t *s, Py_ssize_t i, int64_t *out)
{
    if (s->list)
        return item(s->list, i, out);
    *out = s->data[i];
    return 0;
}

static void seq_close(seq_t *s)
{
    if (s->has_view)
        PyBuffer_Release(&s->view);
    s->has_view = 0;
}

/* A MemoryMap's columns (reader.py): int64 starts, sizes, offsets; uint8 kinds; uint16 depths; and its
 * table, the pages file of each depth (a list). */
typedef struct {
    const int64_t *starts, *sizes, *offsets;
    const uint8_t *kinds;
    const uint16_t *depths;
    PyObject *table;
    Py_ssize_t count;
    Py_buffer views[5];
    int open;
} map_t;

static void map_close(map_t *m)
{
    for (int k = 0; k < m->open; k++)
        PyBuffer_Release(&m->views[k]);
    m->open = 0;
}

static int map_open(map_t *m, PyObject *starts, PyObject *sizes, PyObject *kinds, PyObject *depths,
                    PyObject *offsets, PyObject *table)
{
    memset(m, 0, sizeof(*m));
    PyObject *objs[5] = {starts, sizes, offsets, kinds, depths};
    const Py_ssize_t sizes_of[5] = {8, 8, 8, 1, 2};
    const char *formats[5] = {"ql", "ql", "ql", "B", "H"};
    for (int k = 0; k < 5; k++) {
        if (column(objs[k], &m->views[k], sizes_of[k], formats[k], "map columns") < 0)
            goto fail;
        m->open++;
    }
    m->count = m->views[0].len / 8;
    for (int k = 1; k < 5; k++)
        if (m->views[k].len / sizes_of[k] != m->count) {
            PyErr_SetString(PyExc_ValueError, "map columns differ in length");
            goto fail;
        }
    if (!PyList_Check(table)) {
        PyErr_SetString(PyExc_TypeError, "the map's table must be a list");
        goto fail;
    }
    m->starts = m->views[0].buf;
    m->sizes = m->views[1].buf;
    m->offsets = m->views[2].buf;
    m->kinds = m->views[3].buf;
    m->depths = m->views[4].buf;
    m->table = table;
    return 0;
fail:
    map_close(m);
    return -1;
}

/* Index of the first run whose end is above `vaddr` (count if none): MemoryMap.index_at. */
static Py_ssize_t map_index_at(const map_t *m, int64_t vaddr)
{
    Py_ssize_t lo = 0, hi = m->count;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (vaddr < m->starts[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    Py_ssize_t i = lo - 1;
    if (i >= 0 && m->starts[i] + m->sizes[i] > vaddr)
        return i;
    return i + 1;
}

/* --- a small table of objects (pages files) by identity --------------------------------- */

typedef struct { PyObject **items; Py_ssize_t len, cap, last; } table_t;

static int64_t table_index(table_t *t, PyObject *obj)
{
    if (t->last >= 0 && t->items[t->last] == obj)
        return t->last;
    for (Py_ssize_t k = 0; k < t->len; k++)
        if (t->items[k] == obj)
            return t->last = k;
    if (t->len == t->cap) {
        Py_ssize_t cap = t->cap ? t->cap * 2 : 8;
        PyObject **items = PyMem_Realloc(t->items, (size_t)cap * sizeof(PyObject *));
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        t->items = items;
        t->cap = cap;
    }
    t->items[t->len] = obj;
    return t->last = t->len++;
}

/* The index in `t` of the pages file of run i of `m` (its depth's in the map's table). */
static int64_t run_file(table_t *t, const map_t *m, Py_ssize_t i)
{
    Py_ssize_t d = m->depths[i];
    if (d >= PyList_GET_SIZE(m->table) || PyList_GET_ITEM(m->table, d) == Py_None) {
        PyErr_SetString(PyExc_ValueError, "a present run's depth has no pages file in the map's table");
        return -1;
    }
    return table_index(t, PyList_GET_ITEM(m->table, d));
}

static PyObject *table_list(table_t *t)
{
    PyObject *out = PyList_New(t->len);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < t->len; k++) {
        Py_INCREF(t->items[k]);
        PyList_SET_ITEM(out, k, t->items[k]);
    }
    return out;
}

/* --- plan ------------------------------------------------------------------------------- */

/* Extend `last` by a piece that continues it in its pages file and at its destination: 1 if it did. */
static inline int piece_extends(piece_t *last, int64_t file, int64_t offset, int64_t dest, int64_t length)
{
    if (last == NULL || last->file != file || last->offset + last->length != offset || last->dest + last->length != dest)
        return 0;
    last->length += length;
    return 1;
}

/* What planning a covered run of `kind` gives: P_OK (present: data in a pages file), P_LAZY or P_BROKEN. */
static inline int run_status(int kind)
{
    return kind == K_PRESENT ? P_OK : kind == K_LAZY ? P_LAZY : P_BROKEN;
}

PyDoc_STRVAR(plan_doc,
"plan(starts, sizes, kinds, depths, offsets, table, vaddr, end, holes) -> (status, a, b, pieces, holes, files)\n\n"
"Plan a read of [vaddr, end) over a MemoryMap's columns (typed arrays; a present run's pages file is\n"
"table[depth]). holes: 0 error, 1 zero, 2 skip.\n"
"status 0: pieces (bytes of int64 file, offset, dest_offset, length; file indexes `files`) and, for\n"
"holes=zero, holes (bytes of int64 start, stop pairs); 1: a hole at [a, b) with holes=error;\n"
"2: lazy pages at [a, b); 3: run a is broken (its error is the map's).");

static PyObject *fast_plan(PyObject *self, PyObject *args)
{
    PyObject *starts, *sizes, *kinds, *depths, *offsets, *tab;
    long long vaddr_ll, end_ll;
    int mode;
    if (!PyArg_ParseTuple(args, "OOOOOOLLi", &starts, &sizes, &kinds, &depths, &offsets, &tab, &vaddr_ll, &end_ll,
                          &mode))
        return NULL;
    if (mode < H_ERROR || mode > H_SKIP) {
        PyErr_SetString(PyExc_ValueError, "holes must be 0, 1 or 2");
        return NULL;
    }
    map_t m;
    if (map_open(&m, starts, sizes, kinds, depths, offsets, tab) < 0)
        return NULL;
    const int64_t vaddr = vaddr_ll, end = end_ll;
    const Py_ssize_t count = m.count;
    vec_t holes = {0};
    table_t table = {NULL, 0, 0, -1};
    PyObject *result = NULL;
    int status = P_OK;
    int64_t a = 0, b = 0;
    Py_ssize_t i = map_index_at(&m, vaddr);
    /* at most one piece per run the range meets: runs i.. up to the first that starts at or past end */
    Py_ssize_t lo = i, hi = count;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (m.starts[mid] < end)
            lo = mid + 1;
        else
            hi = mid;
    }
    out_t pieces = {NULL, NULL};
    if (out_open(&pieces, lo - i, sizeof(piece_t)) < 0) {
        map_close(&m);
        return NULL;
    }
    piece_t *out = (piece_t *)pieces.data;
    Py_ssize_t npieces = 0;
    piece_t *last = NULL;
    int64_t pos = vaddr;
    while (pos < end) {
        int64_t start = i < count ? m.starts[i] : 0, kind = -1, stop;
        if (i >= count || start >= end) {
            stop = end;
        } else if (start > pos) {
            stop = start;
        } else {
            kind = m.kinds[i];
            stop = start + m.sizes[i] < end ? start + m.sizes[i] : end;
            if (stop <= pos) { /* an empty run */
                i++;
                continue;
            }
        }
        if (kind < 0) { /* not covered: a hole */
            if (mode == H_ERROR) {
                status = P_HOLE, a = pos, b = stop;
                break;
            }
            if (mode == H_ZERO) {
                int64_t *pair = vec_add(&holes, 2 * sizeof(int64_t));
                if (pair == NULL)
                    goto done;
                pair[0] = pos;
                pair[1] = stop;
            }
            pos = stop;
            continue;
        }
        if ((status = run_status((int)kind)) != P_OK) {
            a = status == P_LAZY ? pos : i, b = stop;
            break;
        }
        int64_t file = run_file(&table, &m, i);
        if (file < 0)
            goto done;
        int64_t offset = m.offsets[i] + pos - start;
        int64_t dest = pos - vaddr, length = stop - pos;
        if (!piece_extends(last, file, offset, dest, length)) {
            last = &out[npieces++];
            last->file = file;
            last->offset = offset;
            last->dest = dest;
            last->length = length;
        }
        pos = stop;
        i++;
    }
    {
        PyObject *p = out_finish(&pieces, npieces * (Py_ssize_t)sizeof(piece_t)), *h = vec_bytes(&holes);
        PyObject *f = table_list(&table);
        if (p && h && f)
            result = Py_BuildValue("iLLNNN", status, (long long)a, (long long)b, p, h, f);
        else {
            Py_XDECREF(p);
            Py_XDECREF(h);
            Py_XDECREF(f);
        }
    }
done:
    map_close(&m);
    out_close(&pieces);
    PyMem_Free(holes.data);
    PyMem_Free(table.items);
    return result;
}

/* --- pack: many ranges one after another into one buffer -------------------------------- */

PyDoc_STRVAR(pack_doc,
"pack(starts, sizes, kinds, depths, offsets, table, rstarts, rends, first, dest, gap, stop=-1) -> "
"(status, a, b, next, used, pieces, addresses, files)\n\n"
"Plan a read of the ranges [rstarts[k], rends[k]) (lists of ints or int64 columns) from k = first on\n"
"over a MemoryMap's columns (as plan()'s) into `dest` one after another, `gap` bytes after each (zeroed\n"
"here), as many as fit with their gaps, and none from `stop` on (>= 0: a windowed map holds ranges up to it).\n"
"status 0: next is the index past the last range planned, used the bytes of dest they take (gaps\n"
"included); pieces as plan()'s (dest_offset in dest) and addresses (bytes of int64: each piece's\n"
"address in memory). 1: a hole at [a, b); 2: lazy pages at [a, b); 3: run a is broken;\n"
"4: an address past 2**62 (plan in Python). ValueError if the first range does not fit.");

#define PACK_LIMIT ((int64_t)1 << 62)

static PyObject *fast_pack(PyObject *self, PyObject *args)
{
    PyObject *starts, *sizes, *kinds, *depths, *offsets, *tab, *rstarts_obj, *rends_obj;
    Py_ssize_t first, gap, stop = -1;
    Py_buffer dest;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnw*n|n", &starts, &sizes, &kinds, &depths, &offsets, &tab, &rstarts_obj,
                          &rends_obj, &first, &dest, &gap, &stop))
        return NULL;
    vec_t pieces = {0}, addrs = {0};
    table_t table = {NULL, 0, 0, -1};
    PyObject *result = NULL;
    map_t m = {0};
    seq_t rstarts = {0}, rends = {0};
    if (map_open(&m, starts, sizes, kinds, depths, offsets, tab) < 0)
        goto done;
    if (seq_open(rstarts_obj, &rstarts, "ranges") < 0 || seq_open(rends_obj, &rends, "ranges") < 0)
        goto done;
    const Py_ssize_t count = m.count;
    Py_ssize_t nranges = rstarts.len;
    if (rends.len != nranges) {
        PyErr_SetString(PyExc_ValueError, "range starts and ends differ in length");
        goto done;
    }
    if (stop >= 0 && stop < nranges)
        nranges = stop; /* the ranges from `stop` on are not packed (the map may not hold them) */
    if (first < 0 || first >= nranges || gap < 0) {
        PyErr_SetString(PyExc_ValueError, "first must index a range and gap must not be negative");
        goto done;
    }
    char *base = dest.buf;
    const Py_ssize_t cap = dest.len;
    int status = P_OK;
    int64_t a = 0, b = 0, used = 0;
    Py_ssize_t k = first;
    piece_t *last = NULL;
    int64_t last_vaddr = 0, prev_end = 0;
    Py_ssize_t i = 0;
    for (; k < nranges; k++) {
        int64_t rs, re;
        if (seq_get(&rstarts, k, &rs) < 0 || seq_get(&rends, k, &re) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                goto done;
            PyErr_Clear();
            status = 4;
            break;
        }
        if (rs < 0 || re >= PACK_LIMIT) {
            status = 4;
            break;
        }
        if (re <= rs) {
            PyErr_SetString(PyExc_ValueError, "a range is empty or reversed");
            goto done;
        }
        if (re - rs > cap - used - gap) {
            if (k == first) {
                PyErr_SetString(PyExc_ValueError, "the first range and its gap do not fit the buffer");
                goto done;
            }
            break;
        }
        /* the map's run at rs: a few steps on from the previous range's (ranges in address order), else
         * a binary search */
        int found = 0;
        if (k > first && rs >= prev_end) {
            for (int step = 0; step < 8 && i < count; step++, i++)
                if (m.starts[i] + m.sizes[i] > rs) {
                    found = 1;
                    break;
                }
            found = found || i >= count;
        }
        if (!found)
            i = map_index_at(&m, rs);
        prev_end = re;
        int64_t pos = rs;
        while (pos < re) {
            int64_t start = i < count ? m.starts[i] : 0;
            if (i >= count || start > pos) {
                status = P_HOLE, a = pos, b = i < count && start < re ? start : re;
                goto planned;
            }
            int64_t kind = m.kinds[i];
            int64_t stop = start + m.sizes[i] < re ? start + m.sizes[i] : re;
            if (stop <= pos) { /* an empty run */
                i++;
                continue;
            }
            if (kind == K_LAZY) {
                status = P_LAZY, a = pos, b = stop;
                goto planned;
            }
            if (kind != K_PRESENT) {
                status = P_BROKEN, a = i;
                goto planned;
            }
            int64_t file = run_file(&table, &m, i);
            if (file < 0)
                goto done;
            int64_t offset = m.offsets[i] + pos - start;
            int64_t at = used + (pos - rs), length = stop - pos;
            if (last != NULL && last->file == file && last->offset + last->length == offset
                    && last->dest + last->length == at && last_vaddr + last->length == pos) {
                last->length += length;
            } else {
                last = vec_add(&pieces, sizeof(piece_t));
                int64_t *addr = last ? vec_add(&addrs, sizeof(int64_t)) : NULL;
                if (addr == NULL)
                    goto done;
                last->file = file;
                last->offset = offset;
                last->dest = at;
                last->length = length;
                *addr = last_vaddr = pos;
            }
            pos = stop;
            i++;
        }
        used += re - rs;
        memset(base + used, 0, (size_t)gap);
        used += gap;
    }
planned:
    {
        PyObject *p = vec_bytes(&pieces), *v = vec_bytes(&addrs), *f = table_list(&table);
        if (p && v && f)
            result = Py_BuildValue("iLLnLNNN", status, (long long)a, (long long)b, k, (long long)used, p, v, f);
        else {
            Py_XDECREF(p);
            Py_XDECREF(v);
            Py_XDECREF(f);
        }
    }
done:
    map_close(&m);
    seq_close(&rstarts);
    seq_close(&rends);
    PyMem_Free(pieces.data);
    PyMem_Free(addrs.data);
    PyMem_Free(table.items);
    PyBuffer_Release(&dest);
    return result;
}

/* --- parse_pagemap: entries as CRIU writes them, in one pass ------------------------------ */

PyDoc_STRVAR(parse_pagemap_doc,
"parse_pagemap(data, pos, offset, page_size, limit, prev_end, layout, count, partial=0)\n"
"    -> (starts, sizes, flags, offsets, layout, offset, pos, prev_end) | None\n\n"
"pagemap.py's one-pass parser, up to `count` entries of `data` from `pos` on (frames of a one-byte\n"
"size, three zero bytes, then fields 1 vaddr, 2 nr_pages, 4 flags (one byte) and in the 4.2 layout 5\n"
"nr_pages, field 2 then 0), all of one layout (`layout` so far: \"\", \"4.1\" or \"4.2\"), valid (known\n"
"flags, not present and parent, page-aligned, in order from `prev_end` on, ending by `limit`, 4.1 page\n"
"counts below 2**32). Columns as bytes: int64 starts, sizes in bytes and pages-file offsets (from\n"
"`offset` on, -1 without PE_PRESENT), uint8 flags; then the layout, the offset past the last present\n"
"page, the position past the last entry read and its end, to go on from. None if an entry is not such\n"
"(the general decoder then reads them and names what is wrong). With `partial`, `data` is a part of the\n"
"image read so far: an entry cut by its end stops the parse there (the columns may then be empty).");

/* A varint of at most `max` bytes at *p (before end); 0 if there is none, or its value is 2**63 or more. */
static int varint(const unsigned char **p, const unsigned char *end, int max, uint64_t *out)
{
    uint64_t value = 0;
    for (int k = 0; k < max && *p < end; k++) {
        unsigned char byte = *(*p)++;
        uint64_t bits = byte & 0x7F;
        if (k == 9 && bits)
            return 0;
        value |= bits << (7 * k);
        if (!(byte & 0x80)) {
            *out = value;
            return 1;
        }
    }
    return 0;
}

static PyObject *fast_parse_pagemap(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t pos, count;
    long long offset_ll, page_size_ll, limit_ll, prev_ll;
    const char *layout_in;
    int partial = 0;
    if (!PyArg_ParseTuple(args, "y*nLLLLsn|p", &data, &pos, &offset_ll, &page_size_ll, &limit_ll, &prev_ll, &layout_in,
                          &count, &partial))
        return NULL;
    PyObject *result = NULL;
    vec_t cols[4] = {{0}, {0}, {0}, {0}};
    const int64_t page_size = page_size_ll, limit = limit_ll;
    int layout = strcmp(layout_in, "4.1") == 0 ? 41 : strcmp(layout_in, "4.2") == 0 ? 42 : 0; /* 0: none yet */
    if (pos < 0 || pos > data.len || page_size <= 0 || (page_size & (page_size - 1)) || limit <= 0 || count < 1
            || (!layout && *layout_in)) {
        PyErr_SetString(PyExc_ValueError, "bad position, page size, limit, layout or count");
        goto done;
    }
    const unsigned char *p = (const unsigned char *)data.buf + pos, *end = (const unsigned char *)data.buf + data.len;
    int64_t offset = offset_ll, prev_end = prev_ll;
    Py_ssize_t n = 0;
    while (p < end && n < count) {
        if (partial && (end - p < 4 || (!p[1] && !p[2] && !p[3] && end - (p + 4) < p[0])))
            break; /* the rest of this entry is not read yet */
        if (end - p < 4 || p[1] || p[2] || p[3] || end - (p + 4) < p[0])
            goto none;
        const unsigned char *q = p + 4, *qe = p + 4 + p[0];
        uint64_t vaddr, compat, nr = 0;
        if (q >= qe || *q++ != 0x08 || !varint(&q, qe, 10, &vaddr))
            goto none;
        if (q >= qe || *q++ != 0x10)
            goto none;
        const unsigned char *compat_at = q;
        if (!varint(&q, qe, 5, &compat))
            goto none;
        const Py_ssize_t compat_len = q - compat_at;
        if (qe - q < 2 || q[0] != 0x20 || q[1] & 0x80)
            goto none;
        const int flags = q[1];
        q += 2;
        int here = 41;
        if (q < qe) {
            /* 4.2: field 5 ends the entry; field 2 is one zero byte */
            if (*q++ != 0x28 || !varint(&q, qe, 10, &nr) || q != qe || compat_len != 1 || compat != 0)
                goto none;
            here = 42;
        } else {
            nr = compat;
            if (nr > 0xFFFFFFFFu)
                goto none;
        }
        if (layout && layout != here)
            goto none;
        layout = here;
        if (flags < 1 || flags > 7 || (flags & 5) == 5 || nr < 1 || (vaddr & (uint64_t)(page_size - 1))
                || vaddr > (uint64_t)limit || nr > (uint64_t)(limit / page_size)
                || (int64_t)vaddr + (int64_t)nr * page_size > limit || (int64_t)vaddr < prev_end)
            goto none;
        const int64_t start = (int64_t)vaddr, size = (int64_t)nr * page_size, off = flags & 4 ? offset : -1;
        int64_t *a = vec_add(&cols[0], 8), *b = vec_add(&cols[1], 8), *o = vec_add(&cols[3], 8);
        unsigned char *f = vec_add(&cols[2], 1);
        if (!a || !b || !o || !f)
            goto done;
        *a = start, *b = size, *o = off, *f = (unsigned char)flags;
        if (flags & 4)
            offset += size;
        prev_end = start + size;
        p = qe;
        n++;
    }
    if (!n && !partial)
        goto none;
    {
        PyObject *v[4];
        for (int k = 0; k < 4; k++)
            v[k] = vec_bytes(&cols[k]);
        if (v[0] && v[1] && v[2] && v[3])
            result = Py_BuildValue("NNNNsLnL", v[0], v[1], v[2], v[3], layout == 42 ? "4.2" : layout == 41 ? "4.1" : "",
                                   (long long)offset, (Py_ssize_t)(p - (const unsigned char *)data.buf),
                                   (long long)prev_end);
        else
            for (int k = 0; k < 4; k++)
                Py_XDECREF(v[k]);
    }
    goto done;
none:
    result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < 4; k++)
        PyMem_Free(cols[k].data);
    PyBuffer_Release(&data);
    return result;
}

/* --- resolve: a chain level over its parent's map --------------------------------------- */

PyDoc_STRVAR(resolve_doc,
"resolve(vaddrs, sizes, flags, offsets, depth, parent, into) -> broken\n\n"
"The map of one chain level from its pagemap columns (int64 vaddrs, sizes, offsets; uint8 flags): an\n"
"entry with PE_PRESENT has its data in this level's pages file at its offset; a PE_PARENT one takes the\n"
"runs of the parent's map over its range (`parent`: its columns starts, sizes, kinds, flags, offsets,\n"
"depths, or None), clipped; PE_LAZY alone is a lazy run. Where a PE_PARENT range has no run in the parent\n"
"a BROKEN run (flags 0, this level's depth) is made. The map's runs are written into `into`, its columns\n"
"(int64 starts, sizes; uint8 kinds, flags; int64 offsets; uint16 depths) of resolve_count()'s length,\n"
"in place (the memory the map keeps is the only memory touched); returned: for each BROKEN run,\n"
"(index, start, stop, parent_index), parent_index -1 for such a gap, else the parent's broken run it\n"
"copies; the caller gives them their errors.");

PyDoc_STRVAR(resolve_count_doc,
"resolve_count(vaddrs, sizes, flags, offsets, depth, parent) -> int\n\n"
"The number of runs resolve() makes of these columns: the length of its `into` columns.");

#define PE_PARENT 1
#define PE_PRESENT 4

/* The resolved map's columns: the caller's (resolve's `into`), written in place; none when only counting. */
typedef struct {
    Py_buffer views[6]; /* starts, sizes, kinds, flags, offsets, depths */
    int nviews;
    int64_t *starts, *sizes, *offsets;
    uint8_t *kinds, *flags;
    uint16_t *depths;
    Py_ssize_t n, cap;
} runs_t;

static int runs_open(runs_t *r, PyObject *into)
{
    memset(r, 0, sizeof(*r));
    if (into == NULL) {
        r->cap = PY_SSIZE_T_MAX; /* counting */
        return 0;
    }
    if (!PyTuple_Check(into) || PyTuple_GET_SIZE(into) != 6) {
        PyErr_SetString(PyExc_TypeError, "into must be a tuple of six columns");
        return -1;
    }
    const Py_ssize_t size[6] = {8, 8, 1, 1, 8, 2};
    const char *fmt[6] = {"ql", "ql", "B", "B", "ql", "H"};
    for (; r->nviews < 6; r->nviews++) {
        Py_buffer *v = &r->views[r->nviews];
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(into, r->nviews), v, PyBUF_WRITABLE | PyBUF_FORMAT
                               | PyBUF_C_CONTIGUOUS) < 0)
            return -1;
        const char *f = v->format ? v->format : "B";
        if (*f == '@' || *f == '=')
            f++;
        if (v->itemsize != size[r->nviews] || f[0] == '\0' || f[1] != '\0' || !strchr(fmt[r->nviews], f[0])) {
            r->nviews++;
            PyErr_SetString(PyExc_TypeError, "into: columns of the map's formats (q, q, B, B, q, H)");
            return -1;
        }
        if (r->nviews && v->len / v->itemsize != r->cap) {
            r->nviews++;
            PyErr_SetString(PyExc_ValueError, "into: columns differ in length");
            return -1;
        }
        r->cap = v->len / v->itemsize;
    }
    r->starts = r->views[0].buf, r->sizes = r->views[1].buf, r->kinds = r->views[2].buf;
    r->flags = r->views[3].buf, r->offsets = r->views[4].buf, r->depths = r->views[5].buf;
    return 0;
}

static void runs_close(runs_t *r)
{
    for (int k = 0; k < r->nviews; k++)
        PyBuffer_Release(&r->views[k]);
    r->nviews = 0;
}

static int add_run(runs_t *r, int64_t start, int64_t size, int kind, int flags, int64_t offset, int depth)
{
    if (r->n >= r->cap) {
        PyErr_SetString(PyExc_ValueError, "into: shorter than the runs (resolve_count's length)");
        return -1;
    }
    Py_ssize_t n = r->n++;
    if (r->starts == NULL) /* counting */
        return 0;
    r->starts[n] = start, r->sizes[n] = size, r->offsets[n] = offset;
    r->kinds[n] = (uint8_t)kind, r->flags[n] = (uint8_t)flags, r->depths[n] = (uint16_t)depth;
    return 0;
}

static int note_broken(PyObject *broken, Py_ssize_t index, int64_t start, int64_t stop, Py_ssize_t parent_index)
{
    PyObject *t = Py_BuildValue("(nLLn)", index, (long long)start, (long long)stop, parent_index);
    if (t == NULL)
        return -1;
    int rc = PyList_Append(broken, t);
    Py_DECREF(t);
    return rc;
}

/* resolve() and resolve_count(): `into` NULL counts the runs. */
static PyObject *resolve_impl(PyObject *args, int counting)
{
    PyObject *vaddrs_o, *sizes_o, *flags_o, *offsets_o, *parent, *into = NULL;
    int depth;
    if (counting ? !PyArg_ParseTuple(args, "OOOOiO", &vaddrs_o, &sizes_o, &flags_o, &offsets_o, &depth, &parent)
                 : !PyArg_ParseTuple(args, "OOOOiOO", &vaddrs_o, &sizes_o, &flags_o, &offsets_o, &depth, &parent,
                                     &into))
        return NULL;
    if (depth < 0 || depth > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "depth out of range");
        return NULL;
    }
    Py_buffer v[4], pv[6];
    int nv = 0, npv = 0;
    PyObject *result = NULL, *broken = NULL;
    runs_t out;
    memset(&out, 0, sizeof(out));
    PyObject *objs[4] = {vaddrs_o, sizes_o, offsets_o, flags_o};
    const Py_ssize_t isz[4] = {8, 8, 8, 1};
    const char *fmt[4] = {"ql", "ql", "ql", "B"};
    for (; nv < 4; nv++)
        if (column(objs[nv], &v[nv], isz[nv], fmt[nv], "pagemap columns") < 0)
            goto done;
    const Py_ssize_t n = v[0].len / 8;
    if (v[1].len / 8 != n || v[2].len / 8 != n || v[3].len != n) {
        PyErr_SetString(PyExc_ValueError, "pagemap columns differ in length");
        goto done;
    }
    const int64_t *vaddrs = v[0].buf, *sizes = v[1].buf, *offsets = v[2].buf;
    const uint8_t *flags = v[3].buf;
    /* the parent's map: starts, sizes, kinds, flags, offsets, depths */
    const int64_t *ps_ = NULL, *pz_ = NULL, *po_ = NULL;
    const uint8_t *pk_ = NULL, *pf_ = NULL;
    const uint16_t *pd_ = NULL;
    Py_ssize_t pcount = 0;
    if (parent != Py_None) {
        if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) != 6) {
            PyErr_SetString(PyExc_TypeError, "parent must be None or a tuple of six columns");
            goto done;
        }
        const Py_ssize_t psz[6] = {8, 8, 1, 1, 8, 2};
        const char *pfmt[6] = {"ql", "ql", "B", "B", "ql", "H"};
        for (; npv < 6; npv++)
            if (column(PyTuple_GET_ITEM(parent, npv), &pv[npv], psz[npv], pfmt[npv], "parent columns") < 0)
                goto done;
        pcount = pv[0].len / 8;
        for (int k = 1; k < 6; k++)
            if (pv[k].len / psz[k] != pcount) {
                PyErr_SetString(PyExc_ValueError, "parent columns differ in length");
                goto done;
            }
        ps_ = pv[0].buf, pz_ = pv[1].buf, pk_ = pv[2].buf, pf_ = pv[3].buf, po_ = pv[4].buf, pd_ = pv[5].buf;
    }
    broken = counting ? Py_None : PyList_New(0);
    if (counting)
        Py_INCREF(broken);
    if (broken == NULL || runs_open(&out, into) < 0)
        goto done;
    Py_ssize_t j = 0; /* entries are in address order: the parent runs before an entry are never needed again */
    for (Py_ssize_t e = 0; e < n; e++) {
        const int64_t vaddr = vaddrs[e], size = sizes[e];
        const int f = flags[e];
        if (f & PE_PRESENT) {
            if (add_run(&out, vaddr, size, K_PRESENT, f, offsets[e], depth) < 0)
                goto done;
            continue;
        }
        if (!(f & PE_PARENT)) {
            if (f && add_run(&out, vaddr, size, K_LAZY, f, -1, depth) < 0)
                goto done;
            continue;
        }
        const int64_t end = vaddr + size;
        int64_t pos = vaddr;
        while (j < pcount && ps_[j] + pz_[j] <= vaddr) /* the first parent run that ends above vaddr */
            j++;
        for (Py_ssize_t k = j; pos < end; k++) {
            int64_t next = k >= pcount || ps_[k] >= end ? end : ps_[k];
            if (next > pos) { /* the parent lacks [pos, next) */
                if ((!counting && note_broken(broken, out.n, pos, next, -1) < 0)
                        || add_run(&out, pos, next - pos, K_BROKEN, 0, -1, depth) < 0)
                    goto done;
                pos = next;
            }
            if (pos >= end)
                break;
            const int64_t stop = ps_[k] + pz_[k] < end ? ps_[k] + pz_[k] : end, poff = po_[k];
            if (!counting && pk_[k] == K_BROKEN && note_broken(broken, out.n, pos, stop, k) < 0)
                goto done;
            if (add_run(&out, pos, stop - pos, pk_[k], pf_[k], poff >= 0 ? poff + pos - ps_[k] : -1, pd_[k]) < 0)
                goto done;
            pos = stop;
        }
    }
    if (counting) {
        result = PyLong_FromSsize_t(out.n);
    } else if (out.n != out.cap) {
        PyErr_SetString(PyExc_ValueError, "into: longer than the runs (resolve_count's length)");
    } else {
        result = broken;
        Py_INCREF(result);
    }
done:
    for (int k = 0; k < nv; k++)
        PyBuffer_Release(&v[k]);
    for (int k = 0; k < npv; k++)
        PyBuffer_Release(&pv[k]);
    runs_close(&out);
    Py_XDECREF(broken);
    return result;
}

static PyObject *fast_resolve(PyObject *self, PyObject *args)
{
    return resolve_impl(args, 0);
}

static PyObject *fast_resolve_count(PyObject *self, PyObject *args)
{
    return resolve_impl(args, 1);
}

/* --- runs: a map's readable runs over a range, joined ------------------------------------ */

PyDoc_STRVAR(runs_doc,
"runs(starts, sizes, kinds, i, j, lo, hi, lazy_ok) -> (starts, ends, lazy, broken)\n\n"
"memory.py's _map_runs: the runs i..j-1 of a MemoryMap's columns (int64 starts and sizes, uint8 kinds),\n"
"the first clipped to start at lo and the last to end at hi, LAZY ones left out (their bytes counted in\n"
"`lazy`) unless lazy_ok, runs back to back joined: bytes of int64 starts and ends. broken: the index of\n"
"the first BROKEN run among them (the caller raises its error; nothing else is then given), else -1.");

static PyObject *fast_runs(PyObject *self, PyObject *args)
{
    PyObject *starts_o, *sizes_o, *kinds_o;
    Py_ssize_t i, j;
    long long lo, hi;
    int lazy_ok;
    if (!PyArg_ParseTuple(args, "OOOnnLLp", &starts_o, &sizes_o, &kinds_o, &i, &j, &lo, &hi, &lazy_ok))
        return NULL;
    Py_buffer v[3];
    int nv = 0;
    PyObject *result = NULL;
    vec_t out_s = {0}, out_e = {0};
    PyObject *objs[3] = {starts_o, sizes_o, kinds_o};
    const Py_ssize_t isz[3] = {8, 8, 1};
    const char *fmt[3] = {"ql", "ql", "B"};
    for (; nv < 3; nv++)
        if (column(objs[nv], &v[nv], isz[nv], fmt[nv], "map columns") < 0)
            goto done;
    const Py_ssize_t count = v[0].len / 8;
    if (v[1].len / 8 != count || v[2].len != count) {
        PyErr_SetString(PyExc_ValueError, "map columns differ in length");
        goto done;
    }
    if (i < 0 || j > count || i > j) {
        PyErr_SetString(PyExc_ValueError, "run indexes out of range");
        goto done;
    }
    const int64_t *starts = v[0].buf, *sizes = v[1].buf;
    const uint8_t *kinds = v[2].buf;
    for (Py_ssize_t k = i; k < j; k++)
        if (kinds[k] == K_BROKEN) {
            result = Py_BuildValue("yyLn", "", "", 0LL, k);
            goto done;
        }
    int64_t lazy = 0, *last_end = NULL;
    for (Py_ssize_t k = i; k < j; k++) {
        int64_t a = starts[k], b = starts[k] + sizes[k];
        if (k == i && a < lo)
            a = lo;
        if (k == j - 1 && b > hi)
            b = hi;
        if (kinds[k] == K_LAZY && !lazy_ok) {
            lazy += b - a;
            continue;
        }
        if (last_end != NULL && *last_end == a) {
            *last_end = b;
            continue;
        }
        int64_t *s = vec_add(&out_s, 8), *e = vec_add(&out_e, 8);
        if (s == NULL || e == NULL)
            goto done;
        *s = a;
        *e = b;
        last_end = (int64_t *)(out_e.data + out_e.len - 8);
    }
    {
        PyObject *s = vec_bytes(&out_s), *e = vec_bytes(&out_e);
        if (s && e)
            result = Py_BuildValue("NNLn", s, e, (long long)lazy, (Py_ssize_t)-1);
        else {
            Py_XDECREF(s);
            Py_XDECREF(e);
        }
    }
done:
    for (int k = 0; k < nv; k++)
        PyBuffer_Release(&v[k]);
    PyMem_Free(out_s.data);
    PyMem_Free(out_e.data);
    return result;
}

/* --- preadv's queue ---------------------------------------------------------------------- */

static rec_t *records_extend(PyObject *records, Py_ssize_t n)
{
    if (!PyByteArray_Check(records)) {
        PyErr_SetString(PyExc_TypeError, "records must be a bytearray");
        return NULL;
    }
    Py_ssize_t old = PyByteArray_GET_SIZE(records);
    if (old % (Py_ssize_t)sizeof(rec_t)) {
        PyErr_SetString(PyExc_ValueError, "records: not whole records");
        return NULL;
    }
    if (PyByteArray_Resize(records, old + n * (Py_ssize_t)sizeof(rec_t)) < 0)
        return NULL;
    return (rec_t *)(PyByteArray_AS_STRING(records) + old);
}

static int check_pieces(Py_buffer *view, Py_ssize_t *n)
{
    if (view->len % (Py_ssize_t)sizeof(piece_t)) {
        PyErr_SetString(PyExc_ValueError, "pieces: not whole pieces");
        return -1;
    }
    *n = view->len / (Py_ssize_t)sizeof(piece_t);
    return 0;
}

/* The pieces' bytes (and their files) fit the buffer and the table. */
static int check_fit(const piece_t *pieces, Py_ssize_t n, Py_ssize_t dest_len, Py_ssize_t files)
{
    for (Py_ssize_t k = 0; k < n; k++) {
        const piece_t *p = &pieces[k];
        if (p->file < 0 || p->file >= files || p->dest < 0 || p->length <= 0 || p->offset < 0
                || p->length > dest_len - p->dest) {
            PyErr_SetString(PyExc_ValueError, "a piece lies outside its buffer or names no file");
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(queue_scatter_doc,
"queue_scatter(records, fd, offset, dest, dest_offsets, lengths) -> int\n\n"
"Append a ScatterRequest (or, with dest_offsets None, one request filling all of dest).");

static PyObject *fast_queue_scatter(PyObject *self, PyObject *args)
{
    PyObject *records, *offs, *lens;
    long long fd, offset;
    Py_buffer dest;
    if (!PyArg_ParseTuple(args, "OLLw*OO", &records, &fd, &offset, &dest, &offs, &lens))
        return NULL;
    PyObject *result = NULL;
    if (offs == Py_None) {
        Py_ssize_t n = dest.len > 0;
        rec_t *r = records_extend(records, n);
        if (r == NULL)
            goto done;
        if (n) {
            r->fd = fd;
            r->offset = offset;
            r->addr = (int64_t)(intptr_t)dest.buf;
            r->length = dest.len;
        }
        result = PyLong_FromSsize_t(n);
        goto done;
    }
    if (!PyList_Check(offs) || !PyList_Check(lens) || PyList_GET_SIZE(offs) != PyList_GET_SIZE(lens)) {
        PyErr_SetString(PyExc_TypeError, "dest_offsets and lengths must be lists of one length");
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(offs), used = 0;
    Py_ssize_t old = PyByteArray_Check(records) ? PyByteArray_GET_SIZE(records) : 0;
    rec_t *r = records_extend(records, n);
    if (r == NULL)
        goto done;
    char *base = dest.buf;
    for (Py_ssize_t k = 0; k < n; k++) {
        int64_t at, length;
        if (item(offs, k, &at) < 0 || item(lens, k, &length) < 0)
            goto undo;
        if (at < 0 || length < 0 || length > dest.len - at) {
            PyErr_SetString(PyExc_ValueError, "a piece lies outside its buffer");
            goto undo;
        }
        if (length == 0)
            continue;
        r[used].fd = fd;
        r[used].offset = offset;
        r[used].addr = (int64_t)(intptr_t)(base + at);
        r[used].length = length;
        offset += length;
        used++;
    }
    if (PyByteArray_Resize(records, old + used * (Py_ssize_t)sizeof(rec_t)) < 0)
        goto done;
    result = PyLong_FromSsize_t(used);
    goto done;
undo:
    PyByteArray_Resize(records, old);
done:
    PyBuffer_Release(&dest);
    return result;
}

/* fd -> index of its newest run: open addressing (raw allocator: used without the GIL) */
typedef struct { int64_t fd; Py_ssize_t run; } tail_t;
typedef struct { tail_t *slots; size_t mask, used; } tails_t;

static int tails_init(tails_t *t)
{
    t->mask = 63;
    t->used = 0;
    t->slots = PyMem_RawMalloc(64 * sizeof(tail_t));
    if (t->slots == NULL)
        return -1;
    for (size_t k = 0; k < 64; k++)
        t->slots[k].fd = -1;
    return 0;
}

static tail_t *tails_get(tails_t *t, int64_t fd)
{
    size_t h = ((uint64_t)fd * 0x9E3779B97F4A7C15ull) >> 20;
    for (;;) {
        tail_t *s = &t->slots[h & t->mask];
        if (s->fd == fd || s->fd == -1)
            return s;
        h++;
    }
}

static tail_t *tails_put(tails_t *t, int64_t fd)
{
    if (2 * (t->used + 1) > t->mask + 1) {
        size_t cap = 2 * (t->mask + 1);
        tail_t *old = t->slots;
        size_t old_cap = t->mask + 1;
        t->slots = PyMem_RawMalloc(cap * sizeof(tail_t));
        if (t->slots == NULL) {
            t->slots = old;
            return NULL;
        }
        for (size_t k = 0; k < cap; k++)
            t->slots[k].fd = -1;
        t->mask = cap - 1;
        for (size_t k = 0; k < old_cap; k++)
            if (old[k].fd != -1)
                *tails_get(t, old[k].fd) = old[k];
        PyMem_RawFree(old);
    }
    tail_t *s = tails_get(t, fd);
    if (s->fd == -1) {
        s->fd = fd;
        t->used++;
    }
    return s;
}

/* How runs are read: IOV_MAX, and for tests a limit on each call's bytes and a record of its iovecs
 * (`trace`: counts grown with the raw allocator, up to `max_counts` of them). */
typedef struct { int iov_max; long long limit; int *counts; size_t max_counts, ncounts; long long calls; int trace; } io_t;

/* Read `left` iovecs from *offset of fd with preadv, iov_max at a time, again after a short read (the
 * iovecs are advanced: they are the caller's scratch). Returns IO_OK, or IO_SHORT/IO_ERRNO (*err) with
 * *offset where it stopped. Called without the GIL. */
static int read_run(int fd, struct iovec *v, Py_ssize_t left, int64_t *offset, io_t *io, int *err)
{
    while (left > 0) {
        int count = left < io->iov_max ? (int)left : io->iov_max, cut = -1;
        size_t cut_len = 0;
        if (io->limit > 0) { /* tests: ask for at most `limit` bytes */
            size_t room = (size_t)io->limit;
            int c = 0;
            while (c < count && room > 0) {
                if (v[c].iov_len > room) {
                    cut = c, cut_len = v[c].iov_len;
                    v[c].iov_len = room;
                }
                room -= v[c++].iov_len;
            }
            count = c;
        }
        ssize_t got = preadv(fd, v, count, (off_t)*offset);
        if (cut >= 0)
            v[cut].iov_len = cut_len;
        io->calls++;
        if (io->trace) {
            if (io->ncounts == io->max_counts) {
                size_t cap = io->max_counts ? 2 * io->max_counts : 256;
                int *counts = PyMem_RawRealloc(io->counts, cap * sizeof(int));
                if (counts != NULL)
                    io->counts = counts, io->max_counts = cap;
            }
            if (io->ncounts < io->max_counts)
                io->counts[io->ncounts++] = count;
        }
        if (got < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            return IO_ERRNO;
        }
        if (got == 0)
            return IO_SHORT;
        *offset += got;
        while (got > 0 && left > 0) {
            if ((size_t)got >= v->iov_len) {
                got -= (ssize_t)v->iov_len;
                v++;
                left--;
            } else {
                v->iov_base = (char *)v->iov_base + got;
                v->iov_len -= (size_t)got;
                got = 0;
            }
        }
    }
    return IO_OK;
}

PyDoc_STRVAR(preadv_queue_doc,
"preadv_queue(items, iov_max, max_gap, scratch, trace=None, limit=0)\n"
"    -> (calls, gap_bytes, status, fd, offset, errno)\n\n"
"Read preadv's queue, a list of items in the order queued: a plan, (fds, pieces, dest) as pread_plan's,\n"
"or a bytearray of records (int64 fd, offset, address, length: queue_scatter's). A piece contiguous in its\n"
"file with that file's newest run joins it, also across reads of other files (CRIU's queue-and-merge); a\n"
"gap of at most max_gap bytes is read into `scratch`; a destination that continues the run's last iovec\n"
"extends it. One preadv per iov_max iovecs of a run, each as soon as the run has them, the rest when the run\n"
"can grow no more (its file's next piece is elsewhere, or the queue ends); short reads continue. status 0\n"
"ok, 1 end of file at (fd, offset), 2 an error (errno) there. For tests: a list `trace` gets each call's\n"
"iovec count; a `limit` above 0 asks each call for at most that many bytes (short reads).");

/* A run being gathered: its file, the file offset of its first iovec not yet read, its end in the file, and
 * its iovecs not yet read (at most iov_max: a full batch is read before another is added). */
typedef struct {
    int64_t fd, at, end;
    struct iovec *v;
    int n, cap, last_gap, open;
} orun_t;

/* The merge of one queue: the runs by file, the reads' settings and how they went. Used without the GIL. */
typedef struct {
    orun_t *runs;
    Py_ssize_t nruns, cap, last;
    tails_t tails;
    io_t io;
    char *scratch;
    int64_t max_gap;
    long long gap_bytes;
    int status, err;
    int64_t err_fd, err_offset;
} merge_t;

/* Read what `r` has gathered. */
static int merge_flush(merge_t *g, orun_t *r)
{
    if (r->n == 0)
        return IO_OK;
    int64_t at = r->at;
    int status = read_run((int)r->fd, r->v, r->n, &at, &g->io, &g->err);
    r->n = 0;
    if (status != IO_OK) {
        g->status = status, g->err_fd = r->fd, g->err_offset = at;
        return status;
    }
    r->at = at;
    return IO_OK;
}

/* Add an iovec to `r`, reading its full batch first. */
static int merge_push(merge_t *g, orun_t *r, char *addr, size_t length)
{
    if (r->n == g->io.iov_max && merge_flush(g, r) != IO_OK)
        return -1;
    if (r->n == r->cap) {
        int cap = r->cap ? 2 * r->cap : 16;
        if (cap > g->io.iov_max)
            cap = g->io.iov_max;
        struct iovec *v = PyMem_RawRealloc(r->v, (size_t)cap * sizeof(struct iovec));
        if (v == NULL) {
            g->status = IO_ERRNO, g->err = ENOMEM, g->err_fd = r->fd, g->err_offset = r->at;
            return -1;
        }
        r->v = v, r->cap = cap;
    }
    r->v[r->n].iov_base = addr;
    r->v[r->n].iov_len = length;
    r->n++;
    return 0;
}

/* One piece of the queue: `length` bytes at `offset` of fd to `addr`. */
static int merge_add(merge_t *g, int64_t fd, int64_t offset, char *addr, int64_t length)
{
    orun_t *r;
    if (g->last >= 0 && g->runs[g->last].fd == fd) {
        r = &g->runs[g->last];
    } else {
        tail_t *t = tails_get(&g->tails, fd);
        if (t->fd == -1) {
            if (g->nruns == g->cap) {
                Py_ssize_t cap = g->cap ? 2 * g->cap : 8;
                orun_t *runs = PyMem_RawRealloc(g->runs, (size_t)cap * sizeof(orun_t));
                if (runs == NULL)
                    goto nomem;
                g->runs = runs, g->cap = cap;
            }
            t = tails_put(&g->tails, fd);
            if (t == NULL)
                goto nomem;
            t->run = g->nruns;
            g->runs[g->nruns++] = (orun_t){fd, 0, 0, NULL, 0, 0, 0, 0};
        }
        g->last = t->run;
        r = &g->runs[t->run];
    }
    if (r->open) {
        int64_t gap = offset - r->end;
        if (gap > 0 && gap <= g->max_gap) { /* bridged: read into scratch */
            if (merge_push(g, r, g->scratch, (size_t)gap) < 0)
                return -1;
            r->last_gap = 1;
            r->end += gap;
            g->gap_bytes += gap;
        } else if (gap != 0) { /* elsewhere: the run can grow no more */
            if (merge_flush(g, r) != IO_OK)
                return -1;
            r->open = 0;
        }
    }
    if (!r->open) {
        r->open = 1, r->last_gap = 0;
        r->at = r->end = offset;
    }
    struct iovec *prev = r->n ? &r->v[r->n - 1] : NULL;
    if (prev != NULL && !r->last_gap && (char *)prev->iov_base + prev->iov_len == addr)
        prev->iov_len += (size_t)length;
    else if (merge_push(g, r, addr, (size_t)length) < 0)
        return -1;
    r->last_gap = 0;
    r->end += length;
    return 0;
nomem:
    g->status = IO_ERRNO, g->err = ENOMEM, g->err_fd = fd, g->err_offset = offset;
    return -1;
}

/* merge_add's usual case, inlined: the piece continues the run of the previous piece's file, in the file and
 * (one iovec) in memory, or with room for another iovec. 0 if it is not that case. */
static inline int merge_next(merge_t *g, int64_t fd, int64_t offset, char *addr, int64_t length)
{
    if (g->last < 0)
        return 0;
    orun_t *r = &g->runs[g->last];
    if (r->fd != fd || !r->open || r->end != offset || r->last_gap || r->n == 0)
        return 0;
    struct iovec *prev = &r->v[r->n - 1];
    if ((char *)prev->iov_base + prev->iov_len == addr)
        prev->iov_len += (size_t)length;
    else if (r->n < r->cap && r->n < g->io.iov_max)
        r->v[r->n++] = (struct iovec){addr, (size_t)length};
    else
        return 0;
    r->end += length;
    return 1;
}

/* A queue item's buffers, held while it is read without the GIL. */
typedef struct {
    const rec_t *recs;
    const piece_t *pieces;
    const int64_t *fds;
    char *base;
    Py_ssize_t n;
    Py_buffer views[3];
    int nviews;
} item_t;

static int item_open(item_t *it, PyObject *obj)
{
    memset(it, 0, sizeof(*it));
    if (PyByteArray_Check(obj)) {
        if (PyObject_GetBuffer(obj, &it->views[0], PyBUF_SIMPLE) < 0)
            return -1;
        it->nviews = 1;
        if (it->views[0].len % (Py_ssize_t)sizeof(rec_t)) {
            PyErr_SetString(PyExc_ValueError, "records: not whole records");
            return -1;
        }
        it->recs = it->views[0].buf;
        it->n = it->views[0].len / (Py_ssize_t)sizeof(rec_t);
        return 0;
    }
    PyObject *fds, *pieces, *dest;
    if (!PyTuple_Check(obj) || !PyArg_ParseTuple(obj, "OOO", &fds, &pieces, &dest)) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "a queue item is a bytearray of records or (fds, pieces, dest)");
        }
        return -1;
    }
    if (PyObject_GetBuffer(fds, &it->views[0], PyBUF_SIMPLE) < 0)
        return -1;
    it->nviews = 1;
    if (PyObject_GetBuffer(pieces, &it->views[1], PyBUF_SIMPLE) < 0)
        return -1;
    it->nviews = 2;
    if (!PyArg_Parse(dest, "w*", &it->views[2])) /* TypeError for a read-only one */
        return -1;
    it->nviews = 3;
    if (check_pieces(&it->views[1], &it->n) < 0)
        return -1;
    it->fds = it->views[0].buf;
    it->pieces = it->views[1].buf;
    it->base = it->views[2].buf;
    return check_fit(it->pieces, it->n, it->views[2].len, it->views[0].len / (Py_ssize_t)sizeof(int64_t));
}

static void item_close(item_t *it)
{
    for (int k = 0; k < it->nviews; k++)
        PyBuffer_Release(&it->views[k]);
    it->nviews = 0;
}

static PyObject *fast_preadv_queue(PyObject *self, PyObject *args)
{
    PyObject *items, *scratch_obj, *trace = Py_None;
    int iov_max;
    long long max_gap, limit = 0;
    if (!PyArg_ParseTuple(args, "OiLO|OL", &items, &iov_max, &max_gap, &scratch_obj, &trace, &limit))
        return NULL;
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "items must be a list");
        return NULL;
    }
    if (iov_max < 1) {
        PyErr_SetString(PyExc_ValueError, "iov_max must be positive");
        return NULL;
    }
    Py_buffer scratch = {0};
    int have_scratch = 0;
    if (scratch_obj != Py_None) {
        if (PyObject_GetBuffer(scratch_obj, &scratch, PyBUF_WRITABLE) < 0)
            return NULL;
        have_scratch = 1;
        if (max_gap > scratch.len)
            max_gap = scratch.len;
    } else {
        max_gap = 0;
    }
    const Py_ssize_t nitems = PyList_GET_SIZE(items);
    PyObject *result = NULL;
    Py_ssize_t opened = 0;
    item_t *its = PyMem_Malloc((size_t)(nitems ? nitems : 1) * sizeof(item_t));
    merge_t g;
    memset(&g, 0, sizeof(g));
    g.last = -1, g.err_fd = -1;
    if (its == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; opened < nitems; opened++)
        if (item_open(&its[opened], PyList_GET_ITEM(items, opened)) < 0) {
            item_close(&its[opened]);
            goto done;
        }
    if (tails_init(&g.tails) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    g.io = (io_t){iov_max, limit, NULL, 0, 0, 0, PyList_Check(trace)};
    g.scratch = have_scratch ? scratch.buf : NULL;
    g.max_gap = max_gap;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < nitems && g.status == IO_OK; k++) {
        const item_t *it = &its[k];
        int failed = 0;
        if (it->recs != NULL) {
            for (Py_ssize_t i = 0; i < it->n && !failed; i++) {
                const rec_t *r = &it->recs[i];
                char *addr = (char *)(intptr_t)r->addr;
                if (!merge_next(&g, r->fd, r->offset, addr, r->length))
                    failed = merge_add(&g, r->fd, r->offset, addr, r->length) < 0;
            }
        } else {
            for (Py_ssize_t i = 0; i < it->n && !failed; i++) {
                const piece_t *q = &it->pieces[i];
                const int64_t fd = it->fds[q->file];
                char *addr = it->base + q->dest;
                if (!merge_next(&g, fd, q->offset, addr, q->length))
                    failed = merge_add(&g, fd, q->offset, addr, q->length) < 0;
            }
        }
    }
    for (Py_ssize_t k = 0; k < g.nruns && g.status == IO_OK; k++)
        merge_flush(&g, &g.runs[k]);
    Py_END_ALLOW_THREADS
    for (size_t k = 0; k < g.io.ncounts; k++) {
        PyObject *c = PyLong_FromLong(g.io.counts[k]);
        if (c == NULL || PyList_Append(trace, c) < 0) {
            Py_XDECREF(c);
            goto done;
        }
        Py_DECREF(c);
    }
    result = Py_BuildValue("LLiLLi", g.io.calls, g.gap_bytes, g.status, (long long)g.err_fd,
                           (long long)g.err_offset, g.err);
done:
    for (Py_ssize_t k = 0; k < opened; k++)
        item_close(&its[k]);
    PyMem_Free(its);
    for (Py_ssize_t k = 0; k < g.nruns; k++)
        PyMem_RawFree(g.runs[k].v);
    PyMem_RawFree(g.runs);
    PyMem_RawFree(g.tails.slots);
    PyMem_RawFree(g.io.counts);
    if (have_scratch)
        PyBuffer_Release(&scratch);
    return result;
}

/* --- pread: one positioned read per piece ------------------------------------------------ */

PyDoc_STRVAR(pread_plan_doc,
"pread_plan(fds, pieces, dest, iov_max) -> (calls, status, file, offset, errno)\n\n"
"Read the pieces at once, one positioned read per stretch of consecutive pieces back to back in one file\n"
"(a preadv of their iovecs, iov_max at a time; again after a short read); status as preadv_queue's, with\n"
"the plan's file index.");

static PyObject *fast_pread_plan(PyObject *self, PyObject *args)
{
    Py_buffer fds, pieces, dest;
    int iov_max;
    if (!PyArg_ParseTuple(args, "y*y*w*i", &fds, &pieces, &dest, &iov_max))
        return NULL;
    PyObject *result = NULL;
    struct iovec *iov = NULL;
    Py_ssize_t n;
    if (check_pieces(&pieces, &n) < 0)
        goto done;
    const piece_t *p = pieces.buf;
    const int64_t *fd = fds.buf;
    if (check_fit(p, n, dest.len, fds.len / (Py_ssize_t)sizeof(int64_t)) < 0)
        goto done;
    if (iov_max < 1) {
        PyErr_SetString(PyExc_ValueError, "iov_max must be positive");
        goto done;
    }
    /* iovecs for one call at a time: a stretch longer than iov_max pieces is read iov_max at a time */
    const Py_ssize_t room = n < iov_max ? (n ? n : 1) : iov_max;
    iov = PyMem_Malloc((size_t)room * sizeof(struct iovec));
    if (iov == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int status = IO_OK, err = 0;
    int64_t err_file = -1, err_offset = 0;
    char *base = dest.buf;
    io_t io = {iov_max, 0, NULL, 0, 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n && status == IO_OK;) {
        /* pieces k.. back to back in one file, at most `room` of them */
        Py_ssize_t j = k + 1;
        int64_t end = p[k].offset + p[k].length;
        while (j < n && j - k < room && p[j].file == p[k].file && p[j].offset == end) {
            end += p[j].length;
            j++;
        }
        for (Py_ssize_t m = k; m < j; m++) {
            iov[m - k].iov_base = base + p[m].dest;
            iov[m - k].iov_len = (size_t)p[m].length;
        }
        err_file = p[k].file, err_offset = p[k].offset;
        status = read_run((int)fd[p[k].file], iov, j - k, &err_offset, &io, &err);
        k = j;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("LiLLi", io.calls, status, (long long)err_file, (long long)err_offset, err);
done:
    PyMem_Free(iov);
    PyBuffer_Release(&fds);
    PyBuffer_Release(&pieces);
    PyBuffer_Release(&dest);
    return result;
}

/* --- mmap: copies from mapped windows ---------------------------------------------------- */

PyDoc_STRVAR(copy_plan_doc,
"copy_plan(windows, bounds, pieces, dest, index, skip) -> (status, index, skip)\n\n"
"memcpy the pieces from `index` (`skip` bytes into it) on into dest from mapped windows: a list of\n"
"(file, start, buffer), a window holding bytes [start, start + len(buffer)) of the plan's file.\n"
"`bounds` is bytes of int64 (low, high) per file: every piece must lie in its file's. status 0 done;\n"
"3 no window holds the byte at offsets[index] + skip (map one, call again); 4 piece `index` is out\n"
"of bounds.");

typedef struct { int64_t file, start, length; const char *addr; } window_t;

static PyObject *fast_copy_plan(PyObject *self, PyObject *args)
{
    PyObject *windows;
    Py_buffer bounds, pieces, dest;
    Py_ssize_t index;
    long long skip_ll;
    if (!PyArg_ParseTuple(args, "Oy*y*w*nL", &windows, &bounds, &pieces, &dest, &index, &skip_ll))
        return NULL;
    PyObject *result = NULL;
    Py_buffer views[16];
    window_t win[16];
    Py_ssize_t nwin = 0, n;
    if (!PyList_Check(windows) || PyList_GET_SIZE(windows) > 16) {
        PyErr_SetString(PyExc_TypeError, "windows must be a list of at most 16 (file, start, buffer)");
        goto done;
    }
    if (check_pieces(&pieces, &n) < 0)
        goto done;
    const piece_t *p = pieces.buf;
    const int64_t *bound = bounds.buf;
    Py_ssize_t files = bounds.len / (Py_ssize_t)(2 * sizeof(int64_t));
    if (check_fit(p, n, dest.len, files) < 0)
        goto done;
    if (index < 0 || index > n || skip_ll < 0) {
        PyErr_SetString(PyExc_ValueError, "index or skip out of range");
        goto done;
    }
    for (Py_ssize_t k = index; k < n; k++) {
        const int64_t *b = &bound[2 * p[k].file];
        if (p[k].offset < b[0] || p[k].offset > b[1] - p[k].length) {
            result = Py_BuildValue("inL", IO_BOUNDS, k, 0LL);
            goto done;
        }
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(windows); k++) {
        PyObject *w = PyList_GET_ITEM(windows, k);
        long long file, start;
        PyObject *buffer;
        if (!PyArg_ParseTuple(w, "LLO", &file, &start, &buffer))
            goto done;
        if (PyObject_GetBuffer(buffer, &views[nwin], PyBUF_SIMPLE) < 0)
            goto done;
        win[nwin] = (window_t){file, start, views[nwin].len, views[nwin].buf};
        nwin++;
    }
    int64_t skip = skip_ll;
    int status = IO_OK;
    char *base = dest.buf;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t last = 0;
    while (index < n) {
        const piece_t *q = &p[index];
        int64_t pos = q->offset + skip;
        const window_t *w = NULL;
        if (last < nwin && win[last].file == q->file && win[last].start <= pos
                && pos < win[last].start + win[last].length)
            w = &win[last];
        else
            for (Py_ssize_t k = 0; k < nwin; k++)
                if (win[k].file == q->file && win[k].start <= pos && pos < win[k].start + win[k].length) {
                    w = &win[k];
                    last = k;
                    break;
                }
        if (w == NULL) {
            status = IO_WINDOW;
            break;
        }
        int64_t count = q->length - skip, room = w->start + w->length - pos;
        if (count > room)
            count = room;
        memcpy(base + q->dest + skip, w->addr + (pos - w->start), (size_t)count);
        skip += count;
        if (skip == q->length) {
            index++;
            skip = 0;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("inL", status, index, (long long)skip);
done:
    for (Py_ssize_t k = 0; k < nwin; k++)
        PyBuffer_Release(&views[k]);
    PyBuffer_Release(&bounds);
    PyBuffer_Release(&pieces);
    PyBuffer_Release(&dest);
    return result;
}


/* --- plan_copies and write_pieces: kernel copies of many ranges into a file ---------------- */

PyDoc_STRVAR(plan_copies_doc,
"plan_copies(starts, sizes, kinds, depths, offsets, table, vaddrs, lengths, outs) -> (status, a, b, pieces, files, total)\n\n"
"Plan copies of the ranges (vaddrs[k], lengths[k]) of memory to output offsets outs[k] (lists of ints or\n"
"int64 columns) over a MemoryMap's columns: pieces as plan()'s (bytes of int64 file, offset, dest, length,\n"
"dest the output offset), joined where contiguous in one pages file and in the output; total their bytes.\n"
"status 0; 1: a hole at [a, b) (the caller plans it otherwise); 2: lazy pages at [a, b); 3: run a is\n"
"broken; 4: a range is empty or reversed.");

static PyObject *fast_plan_copies(PyObject *self, PyObject *args)
{
    PyObject *starts, *sizes, *kinds, *depths, *offsets, *tab, *vo, *lo_, *oo;
    if (!PyArg_ParseTuple(args, "OOOOOOOOO", &starts, &sizes, &kinds, &depths, &offsets, &tab, &vo, &lo_, &oo))
        return NULL;
    map_t m;
    if (map_open(&m, starts, sizes, kinds, depths, offsets, tab) < 0)
        return NULL;
    seq_t sv, sl, so;
    int nseq = 0;
    PyObject *result = NULL;
    vec_t pieces = {0};
    table_t table = {NULL, 0, 0, -1};
    if (seq_open(vo, &sv, "vaddrs") < 0)
        goto done;
    nseq++;
    if (seq_open(lo_, &sl, "lengths") < 0)
        goto done;
    nseq++;
    if (seq_open(oo, &so, "outs") < 0)
        goto done;
    nseq++;
    if (sl.len != sv.len || so.len != sv.len) {
        PyErr_SetString(PyExc_ValueError, "range columns differ in length");
        goto done;
    }
    int status = P_OK;
    int64_t a = 0, b = 0, total = 0;
    piece_t *last = NULL;
    const Py_ssize_t count = m.count;
    for (Py_ssize_t k = 0; k < sv.len && status == P_OK; k++) {
        int64_t vaddr, length, out;
        if (seq_get(&sv, k, &vaddr) < 0 || seq_get(&sl, k, &length) < 0 || seq_get(&so, k, &out) < 0)
            goto done;
        if (length <= 0 || vaddr < 0 || vaddr > INT64_MAX - length) {
            status = 4;
            break;
        }
        const int64_t end = vaddr + length;
        Py_ssize_t i = map_index_at(&m, vaddr);
        int64_t pos = vaddr;
        while (pos < end) {
            if (i >= count || m.starts[i] > pos) { /* not covered */
                status = P_HOLE, a = pos, b = (i < count && m.starts[i] < end) ? m.starts[i] : end;
                break;
            }
            int64_t start = m.starts[i], stop = start + m.sizes[i] < end ? start + m.sizes[i] : end;
            if (stop <= pos) {
                i++;
                continue;
            }
            if ((status = run_status(m.kinds[i])) != P_OK) {
                a = status == P_LAZY ? pos : i, b = stop;
                break;
            }
            int64_t file = run_file(&table, &m, i);
            if (file < 0)
                goto done;
            int64_t offset = m.offsets[i] + pos - start, dest = out + pos - vaddr, n = stop - pos;
            if (!piece_extends(last, file, offset, dest, n)) {
                last = vec_add(&pieces, sizeof(piece_t));
                if (last == NULL)
                    goto done;
                *last = (piece_t){file, offset, dest, n};
            }
            total += n;
            pos = stop;
            i++;
        }
    }
    {
        PyObject *p = vec_bytes(&pieces), *f = table_list(&table);
        if (p && f)
            result = Py_BuildValue("iLLNNL", status, (long long)a, (long long)b, p, f, (long long)total);
        else {
            Py_XDECREF(p);
            Py_XDECREF(f);
        }
    }
done:
    if (nseq > 0)
        seq_close(&sv);
    if (nseq > 1)
        seq_close(&sl);
    if (nseq > 2)
        seq_close(&so);
    map_close(&m);
    PyMem_Free(pieces.data);
    PyMem_Free(table.items);
    return result;
}

PyDoc_STRVAR(write_pieces_doc,
"write_pieces(fds, pieces, fd, fill, small_run, stage, align, max_copy, no_copy_file_range)\n"
"    -> (status, file, offset, errno, copies, no_copy_file_range)\n\n"
"kernel.py's write_to over plan_copies' pieces (in output order), without the GIL: runs of small_run bytes\n"
"or more one copy_file_range each (a run that starts off an `align` boundary of the output split there;\n"
"pread/pwrite through a 1 MiB buffer where copy_file_range is refused: no_copy_file_range set), shorter\n"
"ones that follow in the output within `stage` bytes read into a buffer (one preadv per stretch of a\n"
"pages file) and written with one pwrite per stretch of output, gaps of at most `fill` bytes zeroed.\n"
"fds: the pages files' descriptors by the pieces' file index. status 0 ok; 1 no data at `offset` of\n"
"file `file` (a short pages file); 2 an error (errno).");

typedef struct {
    const int *fds;
    int out, no_cfr, err, status;
    int64_t fill, small, stage_size, align, max_copy, err_file, err_offset;
    long long copies;
    char *stage, *bounce;
} wp_t;

static int wp_pwrite(wp_t *w, const char *p, size_t n, int64_t pos)
{
    while (n > 0) {
        ssize_t got = pwrite(w->out, p, n, (off_t)pos);
        w->copies++;
        if (got < 0) {
            if (errno == EINTR)
                continue;
            w->status = 2, w->err = errno;
            return -1;
        }
        if (got == 0) {
            w->status = 2, w->err = EIO;
            return -1;
        }
        p += got, n -= (size_t)got, pos += got;
    }
    return 0;
}

/* One step of a copy: copy_file_range, else pread + pwrite. Bytes copied, 0 at the end of the pages
 * file, -1 on an error (status set). */
static int64_t wp_step(wp_t *w, int src, int64_t src_pos, int64_t dst_pos, int64_t count)
{
    while (!w->no_cfr) {
        loff_t in = (loff_t)src_pos, o = (loff_t)dst_pos;
        ssize_t n = copy_file_range(src, &in, w->out, &o, (size_t)count, 0);
        w->copies++;
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        if (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP || errno == EBADF) {
            w->no_cfr = 1;
            break;
        }
        w->status = 2, w->err = errno;
        return -1;
    }
    if (w->bounce == NULL && (w->bounce = PyMem_RawMalloc(1 << 20)) == NULL) {
        w->status = 2, w->err = ENOMEM;
        return -1;
    }
    size_t want = count < (1 << 20) ? (size_t)count : (size_t)1 << 20;
    ssize_t n;
    do {
        n = pread(src, w->bounce, want, (off_t)src_pos);
        w->copies++;
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        w->status = 2, w->err = errno;
        return -1;
    }
    if (n > 0 && wp_pwrite(w, w->bounce, (size_t)n, dst_pos) < 0)
        return -1;
    return n;
}

static int wp_copy_run(wp_t *w, const piece_t *p)
{
    int src = w->fds[p->file];
    int64_t offset = p->offset, length = p->length, out = p->dest;
    int64_t head = (w->align - out % w->align) % w->align;
    int64_t step = head && length > head + w->align ? head : w->max_copy;
    while (length > 0) {
        int64_t n = wp_step(w, src, offset, out, length < step ? length : step);
        step = w->max_copy;
        if (n < 0)
            return -1;
        if (n == 0) {
            w->status = 1, w->err_file = p->file, w->err_offset = offset;
            return -1;
        }
        offset += n, out += n, length -= n;
    }
    return 0;
}

/* Read pieces [i, j) at their places in the stage buffer, then write each stretch of output. */
static int wp_buffered(wp_t *w, const piece_t *pieces, Py_ssize_t i, Py_ssize_t j)
{
    struct iovec v[1024];
    const int64_t base = pieces[i].dest;
    Py_ssize_t k = i;
    while (k < j) {
        const piece_t *first = &pieces[k];
        int64_t want = 0;
        int c = 0;
        Py_ssize_t m = k;
        while (m < j && c < 1024 && pieces[m].file == first->file && pieces[m].offset == first->offset + want) {
            v[c].iov_base = w->stage + (pieces[m].dest - base);
            v[c].iov_len = (size_t)pieces[m].length;
            want += pieces[m].length;
            c++, m++;
        }
        int src = w->fds[first->file];
        ssize_t got;
        do {
            got = preadv(src, v, c, (off_t)first->offset);
            w->copies++;
        } while (got < 0 && errno == EINTR);
        if (got < 0) {
            w->status = 2, w->err = errno;
            return -1;
        }
        if (got < want) { /* a short read: the rest piece by piece, or the file ends */
            for (Py_ssize_t q = k; q < m; q++) {
                int64_t done = 0;
                while (done < pieces[q].length) {
                    ssize_t n = pread(src, w->stage + (pieces[q].dest - base) + done,
                                      (size_t)(pieces[q].length - done), (off_t)(pieces[q].offset + done));
                    if (n < 0 && errno == EINTR)
                        continue;
                    if (n < 0) {
                        w->status = 2, w->err = errno;
                        return -1;
                    }
                    if (n == 0) {
                        w->status = 1, w->err_file = pieces[q].file, w->err_offset = pieces[q].offset + done;
                        return -1;
                    }
                    done += n;
                }
            }
        }
        k = m;
    }
    int64_t start = base, end = base;
    for (Py_ssize_t q = i; q < j; q++) {
        int64_t at = pieces[q].dest, gap = at - end;
        if (gap > w->fill) {
            if (wp_pwrite(w, w->stage + (start - base), (size_t)(end - start), start) < 0)
                return -1;
            start = at;
        } else if (gap > 0) {
            memset(w->stage + (end - base), 0, (size_t)gap);
        }
        end = at + pieces[q].length;
    }
    return wp_pwrite(w, w->stage + (start - base), (size_t)(end - start), start);
}

static PyObject *fast_write_pieces(PyObject *self, PyObject *args)
{
    PyObject *fds_o, *pieces_o;
    int out, no_cfr;
    long long fill, small, stage, align, max_copy;
    if (!PyArg_ParseTuple(args, "OOiLLLLLp", &fds_o, &pieces_o, &out, &fill, &small, &stage, &align, &max_copy,
                          &no_cfr))
        return NULL;
    if (!PyList_Check(fds_o)) {
        PyErr_SetString(PyExc_TypeError, "fds must be a list");
        return NULL;
    }
    if (small < 1 || stage < small || align < 1 || max_copy < 1 || fill < 0) {
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return NULL;
    }
    Py_buffer view;
    Py_ssize_t n;
    if (PyObject_GetBuffer(pieces_o, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (check_pieces(&view, &n) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const Py_ssize_t nfds = PyList_GET_SIZE(fds_o);
    int *fds = PyMem_Malloc((size_t)(nfds ? nfds : 1) * sizeof(int));
    if (fds == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k < nfds; k++) {
        long fdv = PyLong_AsLong(PyList_GET_ITEM(fds_o, k));
        if (fdv == -1 && PyErr_Occurred()) {
            PyMem_Free(fds);
            PyBuffer_Release(&view);
            return NULL;
        }
        fds[k] = (int)fdv;
    }
    const piece_t *pieces = view.buf;
    for (Py_ssize_t k = 0; k < n; k++)
        if (pieces[k].file < 0 || pieces[k].file >= nfds || pieces[k].length <= 0 || pieces[k].dest < 0
                || pieces[k].offset < 0) {
            PyMem_Free(fds);
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "a piece is out of range");
            return NULL;
        }
    wp_t w = {fds, out, no_cfr, 0, 0, fill, small, stage, align, max_copy, -1, -1, 0, NULL, NULL};
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
    while (i < n && w.status == 0) {
        const piece_t *p = &pieces[i];
        Py_ssize_t j = i + 1;
        if (p->length < small) { /* small runs that follow in the output within one stage */
            int64_t end = p->dest + p->length, limit = p->dest + stage;
            while (j < n) {
                const piece_t *q = &pieces[j];
                if (q->length >= small || q->dest < end || q->dest + q->length > limit)
                    break;
                end = q->dest + q->length;
                j++;
            }
        }
        if (j > i + 1) {
            if (w.stage == NULL && (w.stage = PyMem_RawMalloc((size_t)stage)) == NULL) {
                w.status = 2, w.err = ENOMEM;
                break;
            }
            wp_buffered(&w, pieces, i, j);
        } else {
            piece_t run = *p; /* pieces contiguous with it in the pages file and in the output join it */
            while (j < n && pieces[j].file == run.file && pieces[j].offset == run.offset + run.length
                    && pieces[j].dest == run.dest + run.length) {
                run.length += pieces[j].length;
                j++;
            }
            wp_copy_run(&w, &run);
        }
        i = j;
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(w.stage);
    PyMem_RawFree(w.bounce);
    PyMem_Free(fds);
    PyBuffer_Release(&view);
    return Py_BuildValue("iLLiLi", w.status, (long long)w.err_file, (long long)w.err_offset, w.err,
                         (long long)w.copies, w.no_cfr);
}


/* --- encode_entries: pagemap entries as CRIU writes them --------------------------------- */

PyDoc_STRVAR(encode_entries_doc,
"encode_entries(vaddrs, counts, flags, layout42) -> bytes\n\n"
"pagemap.py's encode_pagemap_parts for the entries (int64 vaddrs and page counts, uint8 flags columns):\n"
"each a u32 size and a PagemapEntry, 4.1 layout (vaddr 1, nr_pages 2, flags 4) or, with layout42, 4.2\n"
"(vaddr 1, 0 in 2, flags 4, nr_pages 5).");

static unsigned char *put_varint(unsigned char *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (unsigned char)v;
    return p;
}

static PyObject *fast_encode_entries(PyObject *self, PyObject *args)
{
    PyObject *vo, *co, *fo;
    int v42;
    if (!PyArg_ParseTuple(args, "OOOp", &vo, &co, &fo, &v42))
        return NULL;
    Py_buffer v[3];
    int nv = 0;
    PyObject *objs[3] = {vo, co, fo};
    const Py_ssize_t isz[3] = {8, 8, 1};
    const char *fmt[3] = {"qlQL", "qlQL", "B"};
    PyObject *result = NULL;
    for (; nv < 3; nv++)
        if (column(objs[nv], &v[nv], isz[nv], fmt[nv], "entry columns") < 0)
            goto done;
    const Py_ssize_t n = v[0].len / 8;
    if (v[1].len / 8 != n || v[2].len != n) {
        PyErr_SetString(PyExc_ValueError, "entry columns differ in length");
        goto done;
    }
    const int64_t *vaddrs = v[0].buf, *counts = v[1].buf;
    const uint8_t *flags = v[2].buf;
    /* at most 4 (size) + 1+10 + 1+10 + 1+1 + 1+2 + 1+10 bytes an entry */
    if (n > PY_SSIZE_T_MAX / 48) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, n * 48);
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result), *p = out;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (vaddrs[k] < 0 || counts[k] < 0) {
            Py_CLEAR(result);
            PyErr_SetString(PyExc_ValueError, "a negative address or page count");
            goto done;
        }
        unsigned char *body = p + 4, *q = body;
        *q++ = 1 << 3;
        q = put_varint(q, (uint64_t)vaddrs[k]);
        *q++ = 2 << 3;
        q = put_varint(q, v42 ? 0 : (uint64_t)counts[k]);
        *q++ = 4 << 3;
        q = put_varint(q, flags[k]);
        if (v42) {
            *q++ = 5 << 3;
            q = put_varint(q, (uint64_t)counts[k]);
        }
        uint32_t size = (uint32_t)(q - body);
        memcpy(p, &size, 4); /* little-endian, as CRIU (x86_64) writes it */
        p = q;
    }
    if (_PyBytes_Resize(&result, p - out) < 0)
        result = NULL;
done:
    for (int k = 0; k < nv; k++)
        PyBuffer_Release(&v[k]);
    return result;
}

static PyMethodDef methods[] = {
    {"plan", fast_plan, METH_VARARGS, plan_doc},
    {"pack", fast_pack, METH_VARARGS, pack_doc},
    {"parse_pagemap", fast_parse_pagemap, METH_VARARGS, parse_pagemap_doc},
    {"resolve", fast_resolve, METH_VARARGS, resolve_doc},
    {"resolve_count", fast_resolve_count, METH_VARARGS, resolve_count_doc},
    {"runs", fast_runs, METH_VARARGS, runs_doc},
    {"queue_scatter", fast_queue_scatter, METH_VARARGS, queue_scatter_doc},
    {"preadv_queue", fast_preadv_queue, METH_VARARGS, preadv_queue_doc},
    {"pread_plan", fast_pread_plan, METH_VARARGS, pread_plan_doc},
    {"copy_plan", fast_copy_plan, METH_VARARGS, copy_plan_doc},
    {"plan_copies", fast_plan_copies, METH_VARARGS, plan_copies_doc},
    {"write_pieces", fast_write_pieces, METH_VARARGS, write_pieces_doc},
    {"encode_entries", fast_encode_entries, METH_VARARGS, encode_entries_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastio",
    .m_doc = "The per-piece loops of planning and reading in C (optional: crit_pageread/native.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastio(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* native.py uses the module only if this is the version its Python side was written for */
    if (PyModule_AddIntConstant(m, "VERSION", 8) < 0
            || PyModule_AddIntConstant(m, "PIECE_BYTES", (long)sizeof(piece_t)) < 0
            || PyModule_AddIntConstant(m, "RECORD_BYTES", (long)sizeof(rec_t)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
