//! Exact Euclidean neighbour search for high-dimensional vectors through blocked matrix
//! products, behind linfa-nn's [`NearestNeighbour`] trait so linfa-clustering's DBSCAN can use
//! it in place of [`LinearSearch`](linfa_nn::LinearSearch) or a k-d tree.
//!
//! k-d trees do not prune in 1024 dimensions, and a linear scan computes every distance with a
//! scalar loop. Here squared distances come from dot products instead,
//! `‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b` (on unit vectors `2 − 2 a·b`), so a range query is a
//! threshold on a row of the Gram matrix `X Xᵀ`, which ndarray computes with a cache-blocked
//! matrix product (matrixmultiply's SIMD kernels).
//!
//! **Answers are exact**: the same points [`LinearSearch`](linfa_nn::LinearSearch) returns.
//! The dot-product formula rounds differently from the direct sum of squared differences, so
//! every pair whose computed value lies within a rigorous floating-point error bound of the
//! threshold (`2 (d + 4) ε (‖a‖ + ‖b‖)²`, far wider than the real error) is re-checked with
//! the distance function itself, exactly as the linear scan computes it. On realistic data
//! almost no pair is that close to the threshold.
//!
//! DBSCAN queries every point with one range. So the first query that is a row of the indexed
//! batch (recognised by address) computes the neighbour lists of *all* rows for that range at
//! once: the upper triangle of `X Xᵀ` in tiles (by default 256 × 2048, so memory stays bounded
//! whatever the size), spread over the available cores with scoped threads, kept as a
//! compressed sparse row table. Later row queries with the same range are table look-ups.
//! Other queries (points that are not rows of the batch, another range, `k_nearest`, or when
//! the table would exceed its size budget because the range is huge) take one matrix-vector
//! product each, still exact.
//!
//! The dot-product identity only holds for the Euclidean distance ([`L2Dist`](
//! linfa_nn::distance::L2Dist)). The index checks the distance function on probe points when it
//! is built and, for any other metric, answers through a plain linear scan instead.

use std::cmp::Ordering as CmpOrdering;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use linfa::Float;
use linfa_nn::distance::Distance;
use linfa_nn::{BuildError, LinearSearchIndex, NearestNeighbour, NearestNeighbourIndex, NnError};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayBase, ArrayView1, ArrayView2, Axis, Data, Ix2, Slice};

/// A point as linfa-nn passes and returns them.
type Point<'a, F> = ArrayView1<'a, F>;

/// Exact Euclidean neighbour search through blocked Gram-matrix products; see the module
/// documentation. Use it wherever linfa takes a [`NearestNeighbour`], e.g.
/// `Dbscan::params_with(min_points, L2Dist, GramSearch::new())`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GramSearch {
    threads: usize,
    block_rows: usize,
    block_cols: usize,
    max_cached_neighbours: usize,
}

impl Default for GramSearch {
    fn default() -> Self {
        Self {
            threads: 0,
            block_rows: 256,
            block_cols: 2048,
            max_cached_neighbours: 1 << 26,
        }
    }
}

impl GramSearch {
    /// All cores, 256 × 2048 tiles, at most 2²⁶ cached neighbour entries (256 MiB).
    pub fn new() -> Self {
        Self::default()
    }

    /// Threads that compute the neighbour table; 0 (the default) uses every available core.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Tile of the Gram matrix computed at a time (rows × columns, each at least 1). A tile
    /// buffer of `rows × cols` values is allocated per thread.
    pub fn block_size(mut self, rows: usize, cols: usize) -> Self {
        self.block_rows = rows.max(1);
        self.block_cols = cols.max(1);
        self
    }

    /// Largest neighbour table, in entries (4 bytes each; a pair counts twice), kept for row
    /// queries. When a range has more neighbour pairs than that, each query is answered on its
    /// own instead (exact, but one matrix-vector product per query).
    pub fn max_cached_neighbours(mut self, entries: usize) -> Self {
        self.max_cached_neighbours = entries;
        self
    }

