/* Fast spatial matching on the CPU (DSM paper 3.5): gpu_dsm.match.spatial_verify's native backend,
 * from the padded feature tables to each pair's result.
 *
 * Tables (Table below): a query table of Q images and a candidate table of P images, each padded to
 * its capacity: centres xy (images, capacity, 2) and lower-triangular frames [[p, 0], [q, r]]
 * (images, capacity, 2, 2), float32 or float64; channel and scale (images, capacity) int64; valid
 * (images, capacity) bytes. Pair k is candidate image k against query image query_index[k]; a
 * valid row must have a scale in [0, S) and a channel in [0, C) (rows outside are counted, skipped).
 *
 * For each pair of [pair_begin, pair_end):
 *   1. tentative correspondences (build_pair, emit_pair): for each scale pair in the order
 *      sq * S + sc, every (query row i, candidate row j) of one channel with scales sq and sc, in
 *      the order of (i, j): a group. Per pair, candidate rows are counted per (channel, scale) and
 *      ranked within it; a prefix sum over the query rows gives each query row's first place in
 *      each group; each candidate row then walks the query rows of its channel (lists kept per
 *      query image) and writes its correspondences straight to their places: work in the valid
 *      rows and the correspondences, never in query rows x candidate rows;
 *   2. per group (verify_group): one upright-affine hypothesis per correspondence, T = A2 A1^-1,
 *      t = x2 - T x1, and the correspondence's scale change log det A2 - log det A1; every valid
 *      hypothesis (a, c > 0, finite) scored against every correspondence of the group: inlier if
 *      the transfer error is below th_sq and the scale change is within log_limit of log det T;
 *      counted with each feature once (min of distinct query and candidate rows);
 *   3. the best lo_hypotheses (ties: earlier correspondence first) with >= lo_min_inliers are
 *      refined: inliers at lo_th_sq, least-squares fit, re-count, kept while the count grows, at
 *      most lo_rounds times; the group's result is the first of the best counts;
 *   4. the pair's result is the first group of the highest count (the lowest scale pair on ties):
 *      its count, parameters (a, b, c, tx, ty; NaN without inliers), scale pair (-1 without) and
 *      inlier correspondences (query row, candidate row) in group order.
 * Every error, scale change and fit goes through the float64 operations of the plain matcher
 * (gpu_dsm.reference.match), in its order, so inlier decisions are the same bit for bit; the
 * build turns floating-point contraction off (no fused multiply-adds). Built and loaded by
 * gpu_dsm.kernels.native, called through ctypes (which releases the GIL) by
 * gpu_dsm.kernels.fsm, one range of pairs per thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#pragma STDC FP_CONTRACT OFF

typedef struct {
    const void *xy, *frame;
    const int64_t *channel, *scale;
    const uint8_t *valid;
    int64_t capacity;
    int64_t is_double; /* xy and frame are float64 (else float32) */
} Table;

typedef struct {
    double th_sq, lo_th_sq, log_limit;
    int64_t symmetric, lo_hypotheses, lo_rounds, lo_min_inliers;
} Settings;

typedef struct {
    int64_t count;
    double h[5];
} Ranked;

/* Scratch of one thread. */
typedef struct {
    int64_t scales, channels;
    /* query image (the last one loaded): columns per row, valid rows ascending (qrows), and per
     * channel a list of its rows, ascending (qhead[channel], qnext[row]; -1 ends) */
    int64_t query;
    double *qx, *qy, *qp, *qq, *qr, *qpr, *qlog;
    int64_t *qscale, *qchannel, *qrows, qcount;
    int32_t *qhead, *qnext;
    /* candidate image: per valid row its channel and scale (-1 scale for the others) and its rank
     * among the rows of its (channel, scale); the counts per (channel, scale), key channel * S +
     * scale; columns of the rows with correspondences */
    int64_t *cchannel, *cscale;
    int32_t *crank, *count;
    double *cx, *cy, *ca, *cb, *cc, *clog;
    /* per valid query row and candidate scale, its first place in its group (qrows x S) */
    int64_t *place;
    /* the pair's groups: sizes and first rows, S x S; its correspondences and rows (with padding) */
    int64_t *sizes, *first, corr, rows;
    /* the pair's correspondences, group after group */
    int64_t room;
    double *x1, *y1, *x2, *y2, *a, *b, *c, *tx, *ty, *log_h, *log_s;
    int64_t *qrow, *crow;
    int64_t *mask, *inlier; /* an inlier mask and its inliers' rows, ascending */
    uint32_t *stamp;
    uint32_t tag;
    Ranked *top;
} Scratch;

