/* The call trampoline and runtime.matmul's compiled serve path: see trampoline.py, which builds
   this file as a CPython extension (MODNAME and GEMM_FN_TYPEDEF are filled in there). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <stdint.h>

GEMM_FN_TYPEDEF

/* view an operand as (batch, rows, cols) with element strides; batch stride 0 broadcasts */
static int operand(PyObject *o, int typenum, int writable, int64_t bat, int64_t shape[3], int64_t st[3], void **data)
{
    if (!PyArray_Check(o)) { PyErr_SetString(PyExc_TypeError, "expected a numpy array"); return -1; }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_TYPE(a) != typenum) { PyErr_SetString(PyExc_TypeError, "array dtype does not match the kernel"); return -1; }
    if (writable && !PyArray_ISWRITEABLE(a)) { PyErr_SetString(PyExc_ValueError, "output array is read-only"); return -1; }
    int nd = PyArray_NDIM(a);
    if (nd != 2 && nd != 3) { PyErr_SetString(PyExc_ValueError, "expected a 2-D or 3-D array"); return -1; }
    npy_intp *dims = PyArray_DIMS(a), *strides = PyArray_STRIDES(a);
    int64_t item = PyArray_ITEMSIZE(a);
    for (int i = 0; i < nd; i++) if (strides[i] % item) return 1;   /* e.g. a field of a structured array: copy */
    if (nd == 3) { shape[0] = dims[0]; st[0] = strides[0] / item; }
    else { shape[0] = bat; st[0] = 0; }
    shape[1] = dims[nd - 2]; st[1] = strides[nd - 2] / item;
    shape[2] = dims[nd - 1]; st[2] = strides[nd - 1] / item;
    *data = PyArray_DATA(a);
    if (((uintptr_t)*data) % item) return 1;      /* misaligned: the caller copies and retries */
    return 0;
}

/* the bytes [lo, hi) an operand's elements span */
static void extent(const void *data, const int64_t shape[3], const int64_t st[3], int64_t item, uintptr_t *lo, uintptr_t *hi)
{
    int64_t first = 0, last = 0;
    for (int i = 0; i < 3; i++) {
        int64_t span = (shape[i] - 1) * st[i] * item;
        if (span < 0) first += span; else last += span;
    }
    *lo = (uintptr_t)data + first;
    *hi = (uintptr_t)data + last + item;
}

static int overlaps(const void *pc, const int64_t cs[3], const int64_t sc[3], int64_t item_c, const void *px,
                    const int64_t xs[3], const int64_t sx[3], int64_t item_x)
{
    uintptr_t clo, chi, xlo, xhi;
    extent(pc, cs, sc, item_c, &clo, &chi);
    extent(px, xs, sx, item_x, &xlo, &xhi);
    return clo < xhi && xlo < chi;
}

/* METH_FASTCALL: no argument tuple to build or parse (a partial binding fn and typenum calls it directly).
   typenum is the inputs' type; C is of the same type (float32, float64, float16), or float32 for
   any other (bfloat16) */