    fn thread_count(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

impl NearestNeighbour for GramSearch {
    fn from_batch_with_leaf_size<'a, F: Float, DT: Data<Elem = F>, D: 'a + Distance<F>>(
        &self,
        batch: &'a ArrayBase<DT, Ix2>,
        leaf_size: usize,
        dist_fn: D,
    ) -> Result<Box<dyn 'a + Send + Sync + NearestNeighbourIndex<F>>, BuildError> {
        if leaf_size == 0 {
            return Err(BuildError::EmptyLeaf);
        }
        GramSearchIndex::new(batch, dist_fn, *self)
            .map(|index| Box::new(index) as Box<dyn 'a + Send + Sync + NearestNeighbourIndex<F>>)
    }
}

/// The index [`GramSearch`] builds: the borrowed points, their squared norms and, once a row
/// has been queried, the neighbour table for that range.
pub struct GramSearchIndex<'a, F: Float, D: Distance<F>> {
    data: ArrayView2<'a, F>,
    dist_fn: D,
    config: GramSearch,
    /// `‖xᵢ‖²`, computed once.
    sq_norms: Array1<F>,
    /// `‖xᵢ‖`.
    norms: Array1<F>,
    /// `2 (d + 4) ε`: times `(‖a‖ + ‖b‖)²`, bounds the difference between the dot-product and
    /// the direct squared distance, with a factor two to spare.
    band_coef: F,
    /// Set when the distance function is not (squared) Euclidean: answer by linear scan.
    linear: Option<LinearSearchIndex<'a, F, D>>,
    table: OnceLock<RangeTable>,
}

/// Neighbour lists of every row for one range.
struct RangeTable {
    /// The range (not squared) the table was built for, as `f64` bits.
    range_bits: u64,
    /// `None` when the table would have exceeded its budget.
    lists: Option<Csr>,
}

/// Compressed sparse rows: the neighbours of row `i` are `indices[offsets[i]..offsets[i + 1]]`,
/// ascending.
struct Csr {
    offsets: Vec<usize>,
    indices: Vec<u32>,
}

impl<'a, F: Float, D: Distance<F>> GramSearchIndex<'a, F, D> {
    /// Indexes `batch` (one point per row). Fails if the points have no dimensions.
    pub fn new<DT: Data<Elem = F>>(
        batch: &'a ArrayBase<DT, Ix2>,
        dist_fn: D,
        config: GramSearch,
    ) -> Result<Self, BuildError> {
        if batch.ncols() == 0 {
            return Err(BuildError::ZeroDimension);
        }
        let data = batch.view();
        let linear = if is_squared_euclidean(&dist_fn, &data) {
            None
        } else {
            Some(LinearSearchIndex::new(batch, dist_fn.clone())?)
        };
        let sq_norms: Array1<F> = data.rows().into_iter().map(|r| r.dot(&r)).collect();
        let norms = sq_norms.mapv(|v| v.sqrt());
        let band_coef = F::cast(2 * (data.ncols() + 4)) * F::epsilon();
        Ok(Self {
            data,
            dist_fn,
            config,
            sq_norms,
            norms,
            band_coef,
            linear,
            table: OnceLock::new(),
        })
    }

    /// The row of the batch `point` is a view of (same address, length and stride), if any.
    fn row_of(&self, point: &Point<'_, F>) -> Option<usize> {
        let n = self.data.nrows();
        if n == 0 || point.len() != self.data.ncols() {
            return None;
        }
        let stride = self.data.strides()[0];
        let i = if n == 1 || stride == 0 {
            0
        } else {
            let size = std::mem::size_of::<F>() as isize;
            let offset = (point.as_ptr() as usize).wrapping_sub(self.data.as_ptr() as usize);
            let offset = offset as isize;
            if offset % size != 0 || (offset / size) % stride != 0 {
                return None;
            }
            usize::try_from(offset / size / stride)
                .ok()
                .filter(|&i| i < n)?
        };
        let row = self.data.row(i);
        let same =
            row.as_ptr() == point.as_ptr() && (row.len() < 2 || row.strides() == point.strides());
        same.then_some(i)
    }