/* Groups start at multiples of ROW_ALIGN rows, padded with rows that are never inliers: the scoring
 * loop runs whole vectors (4 doubles with AVX2) without a scalar remainder. */
#define ROW_ALIGN 4

static inline int64_t padded(int64_t n) {
    return (n + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN;
}

/* math.log with IEEE results for the arguments where Python's raises: log 0 = -inf, else NaN. */
static inline double log_or_nan(double x) {
    if (x > 0)
        return log(x);
    return x == 0 ? -INFINITY : NAN;
}

static inline int valid_hypothesis(double a, double b, double c, double tx, double ty) {
    return a > 0 && c > 0 && isfinite(a) && isfinite(b) && isfinite(c) && isfinite(tx) && isfinite(ty);
}

static inline double real(const void *base, int64_t at, int64_t is_double) {
    return is_double ? ((const double *)base)[at] : (double)((const float *)base)[at];
}

/* The search of a group (verify_group, with the scoring loop inlined), compiled twice where GCC can
 * choose at load time (AVX2 where the CPU has it: 4 doubles per instruction, no fused multiply-add),
 * so one library serves every x86-64 CPU. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 6 && defined(__x86_64__) && defined(__linux__)
#define HOT_LOOP __attribute__((target_clones("avx2", "default")))
#define INLINE __attribute__((always_inline)) inline
#else
#define HOT_LOOP
#define INLINE inline
#endif

/* Inlier mask of hypothesis h = (a, b, c, tx, ty), log_h = log(a c), over n rows; returns the number
 * of inliers (with repeated features). */
static INLINE int64_t score(int64_t n, const double *restrict x1, const double *restrict y1,
                              const double *restrict x2, const double *restrict y2, const double *restrict log_s,
                              const double *h, double log_h, double th_sq, double log_limit, int symmetric,
                              int64_t *restrict mask) {
    const double a = h[0], b = h[1], c = h[2], tx = h[3], ty = h[4];
    int64_t inliers = 0;
    if (symmetric) {
        for (int64_t l = 0; l < n; l++) {
            double rx = x2[l] - a * x1[l] - tx;
            double ry = y2[l] - b * x1[l] - c * y1[l] - ty;
            double e = rx * rx + ry * ry;
            double bx = rx / a;
            double by = (ry - b * bx) / c;
            e = e + (bx * bx + by * by);
            int64_t in = (fabs(log_s[l] - log_h) <= log_limit) & (e < th_sq);
            mask[l] = in;
            inliers += in;
        }
    } else {
        for (int64_t l = 0; l < n; l++) {
            double rx = x2[l] - a * x1[l] - tx;
            double ry = y2[l] - b * x1[l] - c * y1[l] - ty;
            double e = rx * rx + ry * ry;
            int64_t in = (fabs(log_s[l] - log_h) <= log_limit) & (e < th_sq);
            mask[l] = in;
            inliers += in;
        }
    }
    return inliers;
}

/* The rows of a 0/1 mask's ones over n rows (a multiple of ROW_ALIGN), ascending, into inlier; their
 * number. Inliers are few: blocks without one are skipped. */
static int64_t inlier_rows(int64_t n, const int64_t *mask, int64_t *inlier) {
    int64_t m = 0;
    for (int64_t l = 0; l < n; l += ROW_ALIGN) {
        int64_t any = 0;
        for (int64_t k = 0; k < ROW_ALIGN; k++)
            any |= mask[l + k];
        if (!any)
            continue;
        for (int64_t k = 0; k < ROW_ALIGN; k++) {
            inlier[m] = l + k;
            m += mask[l + k];
        }
    }
    return m;
}

/* Inliers with each feature once: min(distinct query rows, distinct candidate rows) of the m
 * inlier rows of a group (qrow, crow: the group's rows). Query rows of a group are sorted, so
 * distinct ones are runs; candidate rows are stamped. */
static int64_t count_unique(int64_t m, const int64_t *inlier, const int64_t *qrow, const int64_t *crow, Scratch *s,
                            int64_t num_rows) {
    if (++s->tag == 0) {
        memset(s->stamp, 0, (size_t)num_rows * sizeof(uint32_t));
        s->tag = 1;
    }
    const uint32_t tag = s->tag;
    int64_t nq = 0, nc = 0, last_q = -1;
    for (int64_t k = 0; k < m; k++) {
        const int64_t l = inlier[k];
        if (qrow[l] != last_q) {
            nq++;
            last_q = qrow[l];
        }
        if (s->stamp[crow[l]] != tag) {
            s->stamp[crow[l]] = tag;
            nc++;
        }
    }
    return nq < nc ? nq : nc;
}

/* Least-squares (a, b, c, tx, ty) on the m inlier rows: sums in row order, Cramer's rule, as
 * gpu_dsm.reference.match.solve_normal_equations. Returns 0 if degenerate. */
static int fit(int64_t m, const int64_t *inlier, const double *x1, const double *y1, const double *x2,
               const double *y2, double *h) {
    double sx = 0, sy = 0, sxx = 0, sxy = 0, syy = 0, su = 0, sxu = 0, sv = 0, sxv = 0, syv = 0;
    for (int64_t k = 0; k < m; k++) {
        const int64_t l = inlier[k];
        double x = x1[l], y = y1[l], u = x2[l], v = y2[l];
        sx += x;
        sy += y;
        sxx += x * x;
        sxy += x * y;
        syy += y * y;
        su += u;
        sxu += x * u;
        sv += v;
        sxv += x * v;
        syv += y * v;
    }
    if (m < 3)
        return 0;
    double cnt = (double)m;
    double det2 = sxx * cnt - sx * sx;
    double m_yy = syy * cnt - sy * sy;
    double m_xy = sxy * cnt - sy * sx;
    double m_xyy = sxy * sy - syy * sx;
    double det3 = sxx * m_yy - sxy * m_xy + sx * m_xyy;
    if (!(fabs(det2) > 1e-9 * (1 + sxx * cnt) && fabs(det3) > 1e-9 * (1 + sxx * syy * cnt)))
        return 0;
    double a = (sxu * cnt - sx * su) / det2;
    double tx = (sxx * su - sx * sxu) / det2;
    double b = (sxv * m_yy - sxy * (syv * cnt - sy * sv) + sx * (syv * sy - syy * sv)) / det3;
    double c = (sxx * (syv * cnt - sy * sv) - sxv * m_xy + sx * (sxy * sv - syv * sx)) / det3;
    double ty = (sxx * (syy * sv - syv * sy) - sxy * (sxy * sv - syv * sx) + sxv * m_xyy) / det3;
    if (!valid_hypothesis(a, b, c, tx, ty))
        return 0;
    h[0] = a, h[1] = b, h[2] = c, h[3] = tx, h[4] = ty;
    return 1;
}

static void free_scratch(Scratch *s) {
    void *all[] = {s->qx, s->qy, s->qp, s->qq, s->qr, s->qpr, s->qlog, s->qscale, s->qchannel, s->qrows, s->qhead,
                   s->qnext, s->cchannel, s->cscale, s->crank, s->count, s->cx, s->cy, s->ca, s->cb, s->cc, s->clog,
                   s->place, s->sizes, s->first, s->x1, s->y1, s->x2, s->y2, s->a, s->b, s->c, s->tx, s->ty,
                   s->log_h, s->log_s, s->qrow, s->crow, s->mask, s->inlier, s->stamp, s->top};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        free(all[k]);
}

/* Scratch for tables q and c with S scales and C channels; 0 if memory ran out (then freed). */
static int init_scratch(Scratch *s, const Table *q, const Table *c, int64_t S, int64_t C, int64_t keep) {
    memset(s, 0, sizeof *s);
    s->scales = S, s->channels = C, s->query = -1;
    const size_t nq = (size_t)(q->capacity > 0 ? q->capacity : 1), nc = (size_t)(c->capacity > 0 ? c->capacity : 1);
    const size_t d = sizeof(double), i64 = sizeof(int64_t), i32 = sizeof(int32_t);
    s->qx = malloc(nq * d), s->qy = malloc(nq * d), s->qp = malloc(nq * d), s->qq = malloc(nq * d);
    s->qr = malloc(nq * d), s->qpr = malloc(nq * d), s->qlog = malloc(nq * d);
    s->qscale = malloc(nq * i64), s->qchannel = malloc(nq * i64), s->qrows = malloc(nq * i64);
    s->qhead = malloc((size_t)C * i32), s->qnext = malloc(nq * i32);
    s->cchannel = malloc(nc * i64), s->cscale = malloc(nc * i64), s->crank = malloc(nc * i32);
    s->count = calloc((size_t)C * (size_t)S, i32);
    s->cx = malloc(nc * d), s->cy = malloc(nc * d), s->ca = malloc(nc * d), s->cb = malloc(nc * d);
    s->cc = malloc(nc * d), s->clog = malloc(nc * d);
    s->place = malloc(nq * (size_t)S * i64);
    s->sizes = malloc((size_t)(S * S) * i64), s->first = malloc((size_t)(S * S) * i64);
    s->stamp = calloc(nc, sizeof(uint32_t));
    s->top = malloc((size_t)keep * sizeof(Ranked));
    if (!s->qx || !s->qy || !s->qp || !s->qq || !s->qr || !s->qpr || !s->qlog || !s->qscale || !s->qchannel ||
        !s->qrows || !s->qhead || !s->qnext || !s->cchannel || !s->cscale || !s->crank || !s->count || !s->cx ||
        !s->cy || !s->ca || !s->cb || !s->cc || !s->clog || !s->place || !s->sizes || !s->first || !s->stamp ||
        !s->top) {
        free_scratch(s);
        return 0;
    }
    for (int64_t k = 0; k < C; k++)
        s->qhead[k] = -1;
    return 1;
}

/* Room for a pair of n rows; 0 if memory ran out. */
static int reserve(Scratch *s, int64_t n) {
    if (n <= s->room)
        return 1;
    const int64_t room = s->room * 2 > n ? s->room * 2 : n;
    double **cols[] = {&s->x1, &s->y1, &s->x2, &s->y2, &s->a, &s->b, &s->c, &s->tx, &s->ty, &s->log_h, &s->log_s};
    for (size_t k = 0; k < sizeof cols / sizeof cols[0]; k++) {
        double *grown = realloc(*cols[k], (size_t)room * sizeof(double));
        if (!grown)
            return 0;
        *cols[k] = grown;
    }
    int64_t **rows[] = {&s->qrow, &s->crow, &s->mask, &s->inlier};
    for (size_t k = 0; k < sizeof rows / sizeof rows[0]; k++) {
        int64_t *grown = realloc(*rows[k], (size_t)room * sizeof(int64_t));
        if (!grown)
            return 0;
        *rows[k] = grown;
    }
    s->room = room;
    return 1;
}

/* Whether valid row `at` of a table has a scale in [0, S) and a channel in [0, C). */
static inline int in_range(const Table *t, int64_t at, int64_t S, int64_t C) {
    return t->scale[at] >= 0 && t->scale[at] < S && t->channel[at] >= 0 && t->channel[at] < C;
}

/* Query image `image` into the scratch (kept while consecutive pairs share it). Returns the valid
 * rows out of range (skipped). */
static int64_t load_query(Scratch *s, const Table *q, int64_t image) {
    if (image == s->query)
        return 0;
    for (int64_t t = 0; t < s->qcount; t++)
        s->qhead[s->qchannel[s->qrows[t]]] = -1;
    const int64_t S = s->scales, C = s->channels, n = q->capacity, base = image * n;
    int64_t bad = 0;
    s->qcount = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t at = base + i;
        s->qscale[i] = -1;
        if (!q->valid[at])
            continue;
        if (!in_range(q, at, S, C)) {
            bad++;
            continue;
        }
        s->qrows[s->qcount++] = i;
        s->qscale[i] = q->scale[at], s->qchannel[i] = q->channel[at];
        const double p = real(q->frame, 4 * at, q->is_double), r = real(q->frame, 4 * at + 3, q->is_double);
        s->qx[i] = real(q->xy, 2 * at, q->is_double), s->qy[i] = real(q->xy, 2 * at + 1, q->is_double);
        s->qp[i] = p, s->qq[i] = real(q->frame, 4 * at + 2, q->is_double), s->qr[i] = r;
        s->qpr[i] = p * r;
        s->qlog[i] = log_or_nan(p * r);
    }
    for (int64_t t = s->qcount - 1; t >= 0; t--) {
        const int64_t i = s->qrows[t];
        s->qnext[i] = s->qhead[s->qchannel[i]];
        s->qhead[s->qchannel[i]] = (int32_t)i;
    }
    s->query = image;
    return bad;
}