static PyObject *call(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) { PyErr_SetString(PyExc_TypeError, "call(fn, typenum, A, B, C, accumulate, nthreads)"); return NULL; }
    unsigned long long fn = PyLong_AsUnsignedLongLong(args[0]);
    long typenum = PyLong_AsLong(args[1]), accumulate = PyLong_AsLong(args[5]), nthreads = PyLong_AsLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    PyObject *A = args[2], *B = args[3], *C = args[4];
    int64_t sc[3], cs[3], sa[3], as[3], sb[3], bs[3]; void *pa, *pb, *pc;
    int out_typenum = (typenum == NPY_FLOAT || typenum == NPY_DOUBLE || typenum == NPY_HALF) ? (int)typenum : NPY_FLOAT;
    int ec = operand(C, out_typenum, 1, 1, cs, sc, &pc), ea, eb;
    if (ec < 0) return NULL;
    if ((ea = operand(A, (int)typenum, 0, cs[0], as, sa, &pa)) < 0 || (eb = operand(B, (int)typenum, 0, cs[0], bs, sb, &pb)) < 0) return NULL;
    if (ec || ea || eb) return PyLong_FromLong(-3);
    if (as[0] != cs[0] || bs[0] != cs[0] || as[1] != cs[1] || bs[2] != cs[2] || as[2] != bs[1]) {
        PyErr_SetString(PyExc_ValueError, "operand shapes do not match"); return NULL;
    }
    int64_t item = PyArray_ITEMSIZE((PyArrayObject *)C), item_in = PyArray_ITEMSIZE((PyArrayObject *)A);
    if (cs[0] && cs[1] && cs[2] && as[2]
        && (overlaps(pc, cs, sc, item, pa, as, sa, item_in) || overlaps(pc, cs, sc, item, pb, bs, sb, item_in)))
        return PyLong_FromLong(-4);
    int rc;
    int64_t work = cs[0] * cs[1] * cs[2] * as[2];
    if (work > 32768) {
        Py_BEGIN_ALLOW_THREADS
        rc = ((gemm_fn)(uintptr_t)fn)(cs[0], cs[1], cs[2], as[2], pa, sa[0], sa[1], sa[2], pb, sb[0], sb[1], sb[2],
                                      pc, sc[0], sc[1], sc[2], (int32_t)accumulate, (int32_t)nthreads);
        Py_END_ALLOW_THREADS
    } else {
        rc = ((gemm_fn)(uintptr_t)fn)(cs[0], cs[1], cs[2], as[2], pa, sa[0], sa[1], sa[2], pb, sb[0], sb[1], sb[2],
                                      pc, sc[0], sc[1], sc[2], (int32_t)accumulate, (int32_t)nthreads);
    }
    return PyLong_FromLong(rc);
}

/* 'n' (0) when the column stride is one element, 't' (1) when the row stride is, else -1 (the
   rule of looptune.runtime.call_plan.layout_char; byte strides) */
static int layout_of(npy_intp rows, npy_intp cols, npy_intp s_row, npy_intp s_col, npy_intp item)
{
    if (s_row % item || s_col % item) return -1;
    if (s_col == item || cols == 1) return 0;
    if (s_row == item || rows == 1) return 1;
    return -1;
}

static PyObject *dtype_names[3], *layout_names[4], *address_name, *np_matmul;
/* the type number numpy gave ml_dtypes' bfloat16 in this process (set_bfloat16), or -1 */
static int bf16_typenum = -1;

/* an operand's core (rows, cols) in d[1], d[2] with byte strides s[1], s[2] (d[0], s[0]: 1, 0);
   a 1-D operand is a row (A) or a column (B) */
static void core(PyArrayObject *x, int is_a, npy_intp d[3], npy_intp s[3])
{
    int nd = PyArray_NDIM(x);
    npy_intp *dims = PyArray_DIMS(x), *st = PyArray_STRIDES(x);
    d[0] = 1; s[0] = 0;
    if (nd == 1) {
        if (is_a) { d[1] = 1; s[1] = st[0]; d[2] = dims[0]; s[2] = st[0]; }
        else { d[1] = dims[0]; s[1] = st[0]; d[2] = 1; s[2] = st[0]; }
    } else { d[1] = dims[nd - 2]; s[1] = st[nd - 2]; d[2] = dims[nd - 1]; s[2] = st[nd - 1]; }
}

/* the byte stride of x's batch dimensions (those before its last core_nd) folded into one, into
   *stride: 0 when they are all 1 (broadcast) or the batch has one entry; -1 when they are not
   `batch` (a partial broadcast: the plan loops, one call per index) or their strides do not fold */
static int batch_stride(PyArrayObject *x, int core_nd, int nb, const npy_intp *batch, npy_intp count, npy_intp *stride)
{
    int nbx = PyArray_NDIM(x) - core_nd, ones = 1;
    npy_intp *dims = PyArray_DIMS(x), *st = PyArray_STRIDES(x);
    for (int i = 0; i < nbx; i++) if (dims[i] != 1) ones = 0;
    *stride = 0;
    if (ones || count == 1) return 0;
    if (nbx != nb) return -1;
    for (int i = 0; i < nb; i++) if (dims[i] != batch[i]) return -1;
    for (int i = 0; i + 1 < nb; i++) if (st[i] != st[i + 1] * batch[i + 1]) return -1;
    *stride = st[nb - 1];
    return 0;
}