    /// Bound on |dot-product squared distance − direct squared distance| for norms `a`, `b`.
    #[inline]
    fn band(&self, norm_a: F, norm_b: F) -> F {
        let s = norm_a + norm_b;
        self.band_coef * s * s
    }

    /// Whether rows `i` and `j` are closer than `rdist` (squared range) as the linear scan
    /// decides, given their dot product `dot`.
    #[inline]
    fn pair_within(&self, i: usize, j: usize, dot: F, rdist: F) -> bool {
        let approx = self.sq_norms[i] + self.sq_norms[j] - (dot + dot);
        let band = self.band(self.norms[i], self.norms[j]);
        if approx + band < rdist {
            true
        } else if approx - band >= rdist {
            false
        } else {
            self.dist_fn.rdistance(self.data.row(i), self.data.row(j)) < rdist
        }
    }

    /// Approximate squared distances from `point` to every row, with their error bounds.
    fn approx_sq_dists(&self, point: &Point<'_, F>) -> (Array1<F>, Array1<F>) {
        let dots = self.data.dot(point);
        let sq = point.dot(point);
        let norm = sq.sqrt();
        let mut approx = Array1::zeros(self.data.nrows());
        let mut band = Array1::zeros(self.data.nrows());
        for j in 0..self.data.nrows() {
            approx[j] = self.sq_norms[j] + sq - (dots[j] + dots[j]);
            band[j] = self.band(self.norms[j], norm);
        }
        (approx, band)
    }

    /// Range query for one point by a matrix-vector product.
    fn within_range_single(&self, point: &Point<'_, F>, rdist: F) -> Vec<usize> {
        let (approx, band) = self.approx_sq_dists(point);
        (0..self.data.nrows())
            .filter(|&j| {
                if approx[j] + band[j] < rdist {
                    true
                } else if approx[j] - band[j] >= rdist {
                    false
                } else {
                    self.dist_fn.rdistance(point.view(), self.data.row(j)) < rdist
                }
            })
            .collect()
    }

    /// Neighbours of a few rows of the batch within `range`, each list ascending: one matrix
    /// product `X · X[rows]ᵀ` (the rows' columns of the Gram matrix), never the whole table, so
    /// the work is `O(rows · n · d)`. Exact, as every query here: the same neighbours a row
    /// query or the linear scan gives. Points that are not rows of the batch are out of its
    /// scope; the distance function must be Euclidean (else it scans linearly per row).
    pub fn rows_within(&self, rows: &[usize], range: F) -> Vec<Vec<usize>> {
        let rdist = self.dist_fn.dist_to_rdist(range);
        if self.linear.is_some() {
            return rows
                .iter()
                .map(|&i| {
                    (0..self.data.nrows())
                        .filter(|&j| {
                            self.dist_fn.rdistance(self.data.row(i), self.data.row(j)) < rdist
                        })
                        .collect()
                })
                .collect();
        }
        let mut out = Vec::with_capacity(rows.len());
        let n = self.data.nrows();
        // Columns in chunks, so the product buffer stays bounded (n × 64 values).
        for chunk in rows.chunks(64) {
            let picked = self.data.select(Axis(0), chunk);
            let mut dots = Array2::<F>::zeros((n, chunk.len()));
            general_mat_mul(F::one(), &self.data, &picked.t(), F::zero(), &mut dots);
            for (c, &i) in chunk.iter().enumerate() {
                let column = dots.column(c);
                out.push(
                    (0..n)
                        .filter(|&j| self.pair_within(i, j, column[j], rdist))
                        .collect(),
                );
            }
        }
        out
    }