/* Candidate image `image` against the loaded query: its rows counted and ranked per (channel,
 * scale), the sizes and first rows of the S x S groups, each query row's place in them. Returns the
 * valid rows out of range (skipped). */
static int64_t build_pair(Scratch *s, const Table *c, int64_t image) {
    const int64_t S = s->scales, C = s->channels, n = c->capacity, base = image * n;
    int64_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        const int64_t at = base + j;
        s->cscale[j] = -1;
        if (!c->valid[at])
            continue;
        if (!in_range(c, at, S, C)) {
            bad++;
            continue;
        }
        s->cscale[j] = c->scale[at], s->cchannel[j] = c->channel[at];
        s->crank[j] = s->count[c->channel[at] * S + c->scale[at]]++;
    }
    for (int64_t g = 0; g < S * S; g++)
        s->sizes[g] = 0;
    for (int64_t t = 0; t < s->qcount; t++) {
        const int64_t i = s->qrows[t];
        const int32_t *count = s->count + s->qchannel[i] * S;
        int64_t *sizes = s->sizes + s->qscale[i] * S, *place = s->place + i * S;
        for (int64_t sc = 0; sc < S; sc++) {
            place[sc] = sizes[sc];
            sizes[sc] += count[sc];
        }
    }
    s->corr = s->rows = 0;
    for (int64_t g = 0; g < S * S; g++) {
        s->first[g] = s->rows;
        s->corr += s->sizes[g];
        s->rows += padded(s->sizes[g]);
    }
    return bad;
}

