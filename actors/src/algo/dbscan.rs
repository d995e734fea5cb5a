//! A pet's clustering kept between jobs, and DBSCAN run over exact neighbour lists, so that a
//! job adding `k` photos to a pet of `n` assigns them in `O(k · n · d)` instead of
//! re-clustering all `n` (`O(n² · d)`).
//!
//! [`Clustering`] holds the vectors (one contiguous `n × d` matrix), their capture times, each
//! point's cluster and its neighbour count (the point included). [`Clustering::full`] is
//! DBSCAN as linfa-clustering runs it (same visiting order, same neighbour lists from
//! [`GramSearch`], so the same labels as [`super::cluster::cluster`]), keeping the counts.
//!
//! [`Clustering::insert`] is the incremental rule of Ester et al. (*Incremental Clustering for
//! Mining in a Data Warehousing Environment*, VLDB 1998): inserting points only adds edges and
//! core points, so clusters never split. The new points' neighbour lists come from one matrix
//! product against the held matrix; each neighbour's count grows; points that become core
//! (new ones, and held ones that reach `min_points`) get their own lists; clusters joined by a
//! core–core edge through one of those points merge (union–find); non-core points next to
//! exactly one cluster's cores join it as border points. A non-core point next to cores of two
//! clusters is where DBSCAN's answer depends on visiting order: the insertion is then
//! *ambiguous* and the whole pet is re-clustered, as it is when photos leave, when the time
//! rule starts to apply, and on a `recluster` job. With `min_points = 2` (the default) every
//! non-noise point is core, nothing is ambiguous and the result is exactly a full run's.
//!
//! With a [`LowPassRule`] each vector holds two views of its photo (as seen, then
//! low-passed) and its detail, and a pair with a blurred photo is judged by the low-passed
//! views: a second index over those views adds their edges, for the full run and for an
//! insertion alike.

use std::collections::VecDeque;

use linfa_nn::distance::L2Dist;
use ndarray::{Array2, ArrayView2, Axis};

use super::cluster::{ClusterParams, LowPassRule, TimeRule, l2_for_cosine};
use super::neighbours::{GramSearch, GramSearchIndex};

/// How the latest change was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigned {
    /// New points assigned to the held clusters.
    Incremental,
    /// Everything re-clustered, and why.
    Full(FullReason),
}

/// Why a change re-clustered every point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullReason {
    /// Nothing was held for the pet (first job in this process, evicted, or parameters changed).
    NotHeld,
    /// A `recluster` job asked for it.
    Asked,
    /// A non-core point reached cores of two clusters.
    Ambiguous,
    /// Photos left the pet (quarantined or removed).
    Removed,
    /// The capture-time rule started (or stopped) to apply: two photos have a time now.
    TimeRule,
}

impl Assigned {
    /// Label value for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Assigned::Incremental => "incremental",
            Assigned::Full(FullReason::NotHeld) => "full_not_held",
            Assigned::Full(FullReason::Asked) => "full_asked",
            Assigned::Full(FullReason::Ambiguous) => "full_ambiguous",
            Assigned::Full(FullReason::Removed) => "full_removed",
            Assigned::Full(FullReason::TimeRule) => "full_time_rule",
        }
    }

    /// Every label value, for publishing the series up front.
    pub const ALL: [Assigned; 6] = [
        Assigned::Incremental,
        Assigned::Full(FullReason::NotHeld),
        Assigned::Full(FullReason::Asked),
        Assigned::Full(FullReason::Ambiguous),
        Assigned::Full(FullReason::Removed),
        Assigned::Full(FullReason::TimeRule),
    ];
}

/// When two points are neighbours: within `eps`, or, with a time rule and at least two dated
/// points, within the pair's own threshold ([`TimeRule::eps_for`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct PairRule {
    params: ClusterParams,
    time_rule: Option<TimeRule>,
}

impl PairRule {
    /// The range the neighbour search uses: every pair within it is a candidate.
    fn widest(&self, timed: bool) -> f32 {
        match (&self.time_rule, timed) {
            (Some(r), true) => self.params.eps.max(r.burst_eps).max(r.apart_eps),
            _ => self.params.eps,
        }
    }
}

/// A pet's points with their clusters and neighbour counts; see the module documentation.
#[derive(Debug, Clone)]
pub struct Clustering {
    rule: PairRule,
    /// One point per row: its view as seen, then, with a low-pass rule, its low-passed view
    /// and its detail.
    vectors: Array2<f32>,
    times: Vec<Option<i64>>,
    /// Whether each point is blurred under the low-pass rule (all false without one).
    blurred: Vec<bool>,
    /// Whether the time rule applies (a rule is set and at least two points have a time).
    timed: bool,
    /// Cluster of each point; `None`: noise (a singleton).
    labels: Vec<Option<u32>>,
    /// Neighbours of each point under the pair rule, the point included.
    counts: Vec<u32>,
}

