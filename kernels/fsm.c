/* Fast spatial matching on the CPU (DSM paper 3.5): the inner loop of gpu_dsm.match.spatial_verify.
 *
 * A group is the tentative correspondences of one (query, candidate) pair and one scale pair,
 * rows starts[g] .. starts[g + 1] - 1 of the flat arrays, sorted by (query row, candidate row).
 * For each group of [group_begin, group_end):
 *   1. one upright-affine hypothesis per correspondence, T = A2 A1^-1, t = x2 - T x1, and the
 *      correspondence's scale change log det A2 - log det A1;
 *   2. every valid hypothesis (a, c > 0, finite) scored against every correspondence of the group:
 *      inlier if the transfer error is below th_sq and the scale change is within log_limit of
 *      log det T; counted with each feature once (min of distinct query and candidate rows);
 *   3. the best lo_hypotheses (ties: earlier correspondence first) with >= lo_min_inliers are
 *      refined: inliers at lo_th_sq, least-squares fit, re-count, kept while the count grows, at
 *      most lo_rounds times;
 *   4. the first of the best counts is written: out_count[g], out_params[g] (a, b, c, tx, ty;
 *      NaN without inliers) and its inlier mask over the group's rows, out_mask[row].
 * Every error, scale change and fit goes through the float64 operations of the plain matcher
 * (gpu_dsm.reference.match), in its order, so inlier decisions are the same bit for bit; the
 * build turns floating-point contraction off (no fused multiply-adds). Built and loaded by
 * gpu_dsm.kernels.native, called through ctypes (which releases the GIL) by
 * gpu_dsm.kernels.fsm, one range of groups per thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#pragma STDC FP_CONTRACT OFF

typedef struct {
    int64_t count;
    double h[5];
} Ranked;

/* Scratch of one thread: per-row columns of the largest group and the candidate-row stamps. */
typedef struct {
    double *a, *b, *c, *tx, *ty, *log_h, *log_s;
    uint8_t *mask, *best_mask;
    uint32_t *stamp;
    uint32_t tag;
    Ranked *top;
} Scratch;

/* math.log with IEEE results for the arguments where Python's raises: log 0 = -inf, else NaN. */
static inline double log_or_nan(double x) {
    if (x > 0)
        return log(x);
    return x == 0 ? -INFINITY : NAN;
}

static inline int valid_hypothesis(double a, double b, double c, double tx, double ty) {
    return a > 0 && c > 0 && isfinite(a) && isfinite(b) && isfinite(c) && isfinite(tx) && isfinite(ty);
}

/* The hot loop, compiled twice where GCC can choose at load time (AVX2 where the CPU has it: 4
 * doubles per instruction, no fused multiply-add), so one library serves every x86-64 CPU. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 6 && defined(__x86_64__) && defined(__linux__)
#define HOT_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define HOT_LOOP
#endif

/* Number of inliers of hypothesis (a, b, c, tx, ty) over n rows (with repeated features). */
HOT_LOOP static int64_t count_inliers(int64_t n, const double *restrict x1, const double *restrict y1,
                                      const double *restrict x2, const double *restrict y2,
                                      const double *restrict log_s, double a, double b, double c, double tx, double ty,
                                      double th_sq, double log_limit, int symmetric) {
    const double log_h = log_or_nan(a * c);
    int64_t inliers = 0;
    if (symmetric) {
        for (int64_t l = 0; l < n; l++) {
            double rx = x2[l] - a * x1[l] - tx;
            double ry = y2[l] - b * x1[l] - c * y1[l] - ty;
            double e = rx * rx + ry * ry;
            double bx = rx / a;
            double by = (ry - b * bx) / c;
            e = e + (bx * bx + by * by);
            double d = log_s[l] - log_h;
            inliers += (e < th_sq) & (fabs(d) <= log_limit);
        }
    } else {
        for (int64_t l = 0; l < n; l++) {
            double rx = x2[l] - a * x1[l] - tx;
            double ry = y2[l] - b * x1[l] - c * y1[l] - ty;
            double e = rx * rx + ry * ry;
            double d = log_s[l] - log_h;
            inliers += (e < th_sq) & (fabs(d) <= log_limit);
        }
    }
    return inliers;
}