/* x as the kernel reads it (a new reference; NULL on error), as looptune.runtime.call_plan plans it and
   looptune.runtime.execute.prepare makes it: cast to typenum in x's memory order, then copied to C order
   when no core stride is one element */
static PyArrayObject *prepared(PyArrayObject *x, int typenum, int is_a, npy_intp item)
{
    npy_intp d[3], s[3];
    if (PyArray_TYPE(x) != typenum) {
        PyArrayObject *y = (PyArrayObject *)PyArray_NewLikeArray(x, NPY_KEEPORDER, PyArray_DescrFromType(typenum), 0);
        if (y == NULL) return NULL;
        if (PyArray_CopyInto(y, x) < 0) { Py_DECREF(y); return NULL; }
        x = y;
    } else {
        Py_INCREF(x);
    }
    core(x, is_a, d, s);
    if (layout_of(d[1], d[2], s[1], s[2], item) < 0) {
        PyArrayObject *y = (PyArrayObject *)PyArray_NewCopy(x, NPY_CORDER);
        Py_DECREF(x);
        return y;
    }
    return x;
}

/* serve(A, B, out, dispatch, threads, small_flops) -> the result, or None for "take the Python path".
   runtime.matmul's whole call for the common cases: plain arrays of bool, integer or float dtypes
   that numpy promotes to float32 or float64, 1-D and up, each operand's batch either all broadcast
   or all its own and folding into one stride, any strides (cast and copied as call_plan plans), a
   fresh output or a matching aligned out= that overlaps no input, a kernel already in the dispatch
   table under the key a plan holds (call_plan).  All else, and any non-zero kernel code, takes the
   Python path.  Two bfloat16 operands (the type set_bfloat16 named) are served too, into float32. */