impl Clustering {
    /// DBSCAN over every point (`vectors`: one L2-normalised point per row; `times[i]` its
    /// capture time in Unix ms, where known).
    pub fn full(
        vectors: Array2<f32>,
        times: Vec<Option<i64>>,
        params: ClusterParams,
        time_rule: Option<TimeRule>,
    ) -> Self {
        assert_eq!(vectors.nrows(), times.len(), "one time per vector");
        let mut c = Clustering {
            rule: PairRule { params, time_rule },
            timed: false,
            labels: Vec::new(),
            counts: Vec::new(),
            blurred: Vec::new(),
            vectors,
            times,
        };
        c.mark_blurred();
        c.recluster();
        c
    }

    pub fn len(&self) -> usize {
        self.vectors.nrows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dimensions of the vectors (both views and the detail, with a low-pass rule).
    pub fn dim(&self) -> usize {
        self.vectors.ncols()
    }

    /// Point `i`'s view as seen (its whole vector without a low-pass rule): what heroes'
    /// centrality and near-duplicates are measured on.
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.row(i)[..self.seen_dim()]
    }

    /// Point `i`'s low-passed view, with a low-pass rule.
    fn low_vector(&self, i: usize) -> &[f32] {
        let d = self.seen_dim();
        &self.row(i)[d..2 * d]
    }

    /// Point `i`'s detail, with a low-pass rule (the last value of its row).
    fn detail(&self, i: usize) -> f32 {
        self.row(i)[self.dim() - 1]
    }

    fn row(&self, i: usize) -> &[f32] {
        self.vectors
            .row(i)
            .to_slice()
            .expect("rows of a standard-layout matrix are contiguous")
    }

    fn low_pass(&self) -> Option<LowPassRule> {
        self.rule.params.low_pass
    }

    /// Dimensions of the view as seen.
    fn seen_dim(&self) -> usize {
        match self.low_pass() {
            Some(_) => self.vectors.ncols().saturating_sub(1) / 2,
            None => self.vectors.ncols(),
        }
    }

    /// Whether point `i` is blurred (never, without a low-pass rule).
    pub fn is_blurred(&self, i: usize) -> bool {
        self.blurred[i]
    }

    /// Marks the points not yet marked as blurred or not.
    fn mark_blurred(&mut self) {
        let from = self.blurred.len();
        let marks: Vec<bool> = (from..self.len())
            .map(|i| {
                self.low_pass()
                    .is_some_and(|r| r.is_blurred(self.detail(i)))
            })
            .collect();
        self.blurred.extend(marks);
    }

    /// Whether this clustering was made with these parameters (else it must be rebuilt).
    pub fn made_with(&self, params: &ClusterParams, time_rule: Option<&TimeRule>) -> bool {
        self.rule.params == *params && self.rule.time_rule.as_ref() == time_rule
    }

    /// Memory held, in bytes (for the cache's budget).
    pub fn bytes(&self) -> usize {
        self.vectors.len() * size_of::<f32>()
            + self.times.capacity() * size_of::<Option<i64>>()
            + self.blurred.capacity()
            + self.labels.capacity() * size_of::<Option<u32>>()
            + self.counts.capacity() * size_of::<u32>()
    }

    /// Clusters as lists of point indices, each ascending, ordered by their first index; noise
    /// points are singletons (as [`super::cluster::cluster`] returns them).
    pub fn groups(&self) -> Vec<Vec<usize>> {
        let mut by_label: std::collections::HashMap<u32, usize> = Default::default();
        let mut out: Vec<Vec<usize>> = Vec::new();
        for (i, l) in self.labels.iter().enumerate() {
            match l {
                Some(l) => {
                    let g = *by_label.entry(*l).or_insert_with(|| {
                        out.push(Vec::new());
                        out.len() - 1
                    });
                    out[g].push(i);
                }
                None => out.push(vec![i]),
            }
        }
        out
    }

    /// The vectors and times, for a rebuild.
    pub fn into_parts(self) -> (Array2<f32>, Vec<Option<i64>>) {
        (self.vectors, self.times)
    }