    /// The neighbour table for `range`, building it on first use. `None` when the table holds
    /// another range or is over budget.
    fn table_for(&self, range: F) -> Option<&Csr> {
        let bits = range.to_f64().map_or(u64::MAX, f64::to_bits);
        let table = self.table.get_or_init(|| RangeTable {
            range_bits: bits,
            lists: self.build_table(self.dist_fn.dist_to_rdist(range)),
        });
        if table.range_bits == bits {
            table.lists.as_ref()
        } else {
            None
        }
    }

    /// Neighbour lists of every row: tiles of the upper triangle of `X Xᵀ` over scoped threads.
    fn build_table(&self, rdist: F) -> Option<Csr> {
        let n = self.data.nrows();
        if u32::try_from(n).is_err() {
            return None;
        }
        let (rows, cols) = (self.config.block_rows, self.config.block_cols);
        let mut tiles = Vec::new();
        for r0 in (0..n).step_by(rows) {
            for c0 in (r0..n).step_by(cols) {
                tiles.push((r0, (r0 + rows).min(n), c0, (c0 + cols).min(n)));
            }
        }
        // Most entries are far from the threshold: reject them with one comparison, `dot ≤
        // reject_below[i]`, which implies `approx − band ≥ rdist` for every column (it uses the
        // smallest norm and largest band of any column).
        let min_sq = self.sq_norms.iter().copied().fold(F::infinity(), F::min);
        let max_norm = self.norms.iter().copied().fold(F::zero(), F::max);
        let two = F::one() + F::one();
        let reject_below: Vec<F> = (0..n)
            .map(|i| {
                let band = self.band(self.norms[i], max_norm);
                (self.sq_norms[i] + min_sq - band - rdist) / two
            })
            .collect();
        let budget = self.config.max_cached_neighbours;
        let next = AtomicUsize::new(0);
        let entries = AtomicUsize::new(0);
        let over_budget = AtomicBool::new(false);
        let worker = || {
            let mut pairs: Vec<(u32, u32)> = Vec::new();
            let mut gram = Array2::<F>::zeros((rows.min(n), cols.min(n)));
            loop {
                let t = next.fetch_add(1, Ordering::Relaxed);
                if t >= tiles.len() || over_budget.load(Ordering::Relaxed) {
                    break;
                }
                let (r0, r1, c0, c1) = tiles[t];
                let mut g = gram.view_mut();
                g.slice_axis_inplace(Axis(0), Slice::from(..r1 - r0));
                g.slice_axis_inplace(Axis(1), Slice::from(..c1 - c0));
                let a = self.data.slice_axis(Axis(0), Slice::from(r0..r1));
                let b = self.data.slice_axis(Axis(0), Slice::from(c0..c1));
                general_mat_mul(F::one(), &a, &b.t(), F::zero(), &mut g);
                let before = pairs.len();
                for (di, dots) in g.outer_iter().enumerate() {
                    let i = r0 + di;
                    let reject = reject_below[i];
                    // Upper triangle only (j ≥ i); the diagonal tile also holds j < i.
                    let from = i.saturating_sub(c0).min(c1 - c0);
                    for (dj, &dot) in dots.iter().enumerate().skip(from) {
                        if dot <= reject {
                            continue;
                        }
                        let j = c0 + dj;
                        if self.pair_within(i, j, dot, rdist) {
                            pairs.push((i as u32, j as u32));
                        }
                    }
                }
                let added = 2 * (pairs.len() - before);
                if entries.fetch_add(added, Ordering::Relaxed) + added > budget {
                    over_budget.store(true, Ordering::Relaxed);
                    break;
                }
            }
            pairs
        };
        let threads = self.config.thread_count().min(tiles.len()).max(1);
        let parts: Vec<Vec<(u32, u32)>> = if threads == 1 {
            vec![worker()]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads).map(|_| scope.spawn(worker)).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("neighbour worker panicked"))
                    .collect()
            })
        };
        if over_budget.load(Ordering::Relaxed) {
            return None;
        }
        Some(Csr::from_upper_pairs(n, &parts))
    }
}

