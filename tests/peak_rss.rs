//! The process's peak RSS and its reset: alone in this test binary, since both are process-wide
//! and other tests running beside it would move them.

#[test]
fn the_peak_rss_can_be_reset_to_the_current_size() {
    // Touch 256 MiB and let it go: the peak stays up until reset.
    let v = vec![1u8; 256 << 20];
    std::hint::black_box(&v);
    drop(v);
    let high = tensorstream::peak_rss_bytes().unwrap();
    assert!(high >= 256 << 20, "peak {high}");
    assert!(tensorstream::reset_peak_rss(), "clear_refs refused");
    let low = tensorstream::peak_rss_bytes().unwrap();
    assert!(
        low + (192 << 20) < high,
        "peak {high} after the reset still {low}"
    );
}
