//! Stable cluster identities across re-clusterings.
//!
//! A new cluster keeps the id of the previous version's cluster it overlaps
//! most, when that overlap is more than half of both groups (so a cluster
//! that only gained or lost a few photos keeps its id). Each previous id is
//! given at most once, best overlaps first; split and merged groups, whose
//! overlap with any one old group is too small, get new ids.

use std::collections::HashMap;

use uuid::Uuid;

/// For each new cluster (a list of image ids), the previous `cluster_id` it keeps, if any.
///
/// Linear in the number of photos: each photo's previous cluster is looked up once, so only
/// pairs of clusters that share photos are compared.
pub fn match_clusters(previous: &[(Uuid, Vec<Uuid>)], new: &[Vec<Uuid>]) -> Vec<Option<Uuid>> {
    let owner: HashMap<&Uuid, usize> = previous
        .iter()
        .enumerate()
        .flat_map(|(pi, (_, m))| m.iter().map(move |id| (id, pi)))
        .collect();
    let mut pairs = Vec::new();
    for (ni, members) in new.iter().enumerate() {
        let mut overlaps: HashMap<usize, usize> = HashMap::new();
        for m in members {
            if let Some(&pi) = owner.get(m) {
                *overlaps.entry(pi).or_default() += 1;
            }
        }
        for (pi, overlap) in overlaps {
            if 2 * overlap > members.len() && 2 * overlap > previous[pi].1.len() {
                pairs.push((overlap, ni, pi));
            }
        }
    }
    // Largest overlap first; ties by position, so the result is deterministic.
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut out = vec![None; new.len()];
    let mut used = vec![false; previous.len()];
    for (_, ni, pi) in pairs {
        if out[ni].is_none() && !used[pi] {
            out[ni] = Some(previous[pi].0);
            used[pi] = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::new_v4()).collect()
    }

    #[test]
    fn added_photos_keep_the_cluster_id() {
        let (a, b, extra) = (ids(4), ids(3), ids(2));
        let (ca, cb) = (Uuid::new_v4(), Uuid::new_v4());
        let prev = vec![(ca, a.clone()), (cb, b.clone())];
        let new = vec![b.clone(), [a.clone(), extra.clone()].concat(), ids(1)];
        assert_eq!(match_clusters(&prev, &new), vec![Some(cb), Some(ca), None]);
    }

    #[test]
    fn a_merge_keeps_at_most_the_dominant_id() {
        let (a, b) = (ids(6), ids(2));
        let (ca, cb) = (Uuid::new_v4(), Uuid::new_v4());
        let prev = vec![(ca, a.clone()), (cb, b.clone())];
        // 6 of 8 come from a: more than half of both, so a's id survives; b's does not.
        assert_eq!(
            match_clusters(&prev, &[[a.clone(), b.clone()].concat()]),
            vec![Some(ca)]
        );
        // An even merge is a new group.
        let c = ids(6);
        let prev = vec![(ca, a.clone()), (cb, c.clone())];
        assert_eq!(match_clusters(&prev, &[[a, c].concat()]), vec![None]);
    }

    #[test]
    fn an_even_split_gives_new_ids() {
        let a = ids(6);
        let ca = Uuid::new_v4();
        let new = vec![a[..3].to_vec(), a[3..].to_vec()];
        assert_eq!(match_clusters(&[(ca, a)], &new), vec![None, None]);
    }
}
