//! Times the clustering of embeddings read from a `.npy` file (float32, C order, n × d) and
//! prints the result as one JSON object. Used by `scripts/bench_cluster.py`:
//!
//! ```text
//! cargo build --release -p media-clustering-actors --example bench_cluster
//! target/release/examples/bench_cluster emb.npy --eps 0.18 --min-points 2 --repeat 3 \
//!     --algos gram,linear,kdtree --labels-out labels.txt
//! ```
//!
//! `gram` is the project's `cluster()` (DBSCAN with `GramSearch`); `linear` and `kdtree` run
//! the same DBSCAN with linfa's `LinearSearch` and `KdTree`. Each timing covers one full
//! `cluster_with` call (copying the vectors into a matrix, DBSCAN, collecting the clusters).
//! `full` is the pipeline's full run (`Clustering::full`, which keeps neighbour counts);
//! `incremental` clusters all but the last `--add K` vectors (default 10) untimed, then times
//! inserting the last K into that clustering (`Clustering::insert`) and listing the clusters.
//! `--labels-out` writes one cluster label per line (noise points get their own label) from
//! the first algorithm. The file may also be given by the `BENCH_EMBEDDINGS` variable.
//! `--threads N` and `--block ROWS,COLS` run `gram` with a `GramSearch` configured so (for
//! tuning) instead of through `cluster()`.

use std::time::Instant;

use actors::algo::cluster::{ClusterParams, cluster, cluster_with};
use actors::algo::dbscan::Clustering;
use actors::algo::neighbours::GramSearch;
use linfa_nn::CommonNearestNeighbour;
use ndarray::{Array2, Axis};

struct Args {
    path: String,
    params: ClusterParams,
    repeat: usize,
    algos: Vec<String>,
    labels_out: Option<String>,
    /// Set by `--threads` / `--block`.
    gram: Option<GramSearch>,
    /// Vectors the `incremental` algorithm inserts.
    add: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut path = std::env::var("BENCH_EMBEDDINGS").ok();
    let mut params = ClusterParams {
        eps: 0.18,
        min_points: 2,
        low_pass: None,
    };
    let mut repeat = 3;
    let mut algos = vec!["gram".to_string()];
    let mut labels_out = None;
    let mut gram: Option<GramSearch> = None;
    let mut add = 10;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--eps" => params.eps = value("--eps")?.parse().map_err(|e| format!("--eps: {e}"))?,
            "--min-points" => {
                params.min_points = value("--min-points")?
                    .parse()
                    .map_err(|e| format!("--min-points: {e}"))?
            }
            "--repeat" => {
                repeat = value("--repeat")?
                    .parse()
                    .map_err(|e| format!("--repeat: {e}"))?
            }
            "--algos" => algos = value("--algos")?.split(',').map(str::to_string).collect(),
            "--labels-out" => labels_out = Some(value("--labels-out")?),
            "--add" => add = value("--add")?.parse().map_err(|e| format!("--add: {e}"))?,
            "--threads" => {
                let threads = value("--threads")?
                    .parse()
                    .map_err(|e| format!("--threads: {e}"))?;
                gram = Some(gram.unwrap_or_default().threads(threads));
            }
            "--block" => {
                let v = value("--block")?;
                let (r, c) = v.split_once(',').ok_or("--block ROWS,COLS")?;
                let parse = |x: &str| x.parse::<usize>().map_err(|e| format!("--block: {e}"));
                gram = Some(gram.unwrap_or_default().block_size(parse(r)?, parse(c)?));
            }
            _ if !arg.starts_with("--") => path = Some(arg),
            _ => return Err(format!("unknown option {arg}")),
        }
    }
    Ok(Args {
        path: path.ok_or("usage: bench_cluster FILE.npy [--eps E] [--min-points M] [--repeat R] [--algos gram,linear,kdtree] [--labels-out FILE]")?,
        params,
        repeat: repeat.max(1),
        algos,
        labels_out,
        gram,
        add,
    })
}

/// Reads a 2-D little-endian float32 C-order `.npy` file into rows.
fn read_npy(path: &str) -> Result<Vec<Vec<f32>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(format!("{path}: not a .npy file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header =
        std::str::from_utf8(&bytes[start..start + header_len]).map_err(|e| e.to_string())?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(format!(
            "{path}: need float32 little-endian C order, got {header}"
        ));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("no shape")?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e| format!("shape {shape}: {e}")))
        .collect::<Result<_, _>>()?;
    let [n, d] = dims[..] else {
        return Err(format!("{path}: need a 2-D array, got shape ({shape})"));
    };
    let data = &bytes[start + header_len..];
    if data.len() != n * d * 4 {
        return Err(format!(
            "{path}: {} data bytes for shape ({n}, {d})",
            data.len()
        ));
    }
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(values.chunks(d.max(1)).map(<[f32]>::to_vec).collect())
}