impl Csr {
    /// Symmetric table from pairs `(i, j)` with `i ≤ j`.
    fn from_upper_pairs(n: usize, parts: &[Vec<(u32, u32)>]) -> Self {
        let mut counts = vec![0usize; n + 1];
        for &(i, j) in parts.iter().flatten() {
            counts[i as usize] += 1;
            if i != j {
                counts[j as usize] += 1;
            }
        }
        let mut offsets = Vec::with_capacity(n + 1);
        let mut total = 0;
        for c in &counts[..n] {
            offsets.push(total);
            total += c;
        }
        offsets.push(total);
        let mut cursor = offsets[..n].to_vec();
        let mut indices = vec![0u32; total];
        for &(i, j) in parts.iter().flatten() {
            indices[cursor[i as usize]] = j;
            cursor[i as usize] += 1;
            if i != j {
                indices[cursor[j as usize]] = i;
                cursor[j as usize] += 1;
            }
        }
        for w in offsets.windows(2) {
            indices[w[0]..w[1]].sort_unstable();
        }
        Self { offsets, indices }
    }

    fn row(&self, i: usize) -> &[u32] {
        &self.indices[self.offsets[i]..self.offsets[i + 1]]
    }
}

impl<F: Float, D: Distance<F>> NearestNeighbourIndex<F> for GramSearchIndex<'_, F, D> {
    fn k_nearest(
        &self,
        point: Point<'_, F>,
        k: usize,
    ) -> Result<Vec<(Point<'_, F>, usize)>, NnError> {
        if let Some(linear) = &self.linear {
            return linear.k_nearest(point, k);
        }
        if point.len() != self.data.ncols() {
            return Err(NnError::WrongDimension);
        }
        let k = k.min(self.data.nrows());
        if k == 0 {
            return Ok(Vec::new());
        }
        // The k-th smallest approximation `t` bounds the k-th smallest exact distance by
        // `t + max band`; only points whose lower bound is below that can be among the k.
        let (approx, band) = self.approx_sq_dists(&point);
        let mut sorted = approx.to_vec();
        let (_, &mut t, _) = sorted
            .select_nth_unstable_by(k - 1, |a, b| a.partial_cmp(b).unwrap_or(CmpOrdering::Equal));
        let max_band = band.iter().copied().fold(F::zero(), F::max);
        let limit = t + max_band;
        let mut candidates: Vec<(F, usize)> = (0..self.data.nrows())
            .filter(|&j| (approx[j] - band[j]).partial_cmp(&limit) != Some(CmpOrdering::Greater))
            .map(|j| (self.dist_fn.rdistance(point.view(), self.data.row(j)), j))
            .collect();
        candidates.sort_by(
            |a, b| match a.0.partial_cmp(&b.0).unwrap_or(CmpOrdering::Equal) {
                CmpOrdering::Equal => a.1.cmp(&b.1),
                other => other,
            },
        );
        Ok(candidates
            .into_iter()
            .take(k)
            .map(|(_, j)| (self.data.row(j), j))
            .collect())
    }

    fn within_range(
        &self,
        point: Point<'_, F>,
        range: F,
    ) -> Result<Vec<(Point<'_, F>, usize)>, NnError> {
        if let Some(linear) = &self.linear {
            return linear.within_range(point, range);
        }
        if point.len() != self.data.ncols() {
            return Err(NnError::WrongDimension);
        }
        let rdist = self.dist_fn.dist_to_rdist(range);
        // Squared distances are never negative, so nothing is strictly closer (NaN too).
        if rdist.is_nan() || rdist <= F::zero() {
            return Ok(Vec::new());
        }
        if let Some(i) = self.row_of(&point)
            && let Some(table) = self.table_for(range)
        {
            let data = &self.data;
            return Ok(table
                .row(i)
                .iter()
                .map(|&j| (data.row(j as usize), j as usize))
                .collect());
        }
        Ok(self
            .within_range_single(&point, rdist)
            .into_iter()
            .map(|j| (self.data.row(j), j))
            .collect())
    }
}

