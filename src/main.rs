fn main() {
    if let Err(e) = media_clustering::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