/* Empties the counts of build_pair. */
static void clear_pair(Scratch *s, const Table *c) {
    for (int64_t j = 0; j < c->capacity; j++)
        if (s->cscale[j] >= 0)
            s->count[s->cchannel[j] * s->scales + s->cscale[j]] = 0;
}

/* The correspondences of the built pair into s->qrow, s->crow: group g from row s->first[g], in
 * (query row, candidate row) order; with `columns`, the candidate columns of the rows that have
 * correspondences. */
static void emit_pair(Scratch *s, const Table *c, int64_t image, int columns) {
    const int64_t S = s->scales, n = c->capacity;
    for (int64_t j = 0; j < n; j++) {
        if (s->cscale[j] < 0 || s->qhead[s->cchannel[j]] < 0)
            continue;
        if (columns) {
            const int64_t at = image * n + j;
            const double a2 = real(c->frame, 4 * at, c->is_double), c2 = real(c->frame, 4 * at + 3, c->is_double);
            s->cx[j] = real(c->xy, 2 * at, c->is_double), s->cy[j] = real(c->xy, 2 * at + 1, c->is_double);
            s->ca[j] = a2, s->cb[j] = real(c->frame, 4 * at + 2, c->is_double), s->cc[j] = c2;
            s->clog[j] = log_or_nan(a2 * c2);
        }
        const int64_t sc = s->cscale[j], rank = s->crank[j];
        for (int32_t i = s->qhead[s->cchannel[j]]; i >= 0; i = s->qnext[i]) {
            const int64_t at = s->first[s->qscale[i] * S + sc] + s->place[i * S + sc] + rank;
            s->qrow[at] = i, s->crow[at] = j;
        }
    }
}