static PyObject *serve(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) { PyErr_SetString(PyExc_TypeError, "serve(A, B, out, dispatch, threads, small_flops)"); return NULL; }
    PyObject *O = args[2], *dispatch = args[3];
    if (!PyArray_CheckExact(args[0]) || !PyArray_CheckExact(args[1]) || !PyDict_CheckExact(dispatch)) Py_RETURN_NONE;
    PyArrayObject *a = (PyArrayObject *)args[0], *b = (PyArrayObject *)args[1];
    int ta = PyArray_TYPE(a), tb = PyArray_TYPE(b), nda = PyArray_NDIM(a), ndb = PyArray_NDIM(b), typenum = ta;
    if (!PyArray_ISNOTSWAPPED(a) || !PyArray_ISNOTSWAPPED(b) || nda < 1 || ndb < 1 || (nda == 1 && ndb == 1))
        Py_RETURN_NONE;
    const int bf16 = ta == tb && ta == bf16_typenum;     /* bf16 inputs, float32 result */
    if (!bf16 && (ta != tb || (ta != NPY_FLOAT && ta != NPY_DOUBLE))) {
        /* bool, integer and float inputs: numpy's promotion, served when it is float32 or float64 */
        if (!(PyTypeNum_ISBOOL(ta) || PyTypeNum_ISINTEGER(ta) || PyTypeNum_ISFLOAT(ta))
            || !(PyTypeNum_ISBOOL(tb) || PyTypeNum_ISINTEGER(tb) || PyTypeNum_ISFLOAT(tb))) Py_RETURN_NONE;
        PyArray_Descr *r = PyArray_PromoteTypes(PyArray_DESCR(a), PyArray_DESCR(b));
        if (r == NULL) { PyErr_Clear(); Py_RETURN_NONE; }
        typenum = r->type_num;
        Py_DECREF(r);
        if (typenum != NPY_FLOAT && typenum != NPY_DOUBLE) Py_RETURN_NONE;
    }
    long threads = PyLong_AsLong(args[4]);
    double small_flops = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred()) return NULL;
    const int out_typenum = bf16 ? NPY_FLOAT : typenum;
    npy_intp item = bf16 ? 2 : typenum == NPY_DOUBLE ? 8 : 4, item_c = bf16 ? 4 : item, ad[3], as_[3], bd[3], bs[3];
    core(a, 1, ad, as_);
    core(b, 0, bd, bs);
    npy_intp m = ad[1], k = ad[2], n = bd[2], count = 1, cd[NPY_MAXDIMS];
    if (bd[1] != k) Py_RETURN_NONE;
    /* numpy's result shape: the broadcast batch, m (if A is not 1-D), n (if B is not 1-D) */
    int nba = nda > 2 ? nda - 2 : 0, nbb = ndb > 2 ? ndb - 2 : 0, nb = nba > nbb ? nba : nbb;
    if (nb + 2 > NPY_MAXDIMS) Py_RETURN_NONE;
    for (int i = 0; i < nb; i++) {
        npy_intp x = i >= nb - nba ? PyArray_DIMS(a)[i - (nb - nba)] : 1, y = i >= nb - nbb ? PyArray_DIMS(b)[i - (nb - nbb)] : 1;
        if (x != y && x != 1 && y != 1) Py_RETURN_NONE;
        cd[i] = x == 1 ? y : x;
        count *= cd[i];
    }
    if (!(count && m && n && k)) Py_RETURN_NONE;
    int ndc = nb, c_m = -1, c_n = -1;
    if (nda > 1) { c_m = ndc; cd[ndc++] = m; }
    if (ndb > 1) { c_n = ndc; cd[ndc++] = n; }
    if (O != Py_None) {
        if (!PyArray_CheckExact(O)) Py_RETURN_NONE;
        PyArrayObject *o = (PyArrayObject *)O;
        if (PyArray_TYPE(o) != out_typenum || !PyArray_ISNOTSWAPPED(o) || !PyArray_ISWRITEABLE(o) || PyArray_NDIM(o) != ndc)
            Py_RETURN_NONE;
        for (int i = 0; i < ndc; i++) if (PyArray_DIMS(o)[i] != cd[i]) Py_RETURN_NONE;
    }
    /* the operands as the kernel reads them (casts and copies as call_plan plans them), then the output */
    PyObject *result = Py_None, *key = NULL, *address = NULL;
    PyArrayObject *xa = prepared(a, typenum, 1, item), *xb = xa ? prepared(b, typenum, 0, item) : NULL, *c = NULL;
    if (xb == NULL) goto fail;
    core(xa, 1, ad, as_);
    core(xb, 0, bd, bs);
    if (batch_stride(xa, nda == 1 ? 1 : 2, nb, cd, count, &as_[0]) < 0
        || batch_stride(xb, ndb == 1 ? 1 : 2, nb, cd, count, &bs[0]) < 0) goto done;
    int la = layout_of(m, k, as_[1], as_[2], item), lb = layout_of(k, n, bs[1], bs[2], item);
    if (la < 0 || lb < 0) goto done;
    /* the thread rule and the key of dispatch.dispatch_key (tests/runtime/test_dispatch_keys.py checks they agree) */
    if (2.0 * (double)count * (double)m * (double)n * (double)k < small_flops) threads = 1;
    key = Py_BuildValue("(OnnnnOl)", dtype_names[bf16 ? 2 : typenum == NPY_DOUBLE], m, n, k, count, layout_names[2 * la + lb], threads);
    if (key == NULL) goto fail;
    PyObject *hit = PyDict_GetItemWithError(dispatch, key);     /* borrowed */
    if (hit == NULL) { if (PyErr_Occurred()) goto fail; goto done; }
    if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) < 1) goto done;
    address = PyObject_GetAttr(PyTuple_GET_ITEM(hit, 0), address_name);
    if (address == NULL) { PyErr_Clear(); goto done; }
    gemm_fn fn = (gemm_fn)(uintptr_t)PyLong_AsUnsignedLongLong(address);
    if (PyErr_Occurred()) { PyErr_Clear(); goto done; }
    if (fn == NULL) {          /* address 0: numpy serves this key (the hand-off, or a failed kernel) */
        PyObject *args = PyTuple_Pack(2, (PyObject *)a, (PyObject *)b), *kwargs = NULL;
        if (args == NULL) goto fail;
        if (O != Py_None && (kwargs = Py_BuildValue("{s:O}", "out", O)) == NULL) { Py_DECREF(args); goto fail; }
        result = PyObject_Call(np_matmul, args, kwargs);
        Py_DECREF(args);
        Py_XDECREF(kwargs);
        if (result == NULL) goto fail;
        goto done;
    }
    if (O == Py_None) {
        c = (PyArrayObject *)PyArray_SimpleNew(ndc, cd, out_typenum);
        if (c == NULL) goto fail;
    } else {
        c = (PyArrayObject *)O;
        Py_INCREF(c);
    }
    npy_intp *cst = PyArray_STRIDES(c);
    int64_t shc[3] = {count, m, n}, sc[3], sha[3] = {count, m, k}, sa[3], shb[3] = {count, k, n}, sb[3];
    npy_intp cb, cm = c_m >= 0 ? cst[c_m] : 0, cn = c_n >= 0 ? cst[c_n] : 0;
    if (batch_stride(c, ndc - nb, nb, cd, count, &cb) < 0) goto done;
    void *pa = PyArray_DATA(xa), *pb = PyArray_DATA(xb), *pc = PyArray_DATA(c);
    if (cb % item_c || cm % item_c || cn % item_c || as_[0] % item || bs[0] % item
        || (uintptr_t)pa % item || (uintptr_t)pb % item || (uintptr_t)pc % item_c) goto done;
    for (int i = 0; i < 3; i++) { sa[i] = as_[i] / item; sb[i] = bs[i] / item; }
    sc[0] = cb / item_c; sc[1] = cm / item_c; sc[2] = cn / item_c;
    if (O != Py_None && (overlaps(pc, shc, sc, item_c, pa, sha, sa, item) || overlaps(pc, shc, sc, item_c, pb, shb, sb, item))) goto done;
    int rc;
    if (count * m * n * k > 32768) {
        Py_BEGIN_ALLOW_THREADS
        rc = fn(count, m, n, k, pa, sa[0], sa[1], sa[2], pb, sb[0], sb[1], sb[2], pc, sc[0], sc[1], sc[2], 0, (int32_t)threads);
        Py_END_ALLOW_THREADS
    } else {
        rc = fn(count, m, n, k, pa, sa[0], sa[1], sa[2], pb, sb[0], sb[1], sb[2], pc, sc[0], sc[1], sc[2], 0, (int32_t)threads);
    }
    if (rc == 0) { result = (PyObject *)c; c = NULL; }