    /// Adds points (rows of `vectors`, with their `times`) and assigns them; see the module
    /// documentation. Points keep their indices; the new ones follow.
    pub fn insert(&mut self, vectors: ArrayView2<'_, f32>, times: &[Option<i64>]) -> Assigned {
        assert_eq!(vectors.nrows(), times.len(), "one time per vector");
        let n0 = self.len();
        let k = vectors.nrows();
        if k == 0 {
            return Assigned::Incremental;
        }
        if n0 == 0 {
            self.vectors = vectors.to_owned();
        } else {
            self.vectors
                .append(Axis(0), vectors)
                .expect("new vectors have the pet's dimension");
        }
        self.times.extend_from_slice(times);
        self.mark_blurred();
        if self.timed != self.should_be_timed() {
            self.recluster();
            return Assigned::Full(FullReason::TimeRule);
        }
        if self.assign(n0) {
            Assigned::Incremental
        } else {
            self.recluster();
            Assigned::Full(FullReason::Ambiguous)
        }
    }

    /// Re-clusters every point from scratch.
    fn recluster(&mut self) {
        self.timed = self.should_be_timed();
        let lists = self.neighbour_lists();
        self.counts = lists.iter().map(|l| l.len() as u32).collect();
        self.labels = expand(&lists, self.min_points());
    }

    fn min_points(&self) -> usize {
        // As in `cluster`: linfa rejects 1, and with noise as singletons 1 and 2 agree.
        self.rule.params.min_points.max(2)
    }

    fn should_be_timed(&self) -> bool {
        self.rule.time_rule.is_some() && self.times.iter().filter(|t| t.is_some()).count() >= 2
    }

    fn range(&self) -> f32 {
        l2_for_cosine(self.rule.widest(self.timed))
    }

    /// Neighbour lists (ascending, the point included) of every point.
    fn neighbour_lists(&self) -> Vec<Vec<usize>> {
        if self.is_empty() {
            return Vec::new();
        }
        use linfa_nn::NearestNeighbourIndex;
        let views = Views::of(&self.vectors, self.seen_dim());
        let index = views.seen_index();
        let range = self.range();
        // A row query builds the whole table once; the others are look-ups.
        let mut lists: Vec<Vec<usize>> = (0..self.len())
            .map(|i| {
                index
                    .within_range(views.seen.row(i), range)
                    .expect("a row of the batch")
                    .into_iter()
                    .map(|(_, j)| j)
                    .collect()
            })
            .collect();
        for (i, list) in lists.iter_mut().enumerate() {
            self.keep_pairs(i, list);
        }
        // Pairs with a blurred point: the blurred points' low-passed lists, added both ways
        // (`O(blurred · n · d)`, not a second table).
        let blurred: Vec<usize> = (0..self.len()).filter(|&i| self.blurred[i]).collect();
        if let (Some(rule), Some(low)) = (self.low_pass(), views.low_index())
            && !blurred.is_empty()
        {
            let low_lists = low.rows_within(&blurred, l2_for_cosine(rule.widest()));
            for (&b, mut low_list) in blurred.iter().zip(low_lists) {
                self.keep_low_pairs(rule, b, &mut low_list);
                for j in low_list {
                    lists[b].push(j);
                    if !self.blurred[j] {
                        lists[j].push(b);
                    }
                }
            }
            for list in &mut lists {
                list.sort_unstable();
                list.dedup();
            }
        }
        lists
    }

    /// Neighbour lists of a few points, from one matrix product against all of them (two,
    /// with a low-pass rule and a blurred point).
    fn lists_of(&self, views: &Indexes<'_>, rows: &[usize]) -> Vec<Vec<usize>> {
        let mut lists = views.seen.rows_within(rows, self.range());
        for (list, &i) in lists.iter_mut().zip(rows) {
            self.keep_pairs(i, list);
        }
        if let (Some(rule), Some(low)) = (self.low_pass(), &views.low)
            && self.blurred.iter().any(|&b| b)
        {
            let low_lists = low.rows_within(rows, l2_for_cosine(rule.widest()));
            for ((list, &i), mut low_list) in lists.iter_mut().zip(rows).zip(low_lists) {
                self.keep_low_pairs(rule, i, &mut low_list);
                list.extend(low_list);
                list.sort_unstable();
                list.dedup();
            }
        }
        lists
    }

    /// Keeps the candidates of point `i` by the low-passed views (within the rule's widest
    /// range) that are its neighbours by them: pairs with a blurred point, each within its
    /// threshold ([`LowPassRule::eps_for`]); `i` itself is dropped (its own list has it).
    fn keep_low_pairs(&self, rule: LowPassRule, i: usize, list: &mut Vec<usize>) {
        list.retain(|&j| {
            j != i
                && (self.blurred[i] || self.blurred[j])
                && 1.0 - pair_dot(self.low_vector(i), self.low_vector(j))
                    <= rule.eps_for(self.blurred[i] && self.blurred[j])
        });
    }

