/* Maximally stable extremal regions of many maps on the CPU, with VLFeat's semantics (vl/mser.c):
 * the C path of gpu_dsm.mser.mser, whose module docstring states the rules.
 *
 * Per map, regions of {u <= v} (dark-on-bright; the caller passes 255 - levels for bright):
 *   1. the support {u < top} (top: the map's largest value) sorted by value, stable in raster
 *      order (a counting sort of the support alone: after a ReLU it is a few percent of the map); every other pixel joins only the root, the whole map at top;
 *   2. union-find over the support, one grey value at a time, 8-connectivity. After a value v,
 *      each component holding a pixel of value v is an extremal region of value v; the regions
 *      it absorbed (components last grown at a lower value) get it as their parent. The
 *      components left without a parent at the end get the root;
 *   3. variation (|R_top| - |R|) / |R| in single precision, R_top the highest ancestor of value
 *      at most v + delta; maximal stability against a parent one value up (the larger variation
 *      loses, ties the child); then from the highest value down: variation, area bounds (single
 *      precision, as VLFeat) and the relative area difference with the nearest kept ancestor
 *      (the root if none);
 *   4. the kept regions' pixels visited in the order of the sorted support (value, raster), each
 *      pixel adding itself to every kept region that holds it: coordinate sums, then the centred
 *      second moments, the sum and maximum of the values, the box. A kept root takes the whole
 *      map in raster order. These are the float64 operations, in the same order, of the tensor
 *      path (per-region sequential sums), so both give the same bits; the build turns
 *      floating-point contraction off.
 * Per kept region it writes: map, area, value, representative (first pixel in raster order,
 * y * W + x), seed (first pixel of the region's own value in column-major order, x * H + y),
 * mean (x, y), covariance (xx, xy, yy), peak and sum of the values, box (x0, y0, x1, y1).
 * Built and loaded by gpu_dsm.kernels.native, called through ctypes (which releases the GIL) by
 * gpu_dsm.kernels.mser, one range of maps per thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#pragma STDC FP_CONTRACT OFF

#define NO_NODE (-1)

typedef struct {
    int32_t *parent, *size, *stamp, *node, *rep, *seed, *order, *leaf, *waiting;
    int32_t *er_value, *er_area, *er_parent, *er_rep, *er_seed, *er_kept_anc, *er_next_kept, *er_slot;
    float *er_var;
    uint8_t *er_stable, *active;
} Work;

static int32_t find(int32_t *parent, int32_t p) {
    while (parent[p] != p) {
        parent[p] = parent[parent[p]];  /* path halving */
        p = parent[p];
    }
    return p;
}

static void free_work(Work *w) {
    void **all[] = {(void **)&w->parent, (void **)&w->size, (void **)&w->stamp, (void **)&w->node, (void **)&w->rep,
                    (void **)&w->seed, (void **)&w->order, (void **)&w->leaf, (void **)&w->waiting,
                    (void **)&w->er_value, (void **)&w->er_area, (void **)&w->er_parent, (void **)&w->er_rep,
                    (void **)&w->er_seed, (void **)&w->er_kept_anc, (void **)&w->er_next_kept, (void **)&w->er_slot,
                    (void **)&w->er_var, (void **)&w->er_stable, (void **)&w->active};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        free(*all[i]);
        *all[i] = NULL;
    }
}

static int alloc_work(Work *w, int64_t nel) {
    size_t n = (size_t)nel + 1, b = n * sizeof(int32_t);
    memset(w, 0, sizeof(*w));
    w->parent = malloc(b); w->size = malloc(b); w->stamp = malloc(b); w->node = malloc(b); w->rep = malloc(b);
    w->seed = malloc(b); w->order = malloc(b); w->leaf = malloc(b); w->waiting = malloc(b);
    w->er_value = malloc(b); w->er_area = malloc(b); w->er_parent = malloc(b); w->er_rep = malloc(b);
    w->er_seed = malloc(b); w->er_kept_anc = malloc(b); w->er_next_kept = malloc(b); w->er_slot = malloc(b);
    w->er_var = malloc(n * sizeof(float)); w->er_stable = malloc(n); w->active = malloc(n);
    if (!w->parent || !w->size || !w->stamp || !w->node || !w->rep || !w->seed || !w->order || !w->leaf ||
        !w->waiting || !w->er_value || !w->er_area || !w->er_parent || !w->er_rep || !w->er_seed ||
        !w->er_kept_anc || !w->er_next_kept || !w->er_slot || !w->er_var || !w->er_stable || !w->active) {
        free_work(w);
        return -1;
    }
    return 0;
}