done:
    Py_XDECREF(key); Py_XDECREF(address); Py_XDECREF(c); Py_XDECREF(xa); Py_XDECREF(xb);
    if (result == Py_None) Py_INCREF(Py_None);
    return result;
fail:
    Py_XDECREF(key); Py_XDECREF(address); Py_XDECREF(c); Py_XDECREF(xa); Py_XDECREF(xb);
    return NULL;
}

/* set_bfloat16(typenum): the type number of ml_dtypes' bfloat16, which serve then takes */
static PyObject *set_bfloat16(PyObject *self, PyObject *arg)
{
    long t = PyLong_AsLong(arg);
    if (t == -1 && PyErr_Occurred()) return NULL;
    bf16_typenum = (int)t;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"call", (PyCFunction)(void (*)(void))call, METH_FASTCALL, "call(fn, typenum, A, B, C, accumulate, nthreads) -> rc"},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL, "serve(A, B, out, dispatch, threads, small_flops) -> C or None"},
    {"set_bfloat16", set_bfloat16, METH_O, "set_bfloat16(typenum): serve bfloat16 operands of this type"},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "MODNAME", NULL, -1, methods};
PyMODINIT_FUNC PyInit_MODNAME(void)
{
    import_array();
    const char *names[] = {"float32", "float64", "bfloat16"}, *layouts[] = {"nn", "nt", "tn", "tt"};
    for (int i = 0; i < 3; i++) if (!(dtype_names[i] = PyUnicode_InternFromString(names[i]))) return NULL;
    for (int i = 0; i < 4; i++) if (!(layout_names[i] = PyUnicode_InternFromString(layouts[i]))) return NULL;
    if (!(address_name = PyUnicode_InternFromString("address"))) return NULL;
    PyObject *numpy = PyImport_ImportModule("numpy");
    if (numpy == NULL) return NULL;
    np_matmul = PyObject_GetAttrString(numpy, "matmul");
    Py_DECREF(numpy);
    if (np_matmul == NULL) return NULL;
    return PyModule_Create(&module);
}