/* Inlier mask of hypothesis (a, b, c, tx, ty) over n rows, as count_inliers; returns the number of inliers. */
static int64_t score(int64_t n, const double *x1, const double *y1, const double *x2, const double *y2,
                     const double *log_s, double a, double b, double c, double tx, double ty, double th_sq,
                     double log_limit, int symmetric, uint8_t *mask) {
    const double log_h = log_or_nan(a * c);
    int64_t inliers = 0;
    if (symmetric) {
        for (int64_t l = 0; l < n; l++) {
            double rx = x2[l] - a * x1[l] - tx;
            double ry = y2[l] - b * x1[l] - c * y1[l] - ty;
            double e = rx * rx + ry * ry;
            double bx = rx / a;
            double by = (ry - b * bx) / c;
            e = e + (bx * bx + by * by);
            uint8_t in = (uint8_t)((fabs(log_s[l] - log_h) <= log_limit) & (e < th_sq));
            mask[l] = in;
            inliers += in;
        }
    } else {
        for (int64_t l = 0; l < n; l++) {
            double rx = x2[l] - a * x1[l] - tx;
            double ry = y2[l] - b * x1[l] - c * y1[l] - ty;
            double e = rx * rx + ry * ry;
            uint8_t in = (uint8_t)((fabs(log_s[l] - log_h) <= log_limit) & (e < th_sq));
            mask[l] = in;
            inliers += in;
        }
    }
    return inliers;
}

/* Inliers with each feature once: min(distinct query rows, distinct candidate rows). The query
 * rows of a group are sorted, so distinct ones are runs; candidate rows are stamped. */