/* The columns of the pair's correspondences: points, the correspondence's hypothesis, log det of
 * its linear part and its scale change; NaN points and scale change in the padding (never an inlier). */
static void fill_columns(Scratch *s) {
    for (int64_t g = 0; g < s->scales * s->scales; g++)
        for (int64_t l = s->first[g] + s->sizes[g]; l < s->first[g] + padded(s->sizes[g]); l++)
            s->x1[l] = s->y1[l] = s->x2[l] = s->y2[l] = s->log_s[l] = NAN;
    for (int64_t g = 0; g < s->scales * s->scales; g++)
        for (int64_t l = s->first[g]; l < s->first[g] + s->sizes[g]; l++) {
            const int64_t i = s->qrow[l], j = s->crow[l];
            const double x1 = s->qx[i], y1 = s->qy[i], x2 = s->cx[j], y2 = s->cy[j];
            const double p = s->qp[i], c2 = s->cc[j];
            const double a = s->ca[j] / p, c = c2 / s->qr[i];
            const double b = s->cb[j] / p - c2 * s->qq[i] / s->qpr[i];
            s->x1[l] = x1, s->y1[l] = y1, s->x2[l] = x2, s->y2[l] = y2;
            s->a[l] = a, s->b[l] = b, s->c[l] = c;
            s->tx[l] = x2 - a * x1;
            s->ty[l] = y2 - b * x1 - c * y1;
            s->log_h[l] = log_or_nan(a * c);
            s->log_s[l] = s->clog[j] - s->qlog[i];
        }
}