    /// Keeps the candidates of point `i` (by the views as seen) that are its neighbours under
    /// the pair rule, sorted: a pair with a blurred point is left to the low-passed views.
    fn keep_pairs(&self, i: usize, list: &mut Vec<usize>) {
        if self.blurred.iter().any(|&b| b) {
            list.retain(|&j| j == i || !(self.blurred[i] || self.blurred[j]));
        }
        if self.timed {
            let rule = self.rule.time_rule.expect("timed implies a rule");
            let eps = self.rule.params.eps;
            list.retain(|&j| {
                j == i
                    || 1.0 - pair_dot(self.vector(i), self.vector(j))
                        <= rule.eps_for(eps, self.times[i], self.times[j])
            });
        }
        list.sort_unstable();
    }

    /// Assigns points `n0..` to the clusters of points `..n0`; false if ambiguous (the state
    /// is then inconsistent and must be re-clustered).
    fn assign(&mut self, n0: usize) -> bool {
        let n = self.len();
        let m = self.min_points() as u32;
        let new: Vec<usize> = (n0..n).collect();
        // Borrows only the vectors, so counts and labels can change while it is in use.
        let views = Views::of(&self.vectors, self.seen_dim());
        let index = views.indexes();
        let new_lists = self.lists_of(&index, &new);
        let old_counts = self.counts.clone();
        self.counts.resize(n, 0);
        self.labels.resize(n, None);
        for (p, list) in new.iter().zip(&new_lists) {
            self.counts[*p] = list.len() as u32;
            for &q in list.iter().filter(|&&q| q < n0) {
                self.counts[q] += 1;
            }
        }
        let core = |counts: &[u32], i: usize| counts[i] >= m;
        // Points that are core now and were not (or are new): their edges are the new ones.
        let mut risen: Vec<usize> = Vec::new();
        let mut touched: Vec<usize> = new_lists.iter().flatten().copied().collect();
        touched.sort_unstable();
        touched.dedup();
        for &q in &touched {
            if q < n0 && old_counts[q] < m && core(&self.counts, q) {
                risen.push(q);
            }
        }
        let risen_lists = self.lists_of(&index, &risen);
        drop(index);
        let mut lists: std::collections::HashMap<usize, &Vec<usize>> = Default::default();
        for (p, l) in new.iter().zip(&new_lists) {
            lists.insert(*p, l);
        }
        for (q, l) in risen.iter().zip(&risen_lists) {
            lists.insert(*q, l);
        }
        let grown: Vec<usize> = new
            .iter()
            .copied()
            .filter(|&p| core(&self.counts, p))
            .chain(risen.iter().copied())
            .collect();

        let mut sets = LabelSets::new(&self.labels);
        for &c in &grown {
            let sc = sets.of(&mut self.labels[c]);
            for &x in lists[&c] {
                if core(&self.counts, x) {
                    let sx = sets.of(&mut self.labels[x]);
                    sets.union(sc, sx);
                }
            }
        }
        // Non-core points whose neighbourhood changed: new ones, and held ones next to a point
        // that became core. Each joins the one cluster whose cores it reaches.
        let mut reach: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for &c in &grown {
            for &x in lists[&c] {
                if !core(&self.counts, x) {
                    reach.entry(x).or_default().push(c);
                }
            }
        }
        for (p, list) in new.iter().zip(&new_lists) {
            if !core(&self.counts, *p) {
                let cores = list.iter().copied().filter(|&x| core(&self.counts, x));
                reach.entry(*p).or_default().extend(cores);
            }
        }
        for (b, cores) in reach {
            let mut roots: Vec<usize> = cores
                .iter()
                .map(|&c| {
                    let s = sets.of(&mut self.labels[c]);
                    sets.find(s)
                })
                .collect();
            if self.labels[b].is_some() {
                // A held border point stays next to its own cluster's cores.
                let s = sets.of(&mut self.labels[b]);
                roots.push(sets.find(s));
            }
            roots.sort_unstable();
            roots.dedup();
            match roots.len() {
                0 => {}
                1 => self.labels[b] = self.labels[cores[0]],
                _ => return false,
            }
        }
        // Merged clusters take one label, the smallest of their set.
        let rename = sets.renames();
        if !rename.is_empty() {
            for l in self.labels.iter_mut().flatten() {
                if let Some(r) = rename.get(l) {
                    *l = *r;
                }
            }
        }
        true
    }
}

/// The two views of a matrix of points: the columns as seen and, when the rows hold two
/// views (and the detail), the low-passed ones.
struct Views<'a> {
    seen: ArrayView2<'a, f32>,
    low: Option<ArrayView2<'a, f32>>,
}