static inline double value_at(const void *values, int64_t values_f64, int64_t i) {
    return values_f64 ? ((const double *)values)[i] : (double)((const float *)values)[i];
}

/* Regions of one map, written from slot `first`; returns the number of kept regions (written
 * only while below `capacity`). */
static int64_t one_map(Work *w, int64_t map, int64_t height, int64_t width, const uint8_t *u, int64_t delta,
                       const void *values, int64_t values_f64, double max_variation, double min_diversity,
                       double min_area, double max_area, int64_t first, int64_t capacity, int64_t *out_map,
                       int64_t *out_area, int64_t *out_value, int64_t *out_rep, int64_t *out_seed, double *out_mean,
                       double *out_cov, double *out_peak, double *out_total, int64_t *out_bbox) {
    const int32_t nel = (int32_t)(height * width);
    int32_t count[257], start[257];
    uint8_t top = 0;
    for (int32_t p = 0; p < nel; p++) top = u[p] > top ? u[p] : top;
    /* the support in raster order (in `leaf`, free until step 2 ends), then sorted by value */
    memset(count, 0, sizeof(count));
    int32_t support = 0;
    for (int32_t p = 0; p < nel; p++)
        if (u[p] < top) {
            w->leaf[support++] = p;
            count[u[p]]++;
        }
    start[0] = 0;
    for (int v = 0; v < 256; v++) start[v + 1] = start[v] + count[v];
    {
        int32_t fill[256];
        memcpy(fill, start, sizeof(fill));
        for (int32_t i = 0; i < support; i++) {
            int32_t p = w->leaf[i];
            w->order[fill[u[p]]++] = p;
        }
    }
    memset(w->active, 0, (size_t)nel);

    int32_t ner = 0;
    for (int32_t v = 0; v < top; v++) {
        if (count[v] == 0) continue;
        int32_t num_waiting = 0;
        for (int32_t i = start[v]; i < start[v + 1]; i++) {
            int32_t p = w->order[i];
            int32_t y = p / (int32_t)width, x = p % (int32_t)width;
            w->active[p] = 1;
            w->parent[p] = p;
            w->size[p] = 1;
            w->stamp[p] = v;
            w->node[p] = NO_NODE;
            w->rep[p] = p;
            w->seed[p] = x * (int32_t)height + y;
            for (int dy = -1; dy <= 1; dy++) {
                int32_t ny = y + dy;
                if (ny < 0 || ny >= height) continue;
                for (int dx = -1; dx <= 1; dx++) {
                    int32_t nx = x + dx;
                    if ((dy == 0 && dx == 0) || nx < 0 || nx >= width) continue;
                    int32_t q = ny * (int32_t)width + nx;
                    if (!w->active[q]) continue;
                    int32_t rp = find(w->parent, p), rq = find(w->parent, q);
                    if (rp == rq) continue;
                    if (w->stamp[rq] != v) {  /* a component last grown below v: its region waits for a parent */
                        w->waiting[num_waiting++] = w->node[rq];
                        w->stamp[rq] = v;
                        w->seed[rq] = INT32_MAX;
                    }
                    int32_t keep = w->size[rp] >= w->size[rq] ? rp : rq, gone = keep == rp ? rq : rp;
                    w->parent[gone] = keep;
                    w->size[keep] += w->size[gone];
                    if (w->rep[gone] < w->rep[keep]) w->rep[keep] = w->rep[gone];
                    if (w->seed[gone] < w->seed[keep]) w->seed[keep] = w->seed[gone];
                    w->stamp[keep] = v;
                }
            }
        }
        for (int32_t i = start[v]; i < start[v + 1]; i++) {
            int32_t r = find(w->parent, w->order[i]);
            int32_t e = w->node[r];
            if (e == NO_NODE || w->er_value[e] != v) {
                e = ner++;
                w->er_value[e] = v;
                w->er_area[e] = w->size[r];
                w->er_rep[e] = w->rep[r];
                w->er_seed[e] = w->seed[r];
                w->er_parent[e] = NO_NODE;
                w->node[r] = e;
            }
            w->leaf[w->order[i]] = e;
        }
        for (int32_t i = 0; i < num_waiting; i++) {
            int32_t e = w->waiting[i];
            w->er_parent[e] = w->node[find(w->parent, w->er_rep[e])];
        }
    }
    /* the root: the whole map at its top value */
    const int32_t root = ner++;
    w->er_value[root] = top;
    w->er_area[root] = nel;
    w->er_rep[root] = 0;
    w->er_parent[root] = root;
    {
        int32_t best = INT32_MAX;  /* the first pixel of the top value, column-major */
        for (int32_t s = 0; s < nel && best == INT32_MAX; s++)
            if (u[(s % (int32_t)height) * (int32_t)width + s / (int32_t)height] == top) best = s;
        w->er_seed[root] = best;
    }
    for (int32_t e = 0; e < root; e++)
        if (w->er_parent[e] == NO_NODE) w->er_parent[e] = root;

    /* variation and maximal stability */
    for (int32_t e = 0; e < ner; e++) {
        int32_t target = w->er_value[e] + (int32_t)delta, t = e;
        while (w->er_parent[t] != t && w->er_value[w->er_parent[t]] <= target) t = w->er_parent[t];
        w->er_var[e] = (float)(w->er_area[t] - w->er_area[e]) / (float)w->er_area[e];
        w->er_stable[e] = 1;
    }
    for (int32_t e = 0; e < ner; e++) {
        int32_t p = w->er_parent[e];
        if (w->er_value[p] > w->er_value[e] + 1) continue;
        w->er_stable[w->er_var[e] < w->er_var[p] ? p : e] = 0;
    }
    /* filters, from the highest value down (a parent's id is above its children's) */
    const float max_area_f = (float)max_area * (float)nel, min_area_f = (float)min_area * (float)nel;
    const float max_var_f = (float)max_variation, min_div_f = (float)min_diversity;
    for (int32_t e = ner - 1; e >= 0; e--) {
        if (!w->er_stable[e]) continue;
        float area = (float)w->er_area[e];
        if (w->er_var[e] >= max_var_f || area > max_area_f || area < min_area_f) {
            w->er_stable[e] = 0;
            continue;
        }
        if (min_diversity < 1.0 && w->er_parent[e] != e) {
            int32_t p = w->er_parent[e];
            while (!w->er_stable[p] && w->er_parent[p] != p) p = w->er_parent[p];
            float parea = (float)w->er_area[p];
            if ((parea - area) / parea < min_div_f) w->er_stable[e] = 0;
        }
    }
    /* kept regions: slots, the nearest kept ancestor-or-self (the root excluded) of each region */
    int64_t kept = 0;
    for (int32_t e = ner - 1; e >= 0; e--) {
        int32_t p = w->er_parent[e];
        int32_t above = (e == root) ? NO_NODE : w->er_kept_anc[p];
        w->er_slot[e] = NO_NODE;
        if (w->er_stable[e] && e != root) {
            w->er_kept_anc[e] = e;
            w->er_next_kept[e] = above;
        } else {
            w->er_kept_anc[e] = above;
        }
        if (w->er_stable[e]) w->er_slot[e] = (int32_t)kept++;
    }
    if (kept == 0 || first + kept > capacity) return kept;
    for (int32_t e = 0; e < ner; e++) {
        int32_t s = w->er_slot[e];
        if (s < 0) continue;
        int64_t k = first + s;
        out_map[k] = map;
        out_area[k] = w->er_area[e];
        out_value[k] = w->er_value[e];
        out_rep[k] = w->er_rep[e];
        out_seed[k] = w->er_seed[e];
        out_mean[2 * k] = out_mean[2 * k + 1] = 0.0;
        out_cov[3 * k] = out_cov[3 * k + 1] = out_cov[3 * k + 2] = 0.0;
        out_total[k] = 0.0;
        out_peak[k] = -__builtin_inf();
        out_bbox[4 * k] = out_bbox[4 * k + 1] = INT64_MAX;
        out_bbox[4 * k + 2] = out_bbox[4 * k + 3] = -1;
    }
    /* first pass: coordinate sums (integers, exact), values, boxes */
    for (int32_t i = 0; i < support; i++) {
        int32_t p = w->order[i];
        int32_t e = w->er_kept_anc[w->leaf[p]];
        if (e == NO_NODE) continue;
        int64_t y = p / (int32_t)width, x = p % (int32_t)width;
        double value = value_at(values, values_f64, p);
        for (; e != NO_NODE; e = w->er_next_kept[e]) {
            int64_t k = first + w->er_slot[e];
            out_mean[2 * k] += (double)x;
            out_mean[2 * k + 1] += (double)y;
            out_total[k] += value;
            if (value > out_peak[k]) out_peak[k] = value;
            if (x < out_bbox[4 * k]) out_bbox[4 * k] = x;
            if (y < out_bbox[4 * k + 1]) out_bbox[4 * k + 1] = y;
            if (x > out_bbox[4 * k + 2]) out_bbox[4 * k + 2] = x;
            if (y > out_bbox[4 * k + 3]) out_bbox[4 * k + 3] = y;
        }
    }
    int64_t root_slot = w->er_slot[root] >= 0 ? first + w->er_slot[root] : -1;
    if (root_slot >= 0) {
        int64_t k = root_slot;
        for (int32_t p = 0; p < nel; p++) {
            double value = value_at(values, values_f64, p);
            out_mean[2 * k] += (double)(p % (int32_t)width);
            out_mean[2 * k + 1] += (double)(p / (int32_t)width);
            out_total[k] += value;
            if (value > out_peak[k]) out_peak[k] = value;
        }
        out_bbox[4 * k] = out_bbox[4 * k + 1] = 0;
        out_bbox[4 * k + 2] = width - 1;
        out_bbox[4 * k + 3] = height - 1;
    }
    for (int64_t k = first; k < first + kept; k++) {
        double area = (double)out_area[k];
        out_mean[2 * k] = out_mean[2 * k] / area;
        out_mean[2 * k + 1] = out_mean[2 * k + 1] / area;
    }
    /* second pass: centred second moments, summed in the same order */
    for (int32_t i = 0; i < support; i++) {
        int32_t p = w->order[i];
        int32_t e = w->er_kept_anc[w->leaf[p]];
        if (e == NO_NODE) continue;
        double y = (double)(p / (int32_t)width), x = (double)(p % (int32_t)width);
        for (; e != NO_NODE; e = w->er_next_kept[e]) {
            int64_t k = first + w->er_slot[e];
            double dx = x - out_mean[2 * k], dy = y - out_mean[2 * k + 1];
            out_cov[3 * k] += dx * dx;
            out_cov[3 * k + 1] += dx * dy;
            out_cov[3 * k + 2] += dy * dy;
        }
    }
    if (root_slot >= 0) {
        int64_t k = root_slot;
        for (int32_t p = 0; p < nel; p++) {
            double dx = (double)(p % (int32_t)width) - out_mean[2 * k], dy = (double)(p / (int32_t)width) - out_mean[2 * k + 1];
            out_cov[3 * k] += dx * dx;
            out_cov[3 * k + 1] += dx * dy;
            out_cov[3 * k + 2] += dy * dy;
        }
    }
    for (int64_t k = first; k < first + kept; k++) {
        double area = (double)out_area[k];
        out_cov[3 * k] = out_cov[3 * k] / area;
        out_cov[3 * k + 1] = out_cov[3 * k + 1] / area;
        out_cov[3 * k + 2] = out_cov[3 * k + 2] / area;
    }
    return kept;
}

