fn main() {
    return_large_buffers_to_the_system();
    if let Err(e) = media_clustering::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Image buffers (a decoded photo, its RGB and luminance copies: tens of MiB for a large
/// one) are allocated on whichever thread checks or embeds the photo. glibc's malloc raises
/// its mmap threshold after such a buffer is freed, so the next ones come from that thread's
/// arena and stay resident after they are freed, once per arena: the process grows past the
/// decoding budget (`server.decode_memory_budget_mib`) although never that much is in use at
/// once. A fixed threshold keeps every allocation of 4 MiB and more mmapped, returned to the
/// system when freed (a page-mapping call per large buffer, negligible beside decoding it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_buffers_to_the_system() {
    // SAFETY: mallopt only sets an allocator parameter; called first thing in main, before
    // any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers_to_the_system() {}