/* Inliers of hypothesis h, log_h = log(a c), over the group's n rows at `base`: the mask in s->mask,
 * their number with repeated features in *raw; if that is above `floor`, their rows in
 * s->inlier[0 .. *m) and the count with each feature once is returned, else 0. */
static INLINE int64_t inliers(Scratch *s, int64_t base, int64_t n, const double *h, double log_h, double th_sq,
                       const Settings *set, int64_t num_rows, int64_t floor, int64_t *m) {
    const int64_t raw = score(padded(n), s->x1 + base, s->y1 + base, s->x2 + base, s->y2 + base, s->log_s + base, h, log_h,
                              th_sq, set->log_limit, (int)set->symmetric, s->mask);
    if (raw <= floor)
        return 0;
    *m = inlier_rows(padded(n), s->mask, s->inlier);
    return count_unique(*m, s->inlier, s->qrow + base, s->crow + base, s, num_rows);
}

/* Steps 2-3 on the group of n rows at `base`: its count (each feature once), its parameters in h and
 * its inliers' rows (relative to base) in s->inlier[0 .. *m) (count 0: h, *m untouched). */
HOT_LOOP static int64_t verify_group(Scratch *s, int64_t base, int64_t n, const Settings *set, int64_t num_rows, double *h,
                            int64_t *m) {
    const int64_t keep = set->lo_hypotheses > 0 ? set->lo_hypotheses : 1;
    int64_t ranked = 0, found;
    for (int64_t k = base; k < base + n; k++) {
        const double hk[5] = {s->a[k], s->b[k], s->c[k], s->tx[k], s->ty[k]};
        if (!valid_hypothesis(hk[0], hk[1], hk[2], hk[3], hk[4]))
            continue;
        /* the count is at most the raw count; a later hypothesis enters only with a strictly higher count */
        const int64_t floor = ranked == keep ? s->top[keep - 1].count : 0;
        const int64_t count = inliers(s, base, n, hk, s->log_h[k], set->th_sq, set, num_rows, floor, &found);
        if (count <= floor)
            continue;
        int64_t at = ranked < keep ? ranked++ : keep - 1;
        while (at > 0 && s->top[at - 1].count < count) {
            s->top[at] = s->top[at - 1];
            at--;
        }
        s->top[at].count = count;
        memcpy(s->top[at].h, hk, sizeof hk);
    }
    int64_t best = -1;
    for (int64_t j = 0; j < ranked; j++) {
        Ranked *t = &s->top[j];
        if (set->lo_hypotheses > 0 && t->count >= set->lo_min_inliers) {
            for (int64_t round = 0; round < set->lo_rounds; round++) {
                double fitted[5];
                score(padded(n), s->x1 + base, s->y1 + base, s->x2 + base, s->y2 + base, s->log_s + base, t->h,
                      log_or_nan(t->h[0] * t->h[2]), set->lo_th_sq, set->log_limit, (int)set->symmetric, s->mask);
                found = inlier_rows(padded(n), s->mask, s->inlier);
                if (!fit(found, s->inlier, s->x1 + base, s->y1 + base, s->x2 + base, s->y2 + base, fitted))
                    break;
                const int64_t count = inliers(s, base, n, fitted, log_or_nan(fitted[0] * fitted[2]), set->th_sq, set,
                                              num_rows, 0, &found);
                if (count <= t->count)
                    break;
                t->count = count;
                memcpy(t->h, fitted, sizeof fitted);
            }
        }
        if (best < 0 || t->count > s->top[best].count)
            best = j;
    }
    if (best < 0 || s->top[best].count == 0)
        return 0;
    memcpy(h, s->top[best].h, sizeof s->top[best].h);
    inliers(s, base, n, h, log_or_nan(h[0] * h[2]), set->th_sq, set, num_rows, 0, m);
    return s->top[best].count;
}