/// Whether `dist_fn` computes squared Euclidean distances as `rdistance` (as
/// [`L2Dist`](linfa_nn::distance::L2Dist) does), checked on probe points and two data rows.
fn is_squared_euclidean<F: Float, D: Distance<F>>(dist_fn: &D, data: &ArrayView2<F>) -> bool {
    let close = |got: F, want: F| {
        let tol = F::cast(1e-3) * (F::one() + want.abs());
        (got - want).abs() <= tol
    };
    let dim = data.ncols();
    let origin = Array1::<F>::zeros(dim);
    let mut probe = Array1::<F>::zeros(dim);
    // (3, 4) is 7 apart in L1, 4 in L∞, 5 in L2: the squared L2 distance is 25.
    if dim >= 2 {
        probe[0] = F::cast(3.0);
        probe[1] = F::cast(4.0);
    } else {
        probe[0] = F::cast(5.0);
    }
    let twenty_five = F::cast(25.0);
    if !close(dist_fn.rdistance(origin.view(), probe.view()), twenty_five)
        || !close(dist_fn.rdistance(probe.view(), origin.view()), twenty_five)
        || !close(dist_fn.dist_to_rdist(F::cast(5.0)), twenty_five)
    {
        return false;
    }
    if data.nrows() >= 2 {
        let (a, b) = (data.row(0), data.row(data.nrows() - 1));
        let direct = a
            .iter()
            .zip(b.iter())
            .fold(F::zero(), |acc, (&x, &y)| acc + (x - y) * (x - y));
        let got = dist_fn.rdistance(a, b);
        if direct.is_finite() && !close(got, direct) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use linfa_nn::distance::{L1Dist, L2Dist};
    use linfa_nn::{CommonNearestNeighbour, LinearSearch};
    use ndarray::ShapeBuilder;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `n` unit vectors in `dim` dimensions: a few tight groups, near-duplicates and noise.
    fn unit_vectors(n: usize, dim: usize, seed: u64) -> Array2<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut data = Array2::<f32>::zeros((n, dim));
        let centres: Vec<Vec<f32>> = (0..n / 8 + 1)
            .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        for mut row in data.rows_mut() {
            if rng.random_bool(0.8) {
                let centre = &centres[rng.random_range(0..centres.len())];
                let spread: f32 = rng.random_range(0.0..0.6);
                for (x, c) in row.iter_mut().zip(centre) {
                    *x = c + spread * rng.random_range(-1.0f32..1.0);
                }
            } else {
                row.iter_mut()
                    .for_each(|x| *x = rng.random_range(-1.0..1.0));
            }
            let norm = row.dot(&row).sqrt();
            row.mapv_inplace(|x| x / norm);
        }
        // Exact duplicates: distance 0.
        let first = data.row(0).to_owned();
        data.row_mut(n - 1).assign(&first);
        data
    }

    fn sorted_ids(found: Vec<(Point<'_, f32>, usize)>) -> Vec<usize> {
        let mut ids: Vec<usize> = found.into_iter().map(|(_, i)| i).collect();
        ids.sort_unstable();
        ids
    }

    /// Ranges around the actual pairwise distances, including distances that occur exactly.
    fn ranges(data: &Array2<f32>) -> Vec<f32> {
        let mut ranges = vec![0.0, 1e-6, 0.3, 0.6, 0.9, 1.2, 1.5, 3.0];
        for j in [1, 2, 7] {
            let d = L2Dist.distance(data.row(0), data.row(j));
            ranges.extend([
                d,
                f32::from_bits(d.to_bits() + 1),
                f32::from_bits(d.to_bits() - 1),
            ]);
        }
        ranges
    }

    fn assert_same_ranges(data: &Array2<f32>, search: GramSearch) {
        let linear = LinearSearch.from_batch(data, L2Dist).unwrap();
        // One index for all ranges (the first builds the table, the others query one by one)
        // and a fresh index per range (each builds its own table).
        let shared = search.from_batch(data, L2Dist).unwrap();
        for range in ranges(data) {
            let fresh = search.from_batch(data, L2Dist).unwrap();
            for i in 0..data.nrows() {
                let q = data.row(i);
                let want = sorted_ids(linear.within_range(q, range).unwrap());
                let fresh_ids = sorted_ids(fresh.within_range(q, range).unwrap());
                assert_eq!(fresh_ids, want, "row {i}, range {range}");
                let shared_ids = sorted_ids(shared.within_range(q, range).unwrap());
                assert_eq!(shared_ids, want, "row {i}, range {range}");
            }
        }
    }

    #[test]
    fn range_queries_on_rows_match_linear_search() {
        let data = unit_vectors(300, 64, 7);
        assert_same_ranges(&data, GramSearch::new());
        // Small tiles and one thread, then several threads: the same answers.
        assert_same_ranges(&data, GramSearch::new().block_size(17, 40).threads(1));
        assert_same_ranges(&data, GramSearch::new().block_size(32, 64).threads(3));
    }

    #[test]
    fn range_queries_without_a_table_match_linear_search() {
        let data = unit_vectors(200, 48, 11);
        // A budget too small for any table: every query is answered on its own.
        assert_same_ranges(&data, GramSearch::new().max_cached_neighbours(10));
    }

    #[test]
    fn a_few_rows_match_linear_search_without_building_the_table() {
        let data = unit_vectors(300, 40, 21);
        let index = GramSearchIndex::new(&data, L2Dist, GramSearch::new()).unwrap();
        let linear = LinearSearch.from_batch(&data, L2Dist).unwrap();
        // More rows than one product chunk (64), in no particular order, with a repeat.
        let rows: Vec<usize> = (0..100).map(|i| (i * 37) % 300).chain([5]).collect();
        for range in [0.3, 0.9, 1.4] {
            let lists = index.rows_within(&rows, range);
            for (&i, list) in rows.iter().zip(&lists) {
                assert!(list.windows(2).all(|w| w[0] < w[1]), "ascending");
                assert_eq!(
                    *list,
                    sorted_ids(linear.within_range(data.row(i), range).unwrap())
                );
            }
        }
        assert!(index.table.get().is_none(), "no table was built");
    }

    #[test]
    fn foreign_points_and_strided_batches_match_linear_search() {
        let data = unit_vectors(150, 32, 3);
        // Column-major copy: rows are strided views.
        let mut fortran = Array2::<f32>::zeros(data.raw_dim().f());
        fortran.assign(&data);
        assert!(fortran.t().is_standard_layout());
        let queries = unit_vectors(20, 32, 99);
        for batch in [
            data.view(),
            fortran.view(),
            data.slice_axis(Axis(0), Slice::new(0, None, 2)),
        ] {
            let fast = GramSearch::new().from_batch(&batch, L2Dist).unwrap();
            let linear = LinearSearch.from_batch(&batch, L2Dist).unwrap();
            for range in [0.2, 0.7, 1.3] {
                // Rows first (builds the table), then other points and other ranges.
                for q in batch.rows().into_iter().chain(queries.rows()) {
                    assert_eq!(
                        sorted_ids(fast.within_range(q, range).unwrap()),
                        sorted_ids(linear.within_range(q, range).unwrap())
                    );
                }
            }
        }
    }

    #[test]
    fn row_queries_are_answered_from_the_table() {
        let data = unit_vectors(120, 24, 4);
        let every_other = data.slice_axis(Axis(0), Slice::new(1, None, 2));
        for batch in [data.view(), every_other] {
            let index = GramSearchIndex::new(&batch, L2Dist, GramSearch::new()).unwrap();
            for i in [0, 1, 30, batch.nrows() - 1] {
                assert_eq!(index.row_of(&batch.row(i)), Some(i));
            }
            // A copy of a row, or a row of another array, is not a row of the batch.
            assert_eq!(index.row_of(&batch.row(3).to_owned().view()), None);
            assert_eq!(
                index.row_of(&data.row(0).slice_axis(Axis(0), Slice::from(1..))),
                None
            );
            assert!(index.table.get().is_none());
            let near = index.within_range(batch.row(5), 0.9).unwrap();
            let table = index
                .table
                .get()
                .expect("the first row query builds the table");
            assert!(table.lists.is_some());
            assert!(near.iter().any(|&(_, j)| j == 5));
        }
    }

    #[test]
    fn k_nearest_matches_linear_search() {
        let data = unit_vectors(250, 40, 5);
        let fast = GramSearch::new().from_batch(&data, L2Dist).unwrap();
        let linear = CommonNearestNeighbour::LinearSearch
            .from_batch(&data, L2Dist)
            .unwrap();
        let queries = unit_vectors(10, 40, 6);
        for q in data.axis_iter(Axis(0)).take(30).chain(queries.rows()) {
            for k in [0, 1, 2, 5, 17, 250, 400] {
                let got = fast.k_nearest(q, k).unwrap();
                let want = linear.k_nearest(q, k).unwrap();
                assert_eq!(got.len(), want.len());
                let dist = |p: &Point<'_, f32>| L2Dist.rdistance(q, p.view());
                // Ascending distances, the same as the linear scan's (ties may swap).
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(dist(&g.0), dist(&w.0));
                    assert_eq!(g.0, data.row(g.1));
                }
            }
        }
        // The nearest point to a row is itself.
        assert_eq!(fast.k_nearest(data.row(42), 1).unwrap()[0].1, 42);
    }

    #[test]
    fn other_metrics_fall_back_to_linear_search() {
        let data = unit_vectors(80, 16, 8);
        let fast = GramSearch::new().from_batch(&data, L1Dist).unwrap();
        let linear = LinearSearch.from_batch(&data, L1Dist).unwrap();
        for q in data.rows() {
            assert_eq!(
                sorted_ids(fast.within_range(q, 2.0).unwrap()),
                sorted_ids(linear.within_range(q, 2.0).unwrap())
            );
        }
    }

    #[test]
    fn errors_match_linear_search() {
        let data = unit_vectors(10, 8, 1);
        let fast = GramSearch::new().from_batch(&data, L2Dist).unwrap();
        let short = Array1::<f32>::zeros(7);
        assert!(matches!(
            fast.within_range(short.view(), 1.0),
            Err(NnError::WrongDimension)
        ));
        assert!(matches!(
            fast.k_nearest(short.view(), 1),
            Err(NnError::WrongDimension)
        ));
        let empty = Array2::<f32>::zeros((4, 0));
        assert!(matches!(
            GramSearch::new().from_batch(&empty, L2Dist),
            Err(BuildError::ZeroDimension)
        ));
        assert!(matches!(
            GramSearch::new().from_batch_with_leaf_size(&data, 0, L2Dist),
            Err(BuildError::EmptyLeaf)
        ));
    }

    #[test]
    fn works_in_f64() {
        let data = unit_vectors(60, 12, 2).mapv(f64::from);
        let fast = GramSearch::new().from_batch(&data, L2Dist).unwrap();
        let linear = LinearSearch.from_batch(&data, L2Dist).unwrap();
        for q in data.rows() {
            let ids = |v: Vec<(Point<'_, f64>, usize)>| {
                let mut v: Vec<usize> = v.into_iter().map(|(_, i)| i).collect();
                v.sort_unstable();
                v
            };
            assert_eq!(
                ids(fast.within_range(q, 0.8).unwrap()),
                ids(linear.within_range(q, 0.8).unwrap())
            );
        }
    }
}