impl<'a> Views<'a> {
    /// `vectors`' first `seen_dim` columns, and the next `seen_dim` when there are more.
    fn of(vectors: &'a Array2<f32>, seen_dim: usize) -> Self {
        let seen = vectors.slice_axis(Axis(1), ndarray::Slice::from(..seen_dim));
        let low = (seen_dim < vectors.ncols())
            .then(|| vectors.slice_axis(Axis(1), ndarray::Slice::from(seen_dim..2 * seen_dim)));
        Views { seen, low }
    }

    fn seen_index(&self) -> GramSearchIndex<'_, f32, L2Dist> {
        GramSearchIndex::new(&self.seen, L2Dist, GramSearch::new())
            .expect("vectors have dimensions")
    }

    fn low_index(&self) -> Option<GramSearchIndex<'_, f32, L2Dist>> {
        self.low.as_ref().map(|low| {
            GramSearchIndex::new(low, L2Dist, GramSearch::new()).expect("vectors have dimensions")
        })
    }

    fn indexes(&self) -> Indexes<'_> {
        Indexes {
            seen: self.seen_index(),
            low: self.low_index(),
        }
    }
}

/// Neighbour indexes over both views.
struct Indexes<'a> {
    seen: GramSearchIndex<'a, f32, L2Dist>,
    low: Option<GramSearchIndex<'a, f32, L2Dist>>,
}

/// The dot product as the time rule's pair check computes it (one sequential sum), so the
/// full and the incremental runs decide every pair alike.
pub(crate) fn pair_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// DBSCAN's expansion over neighbour lists (ascending, the point included), in linfa's order:
/// points visited by index, a cluster grown breadth-first from its first core point, a border
/// point taking the first cluster that reaches it.
pub(crate) fn expand(lists: &[Vec<usize>], min_points: usize) -> Vec<Option<u32>> {
    let n = lists.len();
    let mut label: Vec<Option<u32>> = vec![None; n];
    let mut queued = vec![false; n];
    let mut queue = VecDeque::new();
    let mut next = 0u32;
    let unlabelled = |label: &[Option<u32>], i: usize, j: usize| label[j].is_none() && j != i;
    for i in 0..n {
        if label[i].is_some() || lists[i].len() < min_points {
            continue;
        }
        for &j in &lists[i] {
            if unlabelled(&label, i, j) {
                queued[j] = true;
                queue.push_back(j);
            }
        }
        label[i] = Some(next);
        while let Some(c) = queue.pop_front() {
            queued[c] = false;
            let grow: Vec<usize> = lists[c]
                .iter()
                .copied()
                .filter(|&j| unlabelled(&label, c, j))
                .collect();
            label[c] = Some(next);
            if lists[c].len() >= min_points {
                for j in grow {
                    if !queued[j] {
                        queued[j] = true;
                        queue.push_back(j);
                    }
                }
            }
        }
        next += 1;
    }
    label
}

/// Disjoint sets of the cluster labels an insertion touches (union–find with path halving;
/// written out because it is a dozen lines and this is its only use). Points without a label
/// get a fresh one when they first take part.
struct LabelSets {
    parent: Vec<usize>,
    by_label: std::collections::HashMap<u32, usize>,
    fresh: u32,
}

impl LabelSets {
    fn new(labels: &[Option<u32>]) -> Self {
        LabelSets {
            parent: Vec::new(),
            by_label: Default::default(),
            fresh: labels.iter().flatten().copied().max().map_or(0, |l| l + 1),
        }
    }

    /// The set of a point's label, labelling it first if it has none.
    fn of(&mut self, label: &mut Option<u32>) -> usize {
        let l = *label.get_or_insert_with(|| {
            self.fresh += 1;
            self.fresh - 1
        });
        *self.by_label.entry(l).or_insert_with(|| {
            self.parent.push(self.parent.len());
            self.parent.len() - 1
        })
    }