static int64_t count_unique(int64_t n, const uint8_t *mask, const int64_t *qrow, const int64_t *crow, Scratch *s,
                            int64_t num_rows) {
    if (++s->tag == 0) {
        memset(s->stamp, 0, (size_t)num_rows * sizeof(uint32_t));
        s->tag = 1;
    }
    const uint32_t tag = s->tag;
    int64_t nq = 0, nc = 0, last_q = -1;
    for (int64_t l = 0; l < n; l++) {
        if (!mask[l])
            continue;
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

/* Least-squares (a, b, c, tx, ty) on the masked rows: sums in row order, Cramer's rule, as
 * gpu_dsm.reference.match.solve_normal_equations. Returns 0 if degenerate. */
static int fit(int64_t n, const double *x1, const double *y1, const double *x2, const double *y2, const uint8_t *mask,
               double *h) {
    double sx = 0, sy = 0, sxx = 0, sxy = 0, syy = 0, su = 0, sxu = 0, sv = 0, sxv = 0, syv = 0;
    int64_t m = 0;
    for (int64_t l = 0; l < n; l++) {
        if (!mask[l])
            continue;
        double x = x1[l], y = y1[l], u = x2[l], v = y2[l];
        m++;
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
    free(s->a), free(s->b), free(s->c), free(s->tx), free(s->ty), free(s->log_h), free(s->log_s);
    free(s->mask), free(s->best_mask), free(s->stamp), free(s->top);
}

/* Returns 0, -1 if memory ran out, or the number of rows whose candidate row is outside
 * [0, num_rows) (those groups are skipped and left with count 0). */
int64_t fsm_verify_groups(int64_t group_begin, int64_t group_end, const int64_t *starts, const double *x1,
                          const double *y1, const double *x2, const double *y2, const double *frame1,
                          const double *frame2, const int64_t *qrow, const int64_t *crow, int64_t num_rows,
                          double th_sq, double lo_th_sq, double log_limit, int64_t symmetric, int64_t lo_hypotheses,
                          int64_t lo_rounds, int64_t lo_min_inliers, int64_t *out_count, double *out_params,
                          uint8_t *out_mask) {
    int64_t largest = 1, bad = 0;
    for (int64_t g = group_begin; g < group_end; g++)
        if (starts[g + 1] - starts[g] > largest)
            largest = starts[g + 1] - starts[g];
    const int64_t keep = lo_hypotheses > 0 ? lo_hypotheses : 1;
    Scratch s = {0};
    size_t col = (size_t)largest * sizeof(double);
    s.a = malloc(col), s.b = malloc(col), s.c = malloc(col), s.tx = malloc(col), s.ty = malloc(col);
    s.log_h = malloc(col), s.log_s = malloc(col);
    s.mask = malloc((size_t)largest), s.best_mask = malloc((size_t)largest);
    s.stamp = calloc((size_t)(num_rows > 0 ? num_rows : 1), sizeof(uint32_t));
    s.top = malloc((size_t)keep * sizeof(Ranked));
    if (!s.a || !s.b || !s.c || !s.tx || !s.ty || !s.log_h || !s.log_s || !s.mask || !s.best_mask || !s.stamp || !s.top) {
        free_scratch(&s);
        return -1;
    }
    for (int64_t g = group_begin; g < group_end; g++) {
        const int64_t base = starts[g], n = starts[g + 1] - base;
        const double *gx1 = x1 + base, *gy1 = y1 + base, *gx2 = x2 + base, *gy2 = y2 + base;
        const int64_t *gq = qrow + base, *gc = crow + base;
        uint8_t *gmask = out_mask + base;
        double *params = out_params + 5 * g;
        out_count[g] = 0;
        for (int k = 0; k < 5; k++)
            params[k] = NAN;
        memset(gmask, 0, (size_t)n);
        int64_t out_of_range = 0;
        for (int64_t l = 0; l < n; l++)
            out_of_range += gc[l] < 0 || gc[l] >= num_rows;
        if (out_of_range) {
            bad += out_of_range;
            continue;
        }
        /* 1. hypotheses and scale changes */
        for (int64_t l = 0; l < n; l++) {
            const double *f1 = frame1 + 3 * (base + l), *f2 = frame2 + 3 * (base + l);
            double p = f1[0], q = f1[1], r = f1[2], a2 = f2[0], b2 = f2[1], c2 = f2[2];
            double a = a2 / p, c = c2 / r;
            double b = b2 / p - c2 * q / (p * r);
            s.a[l] = a, s.b[l] = b, s.c[l] = c;
            s.tx[l] = gx2[l] - a * gx1[l];
            s.ty[l] = gy2[l] - b * gx1[l] - c * gy1[l];
            s.log_s[l] = log_or_nan(a2 * c2) - log_or_nan(p * r);
        }
        /* 2. every hypothesis scored; the best `keep` kept in rank order */
        int64_t ranked = 0;
        for (int64_t k = 0; k < n; k++) {
            if (!valid_hypothesis(s.a[k], s.b[k], s.c[k], s.tx[k], s.ty[k]))
                continue;
            int64_t raw = count_inliers(n, gx1, gy1, gx2, gy2, s.log_s, s.a[k], s.b[k], s.c[k], s.tx[k], s.ty[k],
                                        th_sq, log_limit, (int)symmetric);
            /* the count is at most raw; a later hypothesis enters only with a strictly higher count */
            if (raw == 0 || (ranked == keep && raw <= s.top[keep - 1].count))
                continue;
            score(n, gx1, gy1, gx2, gy2, s.log_s, s.a[k], s.b[k], s.c[k], s.tx[k], s.ty[k], th_sq, log_limit,
                  (int)symmetric, s.mask);
            int64_t count = count_unique(n, s.mask, gq, gc, &s, num_rows);
            if (ranked == keep && count <= s.top[keep - 1].count)
                continue;
            int64_t at = ranked < keep ? ranked++ : keep - 1;
            while (at > 0 && s.top[at - 1].count < count) {
                s.top[at] = s.top[at - 1];
                at--;
            }
            s.top[at].count = count;
            s.top[at].h[0] = s.a[k], s.top[at].h[1] = s.b[k], s.top[at].h[2] = s.c[k];
            s.top[at].h[3] = s.tx[k], s.top[at].h[4] = s.ty[k];
        }
        /* 3. local optimisation, 4. the first best */
        int64_t best = -1;
        for (int64_t j = 0; j < ranked; j++) {
            Ranked *t = &s.top[j];
            if (lo_hypotheses > 0 && t->count >= lo_min_inliers) {
                for (int64_t round = 0; round < lo_rounds; round++) {
                    double fitted[5];
                    score(n, gx1, gy1, gx2, gy2, s.log_s, t->h[0], t->h[1], t->h[2], t->h[3], t->h[4], lo_th_sq,
                          log_limit, (int)symmetric, s.mask);
                    if (!fit(n, gx1, gy1, gx2, gy2, s.mask, fitted))
                        break;
                    score(n, gx1, gy1, gx2, gy2, s.log_s, fitted[0], fitted[1], fitted[2], fitted[3], fitted[4], th_sq,
                          log_limit, (int)symmetric, s.mask);
                    int64_t count = count_unique(n, s.mask, gq, gc, &s, num_rows);
                    if (count <= t->count)
                        break;
                    t->count = count;
                    memcpy(t->h, fitted, sizeof fitted);
                }
            }
            if (best < 0 || t->count > s.top[best].count)
                best = j;
        }
        if (best >= 0 && s.top[best].count > 0) {
            const double *h = s.top[best].h;
            out_count[g] = s.top[best].count;
            memcpy(params, h, 5 * sizeof(double));
            score(n, gx1, gy1, gx2, gy2, s.log_s, h[0], h[1], h[2], h[3], h[4], th_sq, log_limit, (int)symmetric, gmask);
        }
    }
    free_scratch(&s);
    return bad;
}