/* Per pair of [pair_begin, pair_end): out_corr[k], its tentative correspondences, and out_work[k],
 * the sum of its groups' squared sizes (the hypothesis x correspondence evaluations). Returns 0,
 * -1 if memory ran out, or the number of valid rows with a scale or channel out of range. */
int64_t fsm_count_pairs(int64_t pair_begin, int64_t pair_end, const Table *q, const Table *c,
                        const int64_t *query_index, int64_t S, int64_t C, int64_t *out_corr, double *out_work) {
    Scratch s;
    if (!init_scratch(&s, q, c, S, C, 1))
        return -1;
    int64_t bad = 0;
    for (int64_t k = pair_begin; k < pair_end; k++) {
        bad += load_query(&s, q, query_index[k]);
        bad += build_pair(&s, c, k);
        double work = 0;
        for (int64_t g = 0; g < S * S; g++)
            work += (double)s.sizes[g] * (double)s.sizes[g];
        out_corr[k] = s.corr, out_work[k] = work;
        clear_pair(&s, c);
    }
    free_scratch(&s);
    return bad;
}

/* The tentative correspondences of pairs [pair_begin, pair_end), pair k's from row offsets[k] of
 * out_group (k * S^2 + sq * S + sc), out_qrow, out_crow, in group then (query row, candidate row)
 * order. Returns as fsm_count_pairs. */
int64_t fsm_correspondences(int64_t pair_begin, int64_t pair_end, const Table *q, const Table *c,
                            const int64_t *query_index, int64_t S, int64_t C, const int64_t *offsets,
                            int64_t *out_group, int64_t *out_qrow, int64_t *out_crow) {
    Scratch s;
    if (!init_scratch(&s, q, c, S, C, 1))
        return -1;
    int64_t bad = 0;
    for (int64_t k = pair_begin; k < pair_end; k++) {
        bad += load_query(&s, q, query_index[k]);
        bad += build_pair(&s, c, k);
        if (!reserve(&s, s.rows)) {
            free_scratch(&s);
            return -1;
        }
        emit_pair(&s, c, k, 0);
        int64_t at = offsets[k];
        for (int64_t g = 0; g < S * S; g++)
            for (int64_t l = s.first[g]; l < s.first[g] + s.sizes[g]; l++, at++)
                out_group[at] = k * S * S + g, out_qrow[at] = s.qrow[l], out_crow[at] = s.crow[l];
        clear_pair(&s, c);
    }
    free_scratch(&s);
    return bad;
}