    /// For each touched label whose set was merged into another's, the set's smallest label.
    fn renames(&mut self) -> std::collections::HashMap<u32, u32> {
        let pairs: Vec<(u32, usize)> = self.by_label.iter().map(|(l, s)| (*l, *s)).collect();
        let mut smallest: std::collections::HashMap<usize, u32> = Default::default();
        for &(l, s) in &pairs {
            let r = self.find(s);
            let e = smallest.entry(r).or_insert(l);
            *e = (*e).min(l);
        }
        pairs
            .into_iter()
            .filter_map(|(l, s)| {
                let to = smallest[&self.find(s)];
                (to != l).then_some((l, to))
            })
            .collect()
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent[a.max(b)] = a.min(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::cluster::testdata::{clustered_with_noise, unit};
    use crate::algo::cluster::{ClusterParams, TimeRule, cluster};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn matrix(v: &[Vec<f32>]) -> Array2<f32> {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Array2::from_shape_vec((v.len(), v[0].len()), flat).unwrap()
    }

    /// Adjusted Rand index of two partitions of `0..n` (lists of indices).
    fn ari(a: &[Vec<usize>], b: &[Vec<usize>], n: usize) -> f64 {
        let label = |p: &[Vec<usize>]| {
            let mut l = vec![0usize; n];
            for (c, g) in p.iter().enumerate() {
                for &i in g {
                    l[i] = c;
                }
            }
            l
        };
        let (la, lb) = (label(a), label(b));
        let pairs = |x: f64| x * (x - 1.0) / 2.0;
        let mut table: std::collections::HashMap<(usize, usize), f64> = Default::default();
        for i in 0..n {
            *table.entry((la[i], lb[i])).or_default() += 1.0;
        }
        let index: f64 = table.values().map(|&c| pairs(c)).sum();
        let sa: f64 = a.iter().map(|g| pairs(g.len() as f64)).sum();
        let sb: f64 = b.iter().map(|g| pairs(g.len() as f64)).sum();
        let expected = sa * sb / pairs(n as f64);
        let max = (sa + sb) / 2.0;
        if max == expected {
            1.0
        } else {
            (index - expected) / (max - expected)
        }
    }

    #[test]
    fn a_full_run_is_linfas_dbscan() {
        for (seed, dim) in [(11, 32), (12, 128)] {
            let v = clustered_with_noise(300, dim, seed);
            for eps in [0.01, 0.05, 0.1, 0.3] {
                for min_points in [1, 2, 3, 5] {
                    let params = ClusterParams {
                        eps,
                        min_points,
                        low_pass: None,
                    };
                    let full = Clustering::full(matrix(&v), vec![None; v.len()], params, None);
                    assert_eq!(
                        full.groups(),
                        cluster(&v, &params),
                        "seed {seed}, eps {eps}, min {min_points}"
                    );
                }
            }
        }
    }

    /// Builds a clustering of the first `base` points, inserts the rest `step` at a time, and
    /// after each insertion compares with a full run over the same points. Returns the modes.
    fn insert_and_compare(
        v: &[Vec<f32>],
        times: &[Option<i64>],
        params: ClusterParams,
        rule: Option<TimeRule>,
        base: usize,
        step: usize,
        min_ari: f64,
    ) -> Vec<Assigned> {
        let mut inc = Clustering::full(matrix(&v[..base]), times[..base].to_vec(), params, rule);
        let mut modes = Vec::new();
        let mut at = base;
        while at < v.len() {
            let to = (at + step).min(v.len());
            modes.push(inc.insert(matrix(&v[at..to]).view(), &times[at..to]));
            at = to;
            let full = Clustering::full(matrix(&v[..at]), times[..at].to_vec(), params, rule);
            let (a, b) = (inc.groups(), full.groups());
            if min_ari >= 1.0 {
                assert_eq!(a, b, "after {at} points ({:?})", modes.last());
            } else {
                let r = ari(&a, &b, at);
                assert!(r >= min_ari, "ARI {r} after {at} points");
            }
            assert_eq!(
                inc.counts, full.counts,
                "neighbour counts after {at} points"
            );
        }
        modes
    }

    #[test]
    fn inserting_equals_a_full_run_and_is_incremental_with_two_min_points() {
        for (seed, step) in [(21, 1), (22, 10), (23, 37)] {
            let v = clustered_with_noise(400, 64, seed);
            let params = ClusterParams {
                eps: 0.1,
                min_points: 2,
                low_pass: None,
            };
            let modes = insert_and_compare(&v, &vec![None; v.len()], params, None, 200, step, 1.0);
            // Nothing is ambiguous with two min points: every insertion is incremental.
            assert!(
                modes.iter().all(|m| *m == Assigned::Incremental),
                "seed {seed}: {modes:?}"
            );
        }
    }

    #[test]
    fn inserting_with_more_min_points_agrees_with_a_full_run() {
        for (seed, min_points) in [(31, 3), (32, 5)] {
            let v = clustered_with_noise(400, 64, seed);
            let params = ClusterParams {
                eps: 0.1,
                min_points,
                low_pass: None,
            };
            let modes = insert_and_compare(&v, &vec![None; v.len()], params, None, 100, 5, 0.99);
            let incremental = modes
                .iter()
                .filter(|m| **m == Assigned::Incremental)
                .count();
            assert!(
                incremental * 2 > modes.len(),
                "most insertions are incremental: {modes:?}"
            );
        }
    }

    /// Two-view points: the views as seen from one seeded set, the low-passed from another,
    /// and a detail: a fifth of the points are blurred (little detail, and their low-passed
    /// view a slight turn of the one as seen). Rows: seen, low, detail.
    fn two_views(n: usize, dim: usize, seed: u64) -> (Vec<Vec<f32>>, usize) {
        let seen = clustered_with_noise(n, dim, seed);
        let low = clustered_with_noise(n, dim, seed + 1000);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut blurred = 0;
        let rows = seen
            .iter()
            .zip(low)
            .map(|(s, l)| {
                let (l, detail) = if rng.random_bool(0.2) {
                    blurred += 1;
                    let l = unit(
                        &s.iter()
                            .map(|x| x + rng.random_range(-0.01..0.01))
                            .collect::<Vec<_>>(),
                    );
                    (l, rng.random_range(0.0..LOW_PASS.blurred_below))
                } else {
                    (l, rng.random_range(LOW_PASS.blurred_below + 0.001..0.3))
                };
                s.iter().chain(&l).copied().chain([detail]).collect()
            })
            .collect();
        (rows, blurred)
    }

    const LOW_PASS: LowPassRule = LowPassRule {
        eps: 0.12,
        both_blurred_eps: 0.1,
        blurred_below: 0.015,
    };

    #[test]
    fn with_two_views_inserting_equals_a_full_run() {
        for (seed, min_points, min_ari) in [(51, 2, 1.0), (52, 2, 1.0), (53, 3, 0.99)] {
            let (v, blurred) = two_views(300, 32, seed);
            assert!(blurred > 30, "the data has blurred points");
            let params = ClusterParams {
                eps: 0.1,
                min_points,
                low_pass: Some(LOW_PASS),
            };
            let full = Clustering::full(matrix(&v), vec![None; v.len()], params, None);
            assert_eq!(
                (0..v.len()).filter(|&i| full.is_blurred(i)).count(),
                blurred,
                "seed {seed}: exactly the points with little detail are blurred"
            );
            let modes = insert_and_compare(&v, &vec![None; v.len()], params, None, 120, 9, min_ari);
            if min_points == 2 {
                assert!(
                    modes.iter().all(|m| *m == Assigned::Incremental),
                    "seed {seed}: {modes:?}"
                );
            }
        }
    }

    #[test]
    fn a_blurred_copy_joins_its_scene_by_the_low_passed_views_and_sharp_photos_never_do() {
        let dim = 8;
        let e = |k: usize| -> Vec<f32> { (0..dim).map(|i| f32::from(u8::from(i == k))).collect() };
        // `a + t·b`, normalised.
        let towards = |a: &[f32], b: &[f32], t: f32| -> Vec<f32> {
            unit(&a.iter().zip(b).map(|(a, b)| a + t * b).collect::<Vec<_>>())
        };
        let dist = |a: &[f32], b: &[f32]| 1.0 - pair_dot(a, b);
        let point = |seen: &[f32], low: &[f32], detail: f32| -> Vec<f32> {
            seen.iter().chain(low).copied().chain([detail]).collect()
        };
        let params = ClusterParams {
            eps: 0.1,
            min_points: 2,
            low_pass: Some(LOW_PASS),
        };
        // Scene A, two sharp shots; a blurred copy of it (little detail); scene B, sharp.
        let (a0, a1) = (e(0), towards(&e(0), &e(1), 0.2));
        let copy = towards(&e(0), &e(3), 1.3);
        let b = towards(&e(0), &e(4), 1.8);
        let (a0_low, a1_low) = (towards(&copy, &e(5), 0.45), towards(&copy, &e(6), 0.45));
        let b_low = towards(&a0_low, &e(7), 0.45);
        // As seen: A's shots together, the copy and B beyond eps of everything.
        assert!(dist(&a0, &a1) < 0.1);
        for (x, y) in [
            (&a0, &copy),
            (&a1, &copy),
            (&a0, &b),
            (&a1, &b),
            (&copy, &b),
        ] {
            assert!(dist(x, y) > 0.1);
        }
        // Low-passed: A's shots within the rule's eps of the copy, and B's of A's only.
        assert!(dist(&a0_low, &copy) < LOW_PASS.eps && dist(&a1_low, &copy) < LOW_PASS.eps);
        assert!(dist(&b_low, &a0_low) < LOW_PASS.eps && dist(&b_low, &copy) > LOW_PASS.eps);
        let v = vec![
            point(&a0, &a0_low, 0.1),
            point(&a1, &a1_low, 0.08),
            point(&copy, &copy, 0.01),
            point(&b, &b_low, 0.12),
        ];
        let c = Clustering::full(matrix(&v), vec![None; 4], params, None);
        assert_eq!(
            (0..4).map(|i| c.is_blurred(i)).collect::<Vec<_>>(),
            [false, false, true, false],
            "only the copy has little detail"
        );
        // The copy joins A by the low-passed views; B, sharp, is never compared so with A.
        assert_eq!(c.groups(), vec![vec![0, 1, 2], vec![3]]);
        // With one view the copy is alone: as seen it is beyond eps.
        let one_view = ClusterParams {
            low_pass: None,
            ..params
        };
        let seen: Vec<Vec<f32>> = v.iter().map(|p| p[..dim].to_vec()).collect();
        let plain = Clustering::full(matrix(&seen), vec![None; 4], one_view, None);
        assert_eq!(plain.groups(), vec![vec![0, 1], vec![2], vec![3]]);
        // Added one at a time, the same.
        let mut inc = Clustering::full(matrix(&v[..1]), vec![None], params, None);
        for p in &v[1..] {
            inc.insert(matrix(std::slice::from_ref(p)).view(), &[None]);
        }
        assert_eq!(inc.groups(), c.groups());
        // Heroes and near-duplicates measure the view as seen.
        assert_eq!(c.vector(2), &copy[..]);
        assert_eq!(c.dim(), 2 * dim + 1);
    }

    #[test]
    fn inserting_with_capture_times_equals_a_full_run() {
        let rule = TimeRule {
            burst_ms: 10_000,
            burst_eps: 0.25,
            apart_ms: 72 * 3600 * 1000,
            apart_eps: 0.05,
        };
        let v = clustered_with_noise(300, 32, 41);
        let mut rng = StdRng::seed_from_u64(41);
        // Some undated, the rest within a few days, so that bursts and far-apart pairs occur.
        let times: Vec<Option<i64>> = (0..v.len())
            .map(|_| {
                rng.random_bool(0.8)
                    .then(|| 1_700_000_000_000 + rng.random_range(0..5 * 86_400_000i64))
            })
            .collect();
        let params = ClusterParams {
            eps: 0.1,
            min_points: 2,
            low_pass: None,
        };
        let modes = insert_and_compare(&v, &times, params, Some(rule), 150, 10, 1.0);
        assert!(
            modes.iter().all(|m| *m == Assigned::Incremental),
            "{modes:?}"
        );
        // From one dated photo to two, the rule starts to apply: a full run.
        let mut one = Clustering::full(
            matrix(&v[..3]),
            vec![None, Some(0), None],
            params,
            Some(rule),
        );
        assert_eq!(
            one.insert(matrix(&v[3..4]).view(), &[Some(1_000)]),
            Assigned::Full(FullReason::TimeRule)
        );
    }

    #[test]
    fn a_bridge_merges_two_clusters_and_a_lone_point_stays_noise() {
        let params = ClusterParams {
            eps: 0.02,
            min_points: 2,
            low_pass: None,
        };
        let at = |deg: f32| unit(&[deg.to_radians().cos(), deg.to_radians().sin(), 0.0]);
        // cos distance of 10° ≈ 0.015: neighbours; 20° ≈ 0.06: not.
        let v = vec![at(0.0), at(10.0), at(30.0), at(40.0)];
        let mut c = Clustering::full(matrix(&v), vec![None; 4], params, None);
        assert_eq!(c.groups(), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(
            c.insert(
                matrix(&[at(20.0), unit(&[0.0, 0.0, 1.0])]).view(),
                &[None, None]
            ),
            Assigned::Incremental
        );
        assert_eq!(c.groups(), vec![vec![0, 1, 2, 3, 4], vec![5]]);
    }

    #[test]
    fn a_border_point_between_two_clusters_is_ambiguous_and_reclusters() {
        let params = ClusterParams {
            eps: 0.02,
            min_points: 4,
            low_pass: None,
        };
        let at = |deg: f32| unit(&[deg.to_radians().cos(), deg.to_radians().sin(), 0.0]);
        // eps 0.02 is about 11.48°. Two dense groups 22° apart; a point midway reaches one core
        // of each (11° away) and nothing else: three neighbours with itself, fewer than four,
        // so it is a border point either cluster could take.
        let v: Vec<Vec<f32>> = [0.0, 0.5, 1.0, 1.5, 23.5, 24.0, 24.5, 25.0]
            .into_iter()
            .map(at)
            .collect();
        let mut c = Clustering::full(matrix(&v), vec![None; 8], params, None);
        assert_eq!(c.groups(), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(
            c.insert(matrix(&[at(12.5)]).view(), &[None]),
            Assigned::Full(FullReason::Ambiguous)
        );
        let all = [v.clone(), vec![at(12.5)]].concat();
        let full = Clustering::full(matrix(&all), vec![None; 9], params, None);

        assert_eq!(c.groups(), full.groups());
    }
}