fn run(
    algo: &str,
    vectors: &[Vec<f32>],
    params: &ClusterParams,
    gram: Option<GramSearch>,
) -> Vec<Vec<usize>> {
    match (algo, gram) {
        ("gram", None) => cluster(vectors, params),
        ("gram", Some(search)) => cluster_with(vectors, params, search),
        (algo, _) => run_baseline(algo, vectors, params),
    }
}

fn matrix(vectors: &[Vec<f32>]) -> Array2<f32> {
    let flat: Vec<f32> = vectors.iter().flatten().copied().collect();
    Array2::from_shape_vec((vectors.len(), vectors[0].len()), flat).expect("rows of one length")
}

/// Times one algorithm's run; for `incremental`, only the insertion of the last `add`.
fn timed(args: &Args, algo: &str, vectors: &[Vec<f32>]) -> (f64, Vec<Vec<usize>>) {
    let p = args.params;
    match algo {
        "full" => {
            let start = Instant::now();
            let c = Clustering::full(matrix(vectors), vec![None; vectors.len()], p, None);
            let groups = c.groups();
            (start.elapsed().as_secs_f64(), groups)
        }
        "incremental" => {
            let split = vectors.len().saturating_sub(args.add);
            let mut c = Clustering::full(matrix(&vectors[..split]), vec![None; split], p, None);
            let new = matrix(&vectors[split..]);
            let start = Instant::now();
            let how = c.insert(new.view(), &vec![None; new.len_of(Axis(0))]);
            let groups = c.groups();
            let t = start.elapsed().as_secs_f64();
            eprintln!("incremental: {}", how.as_str());
            (t, groups)
        }
        _ => {
            let start = Instant::now();
            let groups = run(algo, vectors, &args.params, args.gram);
            (start.elapsed().as_secs_f64(), groups)
        }
    }
}

fn run_baseline(algo: &str, vectors: &[Vec<f32>], params: &ClusterParams) -> Vec<Vec<usize>> {
    match algo {
        "linear" => cluster_with(vectors, params, CommonNearestNeighbour::LinearSearch),
        "kdtree" => cluster_with(vectors, params, CommonNearestNeighbour::KdTree),
        other => panic!("unknown algorithm {other} (gram, linear, kdtree)"),
    }
}

fn median(times: &[f64]) -> f64 {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let m = t.len() / 2;
    if t.len() % 2 == 1 {
        t[m]
    } else {
        (t[m - 1] + t[m]) / 2.0
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_cluster: {e}");
            std::process::exit(2);
        }
    };
    let vectors = read_npy(&args.path).unwrap_or_else(|e| {
        eprintln!("bench_cluster: {e}");
        std::process::exit(2);
    });
    let mut results = Vec::new();
    let mut reference: Option<Vec<Vec<usize>>> = None;
    for algo in &args.algos {
        let mut times = Vec::new();
        let mut clusters = Vec::new();
        for _ in 0..args.repeat {
            let (t, groups) = timed(&args, algo, &vectors);
            clusters = groups;
            times.push(t);
        }
        let same = reference.as_ref().map(|r| *r == clusters);
        results.push(serde_json::json!({
            "algo": algo,
            "times_s": times,
            "median_s": median(&times),
            "clusters": clusters.len(),
            "multi_member_clusters": clusters.iter().filter(|c| c.len() > 1).count(),
            "singletons": clusters.iter().filter(|c| c.len() == 1).count(),
            "same_partition_as_first": same,
        }));
        if reference.is_none() {
            reference = Some(clusters);
        }
    }
    if let (Some(path), Some(clusters)) = (&args.labels_out, &reference) {
        let mut labels = vec![0usize; vectors.len()];
        for (label, members) in clusters.iter().enumerate() {
            for &i in members {
                labels[i] = label;
            }
        }
        let text: String = labels.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).expect("write labels");
    }
    let out = serde_json::json!({
        "n": vectors.len(),
        "dim": vectors.first().map_or(0, Vec::len),
        "eps_cosine": args.params.eps,
        "eps_l2": actors::algo::cluster::l2_for_cosine(args.params.eps),
        "min_points": args.params.min_points,
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "results": results,
    });
    println!("{out}");
}