/* Spatial verification of pairs [pair_begin, pair_end) (steps 1-4 above): out_count[k],
 * out_params[5 k ...], out_scale_pair[2 k ...], out_corr[k] (its tentative correspondences) and
 * out_matches[k], the number of the winner's inlier correspondences; these, (query row, candidate
 * row) pair after pair, in a buffer the kernel allocates, *out_rows (NULL without any), handed to
 * fsm_take_matches. Returns as fsm_count_pairs. */
int64_t fsm_verify_pairs(int64_t pair_begin, int64_t pair_end, const Table *q, const Table *c,
                         const int64_t *query_index, int64_t S, int64_t C, const Settings *set, int64_t *out_count,
                         double *out_params, int64_t *out_scale_pair, int64_t *out_corr, int64_t *out_matches,
                         int64_t **out_rows) {
    Scratch s;
    *out_rows = NULL;
    if (!init_scratch(&s, q, c, S, C, set->lo_hypotheses > 0 ? set->lo_hypotheses : 1))
        return -1;
    const int64_t num_rows = c->capacity > 0 ? c->capacity : 1;
    int64_t bad = 0, used = 0, room = 0, *rows = NULL;
    for (int64_t k = pair_begin; k < pair_end; k++) {
        bad += load_query(&s, q, query_index[k]);
        bad += build_pair(&s, c, k);
        if (!reserve(&s, s.rows)) {
            free(rows);
            free_scratch(&s);
            return -1;
        }
        emit_pair(&s, c, k, 1);
        fill_columns(&s);
        int64_t best = 0, best_m = 0, best_g = 0;
        double *params = out_params + 5 * k;
        for (int m = 0; m < 5; m++)
            params[m] = NAN;
        out_scale_pair[2 * k] = out_scale_pair[2 * k + 1] = -1;
        for (int64_t g = 0; g < S * S; g++) {
            const int64_t base = s.first[g], n = s.sizes[g];
            int64_t m = 0;
            double h[5];
            if (!n)
                continue;
            const int64_t count = verify_group(&s, base, n, set, num_rows, h, &m);
            if (count <= best)
                continue;
            best = count, best_m = m, best_g = g;
            memcpy(params, h, sizeof h);
            if (used + 2 * m > room) {
                const int64_t grown_room = 2 * (used + 2 * m);
                int64_t *grown = realloc(rows, (size_t)grown_room * sizeof(int64_t));
                if (!grown) {
                    free(rows);
                    free_scratch(&s);
                    return -1;
                }
                rows = grown, room = grown_room;
            }
            for (int64_t t = 0; t < m; t++) {
                rows[used + 2 * t] = s.qrow[base + s.inlier[t]];
                rows[used + 2 * t + 1] = s.crow[base + s.inlier[t]];
            }
        }
        if (best > 0)
            out_scale_pair[2 * k] = best_g / S, out_scale_pair[2 * k + 1] = best_g % S;
        out_count[k] = best, out_corr[k] = s.corr, out_matches[k] = best_m;
        used += 2 * best_m;
        clear_pair(&s, c);
    }
    free_scratch(&s);
    *out_rows = rows;
    return bad;
}

/* Copies the inlier correspondences of fsm_verify_pairs' buffer `rows` (pairs [pair_begin,
 * pair_end), matches[k] each) to out (pairs, longest, 2), pair k's from out[k, 0], and frees the
 * buffer; with out NULL only frees it. */
void fsm_take_matches(int64_t pair_begin, int64_t pair_end, const int64_t *matches, int64_t *rows, int64_t longest,
                      int64_t *out) {
    if (out) {
        const int64_t *from = rows;
        for (int64_t k = pair_begin; k < pair_end; k++)
            if (matches[k] > 0) {
                memcpy(out + 2 * longest * k, from, (size_t)(2 * matches[k]) * sizeof(int64_t));
                from += 2 * matches[k];
            }
    }
    free(rows);
}