/* Regions of maps [map_begin, map_end) of u (num_maps x height x width, uint8, row-major), written
 * from slot 0 of the outputs; returns how many regions were kept (all written when at most
 * `capacity`; otherwise the outputs are incomplete and the caller retries with that capacity), or
 * -1 when memory runs out. values: float32 (values_f64 = 0) or float64, the map's shape. */
int64_t mser_maps(int64_t map_begin, int64_t map_end, int64_t height, int64_t width, const uint8_t *u,
                  const int64_t *delta, const void *values, int64_t values_f64, double max_variation,
                  double min_diversity, double min_area, double max_area, int64_t capacity, int64_t *out_map,
                  int64_t *out_area, int64_t *out_value, int64_t *out_rep, int64_t *out_seed, double *out_mean,
                  double *out_cov, double *out_peak, double *out_total, int64_t *out_bbox) {
    Work w;
    const int64_t nel = height * width;
    if (alloc_work(&w, nel) != 0) return -1;
    int64_t total = 0;
    for (int64_t m = map_begin; m < map_end; m++) {
        const void *map_values = values_f64 ? (const void *)((const double *)values + m * nel)
                                            : (const void *)((const float *)values + m * nel);
        total += one_map(&w, m, height, width, u + m * nel, delta[m], map_values, values_f64, max_variation,
                         min_diversity, min_area, max_area, total, capacity, out_map, out_area, out_value, out_rep,
                         out_seed, out_mean, out_cov, out_peak, out_total, out_bbox);
    }
    free_work(&w);
    return total;
}
