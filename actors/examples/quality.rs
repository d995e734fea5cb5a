//! Prints the quality measures the hero score uses, for photos given as paths:
//! `cargo run -p media-clustering-actors --example quality -- photo.jpg ...`

fn main() {
    for path in std::env::args().skip(1) {
        let measured = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| actors::algo::decode::decode(&b, 50_000_000).map_err(|e| e.to_string()))
            .map(|img| actors::algo::quality::measure(&img));
        match measured {
            Ok(q) => println!(
                "{path}: sharpness {:.2} noise {:.2} exposure {:.3} pixels {}",
                q.sharpness, q.noise, q.exposure, q.pixels
            ),
            Err(e) => println!("{path}: {e}"),
        }
    }
}
